-- ws.verify: proof that the engine holds exactly the trainer's weights.
--
-- Uses the shard-composable checksum: the checksum of a
-- full tensor is the sum mod 2^64 of its shards' checksums taken with their
-- global first index. The trainer side checksums each rank's real shard
-- elements as bf16 (what the engine stores, so f32 master weights compare
-- too) and sums over ranks with one all_reduce; the engine side checksums
-- each destination view from index 0. The first mismatch raises an error
-- naming both tensors. A destination whose contents a sleep discarded raises
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

local M = {}

-- What verification keeps per list of pairs, built at its first check: the
-- lists handed to ws.checksums (the trainer's real shard elements, an empty
-- view for a rank whose shard is all padding, with their global first index;
-- the engine destinations), the empty views it made, and the trainer's last
-- checksums. Weak keys: a list that is dropped takes its state with it (the
-- tensors then go to the GC); M.release frees it at once.
local states = setmetatable({}, { __mode = "k" })

local function state_of(pairs)
    local st = states[pairs]
    if st then return st end
    st = { srcs = {}, firsts = {}, dsts = {}, frozen = true, empty_views = {} }
    for i, p in ipairs(pairs) do
        local e = p.src
        local src = e.view
        if not src then
            src = e.tensor:narrow(1, 1, 0)
            st.empty_views[#st.empty_views + 1] = src
        end
        st.srcs[i], st.firsts[i], st.dsts[i] = src, e.first, p.dst
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

-- The trainer's checksums of a plan, summed over the ranks (one all_reduce of
-- an i64 tensor: sums wrap modulo 2^64, as the checksum does). Reused while
-- the trainer has not changed: frozen base weights are hashed once per load.
local function trainer_sums(st, ctx)
    local key = trainer_key(st, ctx)
    if key and st.trainer_key == key then return st.trainer_sums end
    local sums = must("verify", ws.checksums(st.srcs, st.firsts, "bf16"))
    if (ctx.world or 1) > 1 and ctx.comm then
        local ok, err = pcall(ctx.comm.all_reduce, ctx.comm, sums, "sum")
        if not ok then
            sums:free()
            error(err, 0)
        end
    end
    if st.trainer_sums then st.trainer_sums:free() end
    st.trainer_sums, st.trainer_key = sums, key
    return sums
end

-- Frees what verification keeps for `pairs` (the trainer's checksums and the
-- empty views into trainer shards); call it before the trainer is freed. A
-- later check builds it again. Frees all it can before raising the first
-- error it met.
function M.release(pairs)
    local st = states[pairs]
    if not st then return end
    states[pairs] = nil
    local first
    local function free(obj)
        local ok, err = pcall(obj.free, obj)
        if not ok and first == nil then first = err end
    end
    if st.trainer_sums then free(st.trainer_sums) end
    for _, v in ipairs(st.empty_views) do free(v) end
    if first ~= nil then error(first, 0) end
end

-- pairs: list of {src = trainer entry (view, first, name, trainable), dst =
-- engine view, dst_name}. ctx: comm, world, note, trainer (optional: enables
-- reuse of the trainer's checksums). Two C calls per plan; Lua only walks the
-- list on a mismatch, to name it. Raises on the first mismatch; returns the
-- number of tensors checked.
function M.check(pairs, ctx)
    local st = state_of(pairs)
    st.proven_key = nil -- until this check passes
    local want = trainer_sums(st, ctx)
    local where = ctx.note or "rollout"
    local ok, got, msg = pcall(ws.checksums, st.dsts, nil, "bf16")
    if ok and got == nil then ok, got = false, msg end
    if not ok then error(string.format("verify (%s): %s", where, tostring(got)), 0) end
    if got:checksum() ~= want:checksum() then
        for i, p in ipairs(pairs) do
            local g, w = got:get(i), want:get(i)
            if g ~= w then
                got:free()
                error(string.format(
                    "verify (%s): engine tensor '%s' does not hold trainer parameter '%s': " ..
                    "checksum 0x%016x, trainer 0x%016x; the sync did not write it (check the " ..
                    "policy's send decisions and the plan's entries)",
                    where, tostring(p.dst_name), p.src.name, g, w), 0)
            end
        end
    end
    got:free()
    st.proven_key = st.trainer_key
    return #pairs
end

-- For a plan not sent this step. ctx as for M.check. Proves the engine's
-- tensors readable (one C call, no byte read) when the trainer's side is
-- the one they were last proven against; otherwise M.check. Raises the
-- pool's error naming the first unreadable tensor. Returns the number of
-- tensors and whether their bytes were checksummed.
function M.check_unsent(pairs, ctx)
    local st = state_of(pairs)
    local key = trainer_key(st, ctx)
    if key == nil or st.proven_key ~= key then return M.check(pairs, ctx), true end
    local ok, err = pcall(ws.readable, st.dsts)
    if not ok then
        error(string.format("verify (%s): %s", ctx.note or "rollout", tostring(err)), 0)
    end
    return #pairs, false
end

return M
