-- ws.verify: proof that the engine holds exactly the trainer's weights.
--
-- Uses the shard-composable checksum: the checksum of a
-- full tensor is the sum mod 2^64 of its shards' checksums taken with their
-- global first index. The trainer side checksums each rank's real shard
-- elements as bf16 (what the engine stores, so f32 master weights compare
-- too) and sums over ranks with one all_reduce; the engine side checksums
-- each destination view from index 0. The first mismatch raises an error
-- naming both tensors.
--
-- A tensor- or expert-parallel engine (ws.parallel) holds blocks of the
-- parameters: each rank checksums its block with the indices its elements
-- have in the full parameter (ws.checksums rows: a column block is not one
-- range), and the blocks' checksums are summed over the group that
-- partitions the parameter (one all_reduce per group). Where each element is
-- held by several ranks of the group (norms, replicated KV heads, the whole
-- lora_A of a column-parallel layer) the sum is that many times the
-- trainer's checksum, mod 2^64. A destination whose contents a sleep discarded raises
-- the pool's own error (tensor, pool, sleep) from the checksum call.
--
-- M.check_unsent proves less, for the plans a step did not send: that the
-- engine's tensors are readable (not discarded by a sleep, not in a sleeping
-- pool), from the pools' bookkeeping, without reading their bytes. It falls
-- back to M.check when the trainer's side changed since these pairs were
-- last proven (or they never were): then the engine must hold something it
-- was not sent this step, and only its bytes can say whether it does.
local ws = require("ws")
local must = require("ws.errors").must
local parallel = require("ws.parallel")

local M = {}

-- What verification keeps per list of pairs, built at its first check: per
-- group of pairs ("live": destinations the engine holds and that are
-- checksummed at each check; "staged": the bf16 staging of quantized tensors,
-- whose checksums ws.verify.seal recorded while the staging held them), the
-- lists handed to ws.checksums (the trainer's real shard elements, an empty
-- view for a rank whose shard is all padding, with their global first index;
-- the engine destinations), the pairs' positions, and the trainer's last
-- checksums. Weak keys: a list that is dropped takes its state with it (the
-- tensors then go to the GC); M.release frees it at once.
local states = setmetatable({}, { __mode = "k" })
-- The same for disaggregated lists (check_relay).
local relay_states = setmetatable({}, { __mode = "k" })
-- The same for server mode's lists (pairs.remote).
local remote_states = setmetatable({}, { __mode = "k" })

-- A trainer entry's real shard elements, or (a rank whose shard is all
-- padding) an empty view that st.empty_views keeps until release.
local function trainer_view(e, st)
    if e.view then return e.view end
    local v = e.tensor:narrow(1, 1, 0)
    st.empty_views[#st.empty_views + 1] = v
    return v
end

local function state_of(pairs)
    local st = states[pairs]
    if st then return st end
    local function group()
        return { srcs = {}, firsts = {}, dsts = {}, idx = {}, efirsts = {}, erows = {},
                 groups = {}, replicas = {} }
    end
    st = { live = group(), staged = group(), frozen = true, empty_views = {}, split = false }
    for i, p in ipairs(pairs) do
        local e = p.src
        local src = trainer_view(e, st)
        local g = p.staged and st.staged or st.live
        local k = #g.srcs + 1
        g.srcs[k], g.firsts[k], g.dsts[k], g.idx[k] = src, e.first, p.dst, i
        -- The engine's block: its first element's index in the parameter,
        -- and {cols, pitch} when its rows are not whole rows.
        local b = p.block
        g.efirsts[k], g.erows[k] = 0, false
        if b and b[3] > b[2] and b[5] > b[4] then
            g.efirsts[k] = b[2] * b[1] + b[4]
            if b[4] ~= 0 or b[5] ~= b[1] then g.erows[k] = { b[5] - b[4], b[1] } end
        end
        g.groups[k], g.replicas[k] = p.group or "tp", p.replicas or 1
        if b or g.replicas[k] > 1 or g.groups[k] == "ep" then st.split = true end
        if e.trainable then st.frozen = false end
    end
    states[pairs] = st
    return st
end

-- The trainer's state the checksums of a plan depend on: frozen weights
-- change only when reloaded, trainable ones at every generation. nil without
-- a trainer (nothing is reused then).
local function trainer_key(st, ctx)
    local tr = ctx.trainer
    return tr and (st.frozen and "loads " .. tr.loads or "gen " .. tr.generation)
end

-- The trainer's checksums of a group, summed over the ranks (one all_reduce
-- of an i64 tensor: sums wrap modulo 2^64, as the checksum does). Reused
-- while the trainer has not changed: frozen base weights are hashed once per
-- load.
local function trainer_sums(st, g, ctx)
    local key = trainer_key(st, ctx)
    if key and g.trainer_key == key then return g.trainer_sums end
    local sums = must("verify", ws.checksums(g.srcs, g.firsts, "bf16"))
    if (ctx.world or 1) > 1 and ctx.comm then
        local ok, err = pcall(ctx.comm.all_reduce, ctx.comm, sums, "sum")
        if not ok then
            sums:free()
            error(err, 0)
        end
    end
    if g.trainer_sums then g.trainer_sums:free() end
    g.trainer_sums, g.trainer_key = sums, key
    return sums
