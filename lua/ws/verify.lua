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
local ws = require("ws")
local must = require("ws.errors").must

local M = {}

-- The per-plan lists handed to ws.checksums, built once: the trainer's real
-- shard elements (an empty view for a rank whose shard is all padding) with
-- their global first index, and the engine destinations.
local function lists(pairs)
    local l = pairs.verify_lists
    if l then return l end
    l = { srcs = {}, firsts = {}, dsts = {}, frozen = true }
    for i, p in ipairs(pairs) do
        local e = p.src
        if not e.view then e.empty_view = e.empty_view or e.tensor:narrow(1, 1, 0) end
        l.srcs[i], l.firsts[i], l.dsts[i] = e.view or e.empty_view, e.first, p.dst
        if e.trainable then l.frozen = false end
    end
    pairs.verify_lists = l
    return l
end

-- The trainer's checksums of a plan, summed over the ranks (one all_reduce of
-- an i64 tensor: sums wrap modulo 2^64, as the checksum does). Reused while
-- the trainer has not changed: frozen base weights are hashed once per load.
local function trainer_sums(pairs, l, ctx)
    local tr = ctx.trainer
    local key = tr and (l.frozen and "loads " .. tr.loads or "gen " .. tr.generation)
    if key and pairs.trainer_key == key then return pairs.trainer_sums end
    local sums = must("verify", ws.checksums(l.srcs, l.firsts, "bf16"))
    if (ctx.world or 1) > 1 and ctx.comm then ctx.comm:all_reduce(sums, "sum") end
    if pairs.trainer_sums then pairs.trainer_sums:free() end
    pairs.trainer_sums, pairs.trainer_key = sums, key
    return sums
end

-- pairs: list of {src = trainer entry (view, first, name, trainable), dst =
-- engine view, dst_name}. ctx: comm, world, note, trainer (optional: enables
-- reuse of the trainer's checksums). Two C calls per plan; Lua only walks the
-- list on a mismatch, to name it. Raises on the first mismatch; returns the
-- number of tensors checked.
function M.check(pairs, ctx)
    local l = lists(pairs)
    local want = trainer_sums(pairs, l, ctx)
    local where = ctx.note or "rollout"
    local ok, got, msg = pcall(ws.checksums, l.dsts, nil, "bf16")
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
    return #pairs
end

return M
