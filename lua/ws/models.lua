-- ws.models: model specs (HF Qwen3 parameter names and shapes).
--
-- A spec is plain data; `models.params(spec)` lists every trainer parameter in
-- HF order with its shape, so the trainer, the engine layout and the sync
-- plans are all derived from one place. The `tiny` preset keeps the Qwen3
-- structure at a few MB, with odd sizes so FSDP shards are uneven on 2 or 4
-- ranks (exercising the padding path).
local M = {}

M.presets = {
    ["qwen3-0.6b"] = { hidden = 1024, layers = 28, intermediate = 3072, heads = 16,
                       kv_heads = 8, head_dim = 128, vocab = 151936, tied = true },
    ["qwen3-1.7b"] = { hidden = 2048, layers = 28, intermediate = 6144, heads = 16,
                       kv_heads = 8, head_dim = 128, vocab = 151936, tied = true },
    ["qwen3-8b"] = { hidden = 4096, layers = 36, intermediate = 12288, heads = 32,
                     kv_heads = 8, head_dim = 128, vocab = 151936, tied = false },
    tiny = { hidden = 99, layers = 2, intermediate = 257, heads = 4, kv_heads = 2,
             head_dim = 16, vocab = 8191, tied = true },
}

-- Names in a stable order (for messages and `--help`).
function M.names()
    local names = {}
    for name in pairs(M.presets) do names[#names + 1] = name end
    table.sort(names)
    return names
end

-- Returns a copy of the preset with its name, or raises naming the choices.
function M.get(name)
    local p = M.presets[name]
    if not p then
        error(string.format("unknown model '%s' (known: %s)", tostring(name),
                            table.concat(M.names(), ", ")), 2)
    end
    local spec = { name = name }
    for k, v in pairs(p) do spec[k] = v end
    return spec
end

local function numel_of(shape)
    local n = 1
    for _, d in ipairs(shape) do n = n * d end
    return n
end
M.numel = numel_of

-- Shapes of the linear modules of one layer, [out, in], keyed by module name.
function M.linear_shapes(spec)
    local h, q = spec.hidden, spec.heads * spec.head_dim
    local kv, i = spec.kv_heads * spec.head_dim, spec.intermediate
    return {
        q_proj = { q, h }, k_proj = { kv, h }, v_proj = { kv, h }, o_proj = { h, q },
        gate_proj = { i, h }, up_proj = { i, h }, down_proj = { h, i },
    }
end

M.attn_modules = { "q_proj", "k_proj", "v_proj", "o_proj" }
M.mlp_modules = { "gate_proj", "up_proj", "down_proj" }

-- Every parameter: {name, shape, numel, layer (nil for globals), block
-- ("self_attn"/"mlp"/nil), module ("q_proj", "input_layernorm", ...)}.
function M.params(spec)
    local out = {}
    local function add(name, shape, layer, block, module)
        out[#out + 1] = { name = name, shape = shape, numel = numel_of(shape), layer = layer,
                          block = block, module = module }
    end
    local lin = M.linear_shapes(spec)
    add("model.embed_tokens.weight", { spec.vocab, spec.hidden }, nil, nil, "embed_tokens")
    for l = 0, spec.layers - 1 do
        local p = "model.layers." .. l .. "."
        add(p .. "input_layernorm.weight", { spec.hidden }, l, nil, "input_layernorm")
        for _, m in ipairs(M.attn_modules) do
            add(p .. "self_attn." .. m .. ".weight", lin[m], l, "self_attn", m)
        end
        add(p .. "self_attn.q_norm.weight", { spec.head_dim }, l, "self_attn", "q_norm")
        add(p .. "self_attn.k_norm.weight", { spec.head_dim }, l, "self_attn", "k_norm")
        add(p .. "post_attention_layernorm.weight", { spec.hidden }, l, nil,
            "post_attention_layernorm")
        for _, m in ipairs(M.mlp_modules) do
            add(p .. "mlp." .. m .. ".weight", lin[m], l, "mlp", m)
        end
    end
    add("model.norm.weight", { spec.hidden }, nil, nil, "norm")
    if not spec.tied then
        add("lm_head.weight", { spec.vocab, spec.hidden }, nil, nil, "lm_head")
    end
    return out
end

function M.param_count(spec)
    local n = 0
    for _, p in ipairs(M.params(spec)) do n = n + p.numel end
    return n
end

return M
