-- ws.engine: a rollout-engine stand-in with vLLM's weight layout and sleep modes.
--
-- Full bf16 weights in the layout the model's family gives
-- (ws.family.decoder.engine_layout: q/k/v fused into qkv_proj and gate/up
-- into gate_up_proj, stacked on dim 0; experts fused into w13_weight and
-- w2_weight as vLLM's FusedMoE holds them); with LoRA, a wrapped module keeps
-- its base under `.base_layer.weight` and gets one adapter slot
-- (lora_A/lora_B per sub-module). Weights and adapters live in a pool tagged "weights", the KV
-- cache in one tagged "kv_cache", so sleep/wake_up behave like vLLM's
-- CuMemAllocator: level 1 backs the weights up to pinned host memory and
-- discards the KV cache, level 2 discards both; wake_up maps memory again at
-- the same addresses. Reading discarded contents raises in C, naming the
-- tensor, the pool and the sleep.
--
-- engine_dtype=fp8_block: the tensors the family's rule names (`quantized`:
-- linear layers' weights) are held as fp8 e4m3 plus `<name>_scale_inv`
-- (f32, one per 128x128 block), as vLLM loads DeepSeek-V3 and Qwen3 FP8
-- checkpoints. The sync writes their bf16 values into a staging copy (a
-- third pool, tagged "staging", mapped only during a sync that writes it),
-- then one batched call quantizes all of them; the staging pool then goes
-- to a level-2 sleep, so its memory is returned.
local ws = require("ws")
local models = require("ws.models")
local lora = require("ws.lora")
local must = require("ws.errors").must

local M = {}
local Engine = {}
Engine.__index = Engine

M.dtypes = { "bf16", "fp8_block" }

-- opts: spec, lora (config or nil), device, kv_cache_mb, seed, dry_run
-- (address space only: tensors laid out, nothing mapped or written),
-- engine_dtype ("bf16", the default, or "fp8_block"), parallel (ws.parallel:
-- this rank holds its tensor- and expert-parallel shard; nil: everything).
function M.new(opts)
    local self = setmetatable({}, Engine)
    self.spec, self.lora, self.device = opts.spec, opts.lora, opts.device
    self.parallel = opts.parallel
    self.tensors, self.order, self.dtypes = {}, {}, {}
    self.dry_run = opts.dry_run or false
    self.asleep = {}
    self.engine_dtype = opts.engine_dtype or "bf16"
    if self.engine_dtype ~= "bf16" and self.engine_dtype ~= "fp8_block" then
        error("engine: engine_dtype must be bf16 or fp8_block, got " ..
              tostring(self.engine_dtype), 2)
    end
    -- quantized: {name, scale (its scale tensor's name), shape}; staged:
    -- name -> its bf16 staging tensor (filled by allocate).
    self.quantized, self.staged = {}, {}
    -- The layout is the family's rule (ws.family.decoder.engine_layout), and
    -- so is the choice of what fp8_block quantizes (fam.quantized).
    local fam = models.family(self.spec)
    local order, dest = fam.engine_layout(
        self.spec, models.params(self.spec), self.lora,
        self.lora and lora.params(self.spec, self.lora) or nil, self.parallel)
    local layout, by_dtype = {}, { bf16 = {}, fp8 = {}, f32 = {} }
    local function add(name, shape, dtype)
        layout[name] = shape
        self.order[#self.order + 1] = name
        self.dtypes[name] = dtype
        by_dtype[dtype][#by_dtype[dtype] + 1] = shape
    end
    for _, t in ipairs(order) do
        if self.engine_dtype == "fp8_block" and fam.quantized(t) then
            add(t.name, t.shape, "fp8")
            add(t.name .. "_scale_inv", ws.fp8_block_scale_shape(t.shape), "f32")
            self.quantized[#self.quantized + 1] = { name = t.name, scale = t.name .. "_scale_inv",
                                                    shape = t.shape }
        else
            add(t.name, t.shape, "bf16")
        end
    end
    self.dest = dest

    self.weight_bytes = 0
    for dtype, shapes in pairs(by_dtype) do
        if #shapes > 0 then self.weight_bytes = self.weight_bytes + ws.pool_bytes(shapes, dtype) end
    end
    local staged_shapes = {}
    for i, q in ipairs(self.quantized) do staged_shapes[i] = q.shape end
    self.staging_bytes = #staged_shapes > 0 and ws.pool_bytes(staged_shapes, "bf16") or 0
    self.kv_bytes = math.max(1, opts.kv_cache_mb or 64) * 1024 * 1024
    -- A pool that cannot be had (a KV cache too big) frees the one made before
    -- it. The error that stopped construction (out of memory, Ctrl-C) is what
    -- the caller sees, whatever the cleanup runs into.
    local ok, err = pcall(M.allocate, self, layout)
    if not ok then
        pcall(self.free, self)
        error(err, 0)
    end
    -- Vocabulary shards past the end (tensor parallelism): {real, rows} per tensor.
    self.padding = {}
    for _, d in pairs(dest) do
        if d.pad_rows then self.padding[d.name] = d.pad_rows end
    end
    return self
end

-- Zeroes the padding rows of the named tensors (those with any), as vLLM's
-- VocabParallelEmbedding loader does each time it loads the weights.
function Engine:zero_padding(names)
    for _, name in ipairs(names) do
        local pad = self.padding[name]
        if pad then
            local v = self.tensors[name]:narrow(1, pad[1] + 1, pad[2] - pad[1])
            local ok, err = pcall(v.fill, v, 0)
            v:free()
            if not ok then error(err, 0) end
        end
    end
end

-- Makes the two pools and every tensor in them (`layout`: name -> shape).
function M.allocate(self, layout)
    local dry = self.dry_run
    self.weights = must("engine", ws.pool{ device = self.device, tag = "weights",
                                           bytes = self.weight_bytes, reserve_only = dry })
    local kv_shape = { self.kv_bytes // 2 }
    self.kv_pool = must("engine", ws.pool{ device = self.device, tag = "kv_cache",
                                           bytes = ws.pool_bytes({ kv_shape }, "bf16"),
                                           reserve_only = dry })
    for i, name in ipairs(self.order) do
        local dtype = self.dtypes[name]
        local t = must("engine", self.weights:tensor{ shape = layout[name], dtype = dtype,
                                                      name = name })
        -- Kept before it is filled: an interrupted fill must still free it.
        self.tensors[name] = t
        -- load_format=dummy: the engine starts from random weights, as in
        -- verl (scales of 1 for the fp8 ones).
        if not dry then
            if dtype == "f32" then t:fill(1) else t:random_(0x5EED0 + i, 1.0, 0) end
        end
    end
    self.kv_cache = must("engine", self.kv_pool:tensor{ shape = kv_shape,
                                                        dtype = "bf16", name = "kv_cache" })
    if not dry then self.kv_cache:fill(0) end
    if #self.quantized == 0 then return end
    self.staging_pool = must("engine", ws.pool{ device = self.device, tag = "staging",
                                                bytes = self.staging_bytes, reserve_only = dry })
    for _, q in ipairs(self.quantized) do
        self.staged[q.name] = must("engine", self.staging_pool:tensor{
            shape = q.shape, dtype = "bf16", name = q.name .. " (bf16 staging)" })
    end
    -- Mapped only while a sync writes it (Engine:stage_begin).
    if not dry then
        must("engine", self.staging_pool:sleep(2, "setup"))
        self.asleep.staging = true
    end
end

-- Whether the engine tensor `name` is quantized (written through staging).
function Engine:is_staged(name) return self.staged[name] ~= nil end

-- The staging pool around a sync that writes quantized tensors: mapped
-- before the plan runs; after quantize_staged, back to a level-2 sleep so
-- its memory is returned. `note` names the sync in discarded-read errors.
function Engine:stage_begin()
    if self.staging_pool and self.asleep.staging then
        must("engine", self.staging_pool:wake())
        self.asleep.staging = false
    end
end

function Engine:stage_end(note)
    if self.staging_pool and not self.asleep.staging then
        must("engine", self.staging_pool:sleep(2, note))
        self.asleep.staging = true
    end
end

-- Quantizes staged bf16 weights into their fp8 tensors and scales in one
-- call; `list` holds entries of self.quantized (nil: all of them).
function Engine:quantize_staged(list)
    local srcs, qs, scales = {}, {}, {}
    for i, q in ipairs(list or self.quantized) do
        srcs[i], qs[i], scales[i] = self.staged[q.name], self.tensors[q.name], self.tensors[q.scale]
    end
    must("engine", ws.quantize_fp8_block(srcs, qs, scales))
end

-- The engine tensor an HF (or PEFT) parameter is written into, and where in
-- it: {name, offset (first element), numel, label}.
function Engine:destination(param_name)
    local d = self.dest[param_name]
    if not d then error("engine: no destination for parameter '" .. param_name .. "'", 2) end
    return self.staged[d.name] or self.tensors[d.name], d
end

local function pools_of(self, tags)
    if tags == nil or #tags == 0 then return { self.weights, self.kv_pool }, { "weights", "kv_cache" } end
    local list = {}
    for i, tag in ipairs(tags) do
        if tag == "weights" then list[i] = self.weights
        elseif tag == "kv_cache" then list[i] = self.kv_pool
        else error("engine:wake_up: unknown tag '" .. tostring(tag) .. "' (weights, kv_cache)", 3) end
    end
    return list, tags
end

-- level 1: weights backed up to pinned host, KV cache discarded; level 2:
-- everything discarded. `note` ("step 4") appears in discarded-read errors.
function Engine:sleep(level, note)
    if level ~= 1 and level ~= 2 then
        error("engine:sleep: level must be 1 or 2, got " .. tostring(level), 2)
    end
    -- A sleep that failed (no host memory for the level-1 backup) leaves its
    -- pool awake and mapped: say so rather than report the engine asleep.
    must("engine", self.weights:sleep(level, note))
    self.asleep.weights = true
    must("engine", self.kv_pool:sleep(2, note))
    self.asleep.kv_cache = true
    -- A sync that stopped part way may have left the staging mapped.
    self:stage_end(note)
end

-- tags: {"weights"}, {"kv_cache"} or {} / nil for both. Pools that are awake are left alone.
function Engine:wake_up(tags)
    local pools, names = pools_of(self, tags)
    for i, pool in ipairs(pools) do
        if self.asleep[names[i]] then
            must("engine", pool:wake())
            self.asleep[names[i]] = false
        end
    end
end

function Engine:is_asleep(tag) return self.asleep[tag] == true end

-- Memory the engine's pools hold now: mapped device bytes and host backup.
function Engine:memory()
    local w, k = self.weights:stats(), self.kv_pool:stats()
    local s = self.staging_pool and self.staging_pool:stats() or { mapped = 0, backup_bytes = 0 }
    return { weights_mapped = w.mapped, kv_mapped = k.mapped, staging_mapped = s.mapped,
             mapped = w.mapped + k.mapped + s.mapped,
             backup_bytes = w.backup_bytes + k.backup_bytes + s.backup_bytes }
end

-- The rollout stand-in uses the KV cache: it writes it, so a KV cache that
-- was not woken up fails here.
function Engine:rollout(step)
    self.kv_cache:fill(step % 7)
end

-- Also frees an engine whose construction stopped part way. Frees all it
-- can before raising the first error it met.
function Engine:free()
    local first
    local function release(obj)
        local ok, err = pcall(obj.free, obj)
        if not ok and first == nil then first = err end
    end
    for _, name in ipairs(self.order) do
        if self.tensors[name] then release(self.tensors[name]) end
    end
    for _, t in pairs(self.staged) do release(t) end
    for _, k in ipairs({ "kv_cache", "weights", "kv_pool", "staging_pool" }) do
        if self[k] then release(self[k]) end
        self[k] = nil
    end
    self.tensors, self.staged = {}, {}
    if first ~= nil then error(first, 0) end
end

return M
