-- comm_collectives.lua: every collective against values each rank computes on its
-- own from a formula of (rank, index); run under mpirun -n 2 and -n 4.
local ws = require "ws"
local H = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib/comm_helpers.lua")

local comm = ws.comm()
local rank, size = comm.rank, comm.size
H.eq(size, tonumber(os.getenv("OMPI_COMM_WORLD_SIZE")), "size")
H.eq(rank, tonumber(os.getenv("OMPI_COMM_WORLD_RANK")), "rank")
H.eq(comm.local_rank, tonumber(os.getenv("OMPI_COMM_WORLD_LOCAL_RANK")), "local_rank")
H.eq(comm.backend, "mpi", "backend")
assert(comm.check, "the mismatch check is on by default with more than one rank")
assert(tostring(comm):find("rank " .. rank .. " of " .. size, 1, true), tostring(comm))

local function value(r, i) return r * 1000 + i end

-- all_gather (f32, formula): piece r of recv holds rank r's values.
do
  local n = 37
  local send, recv = H.tensor(n), H.tensor(n * size)
  for i = 1, n do send:set(i, value(rank, i)) end
  H.eq(comm:all_gather(send, recv), recv, "all_gather returns recv")
  for r = 0, size - 1 do
    for i = 1, n do H.eq(recv:get(r * n + i), value(r, i), "all_gather elem " .. r .. "," .. i) end
  end
  -- into a list of tensors
  local list = {}
  for r = 1, size do list[r] = H.tensor(n, "f32", "piece" .. r) end
  comm:all_gather(send, list)
  for r = 0, size - 1 do
    for i = 1, n do H.eq(list[r + 1]:get(i), value(r, i), "all_gather list " .. r .. "," .. i) end
  end
  -- in place: the own piece already sits in recv (FSDP style)
  local whole = H.tensor(n * size)
  local mine = whole:narrow(1, rank * n + 1, n)
  mine:copy_(send)
  comm:all_gather(mine, whole)
  for r = 0, size - 1 do H.eq(whole:get(r * n + 5), value(r, 5), "in-place all_gather " .. r) end
end

-- all_gather of a bf16 shard of a global random tensor is bitwise the global tensor.
do
  local n = 100003
  local send = H.tensor(n, "bf16"):random_(42, 1.0, rank * n)
  local recv = H.tensor(n * size, "bf16")
  comm:all_gather(send, recv)
  local want = H.tensor(n * size, "bf16"):random_(42, 1.0)
  H.eq(recv:checksum(), want:checksum(), "bf16 all_gather checksum")
  for _, i in ipairs{1, n, n + 1, n * size} do H.eq(recv:get(i), want:get(i), "bf16 elem " .. i) end
end

-- broadcast from every root
for root = 0, size - 1 do
  local t = H.tensor(1000, "i32")
  if rank == root then
    for i = 1, 1000 do t:set(i, value(root, i)) end
  else
    t:fill(-1)
  end
  comm:broadcast(t, root)
  for _, i in ipairs{1, 500, 1000} do H.eq(t:get(i), value(root, i), "broadcast " .. root) end
end

-- send/recv: blocking in even/odd order, and an async ring of 8 MiB messages
if size % 2 == 0 then
  local peer = rank ~ 1
  local out, into = H.tensor(64, "i64"), H.tensor(64, "i64")
  for i = 1, 64 do out:set(i, value(rank, i)) end
  if rank % 2 == 0 then
    comm:send(out, peer); comm:recv(into, peer)
  else
    comm:recv(into, peer); comm:send(out, peer)
  end
  for i = 1, 64 do H.eq(into:get(i), value(peer, i), "send/recv " .. i) end
end
do
  local n = 2 * 1024 * 1024
  local nxt, prv = (rank + 1) % size, (rank - 1) % size
  local out = H.tensor(n):random_(7, 1.0, rank * n)
  local into = H.tensor(n)
  local r1 = comm:recv_async(into, prv)
  local r2 = comm:send_async(out, nxt)
  assert(r1:pending() and tostring(r1) == "ws.Request(pending)")
  r2:wait(); r1:wait()
  assert(not r1:pending())
  H.raises("already waited", r1.wait, r1)
  H.eq(into:checksum(prv * n), H.tensor(n):random_(7, 1.0, prv * n):checksum(prv * n), "ring")
end
H.raises("peer " .. rank .. " is this rank", comm.send, comm, H.tensor(1), rank)
H.raises("out of range", comm.recv, comm, H.tensor(1), size)

-- all_reduce: f32 sum, i32 max, bf16 sum (small integers: exact), i64 sum wraps mod 2^64
do
  local n = 1000
  local f, m, b = H.tensor(n), H.tensor(n, "i32"), H.tensor(n, "bf16")
  for i = 1, n do
    f:set(i, rank + i * 0.5)
    m:set(i, (rank * 7 + i) % 13)
    b:set(i, rank + (i % 5))
  end
  comm:all_reduce(f, "sum")
  comm:all_reduce(m, "max")
  comm:all_reduce(b) -- default "sum"
  for i = 1, n do
    H.eq(f:get(i), size * (size - 1) / 2 + size * i * 0.5, "f32 sum " .. i)
    local mx = -1
    for r = 0, size - 1 do mx = math.max(mx, (r * 7 + i) % 13) end
    H.eq(m:get(i), mx, "i32 max " .. i)
    H.eq(b:get(i), size * (size - 1) / 2 + size * (i % 5), "bf16 sum " .. i)
  end
  local w = H.tensor(3, "i64")
  local vals = {math.maxinteger - rank, (1 << 62) + rank * 12345, -(rank + 1) * 999}
  for i = 1, 3 do H.set_i64(w, i, vals[i]) end
  comm:all_reduce(w, "sum")
  for i = 1, 3 do
    local want = 0
    for r = 0, size - 1 do
      want = want + ({math.maxinteger - r, (1 << 62) + r * 12345, -(r + 1) * 999})[i]
    end
    H.eq(H.get_i64(w, i), want, "i64 wrapping sum " .. i) -- Lua integers wrap the same way
  end
  H.raises([[op must be "sum" or "max", got 'mean']], comm.all_reduce, comm, f, "mean")
