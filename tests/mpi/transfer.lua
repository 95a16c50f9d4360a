-- tests/mpi/transfer.lua: sync plans across ranks (CTest runs it under mpirun -n 2 and -n 4).
--
-- Every rank fills its FSDP shard of each parameter from a formula (element g
-- of the full tensor is random_(seed, g)), runs a plan, and checks that every
-- destination equals the full tensor built here independently from the same
-- formula, element by element and by checksum. Fails by raising an error.
local ws = require "ws"

local comm = ws.comm()
local W, rank = comm.size, comm.rank
local cpu = ws.device("cpu")
local H = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib/comm_helpers.lua")
local check, counted = H.checker(rank)
local ceil_div = H.ceil_div

local DSIZE = { f32 = 4, bf16 = 2 }

-- Uneven shards (numel not divisible by the world), numel < world (ranks
-- with only padding), an empty tensor, and one far larger than the small
-- buckets below.
local specs = {
    { numel = 1199, src = "f32", dst = "bf16" },
    { numel = 1, src = "f32", dst = "f32" },
    { numel = W - 1, src = "f32", dst = "bf16" },
    { numel = 0, src = "f32", dst = "bf16" },
    { numel = 3 * W + 1, src = "bf16", dst = "bf16" },
    { numel = 5000, src = "f32", dst = "bf16" },
    { numel = 64 * W, src = "f32", dst = "f32" },
    { numel = 7, src = "bf16", dst = "f32" },
}
-- Plus q, k, v written into adjacent slices of one fused destination.
local fused_numels = { 96 * W + 5, 33, 250 }

local function make_shard(i, numel, dtype)
    local shard = ceil_div(numel, W)
    local src = ws.tensor{ shape = { shard }, dtype = dtype, device = cpu,
                           name = string.format("param%d.shard", i) }
    if shard > 0 then
        src:random_(1000 + i, 1, rank * shard)
        -- FSDP padding: junk that must never reach a destination.
        local valid = math.max(math.min(numel - rank * shard, shard), 0)
        for k = valid + 1, shard do src:set(k, 12345) end
    end
    return src
end

-- The full tensor, independently: the formula over [0, numel), rounded as
-- the source dtype stores it, converted to the destination dtype.
local function expected(i, numel, src_dtype, dst_dtype)
    local full = ws.tensor{ shape = { numel }, dtype = src_dtype, device = cpu }
    full:random_(1000 + i, 1, 0)
    return full:to(cpu, dst_dtype)
end

local srcs, dsts, numels, wants = {}, {}, {}, {}
local bytes_moved = 0
for i, s in ipairs(specs) do
    srcs[i] = make_shard(i, s.numel, s.src)
    dsts[i] = ws.tensor{ shape = { s.numel }, dtype = s.dst, device = cpu,
                         name = string.format("engine.param%d", i) }
    numels[i] = s.numel
    wants[i] = s.numel > 0 and expected(i, s.numel, s.src, s.dst) or false
    bytes_moved = bytes_moved + s.numel * DSIZE[s.dst]
end
local fused_total = 0
for _, n in ipairs(fused_numels) do fused_total = fused_total + n end
local fused = ws.tensor{ shape = { fused_total }, dtype = "bf16", device = cpu, name = "qkv_proj" }
local start = 1
for j, n in ipairs(fused_numels) do
    local i = #specs + j
    srcs[i] = make_shard(i, n, "f32")
    dsts[i] = fused:narrow(1, start, n)
    numels[i] = n
    wants[i] = expected(i, n, "f32", "bf16")
    start = start + n
    bytes_moved = bytes_moved + n * 2
end

local function verify(label)
    for i, dst in ipairs(dsts) do
        local want = wants[i]
        if want then
            check(dst:checksum() == want:checksum(), "%s: entry %d (%s): checksum differs", label,
                  i, tostring(dst))
            for k = 1, dst:numel() do
                local a, b = dst:get(k), want:get(k)
                check(a == b, "%s: entry %d (%s) element %d: got %s, expected %s", label, i,
                      tostring(dst), k, a, b)
            end
        end
    end
end

local function clear()
    for _, d in ipairs(dsts) do if d:numel() > 0 then d:fill(0) end end
end

