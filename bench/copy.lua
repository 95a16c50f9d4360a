-- bench/copy.lua: copy bandwidth of ws tensors against a reference measured
-- in the same run, in the style of nccl-tests.
--
--   wshost bench/copy.lua [--device cpu|cuda[:N]] [--max-mib N] [--iters N] [--json FILE]
--
-- cpu: t:copy_ (the multi-threaded ws copy) vs. glibc memcpy on one thread
-- (ws.reference_copy). cuda: same-device d2d, pinned h2d and d2h vs. the raw
-- backend copy (cudaMemcpy through the device ops). Sizes 1 MiB .. 1 GiB in
-- x4 steps, capped by --max-mib and so the buffers fit in about 8 GiB.
-- Bandwidth counts each byte once, in decimal GB/s. #wrong counts copies
-- (ws and reference) whose checksum differs from the source's; the exit code
-- is 1 when any did.
local ws = require "ws"
local json = require "ws.json"

local MiB = 1024 * 1024
local MEMORY_CAP = 8 * 1024 * MiB

local function usage(msg)
  io.stderr:write("copy.lua: ", msg, "\n",
    "usage: wshost bench/copy.lua [--device cpu|cuda[:N]] [--max-mib N] [--iters N] [--json FILE]\n")
  os.exit(2)
end

local function parse_args(argv)
  local opts = { max_mib = 1024 }
  local i = 1
  while i <= #argv do
    local a = argv[i]
    local key, value = a:match("^%-%-([%w-]+)=(.*)$")
    if not key then
      key = a:match("^%-%-([%w-]+)$")
      if not key then usage("unexpected argument '" .. a .. "'") end
      if key == "help" then usage("help") end
      i = i + 1
      value = argv[i]
      if value == nil then usage("--" .. key .. " needs a value") end
    end
    if key == "device" then
      opts.device = value
    elseif key == "max-mib" or key == "iters" then
      local n = math.tointeger(tonumber(value))
      if not n or n < 1 then usage("--" .. key .. " must be a positive integer") end
      opts[key == "iters" and "iters" or "max_mib"] = n
    elseif key == "json" then
      opts.json = value
    else
      usage("unknown option --" .. key)
    end
    i = i + 1
  end
  return opts
end

-- Mean wall time of `wshost -e ''`, spawned 20 times.
local function startup_ms()
  local lowest = 0
  while arg[lowest - 1] do lowest = lowest - 1 end
  local exe = arg[lowest]
  local n = 20
  local t0 = ws.now_ms()
  for _ = 1, n do
    local p = assert(io.popen(string.format("%q -e ''", exe)))
    p:read("a")
    p:close()
  end
  return (ws.now_ms() - t0) / n, exe
end

