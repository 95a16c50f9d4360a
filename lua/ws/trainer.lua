-- ws.trainer: an FSDP-style trainer stand-in.
--
-- Every parameter is flattened and sharded along dim 0 across the world the
-- way FSDP2 does it: shard_numel = ceil(numel / world), rank r holds flat
-- elements [r * shard_numel, (r + 1) * shard_numel) clipped to numel, the rest
-- is padding. Values come from t:random_(seed, scale, first_index) with the
-- global index, so the shards compose to the same full tensor on any world
-- size and the checksum of the full tensor is known without gathering it.
--
-- All shards live in one sleepable pool ("trainer"): offloading copies them
-- to pinned host memory and puts the pool to sleep, so the device memory is
-- really returned while the addresses the sync plans hold stay valid — and a
-- sync that forgot to load the parameters back fails with the pool's
-- discarded-contents error instead of sending garbage.
local ws = require("ws")
local models = require("ws.models")
local lora = require("ws.lora")
local must = require("ws.errors").must

local M = {}
local Trainer = {}
Trainer.__index = Trainer

local INIT_SCALE = { base = 0.02, adapter = 0.01 }
local MAXINT = math.maxinteger

-- 64-bit FNV-1a of a string, kept non-negative so it is a valid seed anywhere.
function M.seed_of(name, step)
    local h = -3750763034362895579 -- 0xcbf29ce484222325
    for i = 1, #name do
        h = (h ~ name:byte(i)) * 1099511628211
    end
    h = h ~ ((step or 0) * -7046029254386353131) -- 0x9E3779B97F4A7C15
    return h & MAXINT
end

