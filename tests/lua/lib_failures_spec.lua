-- How the Lua library meets failures: a ws call's nil, msg is raised, never
-- dropped; a failed sleep leaves the engine awake; cleanup frees what it can
-- and never replaces the error that stopped setup; bounds that depend on the
-- model are configuration errors.
local ws = require("ws")
local must = require("ws.errors").must
local config = require("ws.config")
local models = require("ws.models")
local lora = require("ws.lora")
local engine_mod = require("ws.engine")

local cpu = ws.device("cpu")
local spec = models.get("tiny")

describe("ws.errors.must", function()
    it("returns every result of a call that succeeded", function()
        local a, b, c = must("x", 1, 2, 3)
        assert.are.same({ 1, 2, 3 }, { a, b, c })
    end)

    it("raises the message, prefixed once with what failed", function()
        local ok, err = pcall(must, "engine", nil, "pool 'weights': out of memory", "nomem")
        assert.is_false(ok)
        assert.are.equal("engine: pool 'weights': out of memory", tostring(err))
        assert.are.equal("nomem", err.code)
        ok, err = pcall(must, "sleep", nil, "sleep: pool 'weights'", "nomem")
        assert.are.equal("sleep: pool 'weights'", tostring(err))
    end)

    it("raises on the nil, msg of a real ws call", function()
        local ok, err = pcall(must, "test", ws.tensor{ shape = { math.maxinteger // 8 },
                                                       dtype = "i64", device = "cpu",
                                                       name = "huge" })
        assert.is_false(ok)
        assert.matches("^test: ", tostring(err))
        assert.are.equal("nomem", err.code)
    end)
end)

describe("engine failures", function()
    it("raises when a pool's sleep fails, and stays awake", function()
        local e = engine_mod.new{ spec = spec, device = cpu, kv_cache_mb = 1 }
        local real = e.weights
        e.weights = setmetatable({
            sleep = function() return nil, "sleep(level=1) of pool 'weights': out of memory", "nomem" end,
        }, { __index = function(_, k) return function(_, ...) return real[k](real, ...) end end })
        local ok, err = pcall(e.sleep, e, 1, "step 1")
        e.weights = real
        assert.is_false(ok)
        assert.matches("pool 'weights': out of memory", tostring(err), 1, true)
        assert.is_false(e:is_asleep("weights"))
        assert.are.equal(0, real:stats().backup_bytes)
        assert.is_false(real:stats().asleep)
        e:free()
    end)

    it("keeps the error that stopped construction, and frees what it built", function()
        local methods = debug.getmetatable(ws.tensor{ shape = { 1 }, device = "cpu" }).__index
        local random_, calls = methods.random_, 0
        methods.random_ = function(t, ...)
            calls = calls + 1
            if calls == 3 then error("interrupted!", 0) end
            return random_(t, ...)
        end
        local held = cpu:memory().held
        local ok, err = pcall(engine_mod.new, { spec = spec, device = cpu, kv_cache_mb = 1 })
        methods.random_ = random_
        assert.is_false(ok)
        assert.are.equal("interrupted!", err)
        assert.are.equal(held, cpu:memory().held)
    end)

    it("free() frees every part before raising the first failure", function()
        local e = engine_mod.new{ spec = spec, device = cpu, kv_cache_mb = 1 }
        local name = e.order[1]
        local real = e.tensors[name]
        e.tensors[name] = { free = function() error("cannot free " .. name, 0) end }
        local ok, err = pcall(e.free, e)
        assert.is_false(ok)
        assert.are.equal("cannot free " .. name, err)
        assert.is_nil(e.weights)
        assert.is_nil(e.kv_pool)
        real:free()
    end)
end)

describe("configuration bounds", function()
    it("bounds the LoRA rank by the smallest targeted layer", function()
        local ok, err = pcall(lora.check_rank, spec, lora.config{ r = 33 })
        assert.is_false(ok)
        assert.are.equal("LoRA rank 33 is larger than the smallest targeted layer (k_proj [32, 99]); "
                         .. "the rank must be <= 32", tostring(err))
        lora.check_rank(spec, lora.config{ r = 32 })
        lora.check_rank(spec, lora.config{ r = 64, target_modules = "q_proj" })
        assert.has_error(function() lora.check_rank(spec, lora.config{ r = 65, target_modules = "q_proj" }) end)
    end)

    it("rejects a LoRA alpha that is not > 0", function()
        for _, a in ipairs({ 0, -16, 0 / 0, math.huge }) do
            assert.has_error(function() lora.config{ r = 4, alpha = a } end)
        end
        assert.are.equal(2, lora.config{ r = 4, alpha = 8 }.scale)
    end)

    it("supports an exclusive minimum", function()
        local schema = { a = { default = 1, type = "number", above = 0 } }
        assert.are.equal(0.5, config.resolve(schema, { a = "0.5" }).a)
        local ok, err = pcall(config.resolve, schema, { a = 0 })
        assert.is_false(ok)
        assert.are.equal("config key 'a' must be > 0, got 0", tostring(err))
    end)

    it("agreement costs nothing in a world of one", function()
        -- no collective, no tensor: a single process never waits on a peer
        local lonely = setmetatable({ size = 1 }, { __index = function(_, k)
            error("config.agree used comm." .. k .. " in a world of one")
        end })
        local held = cpu:memory().held
        assert.is_nil(config.agree(nil, { steps = 2 }, {}, "x"))
        assert.is_nil(config.agree(lonely, { steps = 2 }, {}, "x"))
        assert.is_nil(config.agree(ws.comm(), { steps = 2 }, {}, "x"))
        assert.are.equal(held, cpu:memory().held)
    end)
end)
