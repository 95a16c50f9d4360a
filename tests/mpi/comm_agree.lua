-- comm_agree.lua: argument mismatches across ranks that the size check alone
-- would miss, in collectives and sync plans, must raise the same error on
-- every rank (never hang, never corrupt), and the comm must stay in step
-- afterwards.
local ws = require "ws"
local H = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib/comm_helpers.lua")

local comm = ws.comm()
local rank, size = comm.rank, comm.size
local odd = rank % 2 == 1

-- A plan over the given {numel, dtype} list: shards filled with the rank,
-- destinations with a marker.
local function plan_of(spec, bucket)
  local shards, fulls, numels = {}, {}, {}
  for i, e in ipairs(spec) do
    local n, dt = e[1], e[2]
    shards[i] = H.tensor((n + size - 1) // size, dt, "shard" .. i):fill(rank)
    fulls[i] = H.tensor(n, dt, "full" .. i):fill(dt == "u8" and 255 or -1)
    numels[i] = n
  end
  local plan = ws.plan{bucket_bytes = bucket or 1 << 20, comm = comm, device = "cpu",
                       name = "agree"}
  plan:add(shards, fulls, numels)
  return plan, fulls
end

-- Same number of entries and buckets, but the entries are split differently:
-- the gathered bytes would land in the wrong destinations.
do
  local a, b = {4 * size, "f32"}, {8 * size, "f32"}
  local plan <close> = plan_of(odd and {b, a} or {a, b})
  H.raises("plan 'agree': ranks disagree on the sizes, shards or dtypes of the entries", plan.execute,
           plan)
end

-- Same sizes; a later entry's dtype differs.
do
  local plan <close> = plan_of{{3 * size, "f32"}, {5 * size, odd and "f16" or "bf16"}}
  H.raises("plan 'agree': ranks disagree on the sizes, shards or dtypes of the entries", plan.execute,
           plan)
end

-- A different number of entries on some ranks.
do
  local plan <close> = plan_of(odd and {{size, "f32"}} or {{size, "f32"}, {size, "f32"}})
  H.raises("plan 'agree': ranks disagree on the plan shape", plan.execute, plan)
end

-- A root that is out of range on one rank only: every rank reports the disagreement
-- (the bad rank must not bail out alone and leave the others in the check).
do
  local root = rank == size - 1 and size or 0
  H.raises("ranks disagree on the root: rank 0 has 0, rank " .. (size - 1) .. " has " .. size,
           comm.broadcast, comm, H.tensor(4), root)
  -- the same bad root everywhere is a plain argument error on every rank
  H.raises("root " .. size .. " is out of range", comm.broadcast, comm, H.tensor(4), size)
end

-- numel < world: most ranks hold only padding; tiny buckets.
do
  local plan <close>, f = plan_of({{1, "f32"}, {size - 1, "i64"}, {1, "u8"}}, 256 * size)
  plan:execute()
  H.eq(f[1]:get(1), 0, "numel 1 comes from rank 0")
  for k = 1, size - 1 do H.eq(f[2]:get(k), k - 1, "numel size-1, element " .. k) end
  H.eq(f[3]:get(1), 0, "u8 numel 1")
end

-- One rank stops a direct plan early (its progress callback) and calls a
-- barrier while the others send the next bucket: both raise, naming the
-- calls, instead of a truncated message or a hang.
do
  local plan <close> = ws.plan{bucket_bytes = 256 * size, comm = comm, device = "cpu",
                               name = "stop"}
  local s, d = H.tensor(1000, "f32"):fill(rank), H.tensor(1000 * size, "f32")
  plan:add({s}, {d}, {1000 * size})
  local ok, err = pcall(plan.execute, plan, function(b) return not (rank == 0 and b == 1) end)
  if rank == 0 then
    assert(not ok and err:find("stopped by the progress callback after bucket 1", 1, true), err)
    H.raises("ranks called different collectives: rank 0 called barrier, rank 1 called "
             .. "transfer", comm.barrier, comm)
  else
    assert(not ok and err:find("ranks called different collectives: rank 0 called barrier, "
                               .. "rank 1 called transfer", 1, true), tostring(err))
  end
end

-- still in step
local x = H.tensor(1):fill(1)
comm:all_reduce(x)
H.eq(x:get(1), size, "all_reduce after the mismatches")
comm:barrier()
if rank == 0 then print(string.format("comm_agree: ok on %d ranks", size)) end
