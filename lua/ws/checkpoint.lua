-- ws.checkpoint: Hugging Face model directories and PEFT adapters on disk.
--
-- Reading: a model directory's weights (model.safetensors or shards plus
-- model.safetensors.index.json) must agree with the parameters its
-- config.json implies; the trainer then copies each rank's own FSDP rows out
-- of the mapped files (ws.safetensors maps them, so a rank's read touches only
-- its rows), converting to its dtype in one batched C call.
--
-- Writing: `save_model` writes the trainer's weights as save_pretrained does
-- (Hugging Face names, shards of at most max_shard_bytes in parameter order,
-- model.safetensors.index.json, config.json copied); `save_adapter` writes
-- PEFT's adapter_config.json and adapter_model.safetensors; `save_engine`
-- one file per engine rank in the engine's own names. Whole tensors are
-- gathered over the ranks one shard at a time, so no rank ever holds more
-- than one shard of full tensors; rank 0 writes. Every file is written
-- under a temporary name and renamed, so a failure never leaves a file that
-- looks complete; the index comes last.
local ws = require("ws")
local json = require("ws.json")
local errors = require("ws.errors")
local models = require("ws.models")
local must = errors.must

local M = {}

-- Hugging Face's default max_shard_size ("5GB").
M.DEFAULT_SHARD_BYTES = 5 * 1000 * 1000 * 1000

local function fail(fmt, ...) errors.raise("checkpoint", fmt, ...) end

local function shape_str(shape)
    local parts = {}
    for i, d in ipairs(shape) do parts[i] = tostring(d) end
    return "[" .. table.concat(parts, ", ") .. "]"
end

local function same_shape(a, b)
    if #a ~= #b then return false end
    for i = 1, #a do if a[i] ~= b[i] then return false end end
    return true
end

local TRAINABLE_DTYPES = { f32 = true, bf16 = true, f16 = true }

-- Returns ck once check(ck) passes; frees it and raises otherwise.
local function checked(ck, check)
    local ok, err = pcall(check, ck)
    if not ok then
        ck:free()
        error(err, 0)
    end
    return ck
end

-- Opens the weights of a spec from a model directory (nil without weights)
-- and checks them against the parameter list of its config.json: the same
-- names, shapes and a floating dtype the trainer can start from. A tied
-- model's checkpoint may still carry lm_head.weight; it is not read.
function M.open_model(spec)
    if not spec.weights then return nil end
    return checked(must("model " .. spec.dir, ws.safetensors(spec.weights)),
                   function(ck) M.check_model(spec, ck) end)
end

function M.check_model(spec, ck)
    local where = spec.dir
    local want = {}
    for _, p in ipairs(models.params(spec)) do
        want[p.name] = p
        local info = ck:info(p.name)
        if not info then
            fail("model %s: config.json (%s) implies tensor '%s' %s, which the checkpoint " ..
                 "does not have", where, spec.arch, p.name, shape_str(p.shape))
        end
        if not same_shape(info.shape, p.shape) then
            fail("model %s: tensor '%s' is %s in the checkpoint but config.json implies %s",
                 where, p.name, shape_str(info.shape), shape_str(p.shape))
        end
        if not TRAINABLE_DTYPES[info.dtype] then
            fail("model %s: tensor '%s' is %s; the trainer starts from f32, bf16 or f16 weights",
                 where, p.name, info.dtype)
        end
    end
    for _, name in ipairs(ck:names()) do
        if not want[name] and not (spec.tied and name == "lm_head.weight") then
            fail("model %s: the checkpoint has tensor '%s', which config.json (%s) does not " ..
                 "imply; check config.json against the weights", where, name, spec.arch)
        end
    end
end

-- Copies each entry's real shard elements out of the checkpoint (converting
-- to the shard's dtype), all in one C call. entries: trainer entries (name,
-- first, real, view).
function M.load_shards(ck, entries)
    local dsts, names, firsts = {}, {}, {}
    for _, e in ipairs(entries) do
        if e.real > 0 then
            local k = #dsts + 1
            dsts[k], names[k], firsts[k] = e.view, e.name, e.first
        end
    end
    must("load", ck:read_rows(dsts, names, firsts))
end

-- ------------------------------------------------------------------ PEFT