end

-- Frees what verification keeps for `pairs` (the trainer's checksums and the
-- empty views into trainer shards); call it before the trainer is freed. A
-- later check builds it again. Frees all it can before raising the first
-- error it met.
function M.release(pairs)
    local ms = remote_states[pairs]
    if ms then
        remote_states[pairs] = nil
        if ms.g.trainer_sums then ms.g.trainer_sums:free() end
        for _, v in ipairs(ms.empty_views) do v:free() end
    end
    local rs = relay_states[pairs]
    if rs then
        relay_states[pairs] = nil
        for _, v in ipairs(rs.empty_views) do v:free() end
    end
    local st = states[pairs]
    if not st then return end
    states[pairs] = nil
    local first
    local function free(obj)
        local ok, err = pcall(obj.free, obj)
        if not ok and first == nil then first = err end
    end
    for _, g in ipairs({ st.live, st.staged }) do
        if g.trainer_sums then free(g.trainer_sums) end
    end
    for _, v in ipairs(st.empty_views) do free(v) end
    if first ~= nil then error(first, 0) end
end

local function checksums_or_raise(list, as, where, firsts, rows)
    local ok, got, msg = pcall(ws.checksums, list, firsts, as, rows)
    if ok and got == nil then ok, got = false, msg end
    if not ok then error(string.format("verify (%s): %s", where, tostring(got)), 0) end
    return got
end

