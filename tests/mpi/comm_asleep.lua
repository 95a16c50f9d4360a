-- comm_asleep.lua: with every rank's destination in a sleeping pool, each
-- collective (and a recv at two ranks) raises on every rank, naming the tensor
-- and the pool, instead of writing into unmapped memory; after a wake the same
-- calls deliver. Run under mpirun -n 2 and -n 4.
local ws = require "ws"
local H = dofile((arg[0]:match("^(.*)/") or ".") .. "/lib/comm_helpers.lua")

local comm = ws.comm()
local rank, size = comm.rank, comm.size
local n = 4096

local pool = assert(ws.pool{device = "cpu", tag = "engine", bytes = 8 * 1024 * 1024})
local gathered = pool:tensor{shape = {n * size}, dtype = "f32", name = "gathered"}
local piece = pool:tensor{shape = {n}, dtype = "f32", name = "piece"}
local send = ws.tensor{shape = {n}, dtype = "f32", fill = rank + 1}
local big = ws.tensor{shape = {n * size}, dtype = "f32", fill = rank + 1}

for _, level in ipairs{1, 2} do
  assert(pool:sleep(level))
  local asleep = "in pool 'engine' cannot be written: the pool is asleep"
  H.raises("all_gather recv: tensor 'gathered' " .. asleep,
           function() comm:all_gather(send, gathered) end)
  H.raises("tensor 'gathered' " .. asleep,
           function() comm:all_gather_async(send, gathered):wait() end)
  H.raises("reduce_scatter recv: tensor 'piece' " .. asleep,
           function() comm:reduce_scatter(big, piece) end)
  -- recv at two ranks: each pairs with a neighbour, both sides refuse before
  -- anything is posted, so nobody is left waiting.
  if size % 2 == 0 then
    local peer = rank ~ 1
    H.raises("recv: tensor 'piece' " .. asleep, function() comm:recv(piece, peer) end)
    H.raises("recv: tensor 'piece' " .. asleep, function() comm:recv_async(piece, peer):wait() end)
  end
  comm:barrier()
  assert(pool:wake())
end

-- Awake, the same calls deliver.
comm:all_gather(send, gathered)
for r = 0, size - 1 do H.eq(gathered:get(r * n + 1), r + 1, "all_gather piece " .. r) end
comm:reduce_scatter(big, piece)
H.eq(piece:get(n), size * (size + 1) / 2, "reduce_scatter sum")
if size % 2 == 0 then
  local peer = rank ~ 1
  if rank % 2 == 0 then
    comm:send(send, peer)
    comm:recv(piece, peer)
  else
    comm:recv(piece, peer)
    comm:send(send, peer)
  end
  H.eq(piece:get(1), peer + 1, "recv from " .. peer)
end
comm:barrier()
if rank == 0 then print("comm_asleep: ok at " .. size .. " ranks") end
