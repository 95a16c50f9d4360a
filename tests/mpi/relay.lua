-- tests/mpi/relay.lua: disaggregated sync plans (CTest runs it under mpirun
-- -n 2 and -n 4): the first half of the ranks hold FSDP shards, the other
-- half the engine. Four ways, each checked by its stats:
--   - engine blocks (tensor-parallel shards of their own group): the trainer
--     ranks gather, the first broadcasts each bucket, engine ranks copy out;
--   - whole tensors without peers: gathered, then sent by the first trainer
--     rank straight into the engine rank's tensors (direct) when there is one,
--     else broadcast (one tree rather than a copy per engine rank);
--   - whole tensors, bf16 or f32 shards (packed, converted, first), with
--     peers: every trainer rank sends its shard straight into the engine
--     ranks' tensors (direct, no gather);
--   - the same with exchange = "staged": gather and broadcast.
-- Every engine rank checks its blocks against the full tensors built here
-- from the formula, element by element, with buckets small enough to split
-- tensors and rows.
local ws = require "ws"

local comm = ws.comm()
local W, rank = comm.size, comm.rank
local cpu = ws.device("cpu")
local N = W // 2                -- trainer ranks
local E = W - N                 -- engine ranks
local trainer = rank < N
local H = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib/comm_helpers.lua")
local check, counted = H.checker(rank)
local ceil_div = H.ceil_div

-- [rows, cols] tensors; engine rank e of E holds columns [e*cols/E, ...) of
-- the first, rows of the second, the whole third, and nothing of the fourth
-- and the fifth when e > 0 (with blocks). The fifth passes 4 KiB per shard:
-- with WSHOST_COMM_CHUNK_BYTES=4093 (tests/e2e/mpi_large.sh) a message of
-- runs joined on one side only must still travel as its peer's does.
local specs = { { 37, 8 * E }, { 12 * E, 29 }, { 5, 3 }, { 40, 11 }, { 300, 16 } }

local tcomm = comm:split(trainer and 0 or 1, rank)
local relay = comm:split((rank == 0 or not trainer) and 0 or -1, rank)