-- The reference quantization of one staged tensor, on the host; records
-- its checksums in sealed.quant.
local function seal_reference(staging, q, sealed, where, cpu)
    local made = {}
    local ok, err = pcall(function()
        local host = staging
        if staging:device().kind ~= "cpu" then
            host = must("verify", staging:to(cpu))
            made[#made + 1] = host
        end
        local rq = must("verify", ws.tensor{ shape = q.shape, dtype = "fp8", device = cpu,
                                             name = q.name .. " (reference)" })
        made[#made + 1] = rq
        local rs = must("verify", ws.tensor{ shape = ws.fp8_block_scale_shape(q.shape),
                                             dtype = "f32", device = cpu,
                                             name = q.scale .. " (reference)" })
        made[#made + 1] = rs
        ws.quantize_fp8_block_reference(host, rq, rs)
        sealed.quant[q.name] = { q = rq:checksum(), s = rs:checksum() }
    end)
    for _, t in ipairs(made) do t:free() end
    if not ok then error(string.format("verify (%s): %s", where, tostring(err)), 0) end
end

-- ctx: engine (its staging), note. Records, right after a quantizing sync
-- and while the staging pool still holds the bf16 values the plan wrote,
-- what check() later compares:
--   sealed.staged[parameter] = the staging's checksum of that parameter's
--     slice (bf16), later compared with the trainer's checksum of it;
--   sealed.quant[tensor] = checksums of an fp8 tensor and its scales as the
--     reference quantizer (ws.quantize_fp8_block_reference: separate scalar
--     code, on the host) computes them from the staging, later compared with
--     the engine's own fp8 tensor and scales.
-- Together: the engine holds Q(staging) and staging = trainer, so the engine
-- holds Q(trainer). What is shared: the definition of Q (quant_block.h's
-- comments), the staging itself and the checksum. What is not: the code that
-- computes Q (the batched cpu loop or the CUDA kernel vs a scalar loop in
-- double with its own e4m3 rounding), so a fault in either shows.
function M.seal(pairs, ctx)
    local st, sealed = state_of(pairs), pairs.sealed
    local where = ctx.note or "sync"
    local g, dest = st.staged, ctx.engine.dest
    local sums = checksums_or_raise(g.dsts, "bf16", where)
    local changed = {}
    for k, i in ipairs(g.idx) do
        local name, v = pairs[i].src.name, sums:get(k)
        if sealed.staged[name] ~= v then changed[dest[name].name] = true end
        sealed.staged[name] = v
    end
    sums:free()
    -- A tensor staged from the same bf16 values as at its last seal (a
    -- frozen base sent again after a level-2 sleep) has the same
    -- quantization: its reference is kept, not computed again. The others'
    -- references are dropped first, so a failure part way leaves none stale.
    for _, q in ipairs(pairs.quant) do
        if changed[q.name] then sealed.quant[q.name] = nil end
    end
    local cpu = ws.device("cpu")
    for _, q in ipairs(pairs.quant) do
        if not sealed.quant[q.name] then
            seal_reference(ctx.engine.staged[q.name], q, sealed, where, cpu)
        end
    end
end

-- The engine's checksums of a group of split destinations, each summed
-- over the ranks of its group (tp or ep): Lua integers, one per pair.
local function group_sums(g, got, ctx)
    local par = ctx.engine and ctx.engine.parallel
    local n, totals = #g.idx, {}
    for k = 1, n do totals[k] = got:get(k) end
    for _, group in ipairs({ "tp", "ep" }) do
        local comm = parallel.group_comm(par, group)
        if comm and n > 0 then
            local t = must("verify", ws.tensor{ shape = { n }, dtype = "i64",
                                                device = ws.device("cpu"),
                                                name = "verify " .. group .. " sums" })
            local ok, err = pcall(function()
                for k = 1, n do t:set(k, g.groups[k] == group and totals[k] or 0) end
                comm:all_reduce(t, "sum")
                for k = 1, n do
                    if g.groups[k] == group then totals[k] = t:get(k) end
                end
            end)
            t:free()
            if not ok then error(err, 0) end
        end
    end
    return totals
end

-- The error of a shard whose checksum, summed over its group, is not the
-- trainer's times the number of ranks holding each element; `why` ends it.
local function group_mismatch(where, p, total, group, want, replicas, why)
    error(string.format("verify (%s): engine tensor '%s' does not hold trainer parameter '%s': " ..
                        "checksum 0x%016x summed over the %s group, expected 0x%016x (%d x the " ..
                        "%s", where, tostring(p.dst_name), p.src.name, total, group, want,
                        replicas, why), 0)
end

-- Split destinations: every pair's group sum against its replicas times
-- the trainer's checksum.
local function compare_split(pairs, st, ctx, where)
    local g = st.live
    local want = trainer_sums(st, g, ctx)
    local got = checksums_or_raise(g.dsts, "bf16", where, g.efirsts, g.erows)
    local ok, totals = pcall(group_sums, g, got, ctx)
    got:free()
    if not ok then error(totals, 0) end
    for k, i in ipairs(g.idx) do
        local wv = g.replicas[k] * want:get(k)
        if totals[k] ~= wv then
            group_mismatch(where, pairs[i], totals[k], g.groups[k], wv, g.replicas[k],
                           "trainer's); the sync did not write this shard on some rank of the " ..
                           "group (check the policy's send decisions and the plan's entries)")
        end
    end
end

-- Disaggregated (pairs.relay, ws.placement): the trainer ranks sum their
-- shards' checksums over their own comm, trainer rank 0 broadcasts the sums
-- over the relay, and each engine rank compares its shards' checksums,
-- summed over its TP or EP group, with them.
local function check_relay(pairs, ctx, where)
    local r, n = pairs.relay, #pairs
    if n == 0 then return end
    local st = relay_states[pairs]
    if not st then
        st = { srcs = {}, firsts = {}, dsts = {}, idx = {}, efirsts = {}, erows = {},
               groups = {}, replicas = {}, empty_views = {} }
        for i, p in ipairs(pairs) do
            if r.role == "sender" then
                local e = p.src
                local src = trainer_view(e, st)
                st.srcs[i], st.firsts[i] = src, e.first
            else
                local b = p.block
                st.dsts[i], st.idx[i], st.efirsts[i], st.erows[i] = p.dst, i, 0, false
                if b and b[3] > b[2] and b[5] > b[4] then
                    st.efirsts[i] = b[2] * b[1] + b[4]
                    if b[4] ~= 0 or b[5] ~= b[1] then st.erows[i] = { b[5] - b[4], b[1] } end
                end
                st.groups[i], st.replicas[i] = p.group or "tp", p.replicas or 1
            end
        end
        relay_states[pairs] = st
    end
    if r.role == "sender" then
        local sums = must("verify", ws.checksums(st.srcs, st.firsts, "bf16"))
        local ok, err = pcall(function()
            if r.trainer_comm then r.trainer_comm:all_reduce(sums, "sum") end
            if r.comm then r.comm:broadcast(sums, 0) end
        end)
        sums:free()
        if not ok then error(err, 0) end
        return
    end
    local want = must("verify", ws.tensor{ shape = { n }, dtype = "i64", device = ws.device("cpu"),
                                           name = "verify trainer sums" })
    local ok, err = pcall(r.comm.broadcast, r.comm, want, 0)
    if not ok then
        want:free()
        error(err, 0)
    end
    local got = checksums_or_raise(st.dsts, "bf16", where, st.efirsts, st.erows)
    local okg, totals = pcall(group_sums, st, got, ctx)
    got:free()
    if not okg then
        want:free()
        error(totals, 0)
    end
    for k = 1, n do
        local wv = st.replicas[k] * want:get(k)
        if totals[k] ~= wv then
            want:free()
            group_mismatch(where, pairs[k], totals[k], st.groups[k], wv, st.replicas[k],
                           "trainer ranks'); the relay did not write this shard on some " ..
                           "engine rank")
        end
    end
    want:free()
end

local function compare_live(pairs, st, ctx, where)
    if st.split then return compare_split(pairs, st, ctx, where) end
    local g = st.live
    local want = trainer_sums(st, g, ctx)
    local got = checksums_or_raise(g.dsts, "bf16", where)
    if got:checksum() ~= want:checksum() then
        for k, i in ipairs(g.idx) do
            local gv, wv = got:get(k), want:get(k)
            if gv ~= wv then
                local p = pairs[i]
                got:free()
                error(string.format(
                    "verify (%s): engine tensor '%s' does not hold trainer parameter '%s': " ..
                    "checksum 0x%016x, trainer 0x%016x; the sync did not write it (check the " ..
                    "policy's send decisions and the plan's entries)",
                    where, tostring(p.dst_name), p.src.name, gv, wv), 0)
            end
        end
    end
    got:free()
end

-- The quantized tensors: the engine's fp8 tensors and scales (read now)
-- against the reference quantization sealed at the last sync, and the
-- staging checksums sealed then against the trainer's weights now.
local function compare_quantized(pairs, st, ctx, where)
    local sealed, qs, ss, tensors = pairs.sealed, {}, {}, ctx.engine.tensors
    for k, q in ipairs(pairs.quant) do qs[k], ss[k] = tensors[q.name], tensors[q.scale] end
    local got_q = checksums_or_raise(qs, nil, where)
    local ok, got_s = pcall(checksums_or_raise, ss, nil, where)
    if not ok then
        got_q:free()
        error(got_s, 0)
    end
    local bad
    for k, q in ipairs(pairs.quant) do
        local ref = sealed.quant[q.name]
        if not ref then
            bad = string.format("engine tensor '%s' was never quantized by a sync (send the " ..
                                "base weights before rollout)", q.name)
        elseif got_q:get(k) ~= ref.q or got_s:get(k) ~= ref.s then
            bad = string.format(
                "engine tensor '%s' (fp8 checksum 0x%016x, scales 0x%016x) is not the " ..
                "quantization of the bf16 weights its last sync staged (reference 0x%016x, " ..
                "0x%016x): the fp8 quantizer or a later write changed it", q.name, got_q:get(k),
                got_s:get(k), ref.q, ref.s)
        end
        if bad then break end
    end
    got_q:free()
    got_s:free()
    if bad then error(string.format("verify (%s): %s", where, bad), 0) end
    local g = st.staged
    local want = trainer_sums(st, g, ctx)
    for k, i in ipairs(g.idx) do
        local p = pairs[i]
        local s, w = sealed.staged[p.src.name], want:get(k)
        if s ~= w then
            error(string.format(
                "verify (%s): engine tensor '%s' was quantized from %s, not from trainer " ..
                "parameter '%s' as it is now (trainer checksum 0x%016x); the sync did not " ..
                "write it (check the policy's send decisions and the plan's entries)", where,
                tostring(p.dst_name), s and string.format("bf16 values of checksum 0x%016x", s)
                or "no sync", p.src.name, w), 0)
        end
    end
end

-- Server mode (pairs.remote, ws.sync): the engine is another process, which
-- proves what it holds itself. What it must hold is given as proofs, one
-- range per parameter: its slice of the engine tensor, with the checksum
-- the trainer's shards give it there (each element hashed with its index in
-- the engine tensor: the slice's offset plus its index in the parameter),
-- summed over the trainer ranks.
local function remote_state(pairs)
    local st = remote_states[pairs]
    if st then return st end
    st = { g = { srcs = {}, firsts = {} }, frozen = true, empty_views = {} }
    for i, p in ipairs(pairs) do
        local e = p.src
        local src = trainer_view(e, st)
        st.g.srcs[i], st.g.firsts[i] = src, e.first + p.dst_offset
        if e.trainable then st.frozen = false end
    end
    remote_states[pairs] = st
    return st
end

-- The proofs' checksums for the trainer as it is now (an i64 tensor that
-- verification keeps: do not free it). ctx: comm, world, trainer.
function M.remote_sums(pairs, ctx)
    local st = remote_state(pairs)
    return trainer_sums(st, st.g, ctx)
end

-- After a sync's finish that the engine process proved: what it was proven
-- against (the trainer's state, and the engine's sleeps since).
function M.remote_proven(pairs, engine)
    local st = remote_state(pairs)
    st.proven = { key = st.g.trainer_key, epoch = engine.epoch or 0 }
end

-- Before a sync of these pairs: until its FINISH is proven, nothing is.
function M.remote_begin(pairs)
    remote_state(pairs).proven = nil
end

-- The engine process proves the plan's ranges (validity_only: that their
-- tensors are valid, not discarded by a level-2 sleep nor cut short by a
-- failed sync). Its refusal names the tensor and the trainer parameter.
local function check_remote(pairs, ctx, validity_only)
    local r, where = pairs.remote, ctx.note or "rollout"
    local st = remote_state(pairs)
    local ok, err = pcall(function()
        if validity_only then
            r.engine.sender:verify(r.proofs)
        else
            r.engine.sender:verify(r.proofs, trainer_sums(st, st.g, ctx))
            st.proven = { key = st.g.trainer_key, epoch = r.engine.epoch or 0 }
        end
    end)
    if not ok then error(string.format("verify (%s): %s", where, tostring(err)), 0) end
    return #pairs
end

-- pairs: list of {src = trainer entry (view, first, name, trainable), dst =
-- engine view, dst_name, staged}, with `quant` and `sealed` (ws.sync) when
-- some destinations are quantized. ctx: comm, world, note, trainer
-- (optional: enables reuse of the trainer's checksums), engine (needed with
-- quantized destinations). A few C calls per plan; Lua walks the list only on a
-- mismatch, to name it, and over the quantized tensors. Raises on the first
-- mismatch; returns the number of tensors checked.
function M.check(pairs, ctx)
    -- Server mode: the engine process proves the plan now, whatever its
    -- last sync's FINISH proved (something may have written it since, as a
    -- stray write during the KV cache's wake would).
    if pairs.remote then return check_remote(pairs, ctx, false) end
    if pairs.relay then
        check_relay(pairs, ctx, ctx.note or "rollout")
        return #pairs
    end
    local st = state_of(pairs)
    st.proven_key = nil -- until this check passes
    local where = ctx.note or "rollout"
    compare_live(pairs, st, ctx, where)
    if pairs.quant then compare_quantized(pairs, st, ctx, where) end
    st.proven_key = trainer_key(st, ctx)
    return #pairs
end

-- For a plan not sent this step. ctx as for M.check. Proves the engine's
-- tensors readable (one C call, no byte read: the live destinations, and the
-- fp8 tensors and scales of quantized ones, whose staging is asleep between
-- syncs) when the trainer's side is the one they were last proven against;
-- otherwise M.check. Raises the pool's error naming the first unreadable
-- tensor. Returns the number of tensors and whether their bytes were
-- checksummed.
function M.check_unsent(pairs, ctx)
    if pairs.relay then return M.check(pairs, ctx), true end
    if pairs.remote then
        local st = remote_state(pairs)
        if st.proven and st.proven.key == trainer_key(st, ctx) then
            return check_remote(pairs, ctx, true), false
        end
        return check_remote(pairs, ctx, false), true
    end
    local st = state_of(pairs)
    local key = trainer_key(st, ctx)
    if key == nil or st.proven_key ~= key then return M.check(pairs, ctx), true end
    local list = st.live.dsts
    if pairs.quant then
        list = {}
        for k, t in ipairs(st.live.dsts) do list[k] = t end
        for _, q in ipairs(pairs.quant) do
            list[#list + 1] = ctx.engine.tensors[q.name]
            list[#list + 1] = ctx.engine.tensors[q.scale]
        end
    end
    local ok, err = pcall(ws.readable, list)
    if not ok then
        error(string.format("verify (%s): %s", ctx.note or "rollout", tostring(err)), 0)
    end
    return #pairs, false
end

return M
