-- ws.family.decoder: what the decoder-only families share.
--
-- A family file (lua/ws/family/<model_type>.lua) describes one Hugging Face
-- architecture with `decoder.family{...}`: which config.json keys it reads,
-- which parameters exist (q/k norms, q/k/v biases, mixture-of-experts
-- layers), how the engine fuses them (vLLM's layouts) and which modules LoRA
-- may wrap. Supporting a new family is a new file here; nothing in C knows
-- about architectures.
--
-- A spec is plain data: family, arch, hidden, layers, intermediate, heads,
-- kv_heads, head_dim, vocab, tied, qk_norm, qkv_bias, o_bias, and for
-- mixture-of-experts models experts, moe_intermediate and sparse (layer ->
-- true for layers whose MLP is the experts).
local M = {}

M.attn_modules = { "q_proj", "k_proj", "v_proj", "o_proj" }
M.mlp_modules = { "gate_proj", "up_proj", "down_proj" }
M.linear_modules = { "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj" }

-- vLLM's fused modules: HF module -> {engine module, position}; the parts in order.
M.fused = {
    q_proj = { "qkv_proj", 1 }, k_proj = { "qkv_proj", 2 }, v_proj = { "qkv_proj", 3 },
    gate_proj = { "gate_up_proj", 1 }, up_proj = { "gate_up_proj", 2 },
}
M.parts = { qkv_proj = { "q_proj", "k_proj", "v_proj" }, gate_up_proj = { "gate_proj", "up_proj" } }

local function numel_of(shape)
    local n = 1
    for _, d in ipairs(shape) do n = n * d end
    return n
end
M.numel = numel_of

-- ------------------------------------------------------------ config.json

-- Reads config.json's keys into a spec; `where` names the file in errors.
local function reader(cfg, where)
    local r = {}
    function r.int(key, default, min)
        local v = cfg[key]
        if v == nil then
            if default ~= nil then return default end
            error(string.format("%s: key '%s' is missing", where, key), 0)
        end
        -- A JSON string ("96") is not a number to transformers either.
        local i = type(v) == "number" and math.tointeger(v) or nil
        if i == nil or i < (min or 1) then
            error(string.format("%s: key '%s' must be an integer >= %d, got %s", where, key,
                                min or 1, tostring(v)), 0)
        end
        return i
    end
    function r.bool(key, default)
        local v = cfg[key]
        if v == nil then return default end
        if type(v) ~= "boolean" then
            error(string.format("%s: key '%s' must be true or false, got %s", where, key,
                                tostring(v)), 0)
        end
        return v
    end
    function r.int_list(key)
        local v = cfg[key]
        if v == nil then return {} end
        if type(v) ~= "table" then
            error(string.format("%s: key '%s' must be a list of layer numbers", where, key), 0)
        end
        local out = {}
        for _, x in ipairs(v) do
            local i = type(x) == "number" and math.tointeger(x) or nil
            if i == nil or i < 0 then
                error(string.format("%s: key '%s' holds %s, not a layer number", where, key,
                                    tostring(x)), 0)
            end
            out[#out + 1] = i
        end
        return out
    end
    return r
end

-- The spec every decoder family reads; a family's `read` adds its own keys.
local function base_spec(fam, cfg, where)
    local r = reader(cfg, where)
    local s = { family = fam.name }
    s.hidden = r.int("hidden_size")
    s.layers = r.int("num_hidden_layers")
    s.intermediate = r.int("intermediate_size")
    s.heads = r.int("num_attention_heads")
    s.kv_heads = r.int("num_key_value_heads", s.heads)
    s.head_dim = r.int("head_dim", s.hidden // s.heads)
    s.vocab = r.int("vocab_size")
    s.tied = r.bool("tie_word_embeddings", false)
    if s.heads % s.kv_heads ~= 0 then
        error(string.format("%s: num_attention_heads (%d) is not a multiple of " ..
                            "num_key_value_heads (%d)", where, s.heads, s.kv_heads), 0)
    end
    if cfg.head_dim == nil and s.hidden % s.heads ~= 0 then
        error(string.format("%s: hidden_size (%d) is not a multiple of num_attention_heads " ..
                            "(%d); give head_dim", where, s.hidden, s.heads), 0)
    end
    s.qk_norm = fam.qk_norm or false
    s.qkv_bias = fam.qkv_bias or false
    local attention_bias = r.bool("attention_bias", false)
    if attention_bias then s.qkv_bias, s.o_bias = true, true end
    if fam.read then fam.read(s, r, cfg, where) end
    return s
end

-- ------------------------------------------------------------ parameters

-- Shapes of the dense linear modules of one layer, [out, in].
function M.linear_shapes(spec)
    local h, q = spec.hidden, spec.heads * spec.head_dim
    local kv, i = spec.kv_heads * spec.head_dim, spec.intermediate
    return {
        q_proj = { q, h }, k_proj = { kv, h }, v_proj = { kv, h }, o_proj = { h, q },
        gate_proj = { i, h }, up_proj = { i, h }, down_proj = { h, i },
    }
end

-- Every parameter in Hugging Face order (as state_dict() lists them):
-- {name, shape, numel, layer (nil for globals), block ("self_attn"/"mlp"/nil),
-- module ("q_proj", "input_layernorm", "gate" (router), ...), role
-- ("weight"/"bias"), expert (0-based, experts only)}.
function M.params(spec)
    local out = {}
    local function add(name, shape, layer, block, module, role, expert)
        out[#out + 1] = { name = name, shape = shape, numel = numel_of(shape), layer = layer,
                          block = block, module = module, role = role or "weight",
                          expert = expert }
    end
    local lin = M.linear_shapes(spec)
    local h = spec.hidden
    add("model.embed_tokens.weight", { spec.vocab, h }, nil, nil, "embed_tokens")
    for l = 0, spec.layers - 1 do
        local p = "model.layers." .. l .. "."
        for _, m in ipairs(M.attn_modules) do
            local stem = p .. "self_attn." .. m
            add(stem .. ".weight", lin[m], l, "self_attn", m)
            if (m ~= "o_proj" and spec.qkv_bias) or (m == "o_proj" and spec.o_bias) then
                add(stem .. ".bias", { lin[m][1] }, l, "self_attn", m, "bias")
            end
        end
        if spec.qk_norm then
            add(p .. "self_attn.q_norm.weight", { spec.head_dim }, l, "self_attn", "q_norm")
            add(p .. "self_attn.k_norm.weight", { spec.head_dim }, l, "self_attn", "k_norm")
        end
        if spec.sparse and spec.sparse[l] then
            local mi = spec.moe_intermediate
            add(p .. "mlp.gate.weight", { spec.experts, h }, l, "mlp", "gate")
            local eshape = { gate_proj = { mi, h }, up_proj = { mi, h }, down_proj = { h, mi } }
            for e = 0, spec.experts - 1 do
                for _, m in ipairs(M.mlp_modules) do
                    add(p .. "mlp.experts." .. e .. "." .. m .. ".weight", eshape[m], l, "mlp", m,
                        "weight", e)
                end
            end
        else
            for _, m in ipairs(M.mlp_modules) do
                add(p .. "mlp." .. m .. ".weight", lin[m], l, "mlp", m)
            end
        end
        -- The decoder layer registers its norms after self_attn and mlp.
        add(p .. "input_layernorm.weight", { h }, l, nil, "input_layernorm")
        add(p .. "post_attention_layernorm.weight", { h }, l, nil, "post_attention_layernorm")
    end
    add("model.norm.weight", { h }, nil, nil, "norm")
    if not spec.tied then add("lm_head.weight", { spec.vocab, h }, nil, nil, "lm_head") end
    return out
end

-- ------------------------------------------------------------ engine layout

-- vLLM's layout of the parameters: the engine's tensors in order ({name,
-- shape}) and, per Hugging Face (or PEFT) parameter name, where it lands:
-- {name = engine tensor, offset = first element, numel, label}. Fused
-- modules stack their parts along dim 0 (qkv_proj: q, k, v; gate_up_proj:
-- gate, up); under LoRA a wrapped module keeps `.base_layer.weight` (and
-- `.base_layer.bias`); a mixture-of-experts layer holds its experts as
-- FusedMoE does: w13_weight [E, 2*I, H] (each expert's gate rows, then its up
-- rows) and w2_weight [E, H, I]; the router stays unfused. Each tensor entry
-- says whether it is a linear layer's weight (`linear`): the fused
-- attention and MLP weights (under LoRA their `.base_layer.weight`) and the
-- experts; never embeddings, lm_head, norms, the router, biases or adapters.
function M.engine_layout(spec, params, lcfg, lora_params)
    local order, shapes, dest = {}, {}, {}
    -- linear: a linear layer's weight (what engine_dtype=fp8_block may quantize).
    local function declare(name, shape, linear)
        if not shapes[name] then
            shapes[name] = shape
            order[#order + 1] = { name = name, shape = shape, linear = linear or false }
        end
    end
    local lin = M.linear_shapes(spec)
    local function wrapped(emod)
        if not lcfg then return false end
        for _, sub in ipairs(M.parts[emod] or { emod }) do
            if lcfg.target_set[sub] then return true end
        end
        return false
    end
    for _, p in ipairs(params) do
        local f = M.fused[p.module]
        if p.expert then
            local stem = p.name:gsub("experts%.%d+%." .. p.module .. "%.weight$", "experts.")
            local h, mi, e = spec.hidden, spec.moe_intermediate, p.expert
            if p.module == "down_proj" then
                local name = stem .. "w2_weight"
                declare(name, { spec.experts, h, mi }, true)
                dest[p.name] = { name = name, offset = e * h * mi, numel = p.numel,
                                 label = string.format("%s[expert %d]", name, e) }
            else
                local name = stem .. "w13_weight"
                declare(name, { spec.experts, 2 * mi, h }, true)
                local up = p.module == "up_proj" and 1 or 0
                dest[p.name] = { name = name, offset = (2 * e + up) * mi * h, numel = p.numel,
                                 label = string.format("%s[expert %d %s]", name, e,
                                                       up == 1 and "up" or "gate") }
            end
        elseif p.block and lin[p.module] then
            local emod = f and f[1] or p.module
            local stem = p.name:gsub(p.module .. "%." .. p.role .. "$", emod)
            local name = stem .. (wrapped(emod) and ".base_layer." or ".") .. p.role
            if f then
                local rows, offset = 0, 0
                for i, sub in ipairs(M.parts[emod]) do
                    if i < f[2] then offset = offset + lin[sub][1] end
                    rows = rows + lin[sub][1]
                end
                local cols = p.role == "weight" and p.shape[2] or 1
                declare(name, p.role == "weight" and { rows, cols } or { rows }, p.role == "weight")
                dest[p.name] = { name = name, offset = offset * cols, numel = p.numel,
                                 label = string.format("%s[rows %d..%d]", name, offset + 1,
                                                       offset + p.shape[1]) }
            else
                declare(name, p.shape, p.role == "weight")
                dest[p.name] = { name = name, offset = 0, numel = p.numel, label = name }
            end
        else
            declare(p.name, p.shape)
            dest[p.name] = { name = p.name, offset = 0, numel = p.numel, label = p.name }
        end
    end
    for _, a in ipairs(lora_params or {}) do
        local f = M.fused[a.module]
        local emod = f and f[1] or a.module
        local stem = a.base:gsub(a.module .. "%.weight$", emod)
        local name = stem .. ".lora_" .. a.which .. (f and ("." .. a.module .. ".weight") or ".weight")
        declare(name, a.shape)
        dest[a.name] = { name = name, offset = 0, numel = a.numel, label = name }
    end
    return order, dest
end

-- Which engine tensors engine_dtype=fp8_block stores as fp8 with 128x128
-- block scales: the linear layers' weights. Norms, embeddings, lm_head, the
-- router, biases and LoRA adapters stay bf16 (small, or sensitive: the
-- router's logits pick the experts). A family may pass its own `quantized`.
function M.quantized(entry)
    return entry.linear == true
end

-- ------------------------------------------------------------ families

-- def: name (the config's model_type and the file name), architectures
-- (config.json `architectures` values), qk_norm, qkv_bias, read(spec,
-- reader, cfg, where) for keys of its own, lora_modules (default: every
-- dense linear module), quantized(entry) (default M.quantized). Returns the
-- family table.
function M.family(def)
    local fam = {}
    for k, v in pairs(def) do fam[k] = v end
    fam.lora_modules = def.lora_modules or M.linear_modules
    fam.from_config = function(cfg, where) return base_spec(fam, cfg, where) end
    fam.params = def.params or M.params
    fam.linear_shapes = def.linear_shapes or M.linear_shapes
    fam.engine_layout = def.engine_layout or M.engine_layout
    fam.quantized = def.quantized or M.quantized
    return fam
end

return M