-- Reads DIR/adapter_config.json: {r, alpha, target_modules, use_rslora,
-- path}. Raises naming the file for anything PEFT would not have written or
-- this library cannot apply.
function M.read_adapter_config(dir)
    local where = dir .. "/adapter_config.json"
    local f = io.open(where, "rb")
    if not f then fail("adapter %s: no adapter_config.json there (a PEFT adapter directory " ..
                       "holds adapter_config.json and adapter_model.safetensors)", dir) end
    local text = f:read("a")
    f:close()
    local ok, c = pcall(json.decode, text)
    if not ok or type(c) ~= "table" or getmetatable(c) == json.array_mt then
        fail("%s: not a JSON object", where)
    end
    if c.peft_type ~= nil and c.peft_type ~= "LORA" then
        fail("%s: peft_type is '%s'; only LORA adapters are supported", where, tostring(c.peft_type))
    end
    local r = math.tointeger(c.r)
    if not r or r < 1 then fail("%s: 'r' must be an integer >= 1, got %s", where, tostring(c.r)) end
    local alpha = c.lora_alpha == nil and r or c.lora_alpha
    if type(alpha) ~= "number" then fail("%s: 'lora_alpha' must be a number", where) end
    local targets = c.target_modules
    if type(targets) == "table" then
        targets = table.concat(targets, ",")
    elseif targets ~= "all-linear" then
        fail("%s: 'target_modules' must be a list of module names or \"all-linear\", got %s",
             where, tostring(targets))
    end
    if c.bias ~= nil and c.bias ~= "none" then
        fail("%s: bias '%s' is not supported (adapters train no biases here: \"none\")", where,
             tostring(c.bias))
    end
    local rslora = c.use_rslora == true
    return { r = r, alpha = alpha, target_modules = targets, use_rslora = rslora, path = dir }
end

-- Opens DIR/adapter_model.safetensors and checks it holds exactly the
-- adapter's parameters with their shapes.
function M.open_adapter(dir, adapter_params)
    local path = dir .. "/adapter_model.safetensors"
    return checked(must("adapter " .. dir, ws.safetensors(path)), function(ck)
        local want = {}
        for _, a in ipairs(adapter_params) do
            want[a.name] = true
            local info = ck:info(a.name)
            if not info then
                fail("adapter %s: adapter_model.safetensors has no tensor '%s' %s, which its " ..
                     "adapter_config.json implies for this model", dir, a.name, shape_str(a.shape))
            end
            if not same_shape(info.shape, a.shape) then
                fail("adapter %s: tensor '%s' is %s but the model needs %s", dir, a.name,
                     shape_str(info.shape), shape_str(a.shape))
            end
            if not TRAINABLE_DTYPES[info.dtype] then
                fail("adapter %s: tensor '%s' is %s; adapters load from f32, bf16 or f16", dir,
                     a.name, info.dtype)
            end
        end
        for _, name in ipairs(ck:names()) do
            if not want[name] then
                fail("adapter %s: tensor '%s' is not a LoRA weight of this model's targets " ..
                     "(check target_modules and the base model)", dir, name)
            end
        end
    end)
end

-- ------------------------------------------------------------------ writing

-- Atomic (a temporary of its own, synced, renamed), as the shards are.
local function write_text(path, text) must("save", ws.write_text(path, text)) end

local function make_dir(dir) must("save", ws.mkdir(dir)) end

-- Splits entries into shards as save_pretrained does (the writer's own rule,
-- ws.shard_split): in order, a new shard when the next tensor would pass
-- max_bytes and the current one is not empty. Returns the shards (lists of
-- entries), each entry's shard number and the shards' file names.
function M.split_shards(entries, esize, max_bytes, prefix)
    local sizes = {}
    for i, e in ipairs(entries) do sizes[i] = e.numel * esize end
    local shard_of, files = ws.shard_split(sizes, max_bytes, prefix)
    local shards = {}
    for i, e in ipairs(entries) do
        local k = shard_of[i]
        shards[k] = shards[k] or {}
        table.insert(shards[k], e)
    end
    if #entries == 0 then shards = {} end
    return shards, shard_of, files
end

