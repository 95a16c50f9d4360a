-- comm_shards.lua: zero-size pieces, checksums that compose across shards,
-- split groups and overlapping async calls. (FSDP-style uneven shards are
-- gathered by sync plans: tests/mpi/transfer.lua.)
local ws = require "ws"
local H = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib/comm_helpers.lua")

local comm = ws.comm()
local rank, size = comm.rank, comm.size

-- Zero-size pieces: numel(send) == 0 gathers nothing and still synchronizes.
do
  local send, recv = H.tensor(0), H.tensor(0)
  comm:all_gather(send, recv)
  comm:broadcast(H.tensor(0), size - 1)
  comm:all_reduce(H.tensor(0, "i64"))
end

-- Shard checksums, summed with one i64 all_reduce, give the full tensor's checksum.
do
  local n = 12345
  local s = (n + size - 1) // size
  local lo = math.min(rank * s, n)
  local len = math.min(s, n - lo)
  local full = H.tensor(n, "bf16"):random_(9, 2.0)
  local part = H.tensor(len, "bf16"):random_(9, 2.0, lo)
  local acc = H.tensor(1, "i64")
  H.set_i64(acc, 1, part:checksum(lo))
  comm:all_reduce(acc, "sum")
  H.eq(H.get_i64(acc, 1), full:checksum(), "composed checksum")
end

-- split: two groups by parity, ordered by descending world rank (key = -rank).
do
  local sub <close> = comm:split(rank % 2, -rank)
  local members = {}
  for r = size - 1, 0, -1 do
    if r % 2 == rank % 2 then members[#members + 1] = r end
  end
  H.eq(sub.size, #members, "split size")
  H.eq(members[sub.rank + 1], rank, "split rank follows the key")
  local send, recv = H.tensor(3, "i32"), H.tensor(3 * sub.size, "i32")
  for i = 1, 3 do send:set(i, rank * 10 + i) end
  sub:all_gather(send, recv)
  for j, r in ipairs(members) do
    H.eq(recv:get((j - 1) * 3 + 2), r * 10 + 2, "gather in the group")
  end
  local x = H.tensor(1, "i64"):fill(rank)
  sub:all_reduce(x, "sum")
  local want = 0
  for _, r in ipairs(members) do want = want + r end
  H.eq(x:get(1), want, "sum in the group")
  -- a rank with a negative color gets no communicator
  local maybe = comm:split(rank == 0 and -1 or 0)
  if rank == 0 then H.eq(maybe, nil, "split with color -1") else H.eq(maybe.size, size - 1, "rest") end
  if maybe then maybe:free() end
  sub:free()
  H.raises(string.format("comm 'color %d of world' was freed", rank % 2), sub.barrier, sub)
end

-- Several async collectives in flight at once, waited in reverse order.
do
  local n = 1 << 20
  local g_send = H.tensor(n):random_(5, 1.0, rank * n)
  local g_recv = H.tensor(n * size)
  local red = H.tensor(n, "i64"):fill(rank + 1)
  local bc = H.tensor(n, "bf16")
  if rank == 0 then bc:random_(6) end
  local rs_send, rs_recv = H.tensor(n * size, "i32"):fill(2), H.tensor(n, "i32")
  local list = {}
  for r = 1, size do list[r] = H.tensor(16, "f32") end
  local small = H.tensor(16):fill(rank)
  local reqs = {
    comm:all_gather_async(g_send, g_recv),
    comm:all_reduce_async(red, "sum"),
    comm:broadcast_async(bc, 0),
    comm:reduce_scatter_async(rs_send, rs_recv, "sum"),
    comm:all_gather_async(small, list),
  }
  for i = #reqs, 1, -1 do reqs[i]:wait() end
  H.eq(g_recv:checksum(), H.tensor(n * size):random_(5, 1.0):checksum(), "async all_gather")
  H.eq(red:get(n), size * (size + 1) // 2, "async all_reduce")
  H.eq(bc:checksum(), H.tensor(n, "bf16"):random_(6):checksum(), "async broadcast")
  H.eq(rs_recv:get(1), 2 * size, "async reduce_scatter")
  for r = 1, size do H.eq(list[r]:get(16), r - 1, "async all_gather into a list") end
  -- A request dropped without wait is completed by the garbage collector.
  local x = H.tensor(4):fill(1)
  do local _ = comm:all_reduce_async(x) end
  collectgarbage(); collectgarbage()
  H.eq(x:get(1), size, "request completed by __gc")
  -- A tensor freed before the wait: the transfer still lands in live memory.
  local y = H.tensor(1 << 16):fill(1)
  local q = comm:all_reduce_async(y)
  y:free()
  q:wait()
end

comm:barrier()
if rank == 0 then print(string.format("comm_shards: ok on %d ranks", size)) end
