-- bench/compare.lua: wshost's sync against the PyTorch peer (bench/peer_torch.py).
--
--   wshost bench/compare.lua                               # qwen3-0.6b, worlds 1 and 2
--   wshost bench/compare.lua model=tiny worlds=1 iters=3 json=out.json enforce=true
--
-- For each world size it runs wshost (the binary itself, under mpirun for
-- world > 1) and the peer (spawned with as many processes) on the same model,
-- trainer dtype and LoRA rank, with the same trainer values: the wshost side
-- writes the peer's spec (names, shapes, seeds, engine slices) from its own
-- trainer and engine. One sync = the base weights, then the LoRA adapters.
-- Prints both times, the ratio against the target, and checks that both moved
-- the same bytes and left engines with equal checksums. Exit status: 1 when
-- bytes or checksums differ (or, with enforce=true, a ratio misses its target).
--
-- Internal: `wshost bench/compare.lua --worker dir=D ...` is one wshost rank.
local dir = (debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./")
local ws = require("ws")
local json = require("ws.json")

local DEFAULTS = { model = "qwen3-0.6b", worlds = "1,2", iters = "5", warmup = "1",
                   lora_rank = "32", param_dtype = "f32", bucket_mb = "512",
                   python = "/usr/bin/python3", mpirun = "mpirun", json = "", enforce = "false",
                   target_1 = "8", target_2 = "4", dir = "" }
local TARGET_DEFAULT = 4 -- for world sizes beyond 2

local function fail(msg)
    io.stderr:write("compare: ", msg, "\n")
    os.exit(2)
end

local worker = false
local opt = {}
for k, v in pairs(DEFAULTS) do opt[k] = v end
for i = 1, #arg do
    if arg[i] == "--worker" then
        worker = true
    else
        local k, v = arg[i]:match("^([%w_]+)=(.*)$")
        if not k or (DEFAULTS[k] == nil and not k:match("^target_%d+$")) then
            local keys = {}
            for name in pairs(DEFAULTS) do keys[#keys + 1] = name end
            table.sort(keys)
            fail(string.format("cannot use '%s': expected key=value with key in %s", arg[i],
                               table.concat(keys, ", ")))
        end
        opt[k] = v
    end
end
local iters, warmup = math.tointeger(tonumber(opt.iters)), math.tointeger(tonumber(opt.warmup))
if not iters or iters < 1 then fail("iters must be a positive integer") end
if not warmup or warmup < 0 then fail("warmup must be a non-negative integer") end

local function quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function median(v)
    table.sort(v)
    local n = #v
    return n % 2 == 1 and v[(n + 1) // 2] or (v[n // 2] + v[n // 2 + 1]) / 2
end

local function write_file(path, text)
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
end

local function read_json(path)
    local f = io.open(path, "r")
    if not f then return nil end
    local text = f:read("a")
    f:close()
    local ok, v = pcall(json.decode, text)
    return ok and v or nil
end

-- ------------------------------------------------------------ one wshost rank

local function run_worker()
    local models = require("ws.models")
    local lora = require("ws.lora")
    local trainer_mod = require("ws.trainer")
    local engine_mod = require("ws.engine")
    local sync_mod = require("ws.sync")
    local verify = require("ws.verify")

    local comm = ws.comm and ws.comm() or nil
    local rank, world = comm and comm.rank or 0, comm and comm.size or 1
    if world == 1 then comm = nil end
    local device = ws.default_device()
    local spec = models.get(opt.model)
    local lcfg = lora.config{ r = math.tointeger(tonumber(opt.lora_rank)) or 0 }
    local t0 = ws.now_ms()
    local trainer = trainer_mod.new{ spec = spec, lora = lcfg, device = device, comm = comm,
                                     rank = rank, world = world, dtype = opt.param_dtype,
                                     seed = 0 }
    local engine = engine_mod.new{ spec = spec, lora = lcfg, device = device, kv_cache_mb = 1 }
    local sync = sync_mod.new{ trainer = trainer, engine = engine, comm = comm, device = device,
                               bucket_mb = tonumber(opt.bucket_mb), progress = "off", rank = rank }
    local kinds = lcfg and { "base", "adapter" } or { "base" }
    for _, kind in ipairs(kinds) do sync:build(kind) end
    local init_s = (ws.now_ms() - t0) / 1000

    local function barrier()
        device:synchronize()
        if comm then comm:barrier() end
    end
    local total, per_kind, stats = {}, { base = {}, adapter = {} }, {}
    for it = 1, warmup + iters do
        barrier()
        local start = ws.now_ms()
        local bytes, gathered = 0, 0
        for _, kind in ipairs(kinds) do
            local k0 = ws.now_ms()
            local s = sync:send(kind)
            barrier()
            if it > warmup then table.insert(per_kind[kind], ws.now_ms() - k0) end
            bytes, gathered = bytes + s.bytes_moved, gathered + s.bytes_gathered
            stats[kind] = s
        end
        if it > warmup then
            total[#total + 1] = ws.now_ms() - start
            stats.bytes, stats.gathered = bytes, gathered
        end
    end

    -- Proof against the trainer (raises on a mismatch), then the engine-wide
    -- checksums the peer computes the same way: every engine tensor from index 0.
    for _, kind in ipairs(kinds) do
        verify.check(sync.pairs[kind], { comm = comm, world = world, note = "compare" })
    end
    local adapter_tensors = {}
    for _, e in ipairs(trainer.adapter_params) do
        local _, d = engine:destination(e.name)
        adapter_tensors[d.name] = true
    end
    local cs_base, cs_adapter = 0, 0
    for _, name in ipairs(engine.order) do
        local c = engine.tensors[name]:checksum(0)
        if adapter_tensors[name] then cs_adapter = cs_adapter + c else cs_base = cs_base + c end
    end

    if rank == 0 then
        -- The peer's spec, from this trainer and engine (trainer.lua's init scales).
        local function entries(list, scale)
            local out = {}
            for i, e in ipairs(list) do
                local _, d = engine:destination(e.name)
                out[i] = { name = e.name, shape = e.shape, engine = d.name, offset = d.offset,
                           seed = trainer_mod.seed_of(e.name, 0) ~ trainer.seed, scale = scale }
            end
            return out
        end
        local eng = {}
        for i, name in ipairs(engine.order) do
            eng[i] = { name = name, shape = engine.tensors[name]:shape() }
        end
        local peer_spec = { model = spec.name, base = entries(trainer.base_params, 0.02),
                            adapters = entries(trainer.adapter_params, 0.01), engine = eng }
        if #peer_spec.adapters == 0 then peer_spec.adapters = json.array() end
        write_file(opt.dir .. "/spec.json", json.encode(peer_spec))
        local base_stats = stats.base
        write_file(opt.dir .. "/wshost.json", json.encode{
            impl = "wshost", version = ws.version, model = spec.name, device = tostring(device),
            world = world, iters = iters, sync_ms_median = median(total),
            sync_ms_min = math.min(table.unpack(total)),
            sync_ms_max = math.max(table.unpack(total)),
            base_ms_median = median(per_kind.base),
            adapter_ms_median = #per_kind.adapter > 0 and median(per_kind.adapter) or 0,
            bytes_moved = stats.bytes, bytes_gathered = stats.gathered,
            staging_bytes = base_stats.staging_bytes, buckets = base_stats.buckets,
            checksum = string.format("%016x", cs_base + cs_adapter),
            checksum_base = string.format("%016x", cs_base),
            checksum_adapter = string.format("%016x", cs_adapter), init_s = init_s,
        })
    end
    sync:free()
    engine:free()
    trainer:free()
end

if worker then
    if opt.dir == "" then fail("--worker needs dir=") end
    run_worker()
    return
end

-- ------------------------------------------------------------------- driver

-- The binary running this script: WSHOST, else the interpreter in arg[-n].
local function self_exe()
    local env = os.getenv("WSHOST")
    if env and env ~= "" then return env end
    local i = -1
    while arg[i - 1] ~= nil do i = i - 1 end
    return arg[i] or "wshost"
end

local function run(cmd)
    local ok, how, code = os.execute(cmd)
    return ok == true, how == "exit" and code or 128 + (code or 0)
end

local worlds = {}
for w in opt.worlds:gmatch("[^,]+") do
    local n = math.tointeger(tonumber(w))
    if not n or n < 1 then
        fail("worlds must list positive integers, got '" .. opt.worlds .. "'")
    end
    worlds[#worlds + 1] = n
end

local exe = self_exe()
local script = dir .. "compare.lua"
local device = ws.default_device()
local on_gpu = device.kind == "cuda"
local tmp = os.tmpname()
os.remove(tmp)
assert(os.execute("mkdir -p " .. quote(tmp)))
local common = {}
for _, k in ipairs({ "model", "iters", "warmup", "lora_rank", "param_dtype", "bucket_mb" }) do
    common[#common + 1] = k .. "=" .. quote(opt[k])
end
common = table.concat(common, " ")

local python_ok = run(quote(opt.python) .. " -c 'import torch' >/dev/null 2>&1")
print(string.format("# wshost %s compare: model %s, LoRA r=%s, trainer %s, bucket %s MB, " ..
                    "median of %d syncs (%d warm-up)", ws.version, opt.model, opt.lora_rank,
                    opt.param_dtype, opt.bucket_mb, iters, warmup))
print(string.format("# device %s; peer: %s bench/peer_torch.py (%s)", tostring(device),
                    opt.python, on_gpu and "nccl, cuda" or "gloo, cpu"))
print(string.format("# %5s %11s %11s %11s %11s %7s %7s %9s %8s %16s %s", "world", "wshost ms",
                    "w GB/s", "torch ms", "t GB/s", "ratio", "target", "MB moved", "bytes",
                    "checksum", "sums"))
-- One rank per GPU: NCCL refuses two ranks on one device.
local gpus = 0
for _, d in ipairs(ws.devices()) do
    if d.kind == "cuda" then gpus = gpus + 1 end
end

-- wshost at world w (the binary itself, under mpirun for w > 1): its result
-- and the peer's spec land in wdir. Returns the result or nil.
local function run_wshost(w, wdir)
    local launch = quote(exe)
    if w > 1 then
        launch = string.format("%s --allow-run-as-root --oversubscribe -n %d %s",
                               quote(opt.mpirun), w, quote(exe))
    end
    local ok, code = run(string.format("%s %s --worker dir=%s %s 1>&2", launch, quote(script),
                                       quote(wdir), common))
    local mine = ok and read_json(wdir .. "/wshost.json")
    if not mine then
        io.stderr:write(string.format("compare: wshost at world %d failed (exit %d)\n", w, code))
    end
    return mine
end

-- The peer at world w on wshost's spec. Returns its result or nil.
local function run_peer(w, wdir)
    local cmd = string.format("%s %s/peer_torch.py --spec %s --world %d --iters %d --warmup %d " ..
                              "--trainer-dtype %s --device %s --out %s >/dev/null 2>%s",
                              quote(opt.python), quote(dir), quote(wdir .. "/spec.json"), w,
                              iters, warmup, quote(opt.param_dtype), on_gpu and "cuda" or "cpu",
                              quote(wdir .. "/torch.json"), quote(wdir .. "/torch.log"))
    local ok, code = run(cmd)
    local peer = ok and read_json(wdir .. "/torch.json")
    if not peer then
        local f = io.open(wdir .. "/torch.log", "r")
        local log = f and f:read("a") or ""
        if f then f:close() end
        io.stderr:write(string.format("compare: peer at world %d failed (exit %d):\n%s\n", w, code,
                                      log:sub(-4000)))
    end
    return peer
end

local results, bad, missed = {}, 0, 0
for _, w in ipairs(worlds) do
    local wdir = string.format("%s/w%d", tmp, w)
    local mine, peer
    if on_gpu and w > gpus then
        print(string.format("  %5d skipped: needs %d GPUs, this machine has %d", w, w, gpus))
    else
        assert(os.execute("mkdir -p " .. quote(wdir)))
        mine = run_wshost(w, wdir)
        if mine and python_ok then
            peer = run_peer(w, wdir)
        elseif mine then
            io.stderr:write("compare: " .. opt.python .. " cannot import torch; no peer\n")
        end
        if not (mine and peer) then bad = bad + 1 end
    end
    if mine and peer then
        local ratio = peer.sync_ms_median / mine.sync_ms_median
        local target = tonumber(opt["target_" .. w]) or TARGET_DEFAULT
        local bytes_eq = mine.bytes_moved == peer.bytes_moved
        local sums_eq = mine.checksum == peer.checksum and mine.checksum_base == peer.checksum_base
        print(string.format("  %5d %11.1f %11.2f %11.1f %11.2f %6.2fx %6.1fx %9.1f %8s %16s %s",
                            w, mine.sync_ms_median, mine.bytes_moved / mine.sync_ms_median / 1e6,
                            peer.sync_ms_median, peer.bytes_moved / peer.sync_ms_median / 1e6,
                            ratio, target, mine.bytes_moved / 1e6,
                            bytes_eq and "equal" or "DIFFER", mine.checksum,
                            sums_eq and "equal" or ("DIFFER (torch " .. peer.checksum .. ")")))
        if not bytes_eq or not sums_eq then bad = bad + 1 end
        if ratio < target then missed = missed + 1 end
        results[#results + 1] = { world = w, wshost = mine, torch = peer, ratio = ratio,
                                  target = target, bytes_equal = bytes_eq,
                                  checksums_equal = sums_eq }
    end
end
print(string.format("# %d world size(s): %d mismatch(es) or failure(s), %d below the speed target",
                    #worlds, bad, missed))
if opt.json ~= "" then
    write_file(opt.json, json.encode{ model = opt.model, device = tostring(device),
                                      results = results, failures = bad,
                                      below_target = missed } .. "\n")
end
os.execute("rm -rf " .. quote(tmp))
if bad > 0 or (opt.enforce == "true" and missed > 0) then os.exit(1) end
