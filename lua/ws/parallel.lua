-- ws.parallel: how the engine's ranks split the model (engine_tp=, engine_ep=).
--
-- Tensor parallelism: ranks form groups of engine_tp consecutive ranks; rank
-- r is TP rank r % engine_tp of its group and holds vLLM's TP shard of every
-- weight (the layout itself is the family's rule, ws.family.decoder
-- engine_layout). Expert parallelism: groups of engine_ep consecutive ranks;
-- EP rank r % engine_ep holds a contiguous range of each layer's experts,
-- whole (vLLM's FusedMoE with expert parallelism splits no expert). Each
-- rank's sync plan receives from the trainer's FSDP shards only what its own
-- shard needs (point-to-point messages straight into its blocks where the
-- comm can, cpu over MPI; else an all_to_all when that moves fewer bytes
-- than a gather; sync_exchange=all_gather gathers every whole parameter
-- instead); verification sums the shards' checksums over the group
-- (sub-communicators made here) back to the trainer's.
local config = require("ws.config")

local M = {}

-- vLLM pads the vocabulary to a multiple of 64 before splitting it
-- (VocabParallelEmbedding, ParallelLMHead).
M.VOCAB_PADDING = 64

function M.padded_vocab(vocab) return (vocab + M.VOCAB_PADDING - 1) // M.VOCAB_PADDING * M.VOCAB_PADDING end

-- vLLM's linear placement of `n` experts over `ep` ranks: the first n % ep
-- ranks take one more. Returns the first expert of `ep_rank` and its count.
function M.expert_range(n, ep, ep_rank)
    local base, rem = n // ep, n % ep
    return ep_rank * base + math.min(ep_rank, rem), base + (ep_rank < rem and 1 or 0)
end

local function has_dense_mlp(spec)
    for l = 0, spec.layers - 1 do
        if not (spec.sparse and spec.sparse[l]) then return true end
    end
    return false
end

local function has_experts(spec) return spec.sparse ~= nil and next(spec.sparse) ~= nil end

-- Raises a configuration error unless the model splits over engine_tp and
-- engine_ep as vLLM splits it (its `divide` asserts the same); `world` is
-- the number of engine ranks.
function M.check(cfg, spec, world)
    local T, E = cfg.engine_tp or 1, cfg.engine_ep or 1
    if T == 1 and E == 1 then return end
    local function need(ok, key, fmt, ...)
        if not ok then config.raise("config key '%s': " .. fmt, key, ...) end
    end
    need(world % T == 0, "engine_tp", "%d does not divide the %d engine ranks", T, world)
    need(world % E == 0, "engine_ep", "%d does not divide the %d engine ranks", E, world)
    need(cfg.engine_dtype == "bf16", "engine_dtype",
         "fp8_block with engine_tp or engine_ep > 1 is not supported; use bf16")
    if T > 1 then
        need(spec.heads % T == 0, "engine_tp", "%d does not divide num_attention_heads %d", T,
             spec.heads)
        need(spec.kv_heads % T == 0 or T % spec.kv_heads == 0, "engine_tp",
             "%d and num_key_value_heads %d: one must divide the other (vLLM replicates KV " ..
             "heads only when there are fewer than engine_tp)", T, spec.kv_heads)
        if has_dense_mlp(spec) then
            need(spec.intermediate % T == 0, "engine_tp",
                 "%d does not divide intermediate_size %d", T, spec.intermediate)
        end
        if has_experts(spec) and E == 1 then
            need(spec.moe_intermediate % T == 0, "engine_tp",
                 "%d does not divide moe_intermediate_size %d (set engine_ep to place whole " ..
                 "experts instead)", T, spec.moe_intermediate)
        end
        need(M.padded_vocab(spec.vocab) % T == 0, "engine_tp",
             "%d does not divide the padded vocabulary %d", T, M.padded_vocab(spec.vocab))
    end
    if E > 1 then
        need(has_experts(spec), "engine_ep", "model %s has no mixture-of-experts layers",
             tostring(spec.name))
        need(spec.experts >= E, "engine_ep", "%d ranks for %d experts: every rank needs one",
             E, spec.experts)
    end
end

-- The engine's parallel layout on this rank: {tp, tp_rank, ep, ep_rank,
-- tp_comm, ep_comm} (comms only for groups of more than one rank, over a
-- world of more than one; every rank must call this, as comm:split needs).
-- The engine ranks are [first, world) (first: 0, or the trainer ranks'
-- count when disaggregated; ranks before it get no comms). nil when the
-- engine is not split.
function M.new(cfg, comm, rank, world, first)
    local T, E = cfg.engine_tp or 1, cfg.engine_ep or 1
    if T == 1 and E == 1 then return nil end
    first = first or 0
    local i = rank - first
    local par = { tp = T, tp_rank = i % T, ep = E, ep_rank = i % E }
    if comm and world > 1 then
        local engine = i >= 0
        if T > 1 then par.tp_comm = comm:split(engine and i // T or -1, rank) end
        if E > 1 then par.ep_comm = comm:split(engine and i // E or -1, rank) end
    end
    par.free = function(self)
        for _, k in ipairs({ "tp_comm", "ep_comm" }) do
            if self[k] then self[k]:free() end
            self[k] = nil
        end
    end
    return par
end

-- The sub-communicator a destination's group sums over ("tp" or "ep"), or
-- nil for a group of one rank.
function M.group_comm(par, group)
    if not par then return nil end
    return group == "ep" and par.ep_comm or group == "tp" and par.tp_comm or nil
end

function M.describe(par)
    if not par then return "engine_tp=1" end
    return string.format("engine_tp=%d (TP rank %d), engine_ep=%d (EP rank %d)", par.tp,
                         par.tp_rank, par.ep, par.ep_rank)
end

return M