-- Full tensors (Hugging Face shapes) of trainer entries on every rank:
-- views of the shards when the world is one, else gathered by a plan into
-- tensors this call makes. Returns the tensors and a function freeing what
-- was made.
local function full_tensors(tr, entries, ctx)
    local out, made = {}, {}
    local function free_all()
        for i = #made, 1, -1 do made[i]:free() end
    end
    local ok, err = pcall(function()
        if (ctx.world or 1) == 1 then
            for i, e in ipairs(entries) do
                local t = e.view and e.view:reshape(e.shape)
                    or must("save", ws.tensor{ shape = e.shape, dtype = e.dtype or tr.dtype,
                                               device = tr.device, name = e.name })
                made[#made + 1], out[i] = t, t
            end
            return
        end
        local srcs, dsts, numels, shards = {}, {}, {}, {}
        for i, e in ipairs(entries) do
            local t = must("save", ws.tensor{ shape = e.shape, dtype = e.dtype or tr.dtype,
                                              device = tr.device, name = e.name })
            made[#made + 1], out[i] = t, t
            local flat = t:flat()
            made[#made + 1] = flat
            srcs[i], dsts[i], numels[i], shards[i] = e.tensor, flat, e.numel, e.shard_numel
        end
        local plan <close> = must("save", ws.plan{ comm = ctx.comm, device = tr.device,
                                                   name = "save" })
        plan:add(srcs, dsts, numels, shards)
        plan:execute()
    end)
    if not ok then
        free_all()
        error(err, 0)
    end
    return out, free_all
end

-- Writes the trainer entries (base or adapter) as shards under dir:
-- <prefix>.safetensors, or <prefix>-0000k-of-0000N.safetensors plus
-- <prefix>.safetensors.index.json. Every rank takes part in the gathers;
-- rank 0 writes. Returns the files written.
local function write_entries(tr, entries, dir, prefix, max_bytes, ctx, progress)
    local esize = tr.dtype == "f32" and 4 or 2
    local shards, shard_of, names_of = M.split_shards(entries, esize, max_bytes, prefix)
    -- What a loader would read before the new files: an earlier save's
    -- single file (preferred by transformers) and index go first.
    if (ctx.rank or 0) == 0 then
        os.remove(dir .. "/" .. prefix .. ".safetensors")
        os.remove(dir .. "/" .. prefix .. ".safetensors.index.json")
    end
    local files = {}
    for k, shard in ipairs(shards) do
        local file = names_of[k]
        local tensors, free_all = full_tensors(tr, shard, ctx)
        local ok, err = pcall(function()
            if (ctx.rank or 0) == 0 then
                local names = {}
                for i, e in ipairs(shard) do names[i] = e.name end
                must("save", ws.save_safetensors(dir .. "/" .. file, names, tensors,
                                                 { metadata = { format = "pt" } }))
                if progress then progress(k, #shards) end
            end
        end)
        free_all()
        if not ok then error(err, 0) end
        files[#files + 1] = file
    end
    if #shards > 1 and (ctx.rank or 0) == 0 then
        local names, total = {}, 0
        for i, e in ipairs(entries) do names[i], total = e.name, total + e.numel * esize end
        must("save", ws.save_index(dir, names, shard_of, total, prefix))
        files[#files + 1] = prefix .. ".safetensors.index.json"
    end
    return files
end

-- The config.json a saved model carries: the directory's own, byte for
-- byte, or a preset's published config.
local function config_text(spec)
    if spec.config_text then return spec.config_text end
    return json.encode(models.presets[spec.name] or {}) .. "\n"
end

-- save=DIR: the trainer's base weights as a Hugging Face checkpoint (under
-- LoRA the base as it is, not merged with the adapter). ctx: comm, rank,
-- world, max_shard_bytes, log.
function M.save_model(tr, dir, ctx)
    if tr.offloaded then tr:load() end
    if (ctx.rank or 0) == 0 then make_dir(dir) end
    local files = write_entries(tr, tr.base_params, dir, "model",
                                ctx.max_shard_bytes or M.DEFAULT_SHARD_BYTES, ctx)
    if (ctx.rank or 0) == 0 then
        write_text(dir .. "/config.json", config_text(tr.spec))
        files[#files + 1] = "config.json"
    end
    return files
end

-- save_adapter=DIR: the trainer's adapter in PEFT's format.
function M.save_adapter(tr, dir, ctx)
    local lcfg = tr.lora
    if tr.offloaded then tr:load() end
    if (ctx.rank or 0) == 0 then make_dir(dir) end
    local files = write_entries(tr, tr.adapter_params, dir, "adapter_model", math.maxinteger, ctx)
    if (ctx.rank or 0) == 0 then
        local targets = json.array{}
        for i, m in ipairs(lcfg.targets) do targets[i] = m end
        write_text(dir .. "/adapter_config.json", json.encode{
            peft_type = "LORA", task_type = "CAUSAL_LM", r = lcfg.r, lora_alpha = lcfg.alpha,
            target_modules = lcfg.all_linear and "all-linear" or targets,
            use_rslora = lcfg.use_rslora or false, bias = "none", lora_dropout = 0.0,
            base_model_name_or_path = tr.spec.dir or tr.spec.name,
        } .. "\n")
        files[#files + 1] = "adapter_config.json"
    end
    return files
end

-- save_engine=DIR: what this rank's engine holds, in its own names, as
-- DIR/engine-rank-<rank>.safetensors (every rank writes its own; with
-- placement=disaggregated the engine ranks only, numbered from 0 among
-- themselves, and a trainer rank writes nothing).
function M.save_engine(engine, dir, ctx)
    if engine.holds_nothing then return { "engine-rank-*.safetensors (on the engine ranks)" } end
    make_dir(dir)
    local names, tensors = {}, {}
    for i, name in ipairs(engine.order) do
        names[i], tensors[i] = name, engine.tensors[name]
    end
    local index = engine.save_index or ctx.rank or 0
    local file = string.format("engine-rank-%05d.safetensors", index)
    must("save_engine", ws.save_safetensors(dir .. "/" .. file, names, tensors,
                                            { metadata = { format = "pt" } }))
    return { file }
end

return M
