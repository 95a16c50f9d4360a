-- tests/mpi/relay.lua: disaggregated sync plans (CTest runs it under mpirun
-- -n 2 and -n 4): the first half of the ranks hold FSDP shards and gather, the
-- first of them broadcasts each bucket to the other half, which copy out
-- their blocks (tensor-parallel shards of their own group). Every engine rank
-- checks its blocks against the full tensors built here from the formula,
-- element by element, with buckets small enough to split tensors and rows.
local ws = require "ws"

local comm = ws.comm()
local W, rank = comm.size, comm.rank
local cpu = ws.device("cpu")
local N = W // 2                -- trainer ranks
local E = W - N                 -- engine ranks
local trainer = rank < N
local checks = 0

local function check(cond, fmt, ...)
    checks = checks + 1
    if not cond then error(string.format("rank %d: " .. fmt, rank, ...), 2) end
end

local function ceil_div(a, b) return (a + b - 1) // b end

-- [rows, cols] tensors; engine rank e of E holds columns [e*cols/E, ...) of
-- the first, rows of the second, the whole third, and nothing of the fourth
-- when e > 0.
local specs = { { 37, 8 * E }, { 12 * E, 29 }, { 5, 3 }, { 40, 11 } }

local tcomm = comm:split(trainer and 0 or 1, rank)
local relay = comm:split((rank == 0 or not trainer) and 0 or -1, rank)

for _, bucket in ipairs({ 1 << 20, 256 * N * 3 }) do
    local plan
    if trainer then
        plan = ws.plan{ bucket_bytes = bucket, comm = N > 1 and tcomm or nil, device = cpu,
                        name = "relay", role = "sender", relay = relay, gather_world = N }
    else
        plan = ws.plan{ bucket_bytes = bucket, device = cpu, name = "relay", role = "receiver",
                        relay = relay, gather_world = N }
    end
    local srcs, dsts, numels, blocks, wire, wants = {}, {}, {}, {}, {}, {}
    local e = rank - N
    for i, s in ipairs(specs) do
        local R, C = s[1], s[2]
        local n = R * C
        numels[i], wire[i] = n, "bf16"
        if trainer then
            local shard = ceil_div(n, N)
            local t = ws.tensor{ shape = { shard }, dtype = "f32", device = cpu }
            t:random_(70 + i, 1, rank * shard)
            srcs[i] = t
        else
            local b
            if i == 1 then b = { C, 0, R, e * C // E, (e + 1) * C // E }
            elseif i == 2 then b = { C, e * R // E, (e + 1) * R // E, 0, C }
            elseif i == 3 then b = { C, 0, R, 0, C }
            else b = e == 0 and { C, 0, R, 0, C } or { C, 0, 0, 0, C } end
            blocks[i] = b
            local m = (b[3] - b[2]) * (b[5] - b[4])
            dsts[i] = ws.tensor{ shape = { m }, dtype = "bf16", device = cpu }
            if m > 0 then dsts[i]:fill(-7) end
            local full = ws.tensor{ shape = { n }, dtype = "f32", device = cpu }
            full:random_(70 + i, 1, 0)
            wants[i] = { full = full:to(cpu, "bf16"), b = b }
            full:free()
        end
    end
    if trainer then
        plan:add(srcs, nil, numels, nil, nil, wire)
    else
        plan:add(nil, dsts, numels, nil, blocks)
    end
    for round = 1, 2 do
        local st = plan:execute()
        if trainer then
            check(st.bytes_moved == 0, "a sender writes nothing, got %d", st.bytes_moved)
            check((rank == 0) == (st.bytes_relayed > 0), "only the first trainer rank relays")
        else
            check(st.bytes_relayed > 0, "received nothing")
            for i, w in ipairs(wants) do
                local b, d = w.b, dsts[i]
                local C, at = b[1], 0
                for r = b[2], b[3] - 1 do
                    for c = b[4], b[5] - 1 do
                        at = at + 1
                        local got, want = d:get(at), w.full:get(r * C + c + 1)
                        check(got == want, "round %d bucket %d tensor %d [%d,%d]: %s, want %s",
                              round, bucket, i, r, c, tostring(got), tostring(want))
                    end
                end
                if at > 0 then d:fill(-7) end
            end
        end
    end
    plan:free()
    for _, t in pairs(srcs) do t:free() end
    for _, t in pairs(dsts) do t:free() end
    for _, w in pairs(wants) do w.full:free() end
end
if relay then relay:free() end
tcomm:free()
comm:barrier()
print(string.format("rank %d: relay ok (%d checks)", rank, checks))
