-- models_spec.lua: config.json tables -> parameter lists -> the engine's
-- layout, for every family, against values worked out by hand here from the
-- Hugging Face modules (Qwen3Attention, Qwen2Attention, LlamaAttention,
-- Qwen3MoeDecoderLayer / Qwen3MoeSparseMoeBlock) and vLLM's fused layers,
-- never from the library's own shape rules. No files are read except one
-- config.json written to show that errors name it.
local ws = require("ws")
local json = require("ws.json")
local models = require("ws.models")
local lora = require("ws.lora")
local decoder = require("ws.family.decoder")

-- The message of whatever fn(...) raised (an error object or a string).
local function err_of(fn, ...)
    local ok, err = pcall(fn, ...)
    assert.is_false(ok, "expected an error")
    return tostring(err)
end

local function contains(text, part)
    assert.is_truthy(text:find(part, 1, true),
                     string.format("expected [%s] to contain [%s]", text, part))
end

local function spec_of(cfg) return models.from_config(cfg, "spec", "test/config.json") end

local function numel(shape)
    local n = 1
    for _, d in ipairs(shape) do n = n * d end
    return n
end

-- Checks that spec's parameters are exactly `want` (name -> shape), each
-- with the numel its shape gives.
local function expect_params(spec, want)
    local got = {}
    for _, p in ipairs(models.params(spec)) do
        assert.is_nil(got[p.name], "parameter listed twice: " .. p.name)
        got[p.name] = p
        assert.is_truthy(want[p.name], "unexpected parameter " .. p.name)
        assert.are.same(want[p.name], p.shape, p.name)
        assert.are.equal(numel(want[p.name]), p.numel, p.name)
    end
    for name in pairs(want) do assert.is_truthy(got[name], "missing parameter " .. name) end
end

-- name -> shape of one layer's parameters from hand-given pieces.
local function layer(want, l, parts)
    local p = "model.layers." .. l .. "."
    for suffix, shape in pairs(parts) do want[p .. suffix] = shape end
end

local function base_cfg(over)
    local c = { hidden_size = 64, num_hidden_layers = 2, intermediate_size = 96,
                num_attention_heads = 4, num_key_value_heads = 2, vocab_size = 100 }
    for k, v in pairs(over) do c[k] = v end
    return c
end