end

-- reduce_scatter: block r of the sum lands on rank r
do
  local n = 257
  local send, recv = H.tensor(n * size), H.tensor(n)
  for j = 1, n * size do send:set(j, rank + j) end
  comm:reduce_scatter(send, recv, "sum")
  for i = 1, n do
    local j = rank * n + i
    H.eq(recv:get(i), size * (size - 1) / 2 + size * j, "reduce_scatter " .. i)
  end
  local bsend, brecv = H.tensor(n * size, "bf16"), H.tensor(n, "bf16")
  for j = 1, n * size do bsend:set(j, (j + rank) % 8) end
  comm:reduce_scatter(bsend, brecv, "max")
  for i = 1, n do
    local j, mx = rank * n + i, 0
    for r = 0, size - 1 do mx = math.max(mx, (j + r) % 8) end
    H.eq(brecv:get(i), mx, "bf16 reduce_scatter max " .. i)
  end
  H.raises("must have " .. size .. " x 257", comm.reduce_scatter, comm, H.tensor(n), recv)
end

comm:barrier()

-- Mismatches are reported on every rank with the same message, and the comm stays usable.
do
  local n = rank == 1 and 7 or 8
  local err = H.raises("all_gather: ranks disagree on the send size: rank 0 has 8 elements, " ..
                       "rank 1 has 7", comm.all_gather, comm, H.tensor(n), H.tensor(n * size))
  assert(not err:find("\n"), err)
  H.raises("ranks disagree on the dtype: rank 0 has f32, rank 1 has bf16", comm.broadcast, comm,
           H.tensor(4, rank == 1 and "bf16" or "f32"), 0)
  H.raises("ranks disagree on the root: rank 0 has 0, rank 1 has 1", comm.broadcast, comm,
           H.tensor(4), rank == 1 and 1 or 0)
  H.raises("ranks disagree on the op", comm.all_reduce, comm, H.tensor(4), rank == 1 and "max" or "sum")
  local t = H.tensor(4)
  if rank == 1 then
    H.raises("rank 0 called all_reduce, rank 1 called broadcast", comm.broadcast, comm, t, 0)
  else
    H.raises("rank 0 called all_reduce, rank 1 called broadcast", comm.all_reduce, comm, t)
  end
  -- still in step afterwards
  local x = H.tensor(1):fill(1)
  comm:all_reduce(x)
  H.eq(x:get(1), size, "all_reduce after mismatches")
  -- with the check off, matching calls still work
  comm:set_check(false)
  assert(not comm.check)
  comm:all_reduce(x)
  H.eq(x:get(1), size * size, "all_reduce with check off")
  comm:set_check(true)
end

-- all_to_all (bytes): rank r sends rank q (r + q) % 3 * 5 + 1 bytes of value
-- r * 16 + q, one part after another; every received part is checked. A rank
-- that expects a different count makes every rank raise, naming the pair.
do
  local function bytes(r, q) return (r + q) % 3 * 5 + 1 end
  local sc, rc, sn, rn = {}, {}, 0, 0
  for q = 0, size - 1 do
    sc[q + 1], rc[q + 1] = bytes(rank, q), bytes(q, rank)
    sn, rn = sn + sc[q + 1], rn + rc[q + 1]
  end
  local send, recv = H.tensor(sn, "u8"), H.tensor(rn + 3, "u8")
  local at = 0
  for q = 0, size - 1 do
    for i = 1, sc[q + 1] do send:set(at + i, rank * 16 + q) end
    at = at + sc[q + 1]
  end
  recv:fill(255)
  H.eq(comm:all_to_all(send, sc, recv, rc), recv, "all_to_all returns recv")
  at = 0
  for q = 0, size - 1 do
    for i = 1, rc[q + 1] do H.eq(recv:get(at + i), q * 16 + rank, "all_to_all from " .. q) end
    at = at + rc[q + 1]
  end
  H.eq(recv:get(rn + 1), 255, "all_to_all writes only its parts")
  local wrong = {}
  for q = 1, size do wrong[q] = rc[q] end
  if rank == size - 1 then wrong[1] = wrong[1] + 1 end
  H.raises(string.format("rank %d expects", size - 1), comm.all_to_all, comm, send, sc, recv,
           wrong)
end

-- A freed tensor raises naming it.
do
  local t = ws.tensor{shape = {4}, device = "cpu", name = "model.gone.weight"}
  t:free()
  H.raises("model.gone.weight", comm.all_reduce, comm, t)
  H.raises("ws.Tensor expected", comm.all_gather, comm, nil, H.tensor(1))
end

if rank == 0 then print(string.format("comm_collectives: ok on %d ranks", size)) end
