-- pool_bytes_spec.lua: pool sizing and the bucket default come from C, so the
-- Lua library never restates the allocator's alignment or the engine's default.
local ws = require "ws"
local models = require "ws.models"
local lora = require "ws.lora"
local trainer_mod = require "ws.trainer"
local engine_mod = require "ws.engine"
local sync_mod = require "ws.sync"
local pipeline = require "ws.pipeline"

local cpu = ws.device("cpu")
local spec = models.get("tiny")

describe("ws.pool_bytes", function()
  it("is what the pool carves for the tensors, each rounded up to 256 bytes", function()
    local shapes = {{3, 5}, {129}, {0}, {256}, {2, 2, 2}}
    -- f32: 60 -> 256, 516 -> 768, 0 -> 0, 1024 -> 1024, 32 -> 256
    local bytes = ws.pool_bytes(shapes, "f32")
    assert.are.equal(2304, bytes)
    local p = assert(ws.pool{device = cpu, tag = "sized", bytes = bytes})
    local ts = {}
    for i, s in ipairs(shapes) do ts[i] = assert(p:tensor{shape = s, dtype = "f32"}) end
    assert.are.equal(bytes, p:stats().used)
    for _, t in ipairs(ts) do t:free() end
    p:free()
  end)

  it("counts the dtype's element size", function()
    assert.are.equal(1024, ws.pool_bytes({{1000}}, "fp8"))
    assert.are.equal(2048, ws.pool_bytes({{1000}}, "bf16"))
    assert.are.equal(4096, ws.pool_bytes({{1000}}, "float32"))
    assert.are.equal(8192, ws.pool_bytes({{1000}}, "i64"))
  end)

  it("sizes a pool that holds exactly those tensors", function()
    -- 32 tensors of 258 bytes take 512 each: 16 KiB, a whole number of pages,
    -- where the bytes themselves (8256) would not hold them.
    local shapes = {}
    for i = 1, 32 do shapes[i] = {129} end
    local bytes = ws.pool_bytes(shapes, "bf16")
    assert.are.equal(16384, bytes)
    local p = assert(ws.pool{device = cpu, tag = "exact", bytes = bytes})
    local ts = {}
    for i = 1, 32 do ts[i] = assert(p:tensor{shape = {129}, dtype = "bf16", name = "t" .. i}) end
    assert.are.equal(bytes, p:stats().used)
    assert.are.equal(bytes, p:stats().capacity) -- cpu pools round to 4 KiB pages
    local t, msg, code = p:tensor{shape = {1}, dtype = "bf16", name = "one more"}
    assert.is_nil(t)
    assert.are.equal("nomem", code)
    assert.matches("pool 'exact' is full", msg, 1, true)
    for _, x in ipairs(ts) do x:free() end
    p:free()
  end)

  it("is never 0, so it is always a valid pool size", function()
    for _, shapes in ipairs({{}, {{0}}, {{4, 0}}}) do
      local bytes = ws.pool_bytes(shapes, "bf16")
      assert.is_true(bytes > 0)
      assert(ws.pool{device = cpu, bytes = bytes}):free()
    end
  end)

  it("raises on misuse, naming the bad argument", function()
    local function err_of(...)
      local ok, err = pcall(ws.pool_bytes, ...)
      assert.is_false(ok)
      return tostring(err)
    end
    assert.matches("ws.pool_bytes: unknown dtype 'f8'", err_of({{2}}, "f8"), 1, true)
    assert.matches("shapes[2]: shape must be a table of integers, got number",
                   err_of({{2}, 3}, "bf16"), 1, true)
    assert.matches("shapes[1]: shape[2] = -1: dimensions must be >= 0", err_of({{2, -1}}, "bf16"),
                   1, true)
    assert.matches("shapes[1]: shape[1] must be an integer, got number", err_of({{1.5}}, "bf16"),
                   1, true)
    assert.matches("shapes[1] is too large", err_of({{1 << 40, 1 << 40}}, "bf16"), 1, true)
    assert.matches("add up to more than any pool holds", err_of({{1 << 61}, {1 << 61}}, "f32"),
                   1, true)
    assert.has_error(function() ws.pool_bytes("shapes", "bf16") end)
    assert.has_error(function() ws.pool_bytes({{2}}) end)
  end)

  it("sizes the engine's and the trainer's pools to exactly their tensors", function()
    local lcfg = lora.config{ r = 4 }
    for _, dtype in ipairs({ "bf16", "f32" }) do
      local tr = trainer_mod.new{ spec = spec, lora = lcfg, device = cpu, dtype = dtype,
                                  rank = 1, world = 3 }
      assert.are.equal(tr.pool_bytes, tr.pool:stats().used)
      tr:free()
    end
    local en = engine_mod.new{ spec = spec, lora = lcfg, device = cpu, kv_cache_mb = 1 }
    assert.are.equal(en.weight_bytes, en.weights:stats().used)
    assert.are.equal(en.kv_bytes, en.kv_pool:stats().used)
    en:free()
  end)
end)

describe("ws.DEFAULT_BUCKET_BYTES", function()
  it("is the bucket of a plan made without one, and of a pipeline's sync by default", function()
    local mib = ws.DEFAULT_BUCKET_BYTES // (1 << 20)
    assert.is_true(mib >= 1)
    local plan = ws.plan{ device = cpu, name = "d" }
    assert.matches(string.format("bucket %d KiB", ws.DEFAULT_BUCKET_BYTES >> 10), tostring(plan),
                   1, true)
    plan:free()
    assert.are.equal(mib, pipeline.common.bucket_mb.default)
    assert.is_true(math.type(pipeline.common.bucket_mb.default) == "integer")
    local tr = trainer_mod.new{ spec = spec, device = cpu }
    local en = engine_mod.new{ spec = spec, device = cpu, kv_cache_mb = 1 }
    local s = sync_mod.new{ trainer = tr, engine = en, device = cpu, progress = "off" }
    assert.matches(string.format("bucket %d KiB", ws.DEFAULT_BUCKET_BYTES >> 10),
                   tostring(s:build("base")), 1, true)
    s:free(); en:free(); tr:free()
  end)
end)
