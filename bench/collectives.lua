-- collectives.lua: nccl-tests style bandwidth table for all_gather and broadcast
-- through the ws tensor layer, with raw MPI on malloc'd buffers (comm:reference)
-- measured in the same run as the reference.
--
--   mpirun -n 2 wshost bench/collectives.lua [--min-bytes N] [--max-bytes N]
--       [--iters N] [--dtype bf16] [--device cpu] [--json FILE] [--min-ratio R]
--
-- size: bytes of the full tensor (all_gather: the gathered output); time_us: mean
-- per call, slowest rank; algbw = size / time; busbw = algbw * (n-1)/n for
-- all_gather and algbw for broadcast (decimal GB/s, as in nccl-tests). #wrong:
-- ranks whose result checksum differs from the independently computed one.
-- check_us: the same call with the mismatch check on (the default); time_us is
-- measured with it off, like the reference. ratio = ref_us / time_us.
-- Exit code 1 when a result is wrong or, with --min-ratio, when the ratio at
-- sizes >= 64 MiB falls below it.
local ws = require "ws"
local json = require "ws.json"
local must = require("ws.errors").must

local opts = {min_bytes = 1024, max_bytes = 256 << 20, iters = 20, dtype = "bf16",
              device = "cpu", json = nil, min_ratio = nil}
do
  local i = 1
  while i <= #arg do
    local k = arg[i]:match("^%-%-(.+)$")
    if not k then error("collectives.lua: unexpected argument " .. arg[i]) end
    k = k:gsub("-", "_")
    if opts[k] == nil and k ~= "json" and k ~= "min_ratio" then
      error("collectives.lua: unknown option --" .. k)
    end
    local v = arg[i + 1] or error("collectives.lua: --" .. k .. " needs a value")
    opts[k] = (k == "dtype" or k == "device" or k == "json") and v or tonumber(v)
    i = i + 2
  end
end

local comm = ws.comm()
local rank, size = comm.rank, comm.size
local dev = must("collectives.lua: --device " .. tostring(opts.device), ws.device(opts.device))
local esize = must("collectives.lua", ws.tensor{shape = {1}, dtype = opts.dtype,
  device = "cpu"}):nbytes()

local function slowest(x) -- max over ranks of a per-rank number
  local t = must("collectives.lua", ws.tensor{shape = {1}, dtype = "f32", device = "cpu"}):fill(x)
  comm:all_reduce(t, "max")
  return t:get(1)
end

local function timed(iters, f)
  f() -- warm-up
  dev:synchronize()
  comm:barrier()
  local t0 = ws.now_ms()
  for _ = 1, iters do f() end
  dev:synchronize()
  return slowest((ws.now_ms() - t0) * 1000 / iters)
end

local function log(...) if rank == 0 then print(string.format(...)) end end

log("# wshost %s collectives benchmark", ws.version)
log("# ranks %d, backend %s, device %s, dtype %s, iters %d", size, comm.backend, dev.name,
    opts.dtype, opts.iters)
log("# %10s %12s %6s %-10s %10s %8s %8s %6s %10s %10s %6s", "size", "count", "type", "op",
    "time_us", "algbw", "busbw", "#wrong", "check_us", "ref_us", "ratio")

local rows, bad = {}, false
for _, op in ipairs{"all_gather", "broadcast"} do
  local bytes = opts.min_bytes
  while bytes <= opts.max_bytes do
    local count = bytes // esize // size * size -- elements of the full tensor
    local nbytes = count * esize
    local piece = count // size
    local full = must("collectives.lua", ws.tensor{shape = {count}, dtype = opts.dtype,
      device = dev})
    local send, f
    if op == "all_gather" then
      send = must("collectives.lua", ws.tensor{shape = {piece}, dtype = opts.dtype, device = dev})
      send:random_(11, 1.0, rank * piece)
      f = function() comm:all_gather(send, full) end
    else
      if rank == 0 then full:random_(11) end
      f = function() comm:broadcast(full, 0) end
    end
    local iters = math.max(2, math.min(opts.iters, (4 << 30) // math.max(nbytes, 1)))
    comm:set_check(true)
    local check_us = timed(iters, f)
    comm:set_check(false)
    local time_us = timed(iters, f)
    comm:set_check(true)
    local want = must("collectives.lua", ws.tensor{shape = {count}, dtype = opts.dtype,
      device = dev}):random_(11)
    local wrong = must("collectives.lua", ws.tensor{shape = {1}, dtype = "i64", device = "cpu"})
    wrong:fill(full:checksum() == want:checksum() and 0 or 1)
    comm:all_reduce(wrong, "sum")
    wrong = wrong:get(1)
    want:free()
    local ok_ref, ref_s = pcall(comm.reference, comm, op, nbytes, iters)
    local ref_us = ok_ref and ref_s * 1e6 or nil
    local algbw = nbytes / time_us / 1e3
    local busbw = op == "all_gather" and algbw * (size - 1) / size or algbw
    local ratio = ref_us and ref_us / time_us or nil
    log("  %10d %12d %6s %-10s %10.1f %8.2f %8.2f %6d %10.1f %10s %6s", nbytes, count,
        opts.dtype, op, time_us, algbw, busbw, wrong, check_us,
        ref_us and string.format("%.1f", ref_us) or "n/a",
        ratio and string.format("%.3f", ratio) or "n/a")
    rows[#rows + 1] = {op = op, size = nbytes, count = count, type = opts.dtype,
                       time_us = time_us, algbw = algbw, busbw = busbw, wrong = wrong,
                       check_us = check_us, ref_us = ref_us, ratio = ratio}
    if wrong > 0 then bad = true end
    if opts.min_ratio and ratio and nbytes >= 64 << 20 and ratio < opts.min_ratio then
      log("# %s at %d bytes: ratio %.3f below --min-ratio %.3f", op, nbytes, ratio, opts.min_ratio)
      bad = true
    end
    full:free()
    if send then send:free() end
    bytes = bytes * 4
  end
end

if opts.json and rank == 0 then
  -- A measurement missing on a row is written as null, as before.
  local keys = {"time_us", "algbw", "busbw", "check_us", "ref_us", "ratio"}
  local out = json.array()
  for i, r in ipairs(rows) do
    local row = {op = r.op, size = r.size, count = r.count, type = r.type, wrong = r.wrong}
    for _, k in ipairs(keys) do row[k] = r[k] == nil and json.null or r[k] end
    out[i] = row
  end
  local f = assert(io.open(opts.json, "w"))
  f:write(json.encode{ranks = size, backend = comm.backend, device = dev.name, rows = out}, "\n")
  f:close()
end
os.exit(bad and 1 or 0, true)
