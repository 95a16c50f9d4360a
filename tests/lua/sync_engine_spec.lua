-- The Lua library on the real binary (cpu): engine layout, sleep/wake memory,
-- trainer shards composing across world sizes, and verification catching a
-- wrong engine tensor.
local ws = require("ws")
local models = require("ws.models")
local lora = require("ws.lora")
local trainer_mod = require("ws.trainer")
local engine_mod = require("ws.engine")
local sync_mod = require("ws.sync")
local verify = require("ws.verify")

local cpu = ws.device("cpu")
local spec = models.get("tiny")

describe("engine", function()
    it("uses vLLM's fused layout and base_layer names under LoRA", function()
        local e = engine_mod.new{ spec = spec, lora = lora.config{ r = 4, target_modules = "q_proj,down_proj" },
                                  device = cpu, kv_cache_mb = 1 }
        local q, k = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        local qkv = e.tensors["model.layers.0.self_attn.qkv_proj.base_layer.weight"]
        assert.are.same({ q + 2 * k, spec.hidden }, qkv:shape())
        assert.are.same({ 2 * spec.intermediate, spec.hidden },
                        e.tensors["model.layers.1.mlp.gate_up_proj.weight"]:shape())
        assert.is_not_nil(e.tensors["model.layers.1.mlp.down_proj.base_layer.weight"])
        assert.is_not_nil(e.tensors["model.layers.1.self_attn.o_proj.weight"])
        assert.are.same({ 4, spec.hidden },
                        e.tensors["model.layers.0.self_attn.qkv_proj.lora_A.q_proj.weight"]:shape())
        local t, d = e:destination("model.layers.0.self_attn.v_proj.weight")
        assert.are.equal(qkv, t)
        assert.are.equal((q + k) * spec.hidden, d.offset)
        assert.are.equal(k * spec.hidden, d.numel)
        assert.are.equal("model.layers.0.self_attn.qkv_proj.base_layer.weight[rows "
                         .. (q + k + 1) .. ".." .. (q + 2 * k) .. "]", d.label)
        e:free()
    end)

    it("gives pool memory back on sleep and keeps addresses and (level 1) contents", function()
        local e = engine_mod.new{ spec = spec, device = cpu, kv_cache_mb = 1 }
        local w = e.tensors["model.norm.weight"]
        local before = w:checksum(0)
        local awake = e:memory().mapped
        assert.is_true(awake > 0)
        e:sleep(1, "spec")
        assert.are.equal(0, e:memory().mapped)
        assert.is_true(e:memory().backup_bytes > 0)
        e:wake_up{ "weights" }
        assert.are.equal(before, w:checksum(0))
        assert.is_true(e:is_asleep("kv_cache"))
        e:wake_up{}
        assert.are.equal(awake, e:memory().mapped)
        e:sleep(2, "step 7")
        e:wake_up()
        local ok, err = pcall(w.checksum, w, 0)
        assert.is_false(ok)
        assert.matches("model.norm.weight", tostring(err), 1, true)
        assert.matches("pool 'weights'", tostring(err), 1, true)
        assert.matches("step 7", tostring(err), 1, true)
        assert.has_error(function() e:wake_up{ "gpu" } end)
        e:free()
    end)
end)

describe("trainer shards", function()
    it("compose to the same full tensors on any world size", function()
        local lcfg = lora.config{ r = 4 }
        local one = trainer_mod.new{ spec = spec, lora = lcfg, device = cpu, rank = 0, world = 1 }
        local ranks = {}
        for r = 0, 2 do
            ranks[r + 1] = trainer_mod.new{ spec = spec, lora = lcfg, device = cpu, rank = r,
                                            world = 3, dtype = "f32" }
        end
        one:train_step(3)
        for _, t in ipairs(ranks) do t:train_step(3) end
        local padded = 0
        for i, e in ipairs(one.params) do
            local sum = 0
            for _, t in ipairs(ranks) do
                local s = t.params[i]
                if s.real < s.shard_numel then padded = padded + 1 end
                if s.view then sum = sum + s.view:checksum(s.first, "bf16") end
            end
            assert.are.equal(e.view:checksum(0, "bf16"), sum, e.name)
        end
        assert.is_true(padded > 0)
        one:free()
        for _, t in ipairs(ranks) do t:free() end
    end)
end)

