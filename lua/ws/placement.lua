-- ws.placement: where the trainer and the engine run (placement=,
-- trainer_ranks=).
--
-- colocated (the default): every rank holds a trainer shard and an engine.
-- disaggregated: ranks [0, N) train (FSDP over N: their own comm), ranks
-- [N, world) hold the engine (TP and EP groups among themselves). Where
-- the comm sends cpu memory point to point and no engine rank holds blocks, each
-- trainer rank sends its shard of every bucket straight into every engine
-- rank's tensors (no gather, no staging); otherwise each bucket the trainer
-- ranks gather goes from trainer rank 0 to every engine rank, by messages
-- straight into their tensors or by one broadcast (engine tensors with
-- tensor-parallel blocks) over a comm of rank 0 and the engine ranks (a
-- relay plan: ws.plan role=sender/receiver), double-buffered. The policy runs on
-- every rank with the same decisions; on a trainer rank the engine is a
-- stand-in that holds nothing (its sleeps and wakes are the engine ranks'),
-- on an engine rank the trainer is one that holds no shard (it knows the
-- parameters' sizes, so the relay plan is laid out the same everywhere).
local config = require("ws.config")
local models = require("ws.models")
local lora = require("ws.lora")

local M = {}

M.placements = { "colocated", "disaggregated" }

-- The number of trainer ranks of a disaggregated run (trainer_ranks=0:
-- half the world).
function M.trainer_ranks(cfg, world)
    local n = cfg.trainer_ranks or 0
    if n == 0 then n = world // 2 end
    return n
end

function M.is_disaggregated(cfg) return cfg.placement == "disaggregated" end

-- How many ranks hold the engine: all, or those past the trainer ranks.
function M.engine_world(cfg, world)
    if not M.is_disaggregated(cfg) then return world end
    return world - M.trainer_ranks(cfg, world)
end

-- Raises a configuration error for a placement this run cannot have.
function M.check(cfg, world)
    if not M.is_disaggregated(cfg) then
        if (cfg.trainer_ranks or 0) ~= 0 then
            config.raise("config key 'trainer_ranks': only with placement=disaggregated")
        end
        return
    end
    local function need(ok, key, fmt, ...)
        if not ok then config.raise("config key '%s': " .. fmt, key, ...) end
    end
    local n = M.trainer_ranks(cfg, world)
    need(world >= 2, "placement", "disaggregated needs at least 2 ranks (run under mpirun), " ..
         "got %d", world)
    need(n >= 1 and n < world, "trainer_ranks", "%d of %d ranks leaves no %s", n, world,
         n < 1 and "trainer" or "engine rank")
    need(cfg.engine_dtype == "bf16", "engine_dtype", "fp8_block is colocated only")
    need(not cfg.dry_run, "dry_run", "a dry run is colocated only")
end

-- This rank's place: {n (trainer ranks), trainer (true on them), index (of
-- this rank among the trainer or the engine ranks), trainer_comm (the
-- trainer ranks'; nil on engine ranks and for one trainer rank), relay (rank
-- 0 and the engine ranks; nil elsewhere), peers (`comm` itself, not owned:
-- every rank, trainer ranks first)}, or nil when colocated. Every rank must
-- call it (comm:split).
function M.new(cfg, comm, rank, world)
    if not M.is_disaggregated(cfg) then return nil end
    local n = M.trainer_ranks(cfg, world)
    local place = { n = n, trainer = rank < n, index = rank < n and rank or rank - n,
                    peers = comm }
    local tc = comm:split(place.trainer and 0 or 1, rank)
    if place.trainer and n > 1 then place.trainer_comm = tc else tc:free() end
    place.relay = comm:split((rank == 0 or not place.trainer) and 0 or -1, rank)
    place.free = function(self)
        for _, k in ipairs({ "trainer_comm", "relay" }) do
            if self[k] then self[k]:free() end
            self[k] = nil
        end
    end
    return place
end

-- What an engine rank knows of the trainer, which runs on other ranks: the
-- parameters' sizes and FSDP shards over the n trainer ranks (the relay plan
-- and verification are laid out from them), no memory of its own.
function M.trainer_layout(spec, lcfg, n)
    local tr = { spec = spec, lora = lcfg, rank = -1, world = n, dtype = "bf16",
                 generation = 0, loads = 0, offloaded = false,
                 params = {}, base_params = {}, adapter_params = {}, holds_nothing = true }
    local function entry(p, kind, list)
        local e = { name = p.name, shape = p.shape, numel = p.numel,
                    shard_numel = (p.numel + n - 1) // n, first = 0, real = 0, kind = kind,
                    info = p, version = 0, trainable = kind == "adapter" or lcfg == nil }
        list[#list + 1] = e
        tr.params[#tr.params + 1] = e
    end
    for _, p in ipairs(models.params(spec)) do entry(p, "base", tr.base_params) end
    if lcfg then
        for _, p in ipairs(lora.params(spec, lcfg)) do entry(p, "adapter", tr.adapter_params) end
    end
    function tr.train_step(self) self.generation = self.generation + 1 end
    function tr.offload() end
    function tr.load() end
    function tr.shard_bytes() return 0 end
    function tr.free() end
    return tr
end

-- A trainer rank's engine part: the engine runs on other ranks, so this rank
-- holds no engine memory and has nothing to sleep, wake or roll out.
function M.engine_absent()
    local e = { order = {}, tensors = {}, dest = {}, quantized = {}, staged = {}, padding = {},
                weight_bytes = 0, kv_bytes = 0, staging_bytes = 0, holds_nothing = true }
    function e.is_staged() return false end
    function e.is_asleep() return false end
    function e.wake_up() end
    function e.sleep() end
    function e.rollout() end
    function e.memory()
        return { weights_mapped = 0, kv_mapped = 0, staging_mapped = 0, mapped = 0,
                 backup_bytes = 0 }
    end
    function e.free() end
    return e
end

-- The sync's relay settings for this rank.
function M.relay_of(place)
    return { role = place.trainer and "sender" or "receiver", comm = place.relay,
             trainer_comm = place.trainer_comm, n = place.n, peers = place.peers }
end

-- One line for the run's header: "disaggregated: 2 trainer + 2 engine ranks (...)".
function M.describe(place, world)
    return string.format("disaggregated: %d trainer + %d engine ranks (this rank: %s %d)",
                         place.n, world - place.n, place.trainer and "trainer" or "engine",
                         place.index)
end

return M
