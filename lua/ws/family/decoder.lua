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
--
-- `par` (ws.parallel: tp, tp_rank, ep, ep_rank; nil: one rank holds all)
-- gives this rank's shard, as vLLM's parallel layers hold it:
--   QKVParallelLinear: q heads [t*H/T, (t+1)*H/T); KV heads likewise when
--     KV >= T, else KV head t // (T/KV), each held by T/KV ranks; fused per
--     rank as [q_t; k_t; v_t] (biases follow their rows);
--   MergedColumnParallelLinear (gate_up_proj): [gate rows t-th 1/T; up rows];
--   RowParallelLinear (o_proj, down_proj): columns [t*in/T, (t+1)*in/T); an
--     o_proj bias is held whole by every rank;
--   VocabParallelEmbedding / ParallelLMHead: the vocabulary padded to a
--     multiple of 64, then rows [t*Vp/T, (t+1)*Vp/T); the padding rows are
--     zeroed by each sync that writes the tensor (`pad_rows`: {real, rows}),
--     as vLLM's weight loader zeroes them;
--   FusedMoE: without EP each expert's intermediate split as gate_up and
--     down are; with EP (ep > 1) rank e holds experts [first, first + count)
--     (ws.parallel.expert_range) whole, and none of the others;
--   LoRA: column-parallel bases (qkv, gate_up) take lora_A whole and lora_B
--     split like their rows; row-parallel ones (o_proj, down_proj) lora_A
--     split like their columns and lora_B whole;
--   norms, q/k norms and the router: whole on every rank.
-- A split destination also says which block of the parameter it holds
-- (`block` = {cols, row_begin, row_end, col_begin, col_end}, 0-based, the
-- parameter seen as [numel / cols, cols]), over which group of ranks its
-- blocks partition the parameter (`group`: "tp" or "ep") and how many ranks
-- of that group hold each element (`replicas`).
function M.engine_layout(spec, params, lcfg, lora_params, par)
    local order, shapes, dest = {}, {}, {}
    local T, t = par and par.tp or 1, par and par.tp_rank or 0
    local E, er = par and par.ep or 1, par and par.ep_rank or 0
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
    local D = spec.head_dim
    -- The output rows of a column-parallel module this rank holds, and how
    -- many TP ranks hold each of them.
    local function out_rows(module)
        local full = lin[module][1]
        if T == 1 then return 0, full, 1 end
        if module == "k_proj" or module == "v_proj" then
            if spec.kv_heads >= T then
                local n = spec.kv_heads // T * D
                return t * n, (t + 1) * n, 1
            end
            local rep = T // spec.kv_heads
            local h = t // rep
            return h * D, (h + 1) * D, rep
        end
        local n = full // T
        return t * n, (t + 1) * n, 1
    end
    -- The input columns of a row-parallel module this rank holds.
    local function in_cols(module)
        local n = lin[module][2] // T
        return t * n, (t + 1) * n
    end
    local function rows_block(cols, r0, r1) return T > 1 and { cols, r0, r1, 0, cols } or nil end
    local function cols_block(rows, cols, c0, c1)
        return T > 1 and { cols, 0, rows, c0, c1 } or nil
    end
    -- A destination; `block` nil: the whole parameter, held by `replicas` ranks.
    local split = T > 1 or E > 1
    local function put(pname, d, block, group, replicas)
        if split then d.block, d.group, d.replicas = block, group or "tp", replicas or 1 end
        dest[pname] = d
    end
    local row_parallel = { o_proj = true, down_proj = true }
    local first_expert, n_experts = 0, spec.experts
    if E > 1 then first_expert, n_experts = require("ws.parallel").expert_range(spec.experts, E, er) end
    for _, p in ipairs(params) do
        local f = M.fused[p.module]
        if p.expert then
            local stem = p.name:gsub("experts%.%d+%." .. p.module .. "%.weight$", "experts.")
            local h, mi, e = spec.hidden, spec.moe_intermediate, p.expert
            if E > 1 then
                -- Whole experts, this rank's range only; the others land nowhere.
                local here, le = e >= first_expert and e < first_expert + n_experts, e - first_expert
                local name = stem .. (p.module == "down_proj" and "w2_weight" or "w13_weight")
                local up = p.module == "up_proj" and 1 or 0
                if p.module == "down_proj" then
                    declare(name, { n_experts, h, mi }, true)
                else
                    declare(name, { n_experts, 2 * mi, h }, true)
                end
                if here then
                    local offset = p.module == "down_proj" and le * h * mi or (2 * le + up) * mi * h
                    put(p.name, { name = name, offset = offset, numel = p.numel,
                                  label = string.format("%s[expert %d]", name, e) }, nil, "ep")
                else
                    put(p.name, { name = name, offset = 0, numel = 0,
                                  label = string.format("%s[expert %d: on another rank]", name, e) },
                        { p.shape[2], 0, 0, 0, p.shape[2] }, "ep")
                end
            elseif p.module == "down_proj" then
                local ml = mi // T
                local name = stem .. "w2_weight"
                declare(name, { spec.experts, h, ml }, true)
                put(p.name, { name = name, offset = e * h * ml, numel = h * ml,
                              label = string.format("%s[expert %d]", name, e) },
                    cols_block(h, mi, t * ml, (t + 1) * ml))
            else
                local ml = mi // T
                local name = stem .. "w13_weight"
                declare(name, { spec.experts, 2 * ml, h }, true)
                local up = p.module == "up_proj" and 1 or 0
                put(p.name, { name = name, offset = (2 * e + up) * ml * h, numel = ml * h,
                              label = string.format("%s[expert %d %s]", name, e,
                                                    up == 1 and "up" or "gate") },
                    rows_block(h, t * ml, (t + 1) * ml))
            end
        elseif p.block and lin[p.module] then
            local emod = f and f[1] or p.module
            local stem = p.name:gsub(p.module .. "%." .. p.role .. "$", emod)
            local name = stem .. (wrapped(emod) and ".base_layer." or ".") .. p.role
            local weight = p.role == "weight"
            local cols = weight and p.shape[2] or 1
            if f then
                local rows, offset = 0, 0
                for i, sub in ipairs(M.parts[emod]) do
                    local r0, r1 = out_rows(sub)
                    if i < f[2] then offset = offset + (r1 - r0) end
                    rows = rows + (r1 - r0)
                end
                declare(name, weight and { rows, cols } or { rows }, weight)
                local r0, r1, rep = out_rows(p.module)
                put(p.name, { name = name, offset = offset * cols, numel = (r1 - r0) * cols,
                              label = string.format("%s[rows %d..%d]", name, offset + 1,
                                                    offset + r1 - r0) },
                    rows_block(cols, r0, r1), "tp", rep)
            elseif row_parallel[p.module] and weight then
                local c0, c1 = in_cols(p.module)
                declare(name, { p.shape[1], c1 - c0 }, true)
                put(p.name, { name = name, offset = 0, numel = p.shape[1] * (c1 - c0), label = name },
                    cols_block(p.shape[1], p.shape[2], c0, c1))
            else
                declare(name, p.shape, weight)
                put(p.name, { name = name, offset = 0, numel = p.numel, label = name }, nil, "tp", T)
            end
        elseif T > 1 and (p.module == "embed_tokens" or p.module == "lm_head") then
            local per = require("ws.parallel").padded_vocab(spec.vocab) // T
            local r0, r1 = math.min(t * per, spec.vocab), math.min((t + 1) * per, spec.vocab)
            local h = p.shape[2]
            declare(p.name, { per, h })
            -- pad_rows: the rows past the vocabulary, which vLLM's loader zeroes.
            put(p.name, { name = p.name, offset = 0, numel = (r1 - r0) * h,
                          label = string.format("%s[vocab rows %d..%d]", p.name, r0 + 1, r1),
                          pad_rows = r1 - r0 < per and { r1 - r0, per } or nil },
                rows_block(h, r0, r1))
        else
            declare(p.name, p.shape)
            put(p.name, { name = p.name, offset = 0, numel = p.numel, label = p.name }, nil, "tp", T)
        end
    end
    for _, a in ipairs(lora_params or {}) do
        local f = M.fused[a.module]
        local emod = f and f[1] or a.module
        local stem = a.base:gsub(a.module .. "%.weight$", emod)
        local name = stem .. ".lora_" .. a.which .. (f and ("." .. a.module .. ".weight") or ".weight")
        local r = lcfg.r
        local split = T > 1 and ((row_parallel[a.module] and a.which == "A") or
                                 (not row_parallel[a.module] and a.which == "B"))
        if not split then
            declare(name, a.shape)
            put(a.name, { name = name, offset = 0, numel = a.numel, label = name }, nil, "tp", T)
        elseif a.which == "B" then
            local r0, r1, rep = out_rows(a.module)
            declare(name, { r1 - r0, r })
            put(a.name, { name = name, offset = 0, numel = (r1 - r0) * r, label = name },
                rows_block(r, r0, r1), "tp", rep)
        else
            local c0, c1 = in_cols(a.module)
            declare(name, { r, c1 - c0 })
            put(a.name, { name = name, offset = 0, numel = r * (c1 - c0), label = name },
                cols_block(r, a.shape[2], c0, c1))
        end
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
