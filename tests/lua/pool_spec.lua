-- pool_spec.lua: sleepable pools (ws.pool, ws.Pool) on the cpu: stable
-- addresses, level-1 backup, level-2 discard errors, memory really returned.
local ws = require "ws"

local MiB = 1024 * 1024

local function new_pool(bytes, tag)
  return assert(ws.pool{device = "cpu", tag = tag or "weights", bytes = bytes})
end

describe("ws.pool", function()
  it("validates its options", function()
    local ok, err = pcall(ws.pool, {device = "cpu", bytes = MiB, size = 1})
    assert.is_false(ok)
    assert.matches("unknown option 'size'", err, 1, true)
    assert.has_error(function() ws.pool{device = "cpu", bytes = -1} end)
    assert.has_error(function() ws.pool{device = "cpu"} end)
    local p, msg, code = ws.pool{device = "cuda:7", bytes = MiB}
    if not p then
      assert.are.equal("device", code)
      assert.is_string(msg)
    end
  end)

  it("a pool the machine cannot back: nil, a message saying each thing once, nomem", function()
    local p, msg, code = ws.pool{device = "cpu", tag = "kv_cache", bytes = 1 << 46}
    assert.is_nil(p)
    assert.are.equal("nomem", code)
    -- the call, what it was doing to which pool, the device, the cause
    assert.matches("^ws%.pool: creating pool 'kv_cache': cpu: %a", msg)
    assert.is_nil(msg:find("cpu: cpu", 1, true))
    local ok, err = pcall(require("ws.errors").must, "engine",
                          ws.pool{device = "cpu", tag = "kv_cache", bytes = 1 << 46})
    assert.is_false(ok)
    assert.matches("^engine: ws%.pool: creating pool 'kv_cache': cpu: %a", tostring(err))
  end)

  it("carves tensors and reports stats", function()
    local p = new_pool(4 * MiB)
    local st = p:stats()
    assert.is_true(st.capacity >= 4 * MiB)
    assert.are.equal(0, st.used)
    assert.is_false(st.asleep)
    assert.are.equal(0, st.sleeps)
    assert.are.equal(0, st.last_level)
    local t = p:tensor{shape = {256, 256}, dtype = "bf16", name = "w"}
    assert.is_true(p:stats().used >= 256 * 256 * 2)
    assert.are.equal("cpu", t:device().name)
    assert.matches("ws.Pool%('weights' cpu", tostring(p))
    assert.are.equal("weights", p:tag())
    local ok, err = pcall(p.tensor, p, {shape = {2}, pool = p})
    assert.is_false(ok)
    assert.matches("unknown option 'pool'", err, 1, true)
  end)

  it("sleep(1) then wake restores the data at the same address", function()
    local p = new_pool(4 * MiB)
    local t = p:tensor{shape = {1000}, name = "w"}
    t:random_(5)
    local sum = t:checksum()
    local view = t:narrow(1, 10, 5)
    assert.is_true(p:sleep(1, "step 1"))
    local st = p:stats()
    assert.is_true(st.asleep)
    assert.are.equal(1, st.last_level)
    assert.are.equal(1, st.sleeps)
    assert.is_true(st.backup_bytes >= 4000)
    assert.is_true(p:wake())
    assert.is_false(p:stats().asleep)
    assert.are.equal(sum, t:checksum())
    assert.are.equal(t:get(10), view:get(1))
  end)

  it("sleep(2) discards: reading raises naming tensor, pool and sleep", function()
    local p = new_pool(4 * MiB, "kv")
    local t = p:tensor{shape = {64}, name = "layer0.k"}
    t:fill(1)
    p:sleep(2, "step 4")
    local ok, err = pcall(t.checksum, t)
    assert.is_false(ok)
    assert.matches("'layer0.k'", err, 1, true)
    assert.matches("'kv'", err, 1, true)
    p:wake()
    ok, err = pcall(t.get, t, 1)
    assert.is_false(ok)
    assert.matches("'layer0.k'", err, 1, true)
    assert.matches("'kv'", err, 1, true)
    assert.matches("sleep", err, 1, true)
    assert.matches("level=2", err, 1, true)
    -- writing makes it readable again
    t:fill(3)
    assert.are.equal(3, t:get(64))
  end)

  it("sleep gives the memory back (RSS drops)", function()
    local bytes = 256 * MiB
    local p = new_pool(bytes, "big")
    local t = p:tensor{shape = {bytes // 4}, name = "big.w"}
    t:fill(1)
    local rss_awake = ws.host_memory().rss
    p:sleep(2)
    local rss_asleep = ws.host_memory().rss
    assert.is_true(rss_awake - rss_asleep > 200 * MiB,
      string.format("rss %d -> %d", rss_awake, rss_asleep))
    assert.is_true(p:stats().mapped < bytes)
    p:wake()
    t:free()
    p:free()
  end)

  it("sleep(1) keeps its backup buffer and still returns the pool's pages", function()
    local bytes = 64 * MiB
    local p = new_pool(bytes, "kept")
    local t = p:tensor{shape = {bytes // 2}, dtype = "bf16", name = "kept.w"}
    t:random_(9)
    local sum = t:checksum()
    assert.is_true(p:sleep(1))
    assert.is_true(p:wake())
    local st = p:stats()
    assert.are.equal(bytes, st.backup_cached)
    assert.are.equal(0, st.backup_bytes)
    local rss_awake = ws.host_memory().rss
    assert.is_true(p:sleep(1))
    local rss_asleep = ws.host_memory().rss
    assert.is_true(rss_awake - rss_asleep > 60 * MiB,
      string.format("rss %d -> %d", rss_awake, rss_asleep))
    assert.are.equal(0, p:stats().mapped)
    assert.is_true(p:wake())
    assert.are.equal(sum, t:checksum())
    t:free()
    p:free()
  end)

  it("free refuses while tensors live and is idempotent after", function()
    local p = new_pool(MiB)
    local t = p:tensor{shape = {16}, name = "alive"}
    local ok, err = pcall(p.free, p)
    assert.is_false(ok)
    assert.matches("alive", err, 1, true)
    t:free()
    p:free()
    p:free()
    assert.are.equal("ws.Pool('weights' freed)", tostring(p))
    assert.has_error(function() p:stats() end)
  end)

  it("validates sleep levels", function()
    local p = new_pool(MiB)
    assert.has_error(function() p:sleep(3) end)
    assert.has_error(function() p:sleep("deep") end)
  end)
end)