local function sizes(max_mib, buffers)
  local list, mib = {}, 1
  while mib <= max_mib and mib * MiB * buffers <= MEMORY_CAP do
    list[#list + 1] = mib * MiB
    mib = mib * 4
  end
  return list
end

local function iterations(bytes, forced)
  if forced then return forced end
  return math.max(3, math.min(200, (2048 * MiB) // bytes))
end

-- Times `fn` over iters calls after one warm-up; returns microseconds per call.
local function time_us(dev, iters, fn)
  fn()
  dev:synchronize()
  local t0 = ws.now_ms()
  for _ = 1, iters do fn() end
  dev:synchronize()
  return (ws.now_ms() - t0) * 1000 / iters
end

local function gbps(bytes, us) return bytes / (us * 1e3) end

local function make(shape_bytes, where, name)
  local n = shape_bytes // 4
  local t, msg = ws.tensor{shape = {n}, dtype = "f32", device = where.device,
    pinned = where.pinned, name = name}
  if not t then error("copy.lua: " .. msg, 0) end
  return t
end

-- One row: ws copy and reference copy from src to dst, both verified.
local function measure(mode, bytes, dev, src_where, dst_where, iters_forced)
  local src = make(bytes, src_where, "src")
  local dst = make(bytes, dst_where, "dst")
  src:random_(bytes % 9973 + 1)
  local want = src:checksum()
  local iters = iterations(bytes, iters_forced)
  local wrong = 0
  dst:fill(0)
  local ws_us = time_us(dev, iters, function() dst:copy_(src) end)
  if dst:checksum() ~= want then wrong = wrong + 1 end
  dst:fill(0)
  local ref_us = time_us(dev, iters, function() ws.reference_copy(dst, src) end)
  if dst:checksum() ~= want then wrong = wrong + 1 end
  src:free()
  dst:free()
  return {mode = mode, bytes = bytes, iters = iters, time_us = ws_us,
    ws_gbps = gbps(bytes, ws_us), ref_gbps = gbps(bytes, ref_us),
    ratio = ref_us / ws_us, wrong = wrong}
end

local function write_json(file, header, rows)
  local doc = {rows = json.array()}
  for k, v in pairs(header) do doc[k] = type(v) == "number" and v or tostring(v) end
  for i, r in ipairs(rows) do doc.rows[i] = r end
  local f = assert(io.open(file, "w"))
  f:write(json.encode(doc), "\n")
  f:close()
end

local function main(argv)
  local opts = parse_args(argv)
  local dev
  if opts.device then
    local msg
    dev, msg = ws.device(opts.device)
    if not dev then error("copy.lua: --device " .. opts.device .. ": " .. msg, 0) end
  else
    dev = ws.default_device()
  end
  local start_ms, exe = startup_ms()
  local cpu = assert(ws.device("cpu"))
  local header = {
    version = ws.version, device = dev.name, description = dev.description,
    threads = os.getenv("WSHOST_THREADS") or ("auto: " .. cpu.description),
    startup_ms = start_ms,
  }
  print("# wshost copy benchmark")
  print(string.format("# version: wshost %s (%s)", ws.version, _VERSION))
  print(string.format("# device: %s '%s'", dev.name, dev.description))
  print(string.format("# threads: %s", header.threads))
  print(string.format("# startup: %.2f ms per '%s -e \"\"' (mean of 20)", start_ms, exe))
  if dev.kind == "cpu" then
    print("# reference: glibc memcpy on one thread (ws.reference_copy); ws: t:copy_")
  else
    print("# reference: raw cudaMemcpy through the device ops (ws.reference_copy); ws: t:copy_")
  end
  print("# GB/s counts each byte once; ratio = ws_GB/s / ref_GB/s; #wrong: copies whose checksum differs from the source")
  print("#")
  print(string.format("# %-5s %10s %8s %12s %10s %10s %7s %7s", "mode", "size", "iters",
    "time_us", "ws_GB/s", "ref_GB/s", "ratio", "#wrong"))

  local plans
  if dev.kind == "cpu" then
    plans = {{"h2h", {device = cpu}, {device = cpu}, 2}}
  else
    plans = {
      {"d2d", {device = dev}, {device = dev}, 2},
      {"h2d", {device = dev, pinned = true}, {device = dev}, 2},
      {"d2h", {device = dev}, {device = dev, pinned = true}, 2},
    }
  end
  local rows, wrong = {}, 0
  for _, plan in ipairs(plans) do
    for _, bytes in ipairs(sizes(opts.max_mib, plan[4])) do
      if ws.interrupted() then break end
      local r = measure(plan[1], bytes, dev, plan[2], plan[3], opts.iters)
      rows[#rows + 1] = r
      wrong = wrong + r.wrong
      print(string.format("  %-5s %10d %8d %12.1f %10.2f %10.2f %7.2f %7d", r.mode, r.bytes,
        r.iters, r.time_us, r.ws_gbps, r.ref_gbps, r.ratio, r.wrong))
      io.stdout:flush()
    end
  end
  print(string.format("# wrong copies: %d", wrong))
  if opts.json then
    write_json(opts.json, header, rows)
    print("# json: " .. opts.json)
  end
  return wrong
end

local wrong = main(arg)
if wrong > 0 then os.exit(1, true) end