-- Buckets: the smallest allowed (256 bytes per rank: every parameter above
-- 128 bf16 elements per rank is split), small, and one bucket for everything.
-- Each way: direct (the default over MPI) and through staging.
for _, how in ipairs{ "auto", "staged" } do
    for _, bucket in ipairs{ W * 256, W * 1024 + 256, 64 << 20 } do
        local plan <close> = ws.plan{ bucket_bytes = bucket, comm = comm, device = cpu,
                                      name = "base", exchange = how }
        check(tostring(plan):find("ws.Plan('base'", 1, true), "tostring: %s", tostring(plan))
        -- Two adds: entries and layout continue across calls.
        local half = 5
        plan:add(table.move(srcs, 1, half, 1, {}), table.move(dsts, 1, half, 1, {}),
                 table.move(numels, 1, half, 1, {}))
        plan:add(table.move(srcs, half + 1, #srcs, 1, {}), table.move(dsts, half + 1, #dsts, 1, {}),
                 table.move(numels, half + 1, #numels, 1, {}))
        for round = 1, 2 do
            clear()
            local calls, last_done, last_total = 0, -1, -1
            local st = plan:execute(function(b, nb, done, total)
                calls = calls + 1
                check(b == calls and b <= nb and done >= last_done and done <= total,
                      "progress(%d, %d, %d, %d) out of order", b, nb, done, total)
                last_done, last_total = done, total
            end)
            local label = string.format("%s bucket %d round %d", how, bucket, round)
            verify(label)
            check(st.direct == (W > 1 and how == "auto"), "%s: direct %s", label,
                  tostring(st.direct))
            check(st.entries == #srcs, "%s: entries %d", label, st.entries)
            check(st.bytes_moved == bytes_moved, "%s: bytes_moved %d, expected %d", label,
                  st.bytes_moved, bytes_moved)
            check(calls == st.buckets and last_done == bytes_moved and last_total == bytes_moved,
                  "%s: %d progress calls for %d buckets, done %d of %d", label, calls, st.buckets,
                  last_done, last_total)
            if W > 1 and st.direct then
                -- Direct (cpu over MPI): messages from the shards into the
                -- destinations; these f32 shards are first packed as bf16 into
                -- two send segments of bucket / world.
                check(st.staging_bytes > 0 and st.staging_bytes <= 2 * (bucket // W),
                      "%s: direct staging %d bytes, more than 2 x bucket / world", label,
                      st.staging_bytes)
                check(st.bytes_gathered == bytes_moved,
                      "%s: direct bytes_gathered %d, expected exactly what lands, %d", label,
                      st.bytes_gathered, bytes_moved)
            elseif W > 1 then
                check(st.staging_bytes > 0 and st.staging_bytes <= 2 * (bucket + bucket // W),
                      "%s: staging %d bytes exceeds 2 x (bucket + bucket / world)", label,
                      st.staging_bytes)
                check(st.bytes_gathered >= bytes_moved and st.bytes_gathered % (256 * W) == 0,
                      "%s: bytes_gathered %d", label, st.bytes_gathered)
            else
                check(st.staging_bytes == 0 and st.bytes_gathered == 0,
                      "%s: a world of one stages nothing", label)
            end
            if bucket == 64 << 20 then
                check(st.buckets == 1, "%s: %d buckets, expected 1", label, st.buckets)
            else
                -- The 5000-element parameter alone needs several buckets.
                check(st.buckets > ceil_div(ceil_div(5000, W) * 2, bucket // W),
                      "%s: only %d buckets", label, st.buckets)
            end
            check(st.total_ms >= st.copy_out_ms and st.pack_ms >= 0 and st.gather_ms >= 0,
                  "%s: timings", label)
            local again = plan:stats()
            check(again.buckets == st.buckets and again.total_ms == st.total_ms, "%s: stats()",
                  label)
        end
        -- Stopping early (every rank decides the same) raises and leaves the
        -- last parameters unwritten.
        clear()
        local ok, err = pcall(plan.execute, plan, function(b) return b < 2 end)
        if bucket == 64 << 20 then
            check(ok, "a single bucket never reaches the stop: %s", tostring(err))
            verify("single bucket, stop after 2")
        else
            check(not ok and err:find("stopped by the progress callback after bucket 2", 1, true),
                  "stop: %s", tostring(err))
            check(dsts[#dsts]:get(1) == 0, "stop: last entry written although stopped")
        end
    end
end

-- FSDP2 dim-0 shards: a [rows, cols] tensor split by rows, ceil(rows / W)
-- rows per rank; the last ranks hold their real rows only (no padding), or
-- nothing at all.
do
    local cases = { { rows = 7, cols = 5 }, { rows = W + 1, cols = 3 }, { rows = 1, cols = 4 } }
    local rsrcs, rdsts, rnumels, rshards, rwants = {}, {}, {}, {}, {}
    for i, c in ipairs(cases) do
        local per = ceil_div(c.rows, W)
        local mine = math.max(0, math.min(per, c.rows - rank * per))
        local numel = c.rows * c.cols
        rsrcs[i] = ws.tensor{ shape = { mine * c.cols }, dtype = "f32", device = cpu,
                              name = string.format("rows%d.shard", i) }
        if mine > 0 then rsrcs[i]:random_(2000 + i, 1, rank * per * c.cols) end
        rdsts[i] = ws.tensor{ shape = { numel }, dtype = "bf16", device = cpu,
                              name = string.format("engine.rows%d", i) }
        rnumels[i], rshards[i] = numel, per * c.cols
        local full = ws.tensor{ shape = { numel }, dtype = "f32", device = cpu }
        full:random_(2000 + i, 1, 0)
        rwants[i] = full:to(cpu, "bf16")
    end
    local plan <close> = ws.plan{ bucket_bytes = W * 256, comm = comm, device = cpu, name = "rows" }
    plan:add(rsrcs, rdsts, rnumels, rshards)
    plan:execute()
    for i, d in ipairs(rdsts) do
        check(d:checksum() == rwants[i]:checksum(), "row shards: entry %d (%s) differs", i,
              tostring(d))
    end
    -- A shard size that cannot hold the tensor is refused.
    local ok, err = pcall(plan.add, plan, { rsrcs[1] }, { rdsts[1] }, { rnumels[1] }, { 1 })
    check(not ok and err:find("cannot hold", 1, true), "small shard: %s", tostring(err))
end

-- Shape errors name the entry and the tensors.
do
    local plan <close> = ws.plan{ bucket_mb = 1, comm = comm, device = cpu, name = "base" }
    local wrong = ceil_div(1199, W) + 1
    local bad = ws.tensor{ shape = { wrong }, device = cpu, name = "x" }
    local full = ws.tensor{ shape = { 1199 }, device = cpu, name = "y" }
    local ok, err = pcall(plan.add, plan, { srcs[1], bad }, { dsts[1], full }, { 1199, 1199 })
    local want = string.format("plan 'base': entry 2: src 'x' has %d elements, expected %d "
                               .. "(rank %d's shard", wrong, ceil_div(1199, W), rank)
    check(not ok and err:find(want, 1, true) ~= nil, "shape error: %s", tostring(err))
    check(plan:stats().entries == 0, "a failed add must add nothing")
    plan:free()
    plan:free()
    ok, err = pcall(plan.execute, plan)
    check(not ok and err:find("plan 'base' was freed", 1, true), "freed plan: %s", tostring(err))
    check(tostring(plan):find("freed", 1, true), "tostring of a freed plan: %s", tostring(plan))
end

-- Options are validated; an error raised by the progress callback comes back
-- unchanged once the engine has stopped (every rank raises the same way).
do
    local ok, err = pcall(ws.plan, { bucket_MB = 1, comm = comm })
    check(not ok and err:find("unknown option 'bucket_MB'", 1, true), "typo: %s", tostring(err))
    ok, err = pcall(ws.plan, { bucket_mb = 1, bucket_bytes = 4096 })
    check(not ok and err:find("not both", 1, true), "both sizes: %s", tostring(err))
    ok, err = pcall(ws.plan, { bucket_bytes = 100 * W, comm = comm })
    check(not ok and err:find("too small", 1, true), "small bucket: %s", tostring(err))
    local plan <close> = ws.plan{ bucket_bytes = W * 256, comm = comm, device = "cpu", name = "cb" }
    plan:add(srcs, dsts) -- numels default to the destinations' sizes
    clear()
    ok, err = pcall(plan.execute, plan, function(b) if b == 3 then error({ code = 42 }) end end)
    check(not ok and type(err) == "table" and err.code == 42, "callback error: %s", tostring(err))
    local st = plan:execute()
    verify("after a callback error")
    check(st.entries == #srcs, "cb: %d entries", st.entries)
end

-- A source discarded by a pool sleep on the last rank fails there and ends
-- the sync on every rank (no rank hangs in the gather).
do
    local pool = ws.pool{ device = cpu, tag = "trainer", bytes = 1 << 20 }
    local n = 1000
    local shard = ceil_div(n, W)
    local src = pool:tensor{ shape = { shard }, dtype = "f32", name = "layers.0.mlp.w" }
    src:random_(7, 1, rank * shard)
    local dst = ws.tensor{ shape = { n }, dtype = "bf16", device = cpu, name = "engine.w" }
    local plan <close> = ws.plan{ bucket_bytes = W * 1024, comm = comm, device = cpu, name = "base" }
    plan:add({ src }, { dst }, { n })
    plan:execute()
    if rank == W - 1 then
        pool:sleep(2, "step 4")
        pool:wake()
    end
    local ok, err = pcall(plan.execute, plan)
    check(not ok, "discarded source: the sync should fail on every rank")
    if rank == W - 1 then
        check(err:find("'layers.0.mlp.w'", 1, true) and err:find("discarded", 1, true),
              "discarded source: %s", err)
    else
        check(err:find("another rank could not start the sync", 1, true), "peer failure: %s", err)
    end
    src:random_(7, 1, rank * shard)
    plan:execute()
    local full = ws.tensor{ shape = { n }, dtype = "f32", device = cpu }
    full:random_(7, 1, 0)
    check(dst:checksum() == full:to(cpu, "bf16"):checksum(), "after rewriting the source")
    plan:free()
    src:free()
    pool:free()
end

comm:barrier()
ws.log("transfer: %d checks passed on rank %d of %d", counted.n, rank, W)
