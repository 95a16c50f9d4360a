-- comm_agree.lua: argument mismatches across ranks that the size check alone
-- would miss must raise the same error on every rank (never hang, never
-- corrupt), and the comm must stay in step afterwards.
local ws = require "ws"
local H = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib/comm_helpers.lua")

local comm = ws.comm()
local rank, size = comm.rank, comm.size
local odd = rank % 2 == 1

-- Builds shards (filled with the rank) and fulls for the given {numel, dtype} list.
local function coalesced_args(spec)
  local shards, fulls = {}, {}
  for i, e in ipairs(spec) do
    local n, dt = e[1], e[2]
    shards[i] = H.tensor((n + size - 1) // size, dt, "shard" .. i):fill(rank)
    fulls[i] = H.tensor(n, dt, "full" .. i):fill(dt == "u8" and 255 or -1)
  end
  return shards, fulls
end

-- Same total numel and first dtype, but the tensors are split differently:
-- the gathered bytes would land in the wrong tensors.
do
  local a, b = {4 * size, "f32"}, {8 * size, "f32"}
  local s, f = coalesced_args(odd and {b, a} or {a, b})
  H.raises("ranks disagree on the sizes or dtypes of the tensors", comm.all_gather_coalesced,
           comm, s, f)
end

-- Same sizes and first dtype; a later tensor's dtype differs.
do
  local s, f = coalesced_args{{3 * size, "f32"}, {5 * size, odd and "f16" or "bf16"}}
  H.raises("ranks disagree on the sizes or dtypes of the tensors", comm.all_gather_coalesced,
           comm, s, f)
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

-- A bucket far larger than the data ("one bucket for everything") works and
-- does not try to allocate it.
do
  local spec = {{7, "f32"}, {size + 1, "bf16"}, {0, "f32"}, {1000, "i32"}}
  local s, f = coalesced_args(spec)
  comm:all_gather_coalesced(s, f, 1 << 50)
  for i, e in ipairs(spec) do
    local per = (e[1] + size - 1) // size
    for k = 1, e[1] do
      H.eq(f[i]:get(k), (k - 1) // per, "one big bucket: full " .. i .. " element " .. k)
    end
  end
end

-- numel < world: most ranks hold only padding.
do
  local s, f = coalesced_args{{1, "f32"}, {size - 1, "i64"}, {1, "u8"}}
  comm:all_gather_coalesced(s, f, 16)
  H.eq(f[1]:get(1), 0, "numel 1 comes from rank 0")
  for k = 1, size - 1 do H.eq(f[2]:get(k), k - 1, "numel size-1, element " .. k) end
  H.eq(f[3]:get(1), 0, "u8 numel 1")
end

-- still in step
local x = H.tensor(1):fill(1)
comm:all_reduce(x)
H.eq(x:get(1), size, "all_reduce after the mismatches")
comm:barrier()
if rank == 0 then print(string.format("comm_agree: ok on %d ranks", size)) end
