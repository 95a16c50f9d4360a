-- bench/parallel.lua: a base sync to parallel engines, against the raw MPI
-- collectives moving the same bytes, measured in the same run.
--
--   mpirun -n 4 wshost bench/parallel.lua [model=qwen3-0.6b] [iters=3] [bucket_mb=512]
--                                         [device=auto] [exchange=auto] [check=false]
--                                         [--json FILE]
--
-- Rows: colocated engines with engine_tp = 1, 2, 4 (each that divides the world
-- and the model), and disaggregated N+N (N = world / 2). Each row runs the
-- path the sync takes by default (exchange=auto): direct where MPI sends the
-- memory point to point (messages straight from each
-- shard into the engine tensors; disaggregated: every trainer rank sends
-- its own shard to the engine ranks), staged otherwise (pack, collective,
-- copy-out); a "path" line names it. Per row: the best of `iters` base
-- syncs (time, algorithm bandwidth over the bytes the collective carries),
-- the best of as many runs of the raw collective over the same bytes, each
-- right after a sync (comm:reference: MPI_Allgather, or MPI_Alltoall where
-- each rank receives only its blocks' parts (engine_tp > 1);
-- disaggregated: MPI_Bcast of the model over rank 0 and the engine ranks,
-- after an MPI_Allgather over the trainer ranks where they gather), their
-- ratio (target >= 0.8), the bytes received per rank against what the
-- rank's shard needs (the model / T plus what every rank holds whole;
-- target <= 1.1x) and what a gather of whole tensors would bring it, and
-- the count of wrong tensors after the last sync (ws.verify, 0 expected).
-- exchange=staged runs every row through staging buffers and
-- exchange=all_gather the tensor-parallel rows with whole-tensor gathers,
-- for comparison. check=true makes the exit status fail on a miss;
-- check=bytes only on a miss of the bytes or verification targets (the
-- time target needs a quiet machine).
local ws = require("ws")
local config = require("ws.config")
local models = require("ws.models")
local trainer_mod = require("ws.trainer")
local engine_mod = require("ws.engine")
local sync_mod = require("ws.sync")
local verify = require("ws.verify")
local parallel = require("ws.parallel")
local placement = require("ws.placement")
local json = require("ws.json")
local must = require("ws.errors").must