-- opts: spec (models spec), lora (ws.lora config or nil), device, comm
-- (nil: world of one), rank, world, dtype ("bf16"/"f32"), seed, dry_run
-- (address space only: the shards are laid out but never written),
-- checkpoint (ws.Checkpoint the base weights start from; nil: seeded random
-- values, as vLLM's load_format=dummy), adapter_checkpoint (the same for
-- the LoRA weights, PEFT names).
function M.new(opts)
    local self = setmetatable({}, Trainer)
    self.spec, self.lora, self.device = opts.spec, opts.lora, opts.device
    self.rank, self.world = opts.rank or 0, opts.world or 1
    self.dtype = opts.dtype or "bf16"
    self.seed = opts.seed or 0
    self.offloaded = false
    -- Bumped whenever shard contents change (train_step, load), so a
    -- verification can reuse checksums of a trainer that did not change.
    self.generation, self.loads = 0, 0
    self.params, self.base_params, self.adapter_params = {}, {}, {}

    local function entry(p, kind)
        local shard = (p.numel + self.world - 1) // self.world
        local first = self.rank * shard
        local real = math.max(0, math.min(shard, p.numel - first))
        local e = { name = p.name, shape = p.shape, numel = p.numel, shard_numel = shard,
                    first = first, real = real, kind = kind, info = p, version = 0,
                    trainable = (kind == "adapter") or (self.lora == nil) }
        self.params[#self.params + 1] = e
        return e
    end
    for _, p in ipairs(models.params(self.spec)) do
        self.base_params[#self.base_params + 1] = entry(p, "base")
    end
    if self.lora then
        for _, p in ipairs(lora.params(self.spec, self.lora)) do
            self.adapter_params[#self.adapter_params + 1] = entry(p, "adapter")
        end
    end

    local shapes = {}
    for i, e in ipairs(self.params) do shapes[i] = { e.shard_numel } end
    self.pool_bytes = ws.pool_bytes(shapes, self.dtype)
    self.dry_run = opts.dry_run or false
    self.sources = { base = opts.checkpoint, adapter = opts.adapter_checkpoint }
    self.pool = must("trainer", ws.pool{ device = self.device, tag = "trainer",
                                         bytes = self.pool_bytes, reserve_only = self.dry_run })
    local ok, err = pcall(M.fill, self)
    if not ok then
        -- The error that stopped construction wins over any the cleanup meets.
        pcall(self.free, self)
        error(err, 0)
    end
    return self
end

-- Makes every shard tensor in the pool and gives it its initial values:
-- this rank's rows of the checkpoint, or seeded random values.
function M.fill(self)
    for _, e in ipairs(self.params) do
        e.tensor = must("trainer", self.pool:tensor{ shape = { e.shard_numel },
                                                     dtype = self.dtype, name = e.name })
        -- The shard's real elements (no padding): what checksums and syncs read.
        if e.real > 0 then e.view = e.tensor:narrow(1, 1, e.real) end
        if not self.dry_run and not self.sources[e.kind] then
            e.tensor:random_(M.seed_of(e.name, 0) ~ self.seed, INIT_SCALE[e.kind], e.first)
        end
    end
    if self.dry_run then return end
    local checkpoint = require("ws.checkpoint")
    if self.sources.base then checkpoint.load_shards(self.sources.base, self.base_params) end
    if self.sources.adapter then
        checkpoint.load_shards(self.sources.adapter, self.adapter_params)
    end
end

-- Deterministic update of every trainable parameter (adapters under LoRA,
-- all parameters otherwise): a fresh stream seeded by (parameter, step).
function Trainer:train_step(step)
    if self.offloaded then self:load() end
    for _, e in ipairs(self.params) do
        if e.trainable then
            e.tensor:random_(M.seed_of(e.name, step) ~ self.seed, INIT_SCALE[e.kind], e.first)
            e.version = e.version + 1
        end
    end
    self.generation = self.generation + 1
end

-- Lists of the shard tensors, for batched copies.
local function shard_lists(self)
    if not self.shards then
        local list = {}
        for i, e in ipairs(self.params) do list[i] = e.tensor end
        self.shards = list
    end
    return self.shards
end

-- Copies every shard to pinned host memory and gives the device memory back.
function Trainer:offload(note)
    if self.offloaded then return end
    if not self.host then
        self.host = {}
        for i, e in ipairs(self.params) do
            self.host[i] = must("trainer offload",
                                ws.tensor{ shape = { e.shard_numel }, dtype = self.dtype,
                                           device = self.device, pinned = true,
                                           name = e.name .. " (offloaded)" })
        end
    end
    ws.copy_many(self.host, shard_lists(self))
    must("trainer offload", self.pool:sleep(2, note or "trainer offload"))
    self.offloaded = true
end

-- Maps the device memory again (same addresses) and copies the shards back.
function Trainer:load()
    if not self.offloaded then return end
    must("trainer load", self.pool:wake())
    ws.copy_many(shard_lists(self), self.host)
    for _, e in ipairs(self.params) do e.version = e.version + 1 end
    self.generation, self.loads = self.generation + 1, self.loads + 1
    self.offloaded = false
end

-- Bytes of trainer parameters of one kind ("base", "adapter" or nil: all) on this rank.
function Trainer:shard_bytes(kind)
    local esize = self.dtype == "f32" and 4 or 2
    local n = 0
    for _, e in ipairs(self.params) do
        if kind == nil or e.kind == kind then n = n + e.shard_numel * esize end
    end
    return n
end

-- Frees all it can (also a trainer whose construction stopped part way)
-- before raising the first error it met.
function Trainer:free()
    local first
    local function release(obj)
        local ok, err = pcall(obj.free, obj)
        if not ok and first == nil then first = err end
    end
    for _, e in ipairs(self.params) do
        if e.view then release(e.view) end
        if e.tensor then release(e.tensor) end
    end
    for _, h in ipairs(self.host or {}) do release(h) end
    self.shards, self.host = nil, nil
    if self.pool then
        release(self.pool)
        self.pool = nil
    end
    if first ~= nil then error(first, 0) end
end

return M
