-- ws.remote: server mode's engine, as the trainer's side sees it.
--
-- The engine runs in another process (verl, NeMo-RL and slime run vLLM so)
-- and holds its weights in its own memory, registered with a
-- wshost.Receiver listening on `engine_address`-<rank>. This part is the
-- runner's engine there: its layout (names, shapes, where each trainer
-- parameter lands) comes from the model, as for every engine; sleep and wake
-- go over the connection (the engine process runs its own callbacks), and a
-- sync is MANIFEST, the plan's buckets through two shared-memory slots, and
-- FINISH with proofs (ws.sync, ws.verify). It holds no tensors here.
local ws = require("ws")
local models = require("ws.models")
local lora = require("ws.lora")
local inprocess = require("ws.inprocess")
local config = require("ws.config")

local M = {}
local Engine = {}
Engine.__index = Engine

-- The name rank `rank` connects to.
function M.address(base, rank) return string.format("%s-%d", base, rank) end

-- What server mode does not do; raised before anything connects.
function M.check_config(cfg)
    local function no(key, why) config.raise("config key '%s': server mode (engine_address=%s) %s",
                                             key, cfg.engine_address, why) end
    if cfg.placement ~= "colocated" then no("placement", "runs colocated") end
    if (cfg.engine_tp or 1) > 1 or (cfg.engine_ep or 1) > 1 then
        no("engine_tp", "has one engine process per rank, holding the whole model")
    end
    if cfg.engine_dtype ~= "bf16" then no("engine_dtype", "sends bf16 weights") end
    if cfg.save_engine ~= "" then
        no("save_engine", "leaves the engine's tensors to the engine process")
    end
    if cfg.dry_run then no("dry_run", "needs its engine process") end
end

-- args: the runner's engine arguments (spec, lora, device, bucket_mb);
-- opts: address (the engine_address key), rank, callbacks (the session's:
-- its "rollout" runs as the engine's rollout), timeout_ms.
function M.engine(args, opts)
    local self = setmetatable({}, Engine)
    self.spec, self.lora, self.device = args.spec, args.lora, args.device
    self.remote = true
    self.callbacks = opts.callbacks or {}
    self.tensors, self.order, self.quantized, self.shapes = {}, {}, {}, {}
    self.asleep = {}
    self.staging_bytes, self.kv_bytes, self.weight_bytes = 0, 0, 0
    local fam = models.family(self.spec)
    local _, dest = fam.engine_layout(self.spec, models.params(self.spec), self.lora,
                                      self.lora and lora.params(self.spec, self.lora) or nil)
    self.dest = dest
    for _, e in ipairs(inprocess.expected(self.spec, self.lora, "engine")) do
        self.order[#self.order + 1] = e.name
        self.shapes[e.name] = e.shape
        local n = 1
        for _, d in ipairs(e.shape) do n = n * d end
        self.weight_bytes = self.weight_bytes + 2 * n
    end
    self.total = #self.order
    -- Both slots hold one gathered bucket; pages never touched cost nothing.
    local bucket = args.bucket_mb and math.floor(args.bucket_mb * 1048576) or ws.DEFAULT_BUCKET_BYTES
    self.address = M.address(opts.address, opts.rank or 0)
    -- A trainer on a GPU packs into slots in its GPU memory (CUDA IPC).
    local slot_device = self.device and self.device.kind ~= "cpu" and self.device or nil
    local s, msg = ws.sender(self.address, { slot_bytes = bucket, timeout_ms = opts.timeout_ms,
                                             slot_device = slot_device })
    if not s then
        error(string.format("engine process: cannot connect to the wshost.Receiver on '%s': %s",
                            self.address, tostring(msg)), 0)
    end
    self.sender = s
    -- Weights the engine process allocated in memory it shares
    -- (Receiver.alloc): written in place, one copy instead of two. Only
    -- when all of them are; otherwise every tensor goes through the slots.
    if s:shared_count() > 0 then
        local views = {}
        for _, name in ipairs(self.order) do
            views[name] = s:shared(name, "bf16", self.shapes[name])
            if not views[name] then views = nil break end
        end
        if views then
            self.tensors, self.direct = views, true
            self.dtypes = {}
            for _, name in ipairs(self.order) do self.dtypes[name] = "bf16" end
        end
    end
    self.version = 0
    self.own_memory = false
    return self
end

-- One line for the run's header.
function Engine:describe()
    local how = self.direct and "its weights in memory it shares, written in place"
        or string.format("through two shared-memory slots of %.1f MB", self.sender:slot_bytes() / 1e6)
    return string.format("# engine: process %d on '%s', %s", self.sender:peer_pid(), self.address,
                         how)
end

function Engine:is_staged() return false end
function Engine:stage_begin() end
function Engine:stage_end() end
function Engine:quantize_staged() end

function Engine:destination(param_name)
    local d = self.dest[param_name]
    if not (self.direct and d) then
        error("engine: the engine's tensors are in the engine process (" .. self.address ..
              "); '" .. tostring(param_name) .. "' has no destination here", 2)
    end
    return self.tensors[d.name], d
end

-- The manifest entry of an engine tensor.
function Engine:manifest_entry(name)
    return { name = name, dtype = "bf16", shape = self.shapes[name] }
end

-- Starts a sync of `manifest` (ws.sync builds it per plan); each sync is a
-- new weight version. unproven: it finishes without proofs (verify=off).
-- With shared weights the plan then writes them in place (direct).
function Engine:begin(manifest, unproven)
    self.version = self.version + 1
    self.sender:begin(manifest, self.version, #manifest < self.total, unproven, self.direct)
end

-- level 1: the engine process backs its weights up, 2: discards them (it
-- then holds them invalid until they are sent again).
function Engine:sleep(level, _)
    if level ~= 1 and level ~= 2 then
        error("engine:sleep: level must be 1 or 2, got " .. tostring(level), 2)
    end
    self.sender:sleep(level)
    -- What the engine process proved before a sleep is proven again after.
    self.epoch = (self.epoch or 0) + 1
    self.asleep.weights, self.asleep.kv_cache = true, true
end

function Engine:wake_up(tags)
    inprocess.wake_each(self, tags, function(tag) self.sender:wake(tag) end)
end

function Engine:is_asleep(tag) return self.asleep[tag] == true end

-- The engine process's weights as its layout says (what its sleep gives
-- back is that process's to report).
function Engine:memory()
    local w = self.asleep.weights and 0 or self.weight_bytes
    return { weights_mapped = w, kv_mapped = 0, staging_mapped = 0, mapped = w, backup_bytes = 0 }
end

-- The caller's rollout (the session's "rollout" callback), which asks the
-- engine process for it.
function Engine:rollout(step)
    local cb = self.callbacks.rollout
    if cb then cb(step) end
end

function Engine:free()
    for _, t in pairs(self.direct and self.tensors or {}) do t:free() end
    self.tensors = {}
    if self.sender then
        local s = self.sender
        self.sender = nil
        s:close()
    end
end

return M
