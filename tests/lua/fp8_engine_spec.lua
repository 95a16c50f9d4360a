-- engine_dtype=fp8_block on the real binary (cpu): which engine tensors the
-- family's rule quantizes, the scales' layout, the staging pool's memory
-- going back after a sync, the batched quantizer against the reference, and
-- verification catching a wrong fp8 value, a wrong scale and a stale base.
local ws = require("ws")
local models = require("ws.models")
local lora = require("ws.lora")
local trainer_mod = require("ws.trainer")
local engine_mod = require("ws.engine")
local sync_mod = require("ws.sync")
local verify = require("ws.verify")

local cpu = ws.device("cpu")

local function setup(model, lcfg)
    local spec = models.get(model)
    local tr = trainer_mod.new{ spec = spec, lora = lcfg, device = cpu, rank = 0, world = 1 }
    local e = engine_mod.new{ spec = spec, lora = lcfg, device = cpu, kv_cache_mb = 1,
                              engine_dtype = "fp8_block" }
    local s = sync_mod.new{ trainer = tr, engine = e, device = cpu, progress = "off" }
    return spec, tr, e, s
end

local function free_all(tr, e, s)
    s:free()
    e:free()
    tr:free()
end

describe("engine_dtype=fp8_block", function()
    it("quantizes linear weights only, with one f32 scale per 128x128 block", function()
        local lcfg = lora.config{ r = 4, target_modules = "q_proj,down_proj" }
        local spec, tr, e, s = setup("tiny-moe", lcfg)
        local fp8, kept = {}, {}
        for _, name in ipairs(e.order) do
            local dt = e.tensors[name]:dtype()
            if dt == "fp8" then fp8[#fp8 + 1] = name else kept[#kept + 1] = name end
        end
        assert.is_true(#fp8 > 0)
        local function linear(name)
            return name:match("_proj%.weight$") or name:match("_proj%.base_layer%.weight$")
                or name:match("w13_weight$") or name:match("w2_weight$")
        end
        for _, name in ipairs(fp8) do
            assert.is_truthy(linear(name), name)
            local shape, sc = e.tensors[name]:shape(), e.tensors[name .. "_scale_inv"]
            assert.are.equal("f32", sc:dtype())
            local want = {}
            for i, d in ipairs(shape) do want[i] = i >= #shape - 1 and (d + 127) // 128 or d end
            assert.are.same(want, sc:shape())
        end
        for _, name in ipairs(kept) do
            if not name:match("lora_") and not name:match("_scale_inv$") then
                assert.is_falsy(linear(name), name)
            end
        end
        for _, must_keep in ipairs({ "model.embed_tokens.weight", "model.norm.weight",
                                     "model.layers.0.mlp.gate.weight" }) do
            if e.tensors[must_keep] then assert.are.equal("bf16", e.tensors[must_keep]:dtype()) end
        end
        assert.are.equal("bf16", e.tensors["model.layers.0.self_attn.qkv_proj.lora_A.q_proj.weight"]
                                   :dtype())
        free_all(tr, e, s)
    end)

    it("holds the reference quantization after a base sync and returns the staging", function()
        local spec, tr, e, s = setup("tiny", nil)
        local st = s:send("base")
        assert.are.equal(0, e:memory().staging_mapped)
        local fp8_bytes = 0
        for _, q in ipairs(e.quantized) do
            fp8_bytes = fp8_bytes + e.tensors[q.name]:nbytes() + e.tensors[q.scale]:nbytes()
                        - 2 * e.tensors[q.name]:numel()
        end
        assert.are.equal(st.bytes_moved + fp8_bytes, st.engine_bytes)
        verify.check(s.pairs.base, { trainer = tr, engine = e, note = "spec" })
        for _, q in ipairs(e.quantized) do
            -- The staging is gone; the reference from the trainer's weights directly.
            local t = e.tensors[q.name]
            local src = ws.tensor{ shape = q.shape, dtype = "bf16", device = cpu }
            local rq = ws.tensor{ shape = q.shape, dtype = "fp8", device = cpu }
            local rs = ws.tensor{ shape = ws.fp8_block_scale_shape(q.shape), dtype = "f32",
                                  device = cpu }
            local flat = src:flat()
            for _, p in ipairs(s.pairs.base) do
                local d = e.dest[p.src.name]
                if d.name == q.name then
                    flat:narrow(1, d.offset + 1, d.numel):copy_(p.src.view)
                end
            end
            ws.quantize_fp8_block_reference(src, rq, rs)
            assert.are.equal(rq:checksum(), t:checksum())
            assert.are.equal(rs:checksum(), e.tensors[q.scale]:checksum())
            assert.is_true(ws.fp8_block_error(src, t, e.tensors[q.scale]) <= 16 / 448 * (1 + 1e-6))
            for _, x in ipairs({ flat, src, rq, rs }) do x:free() end
        end
        free_all(tr, e, s)
    end)

    it("catches a changed fp8 value, a changed scale and a stale base", function()
        local spec, tr, e, s = setup("tiny", nil)
        s:send("base")
        local ctx = { trainer = tr, engine = e, note = "spec" }
        verify.check(s.pairs.base, ctx)
        local q = e.quantized[1]
        local t = e.tensors[q.name]
        local old = t:get(1)
        t:set(1, old == 1 and 2 or 1)
        local ok, err = pcall(verify.check, s.pairs.base, ctx)
        assert.is_false(ok)
        assert.matches("engine tensor '" .. q.name .. "'", tostring(err), 1, true)
        assert.matches("is not the quantization", tostring(err), 1, true)
        t:set(1, old)
        verify.check(s.pairs.base, ctx)
        local sc = e.tensors[q.scale]
        sc:set(1, sc:get(1) * 2)
        assert.has_error(function() verify.check(s.pairs.base, ctx) end)
        -- Sent again unchanged: the reference is not computed again.
        local calls, real = 0, ws.quantize_fp8_block_reference
        ws.quantize_fp8_block_reference = function(...)
            calls = calls + 1
            return real(...)
        end
        local ok2, err2 = pcall(s.send, s, "base")
        ws.quantize_fp8_block_reference = real
        assert(ok2, err2)
        assert.are.equal(0, calls)
        verify.check(s.pairs.base, ctx)
        -- The trainer moves on and only a linear weight changes (the bf16
        -- tensors are left alone so the staged check is what must notice).
        local p
        for _, x in ipairs(s.pairs.base) do if x.staged then p = x break end end
        p.src.view:set(1, p.src.view:get(1) + 1)
        tr.generation = tr.generation + 1
        ok, err = pcall(verify.check, s.pairs.base, ctx)
        assert.is_false(ok)
        assert.matches("was quantized from bf16 values of checksum", tostring(err), 1, true)
        assert.matches(p.src.name, tostring(err), 1, true)
        -- Sent again: only the tensor that changed is quantized again by the reference.
        calls = 0
        ws.quantize_fp8_block_reference = function(...)
            calls = calls + 1
            return real(...)
        end
        ok2, err2 = pcall(s.send, s, "base")
        ws.quantize_fp8_block_reference = real
        assert(ok2, err2)
        assert.are.equal(1, calls)
        verify.check(s.pairs.base, ctx)
        free_all(tr, e, s)
    end)

    it("quantizes bit-identically to the reference on odd shapes", function()
        for _, shape in ipairs({ { 1, 1 }, { 129, 257 }, { 3, 130, 5 } }) do
            local src = ws.tensor{ shape = shape, dtype = "bf16", device = cpu }
            src:random_(7, 3.0)
            local function out()
                return ws.tensor{ shape = shape, dtype = "fp8", device = cpu },
                       ws.tensor{ shape = ws.fp8_block_scale_shape(shape), dtype = "f32",
                                  device = cpu }
            end
            local q, sc = out()
            local rq, rs = out()
            assert.is_true(ws.quantize_fp8_block({ src }, { q }, { sc }))
            ws.quantize_fp8_block_reference(src, rq, rs)
            assert.are.equal(rq:checksum(), q:checksum())
            assert.are.equal(rs:checksum(), sc:checksum())
            for _, x in ipairs({ src, q, sc, rq, rs }) do x:free() end
        end
        assert.has_error(function()
            local a = ws.tensor{ shape = { 4, 4 }, dtype = "bf16", device = cpu }
            ws.quantize_fp8_block({ a }, { a }, { a })
        end, nil)
    end)
end)
