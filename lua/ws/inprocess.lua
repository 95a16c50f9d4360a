-- ws.inprocess: the trainer and the engine of an in-process run, made of the
-- caller's tensors (PyTorch's, through DLPack) instead of wshost's stand-ins.
--
-- They have the interface the runner, the sync plans and verification use
-- (ws.trainer, ws.engine), so a policy file runs unchanged. A ws.session
-- collects what the caller registered (session.reg) and its callbacks
-- (session.callbacks); these makers check it against the model before any
-- byte moves: a missing or extra name, a shape, a dtype that cannot convert
-- is an error naming the tensor.
--
-- Trainer: parameters by Hugging Face name (adapters by PEFT name), each
-- this rank's dim-0 shard as FSDP2 lays it out: a [rows, ...] tensor is
-- split into ceil(rows / world) rows per rank; rank r holds rows
-- [r * per, (r + 1) * per) clipped to rows, with or without the padding of
-- a short last shard. Its step is the caller's "train" callback.
--
-- Engine: tensors by the engine's names (vLLM's fused qkv_proj and
-- gate_up_proj, `.base_layer` under LoRA). Its memory is either the
-- caller's (sleep and wake are the caller's "sleep"/"wake" callbacks; the
-- runner then remembers what a level-2 sleep discarded, since no read can
-- tell) or wshost's (session:alloc: a sleepable pool tagged "weights",
-- whose discarded contents raise on read, as with the simulated engine).
local ws = require("ws")
local models = require("ws.models")
local lora = require("ws.lora")
local must = require("ws.errors").must

local M = {}

local function shape_str(shape)
    local parts = {}
    for i, d in ipairs(shape) do parts[i] = tostring(d) end
    return "[" .. table.concat(parts, ", ") .. "]"
end
M.shape_str = shape_str

local function same_shape(a, b)
    if #a ~= #b then return false end
    for i = 1, #a do if a[i] ~= b[i] then return false end end
    return true
end

local function numel_of(shape)
    local n = 1
    for _, d in ipairs(shape) do n = n * d end
    return n
end

-- dtypes the plans convert from into the engine's bf16.
M.trainer_dtypes = { bf16 = true, f32 = true, f16 = true }

-- What the caller must register for `role`: a list of {name, shape, dtype}
-- in the model's order. trainer: Hugging Face names, full shapes; adapter:
-- PEFT names; engine: the engine's names and shapes.
function M.expected(spec, lcfg, role, param_dtype)
    local out = {}
    if role == "trainer" then
        for i, p in ipairs(models.params(spec)) do
            out[i] = { name = p.name, shape = p.shape, dtype = param_dtype or "bf16" }
        end
    elseif role == "adapter" then
        for i, p in ipairs(lcfg and lora.params(spec, lcfg) or {}) do
            out[i] = { name = p.name, shape = p.shape, dtype = param_dtype or "bf16" }
        end
    elseif role == "engine" then
        local fam = models.family(spec)
        local order = fam.engine_layout(spec, models.params(spec), lcfg,
                                        lcfg and lora.params(spec, lcfg) or nil)
        for i, t in ipairs(order) do out[i] = { name = t.name, shape = t.shape, dtype = "bf16" } end
    else
        error(string.format("unknown role '%s' (trainer, adapter, engine)", tostring(role)), 0)
    end
    return out
end

-- This rank's rows of a tensor of global `shape` over `world` ranks:
-- per-rank rows, first row, rows held.
function M.row_shard(shape, rank, world)
    local rows = shape[1] or 1
    local per = (rows + world - 1) // world
    local first = rank * per
    return per, first, math.max(0, math.min(per, rows - first))
end

-- `shape` with its first dimension replaced by `rows`.
function M.rows_shape(shape, rows)
    local out = { rows }
    for d = 2, #shape do out[d] = shape[d] end
    return out
end