local schema = {
    model = { default = "qwen3-0.6b", type = "string" },
    device = { default = "auto", type = "string" },
    iters = { default = 3, type = "integer", min = 1 },
    bucket_mb = { default = ws.DEFAULT_BUCKET_BYTES // (1 << 20), type = "number", min = 0.001 },
    check = { default = "false", type = "enum", values = { "false", "true", "bytes" } },
    exchange = { default = "auto", type = "enum", values = { "auto", "staged", "all_gather" } },
}
local ok, cfg, opts = pcall(config.parse, schema, arg)
if not ok then
    io.stderr:write("bench/parallel.lua: " .. tostring(cfg) .. "\n")
    os.exit(2)
end

local comm = ws.comm()
local rank, world = comm.rank, comm.size
local device = cfg.device == "auto" and ws.default_device()
    or must("bench/parallel.lua: device " .. cfg.device, ws.device(cfg.device))
local spec = models.get(cfg.model)
local function out(fmt, ...) if rank == 0 then io.stdout:write(string.format(fmt, ...), "\n") end end

-- The largest value of x over the ranks (bytes or times of the slowest rank).
local function max_over(x)
    local t = must("bench", ws.tensor{ shape = { 1 }, dtype = "i64", device = ws.device("cpu") })
    t:set(1, math.floor(x * 1000))
    if world > 1 then comm:all_reduce(t, "max") end
    local r = t:get(1) / 1000
    t:free()
    return r
end

local rows, misses = {}, {}

-- One configuration: build, sync iters times, verify, measure the raw
-- collectives, free.
local function run(name, pcfg)
    local place = placement.new(pcfg, comm, rank, world)
    local par = parallel.new(pcfg, comm, rank, world, place and place.n or 0)
    local tr, en, sy
    local okr, err = pcall(function()
        if place and not place.trainer then
            tr = placement.trainer_layout(spec, nil, place.n)
        else
            tr = trainer_mod.new{ spec = spec, device = device,
                                  rank = place and place.index or rank,
                                  world = place and place.n or world }
        end
        if place and place.trainer then
            en = placement.engine_absent()
        else
            en = engine_mod.new{ spec = spec, device = device, kv_cache_mb = 1, parallel = par }
        end
        local scomm = world > 1 and comm or nil
        if place then scomm = place.trainer_comm end
        sy = sync_mod.new{ trainer = tr, engine = en, comm = scomm, device = device,
                           bucket_mb = cfg.bucket_mb, progress = "off", rank = rank,
                           exchange = cfg.exchange,
                           relay = place and placement.relay_of(place) }
        sy:build("base")
        -- Warm-up: staging allocated, pages touched; its stats say what the
        -- raw collectives must move.
        local stats = sy:send("base")
        local gathered, got = max_over(stats.bytes_gathered), 0
        local full = max_over(stats.bytes_gathered_full)
        -- The exchange's reference: an all_to_all moving as many bytes to
        -- every rank as the most any rank received.
        local exchanged = max_over(stats.exchanged and 1 or 0) > 0
        -- Direct: messages straight between shards and engine tensors; the
        -- slowest path of any rank names the row.
        local direct = -max_over(stats.direct and -1 or 0) > 0
        local relayed = place and max_over(stats.bytes_relayed) or 0
        -- One raw run of the collectives over the same bytes, in seconds.
        local function raw_once()
            if place then
                -- The trainer ranks' all_gather, then rank 0's broadcast (rank 0 runs both).
                local t = 0
                if place.trainer_comm then
                    t = t + place.trainer_comm:reference("all_gather", math.floor(gathered), 1)
                end
                if place.relay then
                    t = t + place.relay:reference("broadcast", math.floor(relayed), 1)
                end
                return t
            elseif world > 1 then
                local op = exchanged and "all_to_all" or "all_gather"
                return comm:reference(op, math.floor(gathered) // world * world, 1)
            end
            return 0
        end
        -- Syncs and raw runs alternate, so both see the same machine.
        local best, raw_s = math.huge, math.huge
        for _ = 1, cfg.iters do
            comm:barrier()
            local t0 = ws.now_ms()
            local s = sy:send("base")
            comm:barrier()
            local ms = ws.now_ms() - t0
            if ms < best then best, stats = ms, s end
            raw_s = math.min(raw_s, raw_once())
        end
        -- Proven, not assumed: the engine holds the trainer's weights.
        local wrong = 0
        local okv = pcall(verify.check, sy.pairs.base,
                          { comm = place and place.trainer_comm or (world > 1 and comm or nil),
                            world = place and place.n or world, trainer = tr, engine = en,
                            note = name })
        if not okv then wrong = 1 end
        wrong = max_over(wrong)
        -- Trainer ranks that send their shards themselves gather nothing:
        -- the reference is then the broadcast of the model alone.
        local trainers_gather = gathered > 0
        if place then
            got = relayed
            gathered = gathered + relayed
        elseif world > 1 then
            got = gathered
        end
        local raw_ms = max_over(raw_s * 1e3)
        -- What this rank's shard needs vs what reached it (a colocated
        -- all_gather brings every rank the whole model).
        local need = max_over(en.holds_nothing and 0 or stats.bytes_moved)
        rows[#rows + 1] = { name = name, tp = pcfg.engine_tp, sync_ms = max_over(best),
                            raw_ms = raw_ms, bytes = gathered, need = need, got = got,
                            full = place and got or full,
                            collective = place and (trainers_gather and "all_gather+broadcast"
                                                    or "broadcast")
                                or exchanged and "all_to_all" or "all_gather",
                            path = direct and "direct" or "staged",
                            wrong = wrong }
    end)
    if sy then pcall(sy.free, sy) end
    if en then pcall(en.free, en) end
    if tr then pcall(tr.free, tr) end
    if par then par:free() end
    if place then place:free() end
    if not okr then error(err, 0) end
end

out("# wshost %s parallel-engine sync benchmark", ws.version)
out("# device %s, world %d, model %s (%.1f MB bf16), bucket %s MB, iters %d (best of), " ..
    "exchange %s", tostring(device), world, spec.name, models.param_count(spec) * 2 / 1e6,
    tostring(cfg.bucket_mb), cfg.iters, cfg.exchange)
for _, T in ipairs({ 1, 2, 4 }) do
    local pcfg = { engine_tp = T, engine_ep = 1, engine_dtype = "bf16", placement = "colocated",
                   trainer_ranks = 0 }
    if world % T == 0 and pcall(parallel.check, pcfg, spec, world) then
        run(string.format("colocated tp=%d", T), pcfg)
    end
end
if world >= 2 then
    local n = world // 2
    local pcfg = { engine_tp = 1, engine_ep = 1, engine_dtype = "bf16",
                   placement = "disaggregated", trainer_ranks = n }
    run(string.format("disaggregated %d+%d", n, world - n), pcfg)
end

out("#")
out("# %-18s %-20s %10s %10s %8s %12s %12s %12s %10s %6s", "placement", "collective",
    "sync(ms)", "raw(ms)", "ratio", "MB_received", "MB_needed", "MB_full", "algbw", "wrong")
for _, r in ipairs(rows) do
    r.ratio = r.sync_ms > 0 and r.raw_ms / r.sync_ms or 0
    out("  %-18s %-20s %10.2f %10.2f %8.2f %12.1f %12.1f %12.1f %10.2f %6d", r.name,
        r.collective, r.sync_ms, r.raw_ms, r.ratio, r.bytes / 1e6, r.need / 1e6, r.full / 1e6,
        r.bytes / (r.sync_ms * 1e6), r.wrong)
end
out("#")
for _, r in ipairs(rows) do
    out("#   %-18s %-20s %s", r.name, "path", r.path == "direct" and
        "direct: messages straight from the shards into the engine tensors, no staging" or
        "staged: pack, collective, copy-out")
end
for _, r in ipairs(rows) do
    local function target(what, okv, fmt, ...)
        out("#   %-18s %-20s %s  %s", r.name, what, okv and "ok  " or "MISS", string.format(fmt, ...))
        if not okv then misses[#misses + 1] = r.name .. ": " .. what end
    end
    if world > 1 then
        target("vs raw collective", r.ratio >= 0.8, "%.2fx of the raw %s (target >= 0.8x)",
               r.ratio, r.collective)
    end
    if r.tp and r.tp > 1 then
        local per = r.got / math.max(r.need, 1)
        target("bytes per rank", per <= 1.1,
               "%.3fx what the shard needs: %.1f of at most %.1f MB (target <= 1.1x; a " ..
               "gather of whole tensors: %.1f MB, %.2fx)", per, r.got / 1e6, 1.1 * r.need / 1e6,
               r.full / 1e6, r.full / math.max(r.need, 1))
    end
    target("verified", r.wrong == 0, "%d wrong", r.wrong)
end
if opts.json and rank == 0 then
    local f = assert(io.open(opts.json, "w"))
    f:write(json.encode{ bench = "parallel", version = ws.version, device = tostring(device),
                         world = world, model = spec.name, rows = rows, misses = misses }, "\n")
    f:close()
end
local failing = 0
for _, m in ipairs(misses) do
    if cfg.check == "true" or (cfg.check == "bytes" and not m:find(": vs raw collective$")) then
        failing = failing + 1
    end
end
if failing > 0 then os.exit(1) end
