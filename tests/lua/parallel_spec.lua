-- parallel_spec.lua: the tensor- and expert-parallel engine layout
-- (ws.family.decoder engine_layout with a ws.parallel position) without MPI:
-- over the ranks of a group, every parameter element lands in as many
-- ranks as the layout says hold it (once when split, T times when whole,
-- T/KV times for a replicated KV head), every engine tensor is covered by
-- its destinations but for vocabulary padding, and a few shards are
-- checked against values worked out by hand from vLLM's layers.
local models = require("ws.models")
local lora = require("ws.lora")
local parallel = require("ws.parallel")

local cfg = { architectures = { "Qwen2ForCausalLM" }, hidden_size = 48, num_hidden_layers = 1,
              intermediate_size = 80, num_attention_heads = 4, num_key_value_heads = 2,
              vocab_size = 50, tie_word_embeddings = false }
local moe_cfg = { architectures = { "Qwen3MoeForCausalLM" }, hidden_size = 32,
                  num_hidden_layers = 2, intermediate_size = 64, num_attention_heads = 4,
                  num_key_value_heads = 4, head_dim = 8, vocab_size = 70, num_experts = 5,
                  moe_intermediate_size = 24, mlp_only_layers = { 1 } }

local function spec_of(c) return models.from_config(c, "spec", "test/config.json") end

local function layout(spec, lcfg, par)
    local lparams = lcfg and lora.params(spec, lcfg) or nil
    local order, dest = models.family(spec).engine_layout(spec, models.params(spec), lcfg,
                                                          lparams, par)
    local shapes = {}
    for _, t in ipairs(order) do shapes[t.name] = t.shape end
    return shapes, dest, lparams
end

local function numel(shape)
    local n = 1
    for _, d in ipairs(shape) do n = n * d end
    return n
end