-- Checks one registration against the expected entry `want`; raises naming
-- the tensor. global: the full shape the caller gave (nil: the model's; a
-- trainer tensor is then this rank's shard of it).
function M.check_registration(role, want, t, global, rank, world)
    local name = want.name
    local shape = t:shape()
    if global and not same_shape(global, want.shape) then
        error(string.format("%s tensor '%s': global shape %s differs from the model's %s",
                            role, name, shape_str(global), shape_str(want.shape)), 0)
    end
    local dtype = t:dtype()
    if role == "engine" then
        if dtype ~= "bf16" then
            error(string.format("engine tensor '%s' is %s; the engine's weights must be bf16 " ..
                                "(engine_dtype=bf16)", name, dtype), 0)
        end
        if not same_shape(shape, want.shape) then
            error(string.format("engine tensor '%s' has shape %s, the engine's layout needs %s",
                                name, shape_str(shape), shape_str(want.shape)), 0)
        end
        return
    end
    if not M.trainer_dtypes[dtype] then
        error(string.format("%s tensor '%s' is %s, which cannot convert to the engine's bf16 " ..
                            "(bf16, f32 or f16)", role, name, dtype), 0)
    end
    local per, first, mine = M.row_shard(want.shape, rank, world)
    local cols = numel_of(want.shape) // math.max(1, want.shape[1] or 1)
    if #want.shape == 0 then per, first, mine, cols = 1, 0, rank == 0 and 1 or 0, 1 end
    local n = t:numel()
    if world == 1 then
        if not same_shape(shape, want.shape) then
            error(string.format("%s tensor '%s' has shape %s, the model's is %s", role, name,
                                shape_str(shape), shape_str(want.shape)), 0)
        end
    else
        -- This rank's rows, with or without the padding of a short shard:
        -- [mine or per, the model's other dims].
        local fits = #shape == math.max(1, #want.shape) and (shape[1] == mine or shape[1] == per)
        for d = 2, #want.shape do fits = fits and shape[d] == want.shape[d] end
        if not fits then
            error(string.format("%s tensor '%s': rank %d of %d holds rows [%d, %d) of the %s " ..
                                "tensor (shape %s, or %s with the padding), but the tensor " ..
                                "given has shape %s", role, name, rank, world, first,
                                first + mine, shape_str(want.shape),
                                shape_str(M.rows_shape(want.shape, mine)),
                                shape_str(M.rows_shape(want.shape, per)), shape_str(shape)), 0)
        end
    end
end

-- Every expected name registered, nothing else: raises naming the first
-- missing or extra one (extras are refused when registered; this catches
-- the missing).
local function check_complete(role, wanted, reg)
    local missing, n = nil, 0
    for _, w in ipairs(wanted) do
        if reg[w.name] then n = n + 1 elseif not missing then missing = w.name end
    end
    if missing then
        error(string.format("%s tensor '%s' was not registered (%d of %d %s tensors are)", role,
                            missing, n, #wanted, role), 0)
    end
end

-- Trainer -------------------------------------------------------------------

local Trainer = {}
Trainer.__index = Trainer

-- args: the runner's trainer arguments (spec, lora, device, rank, world);
-- session: reg.trainer / reg.adapter (name -> {tensor, global}), callbacks.
function M.trainer(args, session)
    local self = setmetatable({}, Trainer)
    self.spec, self.lora, self.device = args.spec, args.lora, args.device
    self.rank, self.world = args.rank or 0, args.world or 1
    self.session, self.offloaded = session, false
    self.generation, self.loads = 0, 0
    self.params, self.base_params, self.adapter_params = {}, {}, {}
    self.made = {}
    local ok, err = pcall(M.fill_trainer, self)
    if not ok then
        pcall(self.free, self)
        error(err, 0)
    end
    return self
end

function M.fill_trainer(self)
    local session = self.session
    local roles = { { "trainer", "base", self.base_params }, { "adapter", "adapter",
                                                               self.adapter_params } }
    for _, r in ipairs(roles) do
        local role, kind, list = r[1], r[2], r[3]
        local wanted = M.expected(self.spec, self.lora, role)
        check_complete(role, wanted, session.reg[role])
        for _, w in ipairs(wanted) do
            local reg = session.reg[role][w.name]
            local dtype = reg.tensor:dtype()
            if self.dtype and dtype ~= self.dtype then
                error(string.format("%s tensor '%s' is %s but '%s' is %s; the trainer's " ..
                                    "tensors must share one dtype", role, w.name, dtype,
                                    self.params[1].name, self.dtype), 0)
            end
            self.dtype = dtype
            local numel = numel_of(w.shape)
            local per, first_row, mine = M.row_shard(w.shape, self.rank, self.world)
            local cols = #w.shape > 0 and numel // math.max(1, w.shape[1]) or 1
            if #w.shape == 0 then per, first_row, mine = 1, 0, self.rank == 0 and 1 or 0 end
            local flat = must(role, reg.tensor:flat())
            self.made[#self.made + 1] = flat
            local e = { name = w.name, shape = w.shape, numel = numel, shard_numel = per * cols,
                        first = first_row * cols, real = mine * cols, kind = kind,
                        version = 0, tensor = flat, dtype = dtype,
                        trainable = (kind == "adapter") or (self.lora == nil) }
            if e.real > 0 then
                e.view = flat:numel() == e.real and flat or flat:narrow(1, 1, e.real)
                if e.view ~= flat then self.made[#self.made + 1] = e.view end
            end
            list[#list + 1] = e
            self.params[#self.params + 1] = e
        end
    end
end

-- The caller's optimizer step ("train" callback); the runner's checksums of
-- trainable weights are taken again after it.
--
-- The memory is the caller's, so wshost cannot know which weights its step
-- changed: frozen ones too may change (PEFT's modules_to_save, a caller's own
-- update), so the checksums verification keeps of them are taken again
-- (`loads` counts as a reload). A policy that skips the base then fails its
-- rollout if the base did change, instead of proving a stale copy.
function Trainer:train_step(step)
    local cb = self.session.callbacks.train
    if cb then cb(step) end
    for _, e in ipairs(self.params) do
        if e.trainable then e.version = e.version + 1 end
    end
    self.generation, self.loads = self.generation + 1, self.loads + 1
end

-- The caller's memory is the caller's to offload (the session refuses
-- param_offload=true); loading is then nothing to do.
function Trainer:offload() end
function Trainer:load() end

function Trainer:shard_bytes(kind)
    local n = 0
    for _, e in ipairs(self.params) do
        if kind == nil or e.kind == kind then n = n + e.tensor:nbytes() end
    end
    return n
end

-- Drops wshost's views; the caller's memory is released to the caller when
-- the last view over it goes.
function Trainer:free()
    for i = #self.made, 1, -1 do self.made[i]:free() end
    self.made, self.params, self.base_params, self.adapter_params = {}, {}, {}, {}
end

-- Engine --------------------------------------------------------------------

local Engine = {}
Engine.__index = Engine

-- args: the runner's engine arguments (spec, lora, device); session:
-- reg.engine (name -> {tensor}), pool (session:alloc's, or nil), callbacks.
function M.engine(args, session)
    local self = setmetatable({}, Engine)
    self.spec, self.lora, self.device = args.spec, args.lora, args.device
    self.session = session
    self.tensors, self.order, self.dtypes = {}, {}, {}
    self.quantized, self.staged = {}, {}
    self.asleep = {}
    self.staging_bytes, self.kv_bytes = 0, 0
    self.pool = session.pool
    local fam = models.family(self.spec)
    local order, dest = fam.engine_layout(self.spec, models.params(self.spec), self.lora,
                                          self.lora and lora.params(self.spec, self.lora) or nil)
    self.dest = dest
    local wanted = M.expected(self.spec, self.lora, "engine")
    check_complete("engine", wanted, session.reg.engine)
    -- Memory the caller holds: its sleeps are known to the runner only.
    self.own_bytes, self.pool_bytes = 0, 0
    for _, t in ipairs(order) do
        local reg = session.reg.engine[t.name]
        self.tensors[t.name] = reg.tensor
        self.order[#self.order + 1] = t.name
        self.dtypes[t.name] = "bf16"
        if reg.pooled then
            self.pool_bytes = self.pool_bytes + reg.tensor:nbytes()
        else
            self.own_bytes = self.own_bytes + reg.tensor:nbytes()
        end
    end
    self.weight_bytes = self.own_bytes + self.pool_bytes
    self.own_memory = self.own_bytes > 0
    return self
end

function Engine:is_staged() return false end
function Engine:stage_begin() end
function Engine:stage_end() end
function Engine:quantize_staged() end

function Engine:destination(param_name)
    local d = self.dest[param_name]
    if not d then error("engine: no destination for parameter '" .. param_name .. "'", 2) end
    return self.tensors[d.name], d
end

local function call(self, event, ...)
    local cb = self.session.callbacks[event]
    if cb then cb(...) end
end

-- level 1: the caller backs its weights up (wshost's pool: to host memory),
-- level 2: they are discarded. The KV cache is the caller's.
function Engine:sleep(level, note)
    if level ~= 1 and level ~= 2 then
        error("engine:sleep: level must be 1 or 2, got " .. tostring(level), 2)
    end
    -- The caller's callback first, while wshost's pool is still mapped (views
    -- of alloc'd tensors must not be read while it sleeps).
    call(self, "sleep", level)
    if self.pool and not self.asleep.weights then must("engine", self.pool:sleep(level, note)) end
    self.asleep.weights, self.asleep.kv_cache = true, true
end

-- Wakes each of `tags` (nil or empty: both) that sleeps, through
-- wake(tag): the engines whose memory is not (only) wshost's pools share it.
function M.wake_each(self, tags, wake)
    for _, tag in ipairs(tags and #tags > 0 and tags or { "weights", "kv_cache" }) do
        if tag ~= "weights" and tag ~= "kv_cache" then
            error("engine:wake_up: unknown tag '" .. tostring(tag) .. "' (weights, kv_cache)", 3)
        end
        if self.asleep[tag] then
            wake(tag)
            self.asleep[tag] = false
        end
    end
end

function Engine:wake_up(tags)
    M.wake_each(self, tags, function(tag)
        if tag == "weights" and self.pool then must("engine", self.pool:wake()) end
        call(self, "wake", tag)
    end)
end

function Engine:is_asleep(tag) return self.asleep[tag] == true end

-- The weights' memory: wshost's pool as its stats say; the caller's as
-- registered while awake (what its sleep gives back is the caller's to say).
function Engine:memory()
    local s = self.pool and self.pool:stats() or { mapped = 0, backup_bytes = 0 }
    local own = self.asleep.weights and 0 or self.own_bytes
    return { weights_mapped = s.mapped + own, kv_mapped = 0, staging_mapped = 0,
             mapped = s.mapped + own, backup_bytes = s.backup_bytes }
end

-- The caller's rollout ("rollout" callback): its forward pass.
function Engine:rollout(step) call(self, "rollout", step) end

-- The tensors stay the session's (it frees them and its pool).
function Engine:free() self.tensors = {} end

return M
