-- ws.verify: proof that the engine holds exactly the trainer's weights.
--
-- Uses the shard-composable checksum (design-notes §4): the checksum of a
-- full tensor is the sum mod 2^64 of its shards' checksums taken with their
-- global first index. The trainer side checksums each rank's real shard
-- elements as bf16 (what the engine stores, so f32 master weights compare
-- too) and sums over ranks with one all_reduce; the engine side checksums
-- each destination view from index 0. The first mismatch raises an error
-- naming both tensors. A destination whose contents a sleep discarded raises
-- the pool's own error (tensor, pool, sleep) from the checksum call.
local ws = require("ws")

local M = {}

local LOW = 0xFFFFFFFF

-- Sums a list of 64-bit checksums over the ranks. Each value travels as two
-- 32-bit halves in an i64 tensor so every element stays exact through the
-- binding's double-based get/set; the halves' sums recombine mod 2^64.
function M.all_reduce_sums(comm, world, values, device)
    if world == 1 or comm == nil then return values end
    local n = #values
    local t = assert(ws.tensor{ shape = { 2 * n }, dtype = "i64", device = "cpu",
                                name = "verify checksums" })
    for i, v in ipairs(values) do
        t:set(2 * i - 1, v & LOW)
        t:set(2 * i, (v >> 32) & LOW)
    end
    comm:all_reduce(t, "sum")
    local out = {}
    for i = 1, n do
        local lo = math.tointeger(t:get(2 * i - 1))
        local hi = math.tointeger(t:get(2 * i))
        out[i] = (hi << 32) + lo
    end
    t:free()
    return out
end

-- A trainer shard's checksum. The trainer bumps e.version whenever it writes
-- a shard (train_step, load), so frozen base weights are hashed once, while
-- the engine side, the thing under test, is hashed every time.
local function shard_sum(e)
    if e.sum_version ~= e.version or e.sum == nil then
        e.sum = e.view and e.view:checksum(e.first, "bf16") or 0
        e.sum_version = e.version
    end
    return e.sum
end

-- pairs: list of {src = trainer entry (view, first, name), dst = engine view,
-- dst_name}. Raises on the first mismatch; returns the number of tensors checked.
function M.check(pairs, ctx)
    local local_sums = {}
    for i, p in ipairs(pairs) do local_sums[i] = shard_sum(p.src) end
    local sums = M.all_reduce_sums(ctx.comm, ctx.world or 1, local_sums)
    local where = ctx.note or "rollout"
    for i, p in ipairs(pairs) do
        local ok, got = pcall(p.dst.checksum, p.dst, 0, "bf16")
        if not ok then error(string.format("verify (%s): %s", where, tostring(got)), 0) end
        if got ~= sums[i] then
            error(string.format(
                "verify (%s): engine tensor '%s' does not hold trainer parameter '%s': " ..
                "checksum 0x%016x, trainer 0x%016x; the sync did not write it (check the " ..
                "policy's send decisions and the plan's entries)",
                where, tostring(p.dst_name), p.src.name, got, sums[i]), 0)
        end
    end
    return #pairs
end

return M
