-- ws.models: which model a pipeline syncs.
--
-- `model=` is a preset name or a Hugging Face model directory. Both become a
-- spec through the same path: a preset is the config.json of the published
-- model (shapes only, the trainer starts from seeded random values), a
-- directory's config.json is read as written. The family of the config's
-- first `architectures` entry (lua/ws/family/*.lua) turns it into a spec
-- and lists the parameters; `models.params(spec)` is the one list the
-- trainer, the engine layout and the sync plans are derived from. The `tiny`
-- presets keep the structure at a few MB, with odd sizes so FSDP shards are
-- uneven on 2 or 4 ranks (exercising the padding path).
local json = require("ws.json")

local M = {}

local function qwen3(hidden, layers, intermediate, heads, kv_heads, tied)
    return { architectures = { "Qwen3ForCausalLM" }, model_type = "qwen3", hidden_size = hidden,
             num_hidden_layers = layers, intermediate_size = intermediate,
             num_attention_heads = heads, num_key_value_heads = kv_heads, head_dim = 128,
             vocab_size = 151936, tie_word_embeddings = tied }
end

local function qwen3_moe(hidden, layers, intermediate, heads, experts, moe_intermediate)
    return { architectures = { "Qwen3MoeForCausalLM" }, model_type = "qwen3_moe",
             hidden_size = hidden, num_hidden_layers = layers, intermediate_size = intermediate,
             num_attention_heads = heads, num_key_value_heads = 4, head_dim = 128,
             vocab_size = 151936, tie_word_embeddings = false, num_experts = experts,
             num_experts_per_tok = 8, moe_intermediate_size = moe_intermediate,
             decoder_sparse_step = 1, mlp_only_layers = {} }
end

-- The published sizes (config.json of each Hugging Face repository).
M.presets = {
    ["qwen3-0.6b"] = qwen3(1024, 28, 3072, 16, 8, true),
    ["qwen3-1.7b"] = qwen3(2048, 28, 6144, 16, 8, true),
    ["qwen3-8b"] = qwen3(4096, 36, 12288, 32, 8, false),
    ["qwen3-30b-a3b"] = qwen3_moe(2048, 48, 6144, 32, 128, 768),
    ["qwen3-235b-a22b"] = qwen3_moe(4096, 94, 12288, 64, 128, 1536),
    tiny = { architectures = { "Qwen3ForCausalLM" }, model_type = "qwen3", hidden_size = 99,
             num_hidden_layers = 2, intermediate_size = 257, num_attention_heads = 4,
             num_key_value_heads = 2, head_dim = 16, vocab_size = 8191,
             tie_word_embeddings = true },
    -- Layer 1 keeps a dense MLP (mlp_only_layers), so both kinds are exercised.
    ["tiny-moe"] = { architectures = { "Qwen3MoeForCausalLM" }, model_type = "qwen3_moe",
                     hidden_size = 72, num_hidden_layers = 3, intermediate_size = 131,
                     num_attention_heads = 4, num_key_value_heads = 2, head_dim = 16,
                     vocab_size = 1021, tie_word_embeddings = false, num_experts = 4,
                     num_experts_per_tok = 2, moe_intermediate_size = 37,
                     decoder_sparse_step = 1, mlp_only_layers = { 1 } },
}

-- The families this library knows (lua/ws/family/<name>.lua).
M.families = { "llama", "mistral", "qwen2", "qwen3", "qwen3_moe" }

-- Names in a stable order (for messages and `--help`).
function M.names()
    local names = {}
    for name in pairs(M.presets) do names[#names + 1] = name end
    table.sort(names)
    return names
end

-- The family module of a config.json table: by the first of
-- `architectures`, else (none given) by model_type. Raises listing the known
-- architectures.
function M.family_of(cfg, where)
    local arch = type(cfg.architectures) == "table" and cfg.architectures[1] or nil
    local known = {}
    for _, name in ipairs(M.families) do
        local fam = require("ws.family." .. name)
        for _, a in ipairs(fam.architectures) do
            if a == arch then return fam end
            known[#known + 1] = a
        end
    end
    if arch == nil and type(cfg.model_type) == "string" then
        for _, name in ipairs(M.families) do
            if name == cfg.model_type then return require("ws.family." .. name) end
        end
    end
    table.sort(known)
    error(string.format("%s: architecture '%s' is not supported (known: %s)", where,
                        tostring(arch or cfg.model_type), table.concat(known, ", ")), 0)
end

-- A spec from a config.json table.
function M.from_config(cfg, name, where)
    local fam = M.family_of(cfg, where)
    local spec = fam.from_config(cfg, where)
    spec.name = name
    spec.arch = type(cfg.architectures) == "table" and cfg.architectures[1] or fam.architectures[1]
    return spec
end

local function read_file(path)
    local f = io.open(path, "rb")
    if not f then return nil end
    local text = f:read("a")
    f:close()
    return text
end

local function exists(path)
    local f = io.open(path, "rb")
    if f then f:close() end
    return f ~= nil
end

-- The weights of a model directory: model.safetensors.index.json or
-- model.safetensors (nil: a directory without weights).
function M.weights_of(dir)
    for _, f in ipairs({ "model.safetensors.index.json", "model.safetensors" }) do
        if exists(dir .. "/" .. f) then return dir .. "/" .. f end
    end
    return nil
end

-- Returns the spec of a preset name or of a Hugging Face model directory, or
-- raises naming the choices.
function M.get(name)
    local p = M.presets[name]
    if p then
        local spec = M.from_config(p, name, "preset '" .. name .. "'")
        spec.preset = true
        return spec
    end
    local dir = tostring(name):gsub("/+$", "")
    local text = read_file(dir .. "/config.json")
    if not text then
        error(string.format("unknown model '%s': not a preset (known: %s) and not a directory " ..
                            "holding config.json", tostring(name), table.concat(M.names(), ", ")), 2)
    end
    local where = dir .. "/config.json"
    local ok, cfg = pcall(json.decode, text)
    if not ok or type(cfg) ~= "table" or getmetatable(cfg) == json.array_mt then
        error(string.format("%s: not a JSON object (%s)", where,
                            tostring(ok and "got " .. type(cfg) or cfg):gsub("^[^:]*:%d+: ", "")), 0)
    end
    local spec = M.from_config(cfg, dir:match("([^/]+)$") or dir, where)
    spec.dir, spec.config_text = dir, text
    spec.weights = M.weights_of(dir)
    return spec
end

-- The family module of a spec.
function M.family(spec) return require("ws.family." .. spec.family) end

-- Every parameter (see ws.family.decoder.params), computed once per spec.
function M.params(spec)
    if not spec.param_list then spec.param_list = M.family(spec).params(spec) end
    return spec.param_list
end

function M.numel(shape)
    local n = 1
    for _, d in ipairs(shape) do n = n * d end
    return n
end

function M.linear_shapes(spec) return M.family(spec).linear_shapes(spec) end

function M.param_count(spec)
    local n = 0
    for _, p in ipairs(M.params(spec)) do n = n + p.numel end
    return n
end

return M