describe("sync + verify", function()
    it("copies every parameter and catches an engine tensor that differs", function()
        local lcfg = lora.config{ r = 4 }
        local tr = trainer_mod.new{ spec = spec, lora = lcfg, device = cpu, dtype = "f32" }
        local en = engine_mod.new{ spec = spec, lora = lcfg, device = cpu, kv_cache_mb = 1 }
        local s = sync_mod.new{ trainer = tr, engine = en, device = cpu, bucket_mb = 0.1, progress = "off" }
        local ctx = { world = 1, note = "spec" }
        -- The engine starts from dummy weights: verification must fail.
        s:build("base")
        assert.has_error(function() verify.check(s.pairs.base, ctx) end)
        local st = s:send("full")
        assert.are.equal((models.param_count(spec) + lora.param_count(spec, lcfg)) * 2, st.bytes_moved)
        assert.are.equal(#tr.params, verify.check(s.pairs.full, ctx))
        local k = en.tensors["model.layers.1.self_attn.qkv_proj.base_layer.weight"]
        local rows = spec.heads * spec.head_dim + spec.kv_heads * spec.head_dim
        k:set(rows * spec.hidden + 5, 1.5) -- row 1 of the v slice
        local ok, err = pcall(verify.check, s.pairs.full, ctx)
        assert.is_false(ok)
        assert.matches("model.layers.1.self_attn.v_proj.weight", tostring(err), 1, true)
        assert.matches("qkv_proj.base_layer.weight[rows", tostring(err), 1, true)
        s:send("adapter")
        s:send("base")
        assert.are.equal(#tr.params, verify.check(s.pairs.full, ctx))
        s:free(); en:free(); tr:free()
    end)
end)

describe("verify's own state", function()
    -- Verification keeps the trainer's checksums (one i64 per tensor) and
    -- empty views of padding-only shards; it frees them itself, at release.
    local function held() return cpu:memory().held end

    it("is freed by verify.release and rebuilt by the next check", function()
        local tr = trainer_mod.new{ spec = spec, device = cpu, rank = 999, world = 1000 }
        local pairs, padded = {}, 0
        for i, e in ipairs(tr.params) do
            pairs[i] = { src = e, dst = e.tensor, dst_name = e.name }
            if not e.view then padded = padded + 1 end
        end
        assert.is_true(padded > 0) -- the last rank holds only padding of small tensors
        local ctx = { world = 1, note = "spec", trainer = tr }
        local before = held()
        pcall(verify.check, pairs, ctx)
        local kept = held() - before
        assert.is_true(kept >= #pairs * 8, "the checksums were not kept")
        verify.release(pairs)
        assert.are.equal(before, held())
        verify.release(pairs) -- nothing left: a no-op
        pcall(verify.check, pairs, ctx)
        assert.are.equal(before + kept, held())
        verify.release(pairs)
        tr:free() -- no view verification made is left in the trainer's pool
    end)

    it("is freed by sync:free", function()
        local tr = trainer_mod.new{ spec = spec, device = cpu }
        local en = engine_mod.new{ spec = spec, device = cpu, kv_cache_mb = 1 }
        local s = sync_mod.new{ trainer = tr, engine = en, device = cpu, progress = "off" }
        s:send("full")
        local before = held()
        assert.are.equal(#tr.params, verify.check(s.pairs.full, { world = 1, trainer = tr }))
        assert.is_true(held() > before)
        s:free()
        assert.is_true(held() <= before)
        en:free(); tr:free()
    end)
end)

describe("sync progress", function()
    -- The display appears only once a sync has run for a second, updates in
    -- place with carriage returns, and ends its line at the last bucket.
    it("shows buckets on stderr after a second, and stays quiet before", function()
        local tr = trainer_mod.new{ spec = spec, device = cpu }
        local en = engine_mod.new{ spec = spec, device = cpu, kv_cache_mb = 1 }
        local s = sync_mod.new{ trainer = tr, engine = en, device = cpu, bucket_mb = 0.25,
                                progress = "on" }
        local written = {}
        local real_stderr, real_now = io.stderr, ws.now_ms
        local clock = 0
        io.stderr = { write = function(_, ...) for _, v in ipairs{ ... } do
                          written[#written + 1] = v end end,
                      flush = function() end }
        ws.now_ms = function() return clock end
        local ok, err = pcall(function()
            local show = s:progress_fn("base")
            show(1, 3, 100, 300)                -- at 0 ms: nothing yet
            assert.are.equal(0, #written)
            clock = 1500
            show(2, 3, 200e6, 300e6)
            show(3, 3, 300e6, 300e6)
        end)
        io.stderr, ws.now_ms = real_stderr, real_now
        assert.is_true(ok, tostring(err))
        local text = table.concat(written)
        assert.matches("\rsync base    bucket 2/3  200.0/300.0 MB", text, 1, true)
        assert.matches("bucket 3/3  300.0/300.0 MB\n", text, 1, true)
        s.progress = "off"
        assert.is_nil(s:progress_fn("base"))
        s:free(); en:free(); tr:free()
    end)
end)
