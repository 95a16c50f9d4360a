-- pool_guard_spec.lua: nothing reaches a sleeping pool's memory. Collectives,
-- batches and copies that would write into (or read from) a tensor of a
-- sleeping pool raise naming the tensor and the pool; a pool a running sync
-- plan or an in-flight request uses refuses to sleep or be freed, even from a
-- progress callback; a pool larger than memory is refused with "nomem".
local ws = require "ws"

local MiB = 1024 * 1024

local function pool(tag, bytes)
  return assert(ws.pool{device = "cpu", tag = tag, bytes = bytes or 4 * MiB})
end

-- Runs f, which must raise a message containing every needle.
local function raises(f, ...)
  local ok, err = pcall(f)
  assert.is_false(ok, "expected an error")
  err = tostring(err)
  for _, needle in ipairs{...} do assert.matches(needle, err, 1, true) end
  return err
end

describe("a sleeping pool", function()
  local comm = ws.comm()
  local n = 1024

  for _, level in ipairs{1, 2} do
    it("is never written by a collective (level " .. level .. ")", function()
      local p = pool("engine")
      local recv = p:tensor{shape = {n * comm.size}, dtype = "f32", name = "gathered"}
      local piece = p:tensor{shape = {n}, dtype = "f32", name = "piece"}
      local send = ws.tensor{shape = {n}, dtype = "f32", fill = 1}
      local big = ws.tensor{shape = {n * comm.size}, dtype = "f32", fill = 1}
      assert(p:sleep(level))
      local asleep = "the pool is asleep"
      raises(function() comm:all_gather(send, recv) end, "all_gather recv", "'gathered'",
             "pool 'engine'", asleep)
      raises(function() comm:all_gather_async(send, recv):wait() end, "'gathered'", asleep)
      raises(function() comm:all_gather(send, {piece}) end, "'piece'", "pool 'engine'", asleep)
      raises(function() comm:reduce_scatter(big, piece) end, "reduce_scatter recv", "'piece'",
             asleep)
      raises(function() comm:reduce_scatter_async(big, piece):wait() end, "'piece'", asleep)
      raises(function() comm:all_reduce(piece) end, "all_reduce", "'piece'", "pool 'engine'")
      raises(function() comm:broadcast(piece, 0) end, "broadcast", "'piece'", "pool 'engine'")
      -- and never read as a source either
      raises(function() comm:all_gather(piece, big) end, "all_gather send", "'piece'")
      -- batches and copies
      raises(function() ws.pack(recv, {send}) end, "pack flat", "'gathered'", asleep)
      raises(function() ws.unpack(big, {piece}) end, "unpack dst 1", "'piece'", asleep)
      raises(function() ws.copy_many({piece}, {send}) end, "copy_many dst 1", "'piece'", asleep)
      raises(function() piece:copy_(send) end, "copy_ dst", "'piece'", asleep)
      raises(function() piece:fill(0) end, "fill", "'piece'", asleep)
      raises(function() piece:set(1, 0) end, "set", "'piece'", asleep)
      -- awake again, everything works and lands where it should
      assert(p:wake())
      comm:all_gather(send, recv)
      assert.are.equal(1, recv:get(n * comm.size))
      recv:free()
      piece:free()
      p:free()
    end)
  end

  it("stays mapped while an async collective into it is in flight", function()
    local p = pool("engine")
    local recv = p:tensor{shape = {n * comm.size}, dtype = "f32", name = "gathered"}
    local send = ws.tensor{shape = {n}, dtype = "f32", fill = 3}
    local req = comm:all_gather_async(send, recv)
    raises(function() p:sleep(2) end, "sleep: pool 'engine' is in use by an async all_gather")
    raises(function() p:free() end, "free: pool 'engine' is in use by an async all_gather")
    req:wait()
    assert.are.equal(3, recv:get(1))
    assert(p:sleep(2))
    assert(p:wake())
    recv:free()
    p:free()
  end)
end)