local ways = {
    { name = "blocks", blocks = true, src = "f32", peers = true, exchange = "auto" },
    { name = E == 1 and "gathered direct" or "gathered broadcast", src = "f32", exchange = "auto",
      direct = E == 1 },
    { name = "shards direct", src = "bf16", peers = true, exchange = "auto", direct = true,
      shards = true },
    { name = "converted shards direct", src = "f32", peers = true, exchange = "auto",
      direct = true, shards = true },
    { name = "staged", src = "bf16", peers = true, exchange = "staged" },
}
for _, bucket in ipairs({ 1 << 20, 256 * N * 3 }) do
for _, way in ipairs(ways) do
    local plan
    local peers = way.peers and comm or nil
    if trainer then
        plan = ws.plan{ bucket_bytes = bucket, comm = N > 1 and tcomm or nil, device = cpu,
                        name = "relay", role = "sender", relay = relay, gather_world = N,
                        peers = peers, exchange = way.exchange }
    else
        plan = ws.plan{ bucket_bytes = bucket, device = cpu, name = "relay", role = "receiver",
                        relay = relay, gather_world = N, peers = peers,
                        exchange = way.exchange }
    end
    local srcs, dsts, numels, blocks, wire, wants = {}, {}, {}, {}, {}, {}
    local e = rank - N
    -- A trainer rank's shards are views of one flat buffer, one after
    -- another (as FSDP's flat parameters): runs a sender joins in memory.
    local flat, at = nil, 1
    if trainer then
        local total = 0
        for _, s in ipairs(specs) do total = total + ceil_div(s[1] * s[2], N) end
        flat = ws.tensor{ shape = { total }, dtype = way.src, device = cpu }
    end
    for i, s in ipairs(specs) do
        local R, C = s[1], s[2]
        local n = R * C
        numels[i], wire[i] = n, "bf16"
        if trainer then
            local shard = ceil_div(n, N)
            local t = ws.tensor{ shape = { shard }, dtype = "f32", device = cpu }
            t:random_(70 + i, 1, rank * shard)
            srcs[i] = flat:narrow(1, at, shard):copy_(t)
            at = at + shard
            t:free()
        else
            local b
            if not way.blocks then b = { C, 0, R, 0, C }
            elseif i == 1 then b = { C, 0, R, e * C // E, (e + 1) * C // E }
            elseif i == 2 then b = { C, e * R // E, (e + 1) * R // E, 0, C }
            elseif i == 3 then b = { C, 0, R, 0, C }
            else b = e == 0 and { C, 0, R, 0, C } or { C, 0, 0, 0, C } end
            blocks[i] = way.blocks and b or false
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
        -- Gathered direct: the trainer ranks but the first only gather.
        local direct = way.direct and (way.shards or not trainer or rank == 0) or false
        check(st.direct == direct, "%s: direct %s", way.name, tostring(st.direct))
        if trainer then
            check(st.bytes_moved == 0, "a sender writes nothing, got %d", st.bytes_moved)
            if way.shards then
                check(st.bytes_relayed > 0 and st.bytes_gathered == 0 and
                      (st.staging_bytes == 0) == (way.src == "bf16"),
                      "%s: every trainer rank sends its shard (%d bytes), gathers nothing (%d) "
                      .. "and stages only what it converts (%d)", way.name, st.bytes_relayed,
                      st.bytes_gathered, st.staging_bytes)
            else
                check((rank == 0) == (st.bytes_relayed > 0),
                      "%s: only the first trainer rank relays", way.name)
            end
        else
            check(not way.direct or st.staging_bytes == 0, "%s: an engine rank stages %d bytes",
                  way.name, st.staging_bytes)
            check(st.bytes_relayed > 0, "received nothing")
            for i, w in ipairs(wants) do
                local b, d = w.b, dsts[i]
                local C, at = b[1], 0
                for r = b[2], b[3] - 1 do
                    for c = b[4], b[5] - 1 do
                        at = at + 1
                        local got, want = d:get(at), w.full:get(r * C + c + 1)
                        check(got == want, "%s round %d bucket %d tensor %d [%d,%d]: %s, want %s",
                              way.name, round, bucket, i, r, c, tostring(got), tostring(want))
                    end
                end
                if at > 0 then d:fill(-7) end
            end
        end
    end
    plan:free()
    for _, t in pairs(srcs) do t:free() end
    if flat then flat:free() end
    for _, t in pairs(dsts) do t:free() end
    for _, w in pairs(wants) do w.full:free() end
end
end
-- Peers on every rank but one (an engine rank; a trainer rank other than
-- the first): every rank raises, naming the peers, and none waits.
for _, nopeer in ipairs({ W - 1, N > 1 and 1 or nil }) do
    local peers = rank ~= nopeer and comm or nil
    local plan, t
    if trainer then
        plan = ws.plan{ bucket_bytes = 1 << 16, comm = N > 1 and tcomm or nil, device = cpu,
                        name = "p", role = "sender", relay = relay, gather_world = N,
                        peers = peers }
        t = ws.tensor{ shape = { ceil_div(100, N) }, dtype = "bf16", device = cpu }
        plan:add({ t }, nil, { 100 }, nil, nil, { "bf16" })
    else
        plan = ws.plan{ bucket_bytes = 1 << 16, device = cpu, name = "p", role = "receiver",
                        relay = relay, gather_world = N, peers = peers }
        t = ws.tensor{ shape = { 100 }, dtype = "bf16", device = cpu }
        plan:add(nil, { t }, { 100 })
    end
    local ok, err = pcall(plan.execute, plan)
    check(not ok and tostring(err):find("plan 'p': some ranks' plans have peers and some do not",
                                        1, true),
          "peers missing on rank %d: %s", nopeer, tostring(err))
    plan:free()
    t:free()
end
if relay then relay:free() end
tcomm:free()
comm:barrier()
print(string.format("rank %d: relay ok (%d checks)", rank, counted.n))
