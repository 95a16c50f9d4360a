-- ws.lora: LoRA adapter configuration and PEFT parameter names.
--
-- An adapter on a linear module W [out, in] is lora_A [r, in] and lora_B
-- [out, r], scaled by alpha / r. PEFT names them
-- `base_model.model.<module>.lora_A.weight`; the trainer uses these names so
-- adapters line up with adapter_model.safetensors files.
local models = require("ws.models")

local M = {}

M.all_linear = { "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj" }

local known = {}
for _, m in ipairs(M.all_linear) do known[m] = true end

-- Accepts "all-linear", "q_proj,v_proj" or a list; returns a sorted-by-layer-order
-- list and a set. Raises on an unknown module name, and on an empty list
-- unless allow_empty.
function M.parse_targets(targets, allow_empty)
    if targets == nil or targets == "all-linear" then
        targets = M.all_linear
    elseif type(targets) == "string" then
        local list = {}
        for item in targets:gmatch("[^,%s]+") do list[#list + 1] = item end
        targets = list
    end
    local set = {}
    for _, m in ipairs(targets) do
        if not known[m] then
            error(string.format("unknown LoRA target module '%s' (known: all-linear, %s)",
                                tostring(m), table.concat(M.all_linear, ", ")), 2)
        end
        set[m] = true
    end
    local list = {}
    for _, m in ipairs(M.all_linear) do
        if set[m] then list[#list + 1] = m end
    end
    if #list == 0 and not allow_empty then error("LoRA target_modules is empty", 2) end
    return list, set
end

-- The adapter's scale is alpha / r: a zero or negative alpha silences or
-- inverts it.
function M.check_alpha(alpha)
    if type(alpha) ~= "number" or not (alpha > 0 and alpha < math.huge) then
        error("LoRA alpha must be a finite number > 0, got " .. tostring(alpha), 0)
    end
end

-- cfg: {r=, alpha=, target_modules=, use_rslora=}. Returns nil when r == 0
-- (LoRA off). The scale is alpha / r, or alpha / sqrt(r) with rsLoRA.
function M.config(cfg)
    local r = cfg.r or 0
    if r == 0 then
        -- LoRA off, but a misspelt module name is still a mistake worth naming.
        M.parse_targets(cfg.target_modules, true)
        return nil
    end
    if math.type(r) ~= "integer" or r < 0 then
        error("LoRA rank must be a non-negative integer, got " .. tostring(r), 2)
    end
    local list, set = M.parse_targets(cfg.target_modules)
    local alpha = cfg.alpha or 16
    M.check_alpha(alpha)
    local rslora = cfg.use_rslora == true
    return { r = r, alpha = alpha, scale = rslora and alpha / math.sqrt(r) or alpha / r,
             use_rslora = rslora, targets = list, target_set = set,
             all_linear = cfg.target_modules == nil or cfg.target_modules == "all-linear" }
end

-- Raises unless rank r fits every targeted layer: lora_A [r, in] and lora_B
-- [out, r] only make sense (and stay small) for r <= min(out, in).
function M.check_rank(spec, lcfg)
    local lin = models.linear_shapes(spec)
    local limit, at
    for _, m in ipairs(lcfg.targets) do
        local s = lin[m]
        local side = math.min(s[1], s[2])
        if limit == nil or side < limit then limit, at = side, m end
    end
    if limit and lcfg.r > limit then
        error(string.format("LoRA rank %d is larger than the smallest targeted layer (%s [%d, %d]); "
                            .. "the rank must be <= %d", lcfg.r, at, lin[at][1], lin[at][2], limit), 0)
    end
end

-- Raises when a target cannot be honoured for this model: the engine's fused
-- experts take no adapter, so an MLP module named explicitly on a model with
-- mixture-of-experts layers is refused; "all-linear" there means attention
-- and the dense layers' MLPs.
function M.check_model(spec, lcfg)
    if not spec.sparse or next(spec.sparse) == nil or lcfg.all_linear then return end
    for _, m in ipairs(lcfg.targets) do
        if m == "gate_proj" or m == "up_proj" or m == "down_proj" then
            error(string.format("LoRA on the experts of a mixture-of-experts model is not " ..
                                "supported ('%s' targets mlp.experts.N.%s); target attention " ..
                                "modules (q_proj,k_proj,v_proj,o_proj) or all-linear", m, m), 0)
        end
    end
end

-- Adapter parameters for a model spec: {name, shape, numel, base (the HF base
-- parameter name), layer, block, module, which ("A"/"B")}. Only weights of
-- dense linear modules: no biases, no experts, no router.
function M.params(spec, lcfg)
    local out = {}
    for _, p in ipairs(models.params(spec)) do
        if p.block and p.role == "weight" and not p.expert and lcfg.target_set[p.module] then
            local stem = p.name:gsub("%.weight$", "")
            local rows, cols = p.shape[1], p.shape[2]
            for _, ab in ipairs({ { "A", { lcfg.r, cols } }, { "B", { rows, lcfg.r } } }) do
                out[#out + 1] = {
                    name = "base_model.model." .. stem .. ".lora_" .. ab[1] .. ".weight",
                    shape = ab[2], numel = ab[2][1] * ab[2][2], base = p.name,
                    layer = p.layer, block = p.block, module = p.module, which = ab[1],
                }
            end
        end
    end
    return out
end

function M.param_count(spec, lcfg)
    local n = 0
    for _, p in ipairs(M.params(spec, lcfg)) do n = n + p.numel end
    return n
end

return M
