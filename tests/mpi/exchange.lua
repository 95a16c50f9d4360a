-- tests/mpi/exchange.lua: colocated sync plans whose destinations are
-- tensor-parallel blocks (CTest runs it under mpirun -n 2 and -n 4). The
-- plan exchanges (only what each rank's blocks need) instead of gathering
-- whole tensors: direct (point-to-point messages straight from the shards
-- into the blocks; f32 shards into bf16 blocks are first packed, converted,
-- and sent from there) or staged (exchange = "staged": an all_to_all through
-- staging buffers).
-- Every rank checks its blocks, element by element, against the full
-- tensors built here from the formula and against the same plan run as a
-- gather, and that it received only what its blocks need.
-- Shapes: column blocks of a row-parallel layer (one run per row), row
-- blocks of a column-parallel one, a whole tensor, a block every rank of a
-- group holds (replicated KV heads), a block only one rank holds, and row
-- counts that leave FSDP shards uneven or empty; buckets small enough to
-- split tensors and rows; tensors large enough that a shard's run in a
-- block passes 64 KiB (a message of its own) beside the small ones (sent
-- together, scattered).
local ws = require "ws"

local comm = ws.comm()
local W, rank = comm.size, comm.rank
local cpu = ws.device("cpu")
local T = 2                      -- ranks per tensor-parallel group
local t = rank % T
local H = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib/comm_helpers.lua")
local check, counted = H.checker(rank)
local ceil_div = H.ceil_div

-- {rows, cols, block(rows, cols) or nil for the whole tensor}
local specs = {
    { 37, 8 * T, function(R, C) return { C, 0, R, t * C // T, (t + 1) * C // T } end },
    { 12 * T, 29, function(R, C) return { C, t * R // T, (t + 1) * R // T, 0, C } end },
    { 5, 3, nil },
    { 6, 10, function(R, C) return { C, 0, R, 0, C } end },
    { 40, 11, function(R, C) return t == 0 and { C, 0, R, 0, C } or { C, 0, 0, 0, C } end },
    { 2, 16, function(R, C) return { C, t * R // T, (t + 1) * R // T, 0, C } end },
    { 3, 4 * T, function(R, C) return { C, 0, R, t * C // T, (t + 1) * C // T } end },
    { 128 * T, 512, function(R, C) return { C, t * R // T, (t + 1) * R // T, 0, C } end },
    -- Narrow columns over many rows: a peer's part is thousands of bytes of
    -- 8-byte runs, strided where they are sent, back to back where they land.
    { 2400, 4 * T, function(R, C) return { C, 0, R, t * C // T, (t + 1) * C // T } end },
    { 300, 512, nil },
}

local function build(bucket, exchange, src_dtype)
    local plan = ws.plan{ bucket_bytes = bucket, comm = comm, device = cpu, name = "exchange",
                          exchange = exchange }
    local srcs, dsts, numels, shards, blocks, wants, need = {}, {}, {}, {}, {}, {}, 0
    for i, s in ipairs(specs) do
        local R, C = s[1], s[2]
        local n = R * C
        local shard = ceil_div(R, W) * C  -- FSDP2's dim-0 shard
        numels[i], shards[i] = n, shard
        local src = ws.tensor{ shape = { shard }, dtype = "f32", device = cpu }
        src:random_(90 + i, 1, rank * shard)
        if src_dtype == "bf16" then
            srcs[i] = src:to(cpu, "bf16")
            src:free()
        else
            srcs[i] = src
        end
        local b = s[3] and s[3](R, C) or { C, 0, R, 0, C }
        blocks[i] = s[3] and b or false
        local m = (b[3] - b[2]) * (b[5] - b[4])
        need = need + 2 * m
        dsts[i] = ws.tensor{ shape = { m }, dtype = "bf16", device = cpu }
        if m > 0 then dsts[i]:fill(-7) end
        local full = ws.tensor{ shape = { n }, dtype = "f32", device = cpu }
        full:random_(90 + i, 1, 0)
        wants[i] = { full = full:to(cpu, "bf16"), b = b }
        full:free()
    end
    plan:add(srcs, dsts, numels, shards, blocks)
    return { plan = plan, srcs = srcs, dsts = dsts, wants = wants, need = need }
end

-- Every element of a small block; every 13th of a large one (each of its
-- rows, and each message's ends, still get checked somewhere).
local function verify(x, label)
    for i, w in ipairs(x.wants) do
        local b, d = w.b, x.dsts[i]
        local C, at = b[1], 0
        local step = (b[3] - b[2]) * (b[5] - b[4]) > 4096 and 13 or 1
        for r = b[2], b[3] - 1 do
            for c = b[4], b[5] - 1 do
                at = at + 1
                if at % step == 0 or at == 1 then
                    local got, want = d:get(at), w.full:get(r * C + c + 1)
                    check(got == want, "%s tensor %d [%d,%d]: %s, want %s", label, i, r, c,
                          tostring(got), tostring(want))
                end
            end
        end
        if at > 0 then
            check(d:get(at) == w.full:get((b[3] - 1) * C + b[5]), "%s tensor %d: last element",
                  label, i)
            d:fill(-7)
        end
    end
end

local function free(x)
    x.plan:free()
    for _, v in pairs(x.srcs) do v:free() end
    for _, v in pairs(x.dsts) do v:free() end
    for _, w in pairs(x.wants) do w.full:free() end
end

for _, bucket in ipairs({ 1 << 20, 256 * W * 3 }) do
    local gather = build(bucket, "all_gather", "f32")
    for _, v in ipairs({ { "auto", "bf16", true }, { "auto", "f32", true },
                         { "staged", "bf16", false }, { "staged", "f32", false } }) do
        local a2a = build(bucket, v[1], v[2])
        for round = 1, 2 do
            local label = string.format("bucket %d round %d %s %s", bucket, round, v[1], v[2])
            local sa, sg = a2a.plan:execute(), gather.plan:execute()
            verify(a2a, label .. " exchange")
            verify(gather, label .. " gather")
            check(sa.direct == v[3] and not sg.direct, "%s: direct %s, want %s", label,
                  tostring(sa.direct), tostring(v[3]))
            check(not sa.direct or (sa.staging_bytes == 0) == (v[2] == "bf16"),
                  "%s: direct holds no staging but its converted send segments (%d bytes)",
                  label, sa.staging_bytes)
            check(sg.bytes_gathered == sg.bytes_gathered_full,
                  "%s: a gather receives its full figure (%d, %d)", label, sg.bytes_gathered,
                  sg.bytes_gathered_full)
            check(sa.bytes_gathered_full == sg.bytes_gathered_full,
                  "%s: the same naive figure (%d, %d)", label, sa.bytes_gathered_full,
                  sg.bytes_gathered_full)
            check(sa.exchanged and not sg.exchanged, "%s: auto exchanges, all_gather does not",
                  label)
            check(sa.bytes_gathered < sa.bytes_gathered_full,
                  "%s: the exchange moves less (%d of %d)", label, sa.bytes_gathered,
                  sa.bytes_gathered_full)
            -- What the blocks need, plus (staged) at most 15 bytes of alignment
            -- per (piece, peer) run: at most 10 tensors x 2 pieces x W peers here.
            check(sa.bytes_gathered >= a2a.need and sa.bytes_gathered <= a2a.need + 15 * 20 * W
                  and (not sa.direct or sa.bytes_gathered == a2a.need),
                  "%s: received %d bytes, the blocks need %d", label, sa.bytes_gathered, a2a.need)
            check(sa.bytes_moved == sg.bytes_moved, "%s: the same bytes written", label)
        end
        free(a2a)
    end
    free(gather)
end
-- Blocks that save nothing (every rank's block is the whole tensor): not an
-- exchange, but still direct.
do
    local R, C = 1024, 16
    local n, shard = R * C, ceil_div(R, W) * C
    local src = ws.tensor{ shape = { shard }, dtype = "f32", device = cpu }
    src:random_(5, 1, rank * shard)
    local dst = ws.tensor{ shape = { n }, dtype = "bf16", device = cpu }
    local plan = ws.plan{ bucket_bytes = 1 << 20, comm = comm, device = cpu, name = "whole" }
    plan:add({ src }, { dst }, { n }, { shard }, { { C, 0, R, 0, C } })
    local st = plan:execute()
    check(not st.exchanged and st.direct,
          "whole blocks: whole tensors, direct: %d of %d bytes", st.bytes_gathered,
          st.bytes_gathered_full)
    local full = ws.tensor{ shape = { n }, dtype = "f32", device = cpu }
    full:random_(5, 1, 0)
    local want = full:to(cpu, "bf16")
    for i = 1, n, 7 do check(dst:get(i) == want:get(i), "whole blocks: element %d", i) end
    for _, t in ipairs({ plan, src, dst, full, want }) do t:free() end
end

comm:barrier()
print(string.format("rank %d: exchange ok (%d checks)", rank, counted.n))
