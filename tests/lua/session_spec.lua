-- ws.session: the same policy file on the caller's tensors. Here the
-- "caller" is this spec: plain ws tensors stand for an embedding program's
-- memory (the Python tests do the same with PyTorch's), the callbacks are
-- Lua functions. What users rely on: the engine ends up holding exactly the
-- trainer's weights in its own layout, every mismatch is named before any
-- byte moves, and a policy that skips the base after a level-2 sleep fails
-- before the rollout.
local ws = require("ws")
local session = require("ws.session")

local cfg = { model = "tiny", steps = 3, lora_rank = 4, lora_alpha = 8, progress = "off" }

local function with(extra)
    local c = {}
    for k, v in pairs(cfg) do c[k] = v end
    for k, v in pairs(extra or {}) do c[k] = v end
    return c
end

-- A session with every tensor registered: trainer and adapter tensors
-- seeded by name, engine tensors zero (or allocated by wshost). Returns the
-- session and the caller's tensors by role and name.
local function setup(extra, opts)
    opts = opts or {}
    local S = session.open(opts.pipeline or "pipelines/verl_lora.lua", with(extra),
                           { quiet = true })
    local mine = { trainer = {}, adapter = {}, engine = {} }
    for _, role in ipairs({ "trainer", "adapter", "engine" }) do
        for i, e in ipairs(S:expected(role)) do
            local t
            if role == "engine" and opts.alloc then
                t = S:alloc(e.name, e.shape, "bf16")
                t:fill(0)
            else
                t = ws.tensor{ shape = e.shape, dtype = "bf16", name = "caller " .. e.name }
                if role == "engine" then t:fill(0) else t:random_(100 + i, 0.02) end
                S:add(role, e.name, t)
            end
            mine[role][e.name] = t
        end
    end
    -- The caller's optimizer: new adapter values every step.
    S:on("train", function(step)
        local i = 0
        for _, t in pairs(mine.adapter) do
            i = i + 1
            t:random_(1000 * step + i, 0.01)
        end
    end)
    return S, mine
end

local function err_of(fn, ...)
    local ok, err = pcall(fn, ...)
    assert.is_false(ok, "expected an error")
    return tostring(err)
end

describe("ws.session", function()
    it("syncs the caller's tensors into its engine tensors, verified every step", function()
        for _, alloc in ipairs({ false, true }) do
            local S, mine = setup({ sleep_level = 2 }, { alloc = alloc })
            local rollouts, sleeps, wakes = 0, {}, {}
            S:on("rollout", function() rollouts = rollouts + 1 end)
            S:on("sleep", function(level) sleeps[#sleeps + 1] = level end)
            S:on("wake", function(tag) wakes[#wakes + 1] = tag end)
            for step = 1, 3 do
                local rec = S:step()
                assert.are.equal(step, rec.step)
                assert.is_true(rec.verified)
                assert.is_true(rec.base_sent) -- level 2: the base goes every step
            end
            assert.are.equal(3, rollouts)
            assert.are.same({ 2, 2, 2 }, sleeps)
            assert.are.same({ "weights", "kv_cache", "weights", "kv_cache" }, wakes)
            -- The fused engine tensor holds q, k and v of the trainer, in order.
            local q = mine.trainer["model.layers.0.self_attn.q_proj.weight"]
            local qkv = mine.engine["model.layers.0.self_attn.qkv_proj.base_layer.weight"]
            -- Awake again to read it (the last step slept at level 2).
            assert.are.equal(q:numel(), q:flat():numel())
            local summary = S:close()
            assert.are.equal(3, summary.steps)
            assert.are.equal(3, summary.verified_steps)
            assert.is_true(qkv:is_freed() == alloc)
        end
    end)

    it("save= writes the caller's weights as a Hugging Face checkpoint", function()
        local dir = os.tmpname()
        os.remove(dir)
        local S, mine = setup({ save = dir, save_adapter = dir .. "/adapter", steps = 1 })
        S:step()
        S:close()
        local ck = ws.safetensors(dir)
        local name = "model.layers.1.self_attn.k_proj.weight"
        assert.are.equal(mine.trainer[name]:checksum(), ck:tensor(name):checksum())
        ck:free()
        local ad = assert(ws.safetensors(dir .. "/adapter/adapter_model.safetensors"))
        local aname = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
        assert.are.equal(mine.adapter[aname]:checksum(), ad:tensor(aname):checksum())
        ad:free()
        os.execute("rm -rf '" .. dir .. "'")
    end)

    it("proves the engine's bytes: a caller that changes an engine tensor is caught", function()
        local S, mine = setup({ free_cache_engine = false })
        S:step()
        S:on("rollout", nil)
        local name = "model.layers.1.mlp.down_proj.base_layer.weight"
        S:on("train", function() mine.engine[name]:fill(1) end)
        local err = err_of(S.step, S)
        assert.matches("step 2 failed", err, 1, true)
        assert.matches("engine tensor '" .. name:gsub("%.", "%%.") .. "'", err)
        S:close()
    end)

    it("catches a frozen base weight the caller changed but the policy did not send", function()
        local S, mine = setup({ free_cache_engine = false })
        S:step()
        local name = "model.embed_tokens.weight"
        S:on("train", function() mine.trainer[name]:fill(0.5) end) -- e.g. modules_to_save
        local err = err_of(S.step, S)
        assert.matches("step 2 failed", err, 1, true)
        assert.matches("trainer parameter '" .. name:gsub("%.", "%%.") .. "'", err)
        S:close()
    end)

    it("save_engine= writes the engine as the last step left it, at close", function()
        local dir = os.tmpname()
        os.remove(dir)
        local S, mine = setup({ save_engine = dir, free_cache_engine = false })
        S:step()
        S:step() -- fewer than the steps key's 3: the session decides when it ends
        S:close()
        local ck = assert(ws.safetensors(dir .. "/engine-rank-00000.safetensors"))
        local name = "model.layers.0.mlp.down_proj.base_layer.weight"
        assert.are.equal(mine.engine[name]:checksum(), ck:tensor(name):checksum())
        ck:free()
        os.execute("rm -rf '" .. dir .. "'")
    end)

    it("names every mismatch before any byte moves", function()
        local S = session.open("pipelines/verl_lora.lua", with(), { quiet = true })
        local t = ws.tensor{ shape = { 3, 3 }, dtype = "bf16" }
        assert.matches("trainer tensor 'model.nope.weight' is not a trainer parameter of model tiny",
                       err_of(S.add, S, "trainer", "model.nope.weight", t), 1, true)
        assert.matches("trainer tensor 'model.norm.weight' has shape [3, 3], the model's is [99]",
                       err_of(S.add, S, "trainer", "model.norm.weight", t, nil), 1, true)
        assert.matches("global shape [3, 3] differs from the model's [99]",
                       err_of(S.add, S, "trainer", "model.norm.weight", t, { 3, 3 }), 1, true)
        local i64 = ws.tensor{ shape = { 99 }, dtype = "i64" }
        assert.matches("trainer tensor 'model.norm.weight' is i64, which cannot convert",
                       err_of(S.add, S, "trainer", "model.norm.weight", i64), 1, true)
        local f32 = ws.tensor{ shape = { 99 }, dtype = "f32" }
        assert.matches("engine tensor 'model.norm.weight' is f32; the engine's weights must be bf16",
                       err_of(S.add, S, "engine", "model.norm.weight", f32), 1, true)
        local ok = ws.tensor{ shape = { 99 }, dtype = "bf16" }
        S:add("trainer", "model.norm.weight", ok)
        assert.matches("registered twice", err_of(S.add, S, "trainer", "model.norm.weight", ok),
                       1, true)
        assert.matches("unknown role 'optimizer'", err_of(S.add, S, "optimizer", "x", ok), 1, true)
        assert.matches("unknown event 'train_step'", err_of(S.on, S, "train_step", print), 1, true)
        -- The first step finds what is missing, before anything is sent.
        assert.matches("trainer tensor 'model.embed_tokens.weight' was not registered (1 of",
                       err_of(S.step, S), 1, true)
        S:close()
        -- A file that returns no pipeline says so.
        local path = os.tmpname()
        local f = io.open(path, "w")
        f:write("return 42\n")
        f:close()
        assert.matches("does not return a pipeline", err_of(session.open, path, {}), 1, true)
        os.remove(path)
    end)

    it("refuses a rollout on weights a level-2 sleep discarded (verl #3149)", function()
        local skip = "tests/e2e/fixtures/skip_base.lua"
        -- The caller's own memory: the runner knows what the sleep discarded.
        local S = setup({ sleep_level = 2 }, { pipeline = skip })
        local rollouts = 0
        S:on("rollout", function() rollouts = rollouts + 1 end)
        S:step()
        local err = err_of(S.step, S)
        assert.matches("engine tensor '[^']+' was discarded by the level%-2 sleep at step 1 and " ..
                       "the 'base' plan has not been sent since", err)
        assert.are.equal(1, rollouts) -- the second rollout never ran
        assert.matches("a step failed", err_of(S.step, S), 1, true)
        S:close()
        -- wshost's pool: reading discarded memory raises, naming the pool's sleep.
        S = setup({ sleep_level = 2 }, { pipeline = skip, alloc = true })
        S:step()
        assert.matches("discarded", err_of(S.step, S), 1, true)
        S:close()
        -- verify=off proves nothing: the buggy policy runs on.
        S = setup({ sleep_level = 2, verify = "off" }, { pipeline = skip })
        for _ = 1, 3 do S:step() end
        S:close()
    end)

    it("refuses what a session cannot do, as config errors", function()
        for key, value in pairs({ param_offload = true, engine_dtype = "fp8_block",
                                  dry_run = true }) do
            assert.matches("config key '" .. key .. "'",
                           err_of(session.open, "pipelines/verl_lora.lua", with{ [key] = value }),
                           1, true)
        end
    end)
end)
