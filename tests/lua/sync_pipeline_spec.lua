-- The pipeline runner under failure: configuration edge cases are config
-- errors (one line, exit 2 from the command line), and a run that fails in
-- setup or in a step frees the trainer, the engine, the plans and their
-- pools at once (not at the next garbage collection) and says which step.
local ws = require("ws")
local config = require("ws.config")
local lora = require("ws.lora")
local engine_mod = require("ws.engine")
local models = require("ws.models")

local P = dofile("pipelines/verl_lora.lua")
local tiny = { model = "tiny", steps = 3, kv_cache_mb = 1, progress = "off" }

local function with(extra)
    local c = {}
    for k, v in pairs(tiny) do c[k] = v end
    for k, v in pairs(extra or {}) do c[k] = v end
    return c
end

local function held() return ws.default_device():memory().held end

-- Runs fn with the collector stopped, so memory only comes back if freed explicitly.
local function no_gc(fn)
    collectgarbage("collect")
    collectgarbage("stop")
    local ok, err = pcall(fn)
    collectgarbage("restart")
    if not ok then error(err, 0) end
end

local function config_message(fn)
    local ok, err = pcall(fn)
    assert.is_false(ok, "expected an error")
    assert.is_true(config.is_error(err), "expected a config error, got " .. tostring(err))
    return tostring(err)
end

describe("pipeline configuration edge cases", function()
    it("rejects an empty or repeated --json", function()
        assert.are.equal("--json needs a file name",
                         config_message(function() config.parse(P.schema, { "--json=" }) end))
        assert.are.equal("--json given twice", config_message(function()
            config.parse(P.schema, { "--json", "a.jsonl", "--json=b.jsonl" })
        end))
    end)

    it("bounds sizes so they cannot overflow later", function()
        assert.are.equal("config key 'bucket_mb' must be <= 1048576, got 1e+308",
                         config_message(function() P.run(with{ bucket_mb = "1e308" }) end))
        assert.are.equal("config key 'kv_cache_mb' must be <= 1048576, got 9000000000000000",
                         config_message(function() P.run(with{ kv_cache_mb = "9000000000000000" }) end))
        assert.are.equal("config key 'lora_alpha' expects a finite number, got '1e999'",
                         config_message(function() P.run(with{ lora_alpha = "1e999" }) end))
    end)

    it("checks target_modules even when LoRA is off", function()
        assert.truthy(config_message(function()
            P.run(with{ lora_rank = 0, target_modules = "q_proj,qkv" })
        end):find("config key 'target_modules': unknown LoRA target module 'qkv'", 1, true))
        assert.is_nil(lora.config{ r = 0, target_modules = "" })
        assert.is_nil(lora.config{ r = 0, target_modules = " q_proj , v_proj " })
    end)

    it("makes an unwritable --json a config error, before allocating anything", function()
        no_gc(function()
            local base = held()
            local msg = config_message(function()
                P.run(tiny, { quiet = true, json = "/nonexistent-dir/x.jsonl" })
            end)
            assert.are.equal("--json: cannot write /nonexistent-dir/x.jsonl: No such file or directory", msg)
            assert.are.equal(base, held())
        end)
    end)
end)

describe("pipeline failures", function()
    it("free everything built when setup fails", function()
        no_gc(function()
            local base = held()
            local bad = P:with{ name = "bad_plans", plans = { "base", "bogus" } }
            local ok, err = pcall(bad.run, tiny, { quiet = true })
            assert.is_false(ok)
            assert.truthy(tostring(err):find("unknown plan kind 'bogus'", 1, true), tostring(err))
            assert.are.equal(base, held())
        end)
    end)

    it("shows a policy's own phase in the table and the summary, and only phases used", function()
        local scored = P:with{ name = "scored" }
        function scored:step(ctx, step)
            P.step(self, ctx, step)
            ctx:phase("score", function() end)
        end
        local lines = {}
        local recs, summary = scored.run(tiny, { log = function(msg)
            for l in (msg .. "\n"):gmatch("(.-)\n") do lines[#lines + 1] = l end
        end })
        local header = lines[1]
        for _, l in ipairs(lines) do if l:match("^#%s*step ") then header = l end end
        assert.truthy(header:find(" score ", 1, true), header)
        assert.falsy(header:find("offload", 1, true), header) -- param_offload=false: never ran
        assert.is_number(recs[1].phase_ms.score)
        assert.is_number(summary.phase_ms.score)
        local in_summary = false
        for _, l in ipairs(lines) do if l:match("^  score ") then in_summary = true end end
        assert.is_true(in_summary)
    end)

    it("free everything and name the step when a step fails", function()
        no_gc(function()
            local base = held()
            local bad = P:with{ name = "bad_step", step = function(_, ctx, step)
                ctx:send("base")
                if step == 2 then error("policy broke", 0) end
            end }
            local ok, err = pcall(bad.run, tiny, { quiet = true })
            assert.is_false(ok)
            assert.are.equal("bad_step: step 2 failed: policy broke", tostring(err))
            -- An adapter send with LoRA off says what to change.
            local adapter = P:with{ name = "adapter_only",
                                    step = function(_, ctx) ctx:send("adapter") end }
            ok, err = pcall(adapter.run, with{ lora_rank = 0 }, { quiet = true })
            assert.is_false(ok)
            assert.truthy(tostring(err):find("adapter_only: step 1 failed: .*set lora_rank > 0"),
                          tostring(err))
            assert.are.equal(base, held())
        end)
    end)

    it("engine construction that fails part way frees its first pool", function()
        no_gc(function()
            local base = held()
            local ok, err = pcall(engine_mod.new, { spec = models.get("tiny"), device = ws.device("cpu"),
                                                    kv_cache_mb = 2 ^ 40 // 1 })
            assert.is_false(ok)
            assert.truthy(tostring(err):find("kv_cache", 1, true), tostring(err))
            assert.are.equal(base, held())
        end)
    end)
end)