describe("a sync plan's progress callback", function()
  -- Two pools of 8 tensors; a bucket per tensor, so the callback runs
  -- between copies that still have to reach both pools.
  local count, numel = 8, 65536
  local function setup()
    local sp, dp = pool("trainer", 8 * MiB), pool("engine", 8 * MiB)
    local srcs, dsts = {}, {}
    for i = 1, count do
      srcs[i] = sp:tensor{shape = {numel}, dtype = "f32", name = "s" .. i, fill = i}
      dsts[i] = dp:tensor{shape = {numel}, dtype = "bf16", name = "d" .. i}
    end
    local plan = ws.plan{bucket_bytes = numel * 2, name = "base"}
    plan:add(srcs, dsts)
    return sp, dp, srcs, dsts, plan
  end

  local function check_synced(dsts)
    for i = 1, count do
      assert.are.equal(i, dsts[i]:get(1))
      assert.are.equal(i, dsts[i]:get(numel))
    end
  end

  for _, case in ipairs{
    {"sleeps the source pool", function(sp) return sp:sleep(1) end, "pool 'trainer'"},
    {"sleeps the source pool, level 2", function(sp) return sp:sleep(2) end, "pool 'trainer'"},
    {"sleeps the destination pool", function(_, dp) return dp:sleep(1) end, "pool 'engine'"},
    {"sleeps the destination pool, level 2", function(_, dp) return dp:sleep(2) end,
     "pool 'engine'"},
    {"frees the source pool", function(sp) return sp:free() end, "pool 'trainer'"},
    {"frees the destination pool", function(_, dp) return dp:free() end, "pool 'engine'"},
  } do
    local name, act, pool_name = case[1], case[2], case[3]
    it("cannot pull memory from under the plan when it " .. name, function()
      local sp, dp, _, dsts, plan = setup()
      local calls, err = 0, nil
      plan:execute(function(k)
        calls = calls + 1
        if k == 2 then
          local ok, e = pcall(act, sp, dp)
          assert.is_false(ok, "the pool must refuse while the plan runs")
          err = e
        end
      end)
      assert.are.equal(count, calls)
      assert.matches(pool_name .. " is in use by plan 'base' (executing)", err, 1, true)
      check_synced(dsts)
      -- Once the plan is done the pools behave as ever.
      assert(dp:sleep(2))
      assert(dp:wake())
      assert(sp:sleep(1))
      assert(sp:wake())
      plan:free()
    end)
  end

  it("may wake an awake pool and free tensors; the plan keeps its own", function()
    local sp, dp, srcs, dsts, plan = setup()
    plan:execute(function(k)
      if k == 1 then
        assert(sp:wake())
        assert(dp:wake())
        srcs[count]:free()
        dsts[count]:free()
      end
    end)
    for i = 1, count - 1 do assert.are.equal(i, dsts[i]:get(1)) end
    plan:free()
  end)

  it("raising still releases the pools", function()
    local _, dp, _, _, plan = setup()
    raises(function() plan:execute(function() error("stop here") end) end, "stop here")
    assert(dp:sleep(2))
    raises(function() plan:execute() end, "plan 'base': entry 1", "pool 'engine'")
    assert(dp:wake())
    plan:execute()
    plan:free()
  end)
end)

describe("a pool larger than memory", function()
  it("is refused with nomem naming the pool and the size", function()
    -- Far above what the machine has: nothing is touched, the map is refused.
    local total = ws.device("cpu"):memory().total
    local bytes = 4 * total
    local p, msg, code = ws.pool{device = "cpu", tag = "kv_cache", bytes = bytes}
    assert.is_nil(p)
    assert.are.equal("nomem", code)
    assert.matches("pool 'kv_cache'", msg, 1, true)
    assert.matches("(" .. bytes .. " bytes)", msg, 1, true)
    -- and the process is fine afterwards
    local q = pool("small")
    q:tensor{shape = {16}, fill = 1}
  end)
end)

describe("integer elements", function()
  it("refuse values they cannot hold, naming the value and the dtype", function()
    local i32 = ws.tensor{shape = {4}, dtype = "i32", name = "counts", fill = 7}
    local u8 = ws.tensor{shape = {4}, dtype = "u8", name = "mask", fill = 7}
    local i64 = ws.tensor{shape = {4}, dtype = "i64", name = "ids", fill = 7}
    raises(function() i32:set(1, 2^40) end,
           "set: value 1099511627776 is out of range for i32 (-2147483648 to 2147483647)",
           "'counts'")
    raises(function() i32:set(1, 1 << 40) end, "value 1099511627776 is out of range for i32")
    raises(function() u8:set(1, -1) end, "set: value -1 is out of range for u8 (0 to 255)",
           "'mask'")
    raises(function() i64:set(1, 1.5) end, "set: value 1.5 is not an integer", "'ids'",
           "holds i64")
    raises(function() i64:set(1, 2^63) end, "is out of range for i64")
    raises(function() i32:set(1, 0/0) end, "value nan is not an integer")
    raises(function() i32:fill(2^31) end, "fill: value 2147483648 is out of range for i32")
    raises(function() u8:fill(2.5) end, "fill: value 2.5 is not an integer")
    raises(function() ws.tensor{shape = {2}, dtype = "u8", fill = 300} end,
           "value 300 is out of range for u8")
    -- fill travels as a double: an i64 it cannot hold is refused, not rounded
    raises(function() i64:fill((1 << 62) + 3) end,
           "fill: value 4611686018427387907 cannot be filled exactly into i64")
    raises(function() ws.tensor{shape = {2}, dtype = "i64", fill = math.maxinteger} end,
           "cannot be filled exactly into i64")
    for i = 1, 4 do
      assert.are.equal(7, i32:get(i))
      assert.are.equal(7, u8:get(i))
      assert.are.equal(7, i64:get(i))
    end
    local big = ws.tensor{shape = {2}, dtype = "i64", fill = 1 << 62}
    assert.are.equal(1 << 62, big:get(2))
    big:fill(-(1 << 53) - 2)
    assert.are.equal(-(1 << 53) - 2, big:get(1))
    -- exact values still go in, at both ends of each range
    i32:set(1, -2147483648):set(2, 2147483647):set(3, 3.0)
    u8:set(1, 0):set(2, 255)
    i64:set(1, math.mininteger):set(2, math.maxinteger):set(3, -2.0^63)
    assert.are.equal(-2147483648, i32:get(1))
    assert.are.equal(2147483647, i32:get(2))
    assert.are.equal(3, i32:get(3))
    assert.are.equal(255, u8:get(2))
    assert.are.equal(math.maxinteger, i64:get(2))
    assert.are.equal(math.mininteger, i64:get(3))
    -- float dtypes round as before
    local f = ws.tensor{shape = {1}, dtype = "bf16"}:set(1, 1.001)
    assert.are.equal(1, f:get(1))
  end)
end)