-- Every parameter of every rank: how many ranks hold each of its elements.
local function coverage(spec, lcfg, T, E)
    local params = {}
    for i, p in ipairs(models.params(spec)) do params[i] = p end
    if lcfg then
        for _, a in ipairs(lora.params(spec, lcfg)) do params[#params + 1] = a end
    end
    local count, dests, W = {}, {}, math.max(T, E)
    for r = 0, W - 1 do
        local shapes, dest = layout(spec, lcfg, { tp = T, tp_rank = r % T, ep = E, ep_rank = r % E })
        -- Inside each engine tensor, the destinations tile it but for padding rows.
        local used = {}
        for _, p in ipairs(params) do
            local d = assert(dest[p.name], "no destination for " .. p.name)
            assert.is_truthy(shapes[d.name], d.name)
            used[d.name] = (used[d.name] or 0) + d.numel
            local b = d.block
            local c = count[p.name] or {}
            count[p.name] = c
            local cols = b and b[1] or p.numel
            for x = 0, p.numel - 1 do
                local i, j = x // cols, x % cols
                local here = b == nil and d.numel > 0 or
                             (b and i >= b[2] and i < b[3] and j >= b[4] and j < b[5])
                if here then c[x] = (c[x] or 0) + 1 end
            end
            dests[p.name] = d
        end
        for name, n in pairs(used) do
            local pad = 0
            for _, d in pairs(dest) do
                if d.name == name and d.pad_rows then
                    pad = (d.pad_rows[2] - d.pad_rows[1]) * shapes[name][2]
                end
            end
            assert.are.equal(numel(shapes[name]), n + pad, name .. " on rank " .. r)
        end
    end
    for _, p in ipairs(params) do
        -- Over W ranks: W / T TP groups, W / E EP groups.
        local want = dests[p.name].replicas * W // T
        if p.expert and E > 1 then want = W // E end
        for x = 0, p.numel - 1 do
            assert.are.equal(want, count[p.name][x] or 0,
                             string.format("%s element %d", p.name, x))
        end
    end
end

describe("tensor-parallel layout", function()
    local spec = spec_of(cfg)
    local lcfg = lora.config{ r = 4, alpha = 8 }

    it("holds each element on as many ranks as its replicas, for T = 2 and 4", function()
        coverage(spec, lcfg, 2, 1)
        coverage(spec, lcfg, 4, 1)
        coverage(spec, nil, 4, 1)
    end)

    it("gives rank 3 of 4 one q head, KV head 1 (held by ranks 2 and 3) and the vocab tail", function()
        local shapes, dest = layout(spec, lcfg, { tp = 4, tp_rank = 3, ep = 1, ep_rank = 0 })
        local p = "model.layers.0."
        -- head_dim 12: q rows 36..47, k and v rows 12..23 (KV head 3 // 2 = 1).
        assert.are.same({ 36, 48 }, shapes[p .. "self_attn.qkv_proj.base_layer.weight"])
        local q, k = dest[p .. "self_attn.q_proj.weight"], dest[p .. "self_attn.k_proj.weight"]
        assert.are.same({ 48, 36, 48, 0, 48 }, q.block)
        assert.are.same({ 48, 12, 24, 0, 48 }, k.block)
        assert.are.equal(2, k.replicas)
        assert.are.equal(12 * 48, k.offset)
        local kb = dest[p .. "self_attn.k_proj.bias"]
        assert.are.same({ 1, 12, 24, 0, 1 }, kb.block)
        -- o_proj: columns 36..47 of [48, 48]; its lora_A likewise, lora_B whole.
        assert.are.same({ 48, 0, 48, 36, 48 }, dest[p .. "self_attn.o_proj.weight"].block)
        local oa = dest["base_model.model." .. p .. "self_attn.o_proj.lora_A.weight"]
        assert.are.same({ 48, 0, 4, 36, 48 }, oa.block)
        assert.are.same({ 4, 12 }, shapes[p .. "self_attn.o_proj.lora_A.weight"])
        assert.are.equal(4, dest["base_model.model." .. p .. "self_attn.o_proj.lora_B.weight"].replicas)
        -- gate_up: rows 60..79 of gate and of up; down: columns 60..79.
        assert.are.same({ 40, 48 }, shapes[p .. "mlp.gate_up_proj.base_layer.weight"])
        assert.are.equal(20 * 48, dest[p .. "mlp.up_proj.weight"].offset)
        assert.are.same({ 80, 0, 48, 60, 80 }, dest[p .. "mlp.down_proj.weight"].block)
        -- vocab 50 -> 64: rows 48..63, of which 48 and 49 are real.
        assert.are.same({ 16, 48 }, shapes["model.embed_tokens.weight"])
        local emb = dest["model.embed_tokens.weight"]
        assert.are.same({ 48, 48, 50, 0, 48 }, emb.block)
        assert.are.same({ 2, 16 }, emb.pad_rows)
        assert.are.equal(4, dest["model.norm.weight"].replicas)
    end)

    it("splits experts' intermediate without EP, places them whole with EP", function()
        local moe = spec_of(moe_cfg)
        coverage(moe, nil, 2, 1)
        coverage(moe, nil, 1, 2)
        coverage(moe, nil, 2, 2)
        local shapes, dest = layout(moe, nil, { tp = 2, tp_rank = 1, ep = 1, ep_rank = 0 })
        local p = "model.layers.0.mlp.experts."
        assert.are.same({ 5, 24, 32 }, shapes[p .. "w13_weight"])
        assert.are.same({ 5, 32, 12 }, shapes[p .. "w2_weight"])
        assert.are.same({ 24, 0, 32, 12, 24 }, dest[p .. "3.down_proj.weight"].block)
        -- EP over 2 ranks: experts 0..2 and 3..4 (the first rank takes the extra one).
        assert.are.same({ 0, 3 }, { parallel.expert_range(5, 2, 0) })
        assert.are.same({ 3, 2 }, { parallel.expert_range(5, 2, 1) })
        shapes, dest = layout(moe, nil, { tp = 1, tp_rank = 0, ep = 2, ep_rank = 1 })
        assert.are.same({ 2, 48, 32 }, shapes[p .. "w13_weight"])
        assert.are.equal(0, dest[p .. "0.gate_proj.weight"].numel)
        assert.are.equal((2 * 1 + 1) * 24 * 32, dest[p .. "4.up_proj.weight"].offset)
        assert.are.equal("ep", dest[p .. "4.up_proj.weight"].group)
    end)

    it("refuses sizes vLLM cannot split, naming the key", function()
        local function err(c, world)
            local ok, e = pcall(parallel.check, c, spec, world)
            assert.is_false(ok)
            return tostring(e)
        end
        assert.truthy(err({ engine_tp = 3, engine_ep = 1, engine_dtype = "bf16" }, 6)
                      :find("3 does not divide num_attention_heads 4", 1, true))
        assert.truthy(err({ engine_tp = 2, engine_ep = 1, engine_dtype = "bf16" }, 3)
                      :find("does not divide the 3 engine ranks", 1, true))
        assert.truthy(err({ engine_tp = 2, engine_ep = 1, engine_dtype = "fp8_block" }, 2)
                      :find("fp8_block", 1, true))
        assert.truthy(err({ engine_tp = 1, engine_ep = 2, engine_dtype = "bf16" }, 2)
                      :find("no mixture-of-experts layers", 1, true))
    end)
end)