describe("families from config.json", function()
    it("Qwen3: q/k norms of head_dim, no biases, head_dim taken from the config", function()
        -- head_dim 24 differs from hidden / heads = 16: the key must win.
        local spec = spec_of(base_cfg{ architectures = { "Qwen3ForCausalLM" },
                                       model_type = "qwen3", head_dim = 24,
                                       tie_word_embeddings = false })
        local want = { ["model.embed_tokens.weight"] = { 100, 64 },
                       ["model.norm.weight"] = { 64 }, ["lm_head.weight"] = { 100, 64 } }
        for l = 0, 1 do
            layer(want, l, {
                ["input_layernorm.weight"] = { 64 }, ["post_attention_layernorm.weight"] = { 64 },
                ["self_attn.q_proj.weight"] = { 96, 64 }, ["self_attn.k_proj.weight"] = { 48, 64 },
                ["self_attn.v_proj.weight"] = { 48, 64 }, ["self_attn.o_proj.weight"] = { 64, 96 },
                ["self_attn.q_norm.weight"] = { 24 }, ["self_attn.k_norm.weight"] = { 24 },
                ["mlp.gate_proj.weight"] = { 96, 64 }, ["mlp.up_proj.weight"] = { 96, 64 },
                ["mlp.down_proj.weight"] = { 64, 96 },
            })
        end
        expect_params(spec, want)
        assert.are.equal("Qwen3ForCausalLM", spec.arch)
    end)

    it("Qwen2: q/k/v biases, no o_proj bias, no q/k norms; tied embeddings drop lm_head", function()
        local spec = spec_of{ architectures = { "Qwen2ForCausalLM" }, model_type = "qwen2",
                              hidden_size = 48, num_hidden_layers = 1, intermediate_size = 80,
                              num_attention_heads = 4, num_key_value_heads = 2, vocab_size = 50,
                              tie_word_embeddings = true }
        -- head_dim absent: 48 / 4 = 12; q 4*12 = 48 rows, k/v 2*12 = 24 rows.
        local want = { ["model.embed_tokens.weight"] = { 50, 48 }, ["model.norm.weight"] = { 48 } }
        layer(want, 0, {
            ["input_layernorm.weight"] = { 48 }, ["post_attention_layernorm.weight"] = { 48 },
            ["self_attn.q_proj.weight"] = { 48, 48 }, ["self_attn.q_proj.bias"] = { 48 },
            ["self_attn.k_proj.weight"] = { 24, 48 }, ["self_attn.k_proj.bias"] = { 24 },
            ["self_attn.v_proj.weight"] = { 24, 48 }, ["self_attn.v_proj.bias"] = { 24 },
            ["self_attn.o_proj.weight"] = { 48, 48 },
            ["mlp.gate_proj.weight"] = { 80, 48 }, ["mlp.up_proj.weight"] = { 80, 48 },
            ["mlp.down_proj.weight"] = { 48, 80 },
        })
        expect_params(spec, want)
    end)

    local function llama_want(bias)
        -- hidden 40, 5 heads, no head_dim and no num_key_value_heads: head_dim
        -- 40 / 5 = 8 and 5 kv heads, so q, k, v and o are all [40, 40].
        local want = { ["model.embed_tokens.weight"] = { 30, 40 }, ["model.norm.weight"] = { 40 },
                       ["lm_head.weight"] = { 30, 40 } }
        local parts = {
            ["input_layernorm.weight"] = { 40 }, ["post_attention_layernorm.weight"] = { 40 },
            ["mlp.gate_proj.weight"] = { 70, 40 }, ["mlp.up_proj.weight"] = { 70, 40 },
            ["mlp.down_proj.weight"] = { 40, 70 },
        }
        for _, m in ipairs({ "q", "k", "v", "o" }) do
            parts["self_attn." .. m .. "_proj.weight"] = { 40, 40 }
            -- LlamaAttention: attention_bias puts a bias on o_proj too.
            if bias then parts["self_attn." .. m .. "_proj.bias"] = { 40 } end
        end
        layer(want, 0, parts)
        return want
    end
    local function llama_cfg(arch, over)
        local c = { architectures = { arch }, hidden_size = 40, num_hidden_layers = 1,
                    intermediate_size = 70, num_attention_heads = 5, vocab_size = 30 }
        for k, v in pairs(over or {}) do c[k] = v end
        return c
    end

    it("Llama: head_dim and num_key_value_heads default to hidden/heads and heads", function()
        local spec = spec_of(llama_cfg("LlamaForCausalLM"))
        assert.are.equal(8, spec.head_dim)
        assert.are.equal(5, spec.kv_heads)
        expect_params(spec, llama_want(false))
    end)

    it("Llama: attention_bias adds q/k/v/o biases", function()
        expect_params(spec_of(llama_cfg("LlamaForCausalLM", { attention_bias = true })),
                      llama_want(true))
        expect_params(spec_of(llama_cfg("LlamaForCausalLM", { attention_bias = false })),
                      llama_want(false))
    end)

    it("Mistral: Llama's parameters", function()
        local spec = spec_of(llama_cfg("MistralForCausalLM", { sliding_window = 4096 }))
        assert.are.equal("mistral", spec.family)
        expect_params(spec, llama_want(false))
    end)

    it("picks the family by model_type when architectures is absent", function()
        local c = llama_cfg("LlamaForCausalLM")
        c.architectures, c.model_type = nil, "llama"
        local spec = spec_of(c)
        assert.are.equal("llama", spec.family)
        assert.are.equal("LlamaForCausalLM", spec.arch)
    end)

    -- Qwen3MoeDecoderLayer: layer l has the sparse block when l is not in
    -- mlp_only_layers and (l + 1) % decoder_sparse_step == 0; otherwise a
    -- dense Qwen3MoeMLP of intermediate_size.
    local function moe_cfg(over)
        local c = { architectures = { "Qwen3MoeForCausalLM" }, model_type = "qwen3_moe",
                    hidden_size = 32, num_hidden_layers = 4, intermediate_size = 50,
                    num_attention_heads = 4, num_key_value_heads = 2, head_dim = 8,
                    vocab_size = 20, num_experts = 3, num_experts_per_tok = 2,
                    moe_intermediate_size = 7, tie_word_embeddings = false }
        for k, v in pairs(over or {}) do c[k] = v end
        return c
    end
    local function moe_want(layers, sparse)
        local want = { ["model.embed_tokens.weight"] = { 20, 32 }, ["model.norm.weight"] = { 32 },
                       ["lm_head.weight"] = { 20, 32 } }
        for l = 0, layers - 1 do
            local parts = {
                ["input_layernorm.weight"] = { 32 }, ["post_attention_layernorm.weight"] = { 32 },
                ["self_attn.q_proj.weight"] = { 32, 32 }, ["self_attn.k_proj.weight"] = { 16, 32 },
                ["self_attn.v_proj.weight"] = { 16, 32 }, ["self_attn.o_proj.weight"] = { 32, 32 },
                ["self_attn.q_norm.weight"] = { 8 }, ["self_attn.k_norm.weight"] = { 8 },
            }
            if sparse[l] then
                parts["mlp.gate.weight"] = { 3, 32 }
                for e = 0, 2 do
                    local x = "mlp.experts." .. e .. "."
                    parts[x .. "gate_proj.weight"] = { 7, 32 }
                    parts[x .. "up_proj.weight"] = { 7, 32 }
                    parts[x .. "down_proj.weight"] = { 32, 7 }
                end
            else
                parts["mlp.gate_proj.weight"] = { 50, 32 }
                parts["mlp.up_proj.weight"] = { 50, 32 }
                parts["mlp.down_proj.weight"] = { 32, 50 }
            end
            layer(want, l, parts)
        end
        return want
    end

    it("Qwen3-MoE: router [E, H] and experts of moe_intermediate_size on every layer", function()
        local spec = spec_of(moe_cfg())
        expect_params(spec, moe_want(4, { [0] = true, true, true, true }))
        local router = "model.layers.0.mlp.gate.weight"
        for _, p in ipairs(models.params(spec)) do
            if p.name == router then
                assert.are.equal("gate", p.module)
                assert.is_nil(p.expert)
            elseif p.name:find("experts.2.down_proj", 1, true) then
                assert.are.equal(2, p.expert)
            end
        end
    end)

    it("Qwen3-MoE: decoder_sparse_step=2 and mlp_only_layers leave the layers HF keeps dense",
       function()
        -- step 2: layers 1 and 3 are sparse; 3 is in mlp_only_layers: only 1 remains.
        expect_params(spec_of(moe_cfg{ decoder_sparse_step = 2, mlp_only_layers = { 3 } }),
                      moe_want(4, { [1] = true }))
        expect_params(spec_of(moe_cfg{ decoder_sparse_step = 2 }),
                      moe_want(4, { [1] = true, [3] = true }))
        -- step 3 over 4 layers: only layer 2.
        expect_params(spec_of(moe_cfg{ decoder_sparse_step = 3 }), moe_want(4, { [2] = true }))
        expect_params(spec_of(moe_cfg{ decoder_sparse_step = 1, mlp_only_layers = { 0, 2 } }),
                      moe_want(4, { [1] = true, [3] = true }))
        -- Every layer in mlp_only_layers: a dense model under the MoE architecture.
        expect_params(spec_of(moe_cfg{ mlp_only_layers = { 0, 1, 2, 3 } }), moe_want(4, {}))
    end)

    it("rejects an unknown architecture, listing the known ones", function()
        local msg = err_of(spec_of, { architectures = { "GPT2LMHeadModel" }, model_type = "gpt2",
                                      hidden_size = 8 })
        assert.are.equal("test/config.json: architecture 'GPT2LMHeadModel' is not supported " ..
                         "(known: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, " ..
                         "Qwen3ForCausalLM, Qwen3MoeForCausalLM)", msg)
        contains(err_of(spec_of, { model_type = "gpt2" }), "architecture 'gpt2' is not supported")
    end)

    it("names config.json and the key for a missing or non-integer key", function()
        local c = base_cfg{ architectures = { "Qwen3ForCausalLM" }, head_dim = 16 }
        c.intermediate_size = nil
        assert.are.equal("test/config.json: key 'intermediate_size' is missing", err_of(spec_of, c))
        c.intermediate_size = 95.5
        assert.are.equal("test/config.json: key 'intermediate_size' must be an integer >= 1, " ..
                         "got 95.5", err_of(spec_of, c))
        c.intermediate_size = 96
        c.tie_word_embeddings = "yes"
        contains(err_of(spec_of, c), "test/config.json: key 'tie_word_embeddings' must be true " ..
                                     "or false")
        local m = moe_cfg()
        m.num_experts = nil
        assert.are.equal("test/config.json: key 'num_experts' is missing", err_of(spec_of, m))
        m = moe_cfg{ mlp_only_layers = { 1, "x" } }
        contains(err_of(spec_of, m), "key 'mlp_only_layers' holds x, not a layer number")
    end)

    it("Qwen3-MoE with num_experts 0: every layer keeps a dense MLP, as transformers builds it",
       function()
        expect_params(spec_of(moe_cfg{ num_experts = 0 }), moe_want(4, {}))
    end)

    it("refuses a JSON string where config.json needs an integer", function()
        -- transformers keeps "96" a string and fails building the model.
        local c = base_cfg{ architectures = { "Qwen3ForCausalLM" }, head_dim = 16,
                            intermediate_size = "96" }
        contains(err_of(spec_of, c), "test/config.json: key 'intermediate_size' must be an integer")
    end)

    it("lists a layer's parameters in state_dict() order", function()
        -- Qwen3DecoderLayer registers self_attn, mlp, input_layernorm,
        -- post_attention_layernorm; save= splits shards in this order.
        local spec = spec_of(base_cfg{ architectures = { "Qwen3ForCausalLM" }, head_dim = 16,
                                       num_hidden_layers = 1 })
        local want = { "model.embed_tokens.weight" }
        for _, s in ipairs({ "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                             "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                             "input_layernorm", "post_attention_layernorm" }) do
            want[#want + 1] = "model.layers.0." .. s .. ".weight"
        end
        want[#want + 1] = "model.norm.weight"
        want[#want + 1] = "lm_head.weight"
        local got = {}
        for i, p in ipairs(models.params(spec)) do got[i] = p.name end
        assert.are.same(want, got)
    end)

    it("names the directory's config.json when it reads one", function()
        local dir = os.tmpname()
        os.remove(dir)
        assert(ws.mkdir(dir))
        local c = base_cfg{ architectures = { "Qwen3ForCausalLM" } }
        c.vocab_size = nil
        local f = assert(io.open(dir .. "/config.json", "wb"))
        f:write(json.encode(c))
        f:close()
        local msg = err_of(models.get, dir)
        os.execute("rm -rf '" .. dir .. "'")
        assert.are.equal(dir .. "/config.json: key 'vocab_size' is missing", msg)
    end)
end)

-- The published config.json sizes, written out here, and the parameter
-- count they give worked out module by module.
local published = {
    ["qwen3-0.6b"] = { hidden = 1024, layers = 28, inter = 3072, heads = 16, kv = 8, hd = 128,
                       vocab = 151936, tied = true },
    ["qwen3-30b-a3b"] = { hidden = 2048, layers = 48, inter = 6144, heads = 32, kv = 4, hd = 128,
                          vocab = 151936, tied = false, experts = 128, moe_inter = 768 },
    ["qwen3-235b-a22b"] = { hidden = 4096, layers = 94, inter = 12288, heads = 64, kv = 4,
                            hd = 128, vocab = 151936, tied = false, experts = 128,
                            moe_inter = 1536 },
}

-- Parameters and tensors: every layer of the MoE presets is sparse
-- (decoder_sparse_step 1, no mlp_only_layers).
local function published_count(c)
    local h = c.hidden
    local attn = 2 * (c.heads * c.hd * h) + 2 * (c.kv * c.hd * h) + 2 * c.hd -- q,o; k,v; norms
    local norms = 2 * h
    local mlp, mlp_tensors
    if c.experts then
        mlp = c.experts * h + c.experts * 3 * c.moe_inter * h
        mlp_tensors = 1 + 3 * c.experts
    else
        mlp, mlp_tensors = 3 * c.inter * h, 3
    end
    local n = c.layers * (attn + norms + mlp) + c.vocab * h * (c.tied and 1 or 2) + h
    local tensors = c.layers * (8 + mlp_tensors) + (c.tied and 2 or 3)
    return n, tensors
end

describe("presets", function()
    it("have the published parameter and tensor counts", function()
        for name, c in pairs(published) do
            local spec = models.get(name)
            local n, tensors = published_count(c)
            assert.are.equal(n, models.param_count(spec), name)
            assert.are.equal(tensors, #models.params(spec), name)
        end
        assert.are.equal(596049920, models.param_count(models.get("qwen3-0.6b")))
        assert.are.equal(30532122624, models.param_count(models.get("qwen3-30b-a3b")))
        assert.are.equal(235093634560, models.param_count(models.get("qwen3-235b-a22b")))
        -- 94 layers of 8 attention/norm tensors, a router and 3 * 128 experts; embed, norm, head.
        assert.are.equal(36945, #models.params(models.get("qwen3-235b-a22b")))
    end)
end)

-- ------------------------------------------------------------ engine layout

local function layout(spec, lcfg)
    local lparams = lcfg and lora.params(spec, lcfg) or nil
    local order, dest = models.family(spec).engine_layout(spec, models.params(spec), lcfg, lparams)
    local shapes = {}
    for _, t in ipairs(order) do
        assert.is_nil(shapes[t.name], "engine tensor declared twice: " .. t.name)
        shapes[t.name] = t.shape
    end
    return shapes, dest, lparams
end

-- Every element of every engine tensor is written by exactly one parameter.
local function check_cover(spec, shapes, dest, lparams)
    local spans = {}
    local function add(name, d)
        assert.is_truthy(shapes[d.name], name .. " lands in undeclared " .. d.name)
        spans[d.name] = spans[d.name] or {}
        table.insert(spans[d.name], { d.offset, d.offset + d.numel })
    end
    for _, p in ipairs(models.params(spec)) do
        add(p.name, assert(dest[p.name], "no destination for " .. p.name))
        assert.are.equal(p.numel, dest[p.name].numel)
    end
    for _, a in ipairs(lparams or {}) do add(a.name, assert(dest[a.name])) end
    for name, shape in pairs(shapes) do
        local list = assert(spans[name], "engine tensor " .. name .. " receives nothing")
        table.sort(list, function(a, b) return a[1] < b[1] end)
        local at = 0
        for _, s in ipairs(list) do
            assert.are.equal(at, s[1], name .. ": gap or overlap")
            at = s[2]
        end
        assert.are.equal(numel(shape), at, name .. ": not filled to the end")
    end
end

local qwen2_cfg = { architectures = { "Qwen2ForCausalLM" }, hidden_size = 48,
                    num_hidden_layers = 1, intermediate_size = 80, num_attention_heads = 4,
                    num_key_value_heads = 2, vocab_size = 50, tie_word_embeddings = false }

describe("engine layout", function()
    local p = "model.layers.0."

    it("stacks q, k, v in qkv_proj and their biases in qkv_proj.bias", function()
        local spec = spec_of(qwen2_cfg)
        local shapes, dest = layout(spec)
        check_cover(spec, shapes, dest)
        local qkv = p .. "self_attn.qkv_proj.weight"
        -- q 48 rows, k 24, v 24, of 48 columns.
        assert.are.same({ 96, 48 }, shapes[qkv])
        assert.are.same({ 96 }, shapes[p .. "self_attn.qkv_proj.bias"])
        local want = {
            q = { 0, 48 * 48, "[rows 1..48]", 0, "[rows 1..48]" },
            k = { 48 * 48, 24 * 48, "[rows 49..72]", 48, "[rows 49..72]" },
            v = { 72 * 48, 24 * 48, "[rows 73..96]", 72, "[rows 73..96]" },
        }
        for m, w in pairs(want) do
            local d = dest[p .. "self_attn." .. m .. "_proj.weight"]
            assert.are.same({ name = qkv, offset = w[1], numel = w[2], label = qkv .. w[3] }, d)
            local b = dest[p .. "self_attn." .. m .. "_proj.bias"]
            assert.are.equal(p .. "self_attn.qkv_proj.bias", b.name)
            assert.are.equal(w[4], b.offset)
            assert.are.equal(p .. "self_attn.qkv_proj.bias" .. w[5], b.label)
        end
        assert.are.same({ name = p .. "self_attn.o_proj.weight", offset = 0, numel = 48 * 48,
                          label = p .. "self_attn.o_proj.weight" },
                        dest[p .. "self_attn.o_proj.weight"])
        assert.is_nil(shapes[p .. "self_attn.o_proj.bias"])
        -- No q/k/v tensors of their own.
        assert.is_nil(shapes[p .. "self_attn.q_proj.weight"])
    end)

    it("stacks gate and up in gate_up_proj", function()
        local spec = spec_of(qwen2_cfg)
        local shapes, dest = layout(spec)
        local gu = p .. "mlp.gate_up_proj.weight"
        assert.are.same({ 160, 48 }, shapes[gu])
        assert.are.same({ name = gu, offset = 0, numel = 80 * 48, label = gu .. "[rows 1..80]" },
                        dest[p .. "mlp.gate_proj.weight"])
        assert.are.same({ name = gu, offset = 80 * 48, numel = 80 * 48,
                          label = gu .. "[rows 81..160]" }, dest[p .. "mlp.up_proj.weight"])
        assert.are.same({ 48, 80 }, shapes[p .. "mlp.down_proj.weight"])
        assert.are.same({ 50, 48 }, shapes["lm_head.weight"])
    end)

    it("keeps .base_layer.weight and .base_layer.bias of wrapped modules under LoRA", function()
        local spec = spec_of(qwen2_cfg)
        local lcfg = lora.config{ r = 4, target_modules = "k_proj,down_proj" }
        local shapes, dest, lparams = layout(spec, lcfg)
        check_cover(spec, shapes, dest, lparams)
        local base = p .. "self_attn.qkv_proj.base_layer."
        assert.are.same({ 96, 48 }, shapes[base .. "weight"])
        assert.are.same({ 96 }, shapes[base .. "bias"])
        assert.are.equal(base .. "weight", dest[p .. "self_attn.q_proj.weight"].name)
        assert.are.equal(base .. "bias", dest[p .. "self_attn.v_proj.bias"].name)
        assert.are.equal(72, dest[p .. "self_attn.v_proj.bias"].offset)
        assert.is_nil(shapes[p .. "self_attn.qkv_proj.weight"])
        assert.is_truthy(shapes[p .. "mlp.down_proj.base_layer.weight"])
        -- Modules no target names stay plain.
        assert.is_truthy(shapes[p .. "self_attn.o_proj.weight"])
        assert.is_truthy(shapes[p .. "mlp.gate_up_proj.weight"])
        -- The adapter slots: lora_A [r, in], lora_B [out, r].
        assert.are.same({ 4, 48 }, shapes[p .. "self_attn.qkv_proj.lora_A.k_proj.weight"])
        assert.are.same({ 24, 4 }, shapes[p .. "self_attn.qkv_proj.lora_B.k_proj.weight"])
        assert.are.same({ 4, 80 }, shapes[p .. "mlp.down_proj.lora_A.weight"])
        assert.are.same({ 48, 4 }, shapes[p .. "mlp.down_proj.lora_B.weight"])
        assert.are.equal(p .. "mlp.down_proj.lora_B.weight",
                         dest["base_model.model." .. p .. "mlp.down_proj.lora_B.weight"].name)
        -- Adapters on weights only: no bias gets one.
        assert.are.equal(4, #lparams)
        for _, a in ipairs(lparams) do assert.is_nil(a.name:find("bias", 1, true)) end
    end)

    it("o_proj.bias (Llama attention_bias) stays with o_proj, under base_layer when wrapped",
       function()
        local spec = spec_of{ architectures = { "LlamaForCausalLM" }, hidden_size = 40,
                              num_hidden_layers = 1, intermediate_size = 70,
                              num_attention_heads = 5, vocab_size = 30, attention_bias = true }
        local shapes, dest = layout(spec)
        check_cover(spec, shapes, dest)
        assert.are.same({ 40 }, shapes[p .. "self_attn.o_proj.bias"])
        assert.are.same({ 120 }, shapes[p .. "self_attn.qkv_proj.bias"])
        local lcfg = lora.config{ r = 2 }
        local lshapes, ldest, lparams = layout(spec, lcfg)
        check_cover(spec, lshapes, ldest, lparams)
        assert.are.equal(p .. "self_attn.o_proj.base_layer.bias",
                         ldest[p .. "self_attn.o_proj.bias"].name)
        assert.are.equal(80, ldest[p .. "self_attn.v_proj.bias"].offset)
        -- all-linear on one layer: 7 modules, A and B each.
        assert.are.equal(7 * 2, #lparams)
    end)

    local moe = { architectures = { "Qwen3MoeForCausalLM" }, hidden_size = 32,
                  num_hidden_layers = 2, intermediate_size = 50, num_attention_heads = 4,
                  num_key_value_heads = 2, head_dim = 8, vocab_size = 20, num_experts = 3,
                  moe_intermediate_size = 7, mlp_only_layers = { 1 } }

    it("fuses experts as FusedMoE: w13_weight [E, 2I, H] and w2_weight [E, H, I]", function()
        local spec = spec_of(moe)
        local shapes, dest = layout(spec)
        check_cover(spec, shapes, dest)
        local w13, w2 = p .. "mlp.experts.w13_weight", p .. "mlp.experts.w2_weight"
        local I, H = 7, 32
        assert.are.same({ 3, 14, 32 }, shapes[w13])
        assert.are.same({ 3, 32, 7 }, shapes[w2])
        for e = 0, 2 do
            local x = p .. "mlp.experts." .. e .. "."
            assert.are.same({ name = w13, offset = 2 * e * I * H, numel = I * H,
                              label = w13 .. "[expert " .. e .. " gate]" },
                            dest[x .. "gate_proj.weight"])
            assert.are.same({ name = w13, offset = (2 * e + 1) * I * H, numel = I * H,
                              label = w13 .. "[expert " .. e .. " up]" },
                            dest[x .. "up_proj.weight"])
            assert.are.same({ name = w2, offset = e * H * I, numel = H * I,
                              label = w2 .. "[expert " .. e .. "]" },
                            dest[x .. "down_proj.weight"])
        end
        -- The router stays unfused; the dense layer 1 has gate_up_proj.
        assert.are.same({ 3, 32 }, shapes[p .. "mlp.gate.weight"])
        assert.are.same({ 100, 32 }, shapes["model.layers.1.mlp.gate_up_proj.weight"])
        assert.is_nil(shapes["model.layers.1.mlp.experts.w13_weight"])
        assert.are.same({ 8 }, shapes[p .. "self_attn.q_norm.weight"])
    end)

    it("gives LoRA no experts, router or biases on a mixture-of-experts model", function()
        local spec = spec_of(moe)
        local lcfg = lora.config{ r = 2 }
        local shapes, dest, lparams = layout(spec, lcfg)
        check_cover(spec, shapes, dest, lparams)
        -- Attention on both layers (4 modules) and the dense layer 1's MLP (3): A and B each.
        assert.are.equal((4 * 2 + 3) * 2, #lparams)
        for _, a in ipairs(lparams) do
            assert.is_nil(a.base:find("experts", 1, true), a.name)
            assert.is_nil(a.base:find("mlp.gate.weight", 1, true), a.name)
            assert.is_nil(a.base:find("layers.0.mlp", 1, true), a.name)
        end
        -- Experts and router keep their names; wrapped dense modules get base_layer.
        assert.is_truthy(shapes[p .. "mlp.experts.w13_weight"])
        assert.is_truthy(shapes[p .. "mlp.gate.weight"])
        assert.is_truthy(shapes["model.layers.1.mlp.gate_up_proj.base_layer.weight"])
        assert.is_truthy(shapes[p .. "self_attn.qkv_proj.base_layer.weight"])
    end)

    it("refuses explicit MLP targets on a mixture-of-experts model", function()
        local spec = spec_of(moe)
        for _, m in ipairs({ "gate_proj", "up_proj", "down_proj" }) do
            local msg = err_of(lora.check_model, spec,
                               lora.config{ r = 2, target_modules = "q_proj," .. m })
            contains(msg, "LoRA on the experts of a mixture-of-experts model is not supported " ..
                          "('" .. m .. "' targets mlp.experts.N." .. m .. ")")
        end
        lora.check_model(spec, lora.config{ r = 2 })
        lora.check_model(spec, lora.config{ r = 2, target_modules = "q_proj,o_proj" })
        -- A dense model takes MLP targets.
        lora.check_model(spec_of(qwen2_cfg), lora.config{ r = 2, target_modules = "up_proj" })
        -- Every layer dense: nothing to refuse.
        local dense = {}
        for k, v in pairs(moe) do dense[k] = v end
        dense.mlp_only_layers = { 0, 1 }
        lora.check_model(spec_of(dense), lora.config{ r = 2, target_modules = "up_proj" })
    end)
end)

describe("lora.config", function()
    it("scales by alpha / r, or alpha / sqrt(r) with use_rslora", function()
        assert.are.equal(32 / 16, lora.config{ r = 16, alpha = 32 }.scale)
        local rs = lora.config{ r = 16, alpha = 32, use_rslora = true }
        assert.are.equal(32 / 4, rs.scale)
        assert.is_true(rs.use_rslora)
        assert.are.equal(8 / math.sqrt(3), lora.config{ r = 3, alpha = 8, use_rslora = true }.scale)
        assert.is_false(lora.config{ r = 3, alpha = 8 }.use_rslora)
    end)

    it("uses the family's dense linear shapes", function()
        -- decoder.linear_shapes of the Qwen2 config above, by hand.
        local lin = decoder.linear_shapes(spec_of(qwen2_cfg))
        assert.are.same({ 48, 48 }, lin.q_proj)
        assert.are.same({ 24, 48 }, lin.v_proj)
        assert.are.same({ 48, 80 }, lin.down_proj)
    end)
end)
