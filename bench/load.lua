-- bench/load.lua: loading a checkpoint into trainer shards, against reading
-- the same file bytes, measured in the same run.
--
--   wshost bench/load.lua [model=qwen3-0.6b] [dir=DIR] [shard_mb=500] [iters=3]
--                         [param_dtype=bf16] [--json FILE]
--   mpirun -n 2 wshost bench/load.lua          # each rank loads its half of every tensor
--
-- The checkpoint (the model's parameters with seeded random bf16 values,
-- sharded as save_pretrained does) is written to DIR on the first run and
-- reused after (default: $TMPDIR/wshost-bench-load-<model>). Then, page cache
-- warm:
--   read      every file read with read(2) into one host buffer of the
--             checkpoint's size (already touched, as the shards are);
--   load      open the checkpoint (map, validate, check against config) and
--             copy this rank's FSDP rows into existing trainer shards,
--             converting to param_dtype: what the pipeline does at setup,
--             minus allocating the shards;
--   cold      a whole trainer built from the checkpoint (shards allocated
--             and first touched, then loaded).
-- Rates are checkpoint bytes per second (decimal GB/s; under several ranks,
-- the whole checkpoint over the slowest rank's time). Target: load >= 0.8x read.
local ws = require("ws")
local json = require("ws.json")
local config = require("ws.config")
local models = require("ws.models")
local trainer_mod = require("ws.trainer")
local checkpoint = require("ws.checkpoint")
local must = require("ws.errors").must

local schema = {
    model = { default = "qwen3-0.6b", type = "string", help = "preset to generate" },
    dir = { default = "", type = "string", help = "checkpoint directory (made if absent)" },
    shard_mb = { default = 500, type = "number", min = 1, help = "shard size when writing" },
    iters = { default = 3, type = "integer", min = 1, max = 100, help = "timed repetitions" },
    param_dtype = { default = "bf16", type = "enum", values = { "bf16", "f32" },
                    help = "trainer dtype" },
    device = { default = "auto", type = "string", per_rank = true, help = "cpu, cuda, auto" },
}

local ok, cfg, opts = pcall(config.parse, schema, arg)
if not ok then
    io.stderr:write("load.lua: ", tostring(cfg), "\n")
    os.exit(2)
end
if opts.help then
    print("bench/load.lua: checkpoint load vs. file read\n" .. config.usage(schema))
    return
end

local comm = ws.comm and ws.comm() or nil
local rank, world = comm and comm.rank or 0, comm and comm.size or 1
local device = cfg.device == "auto" and ws.default_device() or must("device", ws.device(cfg.device))
local function log(fmt, ...) if rank == 0 then print(string.format(fmt, ...)) end end
local function barrier()
    if world > 1 then
        local t <close> = must("barrier", ws.tensor{ shape = { 1 }, dtype = "f32", device = "cpu" })
        t:fill(0)
        comm:all_reduce(t, "sum")
    end
end
-- The slowest rank's time.
local function slowest(ms)
    if world == 1 then return ms end
    local t <close> = must("bench", ws.tensor{ shape = { 1 }, dtype = "f32", device = "cpu" })
    t:set(1, ms)
    comm:all_reduce(t, "max")
    return t:get(1)
end

local preset = models.get(cfg.model)
local dir = cfg.dir ~= "" and cfg.dir
    or string.format("%s/wshost-bench-load-%s", os.getenv("TMPDIR") or "/tmp", cfg.model)

-- Generate once (every rank takes part in the gathers; rank 0 writes).
if not models.weights_of(dir) then
    local t0 = ws.now_ms()
    local tr = trainer_mod.new{ spec = preset, device = device, comm = comm, rank = rank,
                                world = world, dtype = "bf16", seed = 1 }
    local files = checkpoint.save_model(tr, dir, { comm = world > 1 and comm or nil, rank = rank,
                                                   world = world,
                                                   max_shard_bytes = math.floor(cfg.shard_mb * 1e6) })
    tr:free()
    log("# wrote %s (%d files) in %.1f s", dir, #files, (ws.now_ms() - t0) / 1e3)
end
barrier()
local spec = models.get(dir)
local ck0 = must("bench", ws.safetensors(spec.weights))
local files, bytes = ck0:files(), 0
for _, name in ipairs(ck0:names()) do bytes = bytes + ck0:info(name).nbytes end
ck0:free()

log("# wshost %s bench/load.lua: %s, %d files, %.2f GB of tensors, world %d, device %s, " ..
    "param_dtype %s", ws.version, dir, #files, bytes / 1e9, world, tostring(device),
    cfg.param_dtype)

-- Reference: the files' bytes through read(2) into memory, page cache warm
-- (one warm-up pass, which also touches the buffer).
local sizes, total_size = {}, 0
for i, f in ipairs(files) do
    local h = assert(io.open(dir .. "/" .. f, "rb"))
    sizes[i] = h:seek("end")
    h:close()
    total_size = total_size + sizes[i]
end
local buffer = must("bench", ws.tensor{ shape = { total_size }, dtype = "u8", device = "cpu",
                                  name = "read buffer" })
local function read_all()
    local n = 0
    for i, f in ipairs(files) do
        local part <close> = buffer:narrow(1, n + 1, sizes[i])
        n = n + must("read", ws.reference_read(dir .. "/" .. f, part))
    end
    return n
end
read_all()
local read_ms = math.huge
for _ = 1, cfg.iters do
    local t0 = ws.now_ms()
    read_all()
    read_ms = math.min(read_ms, ws.now_ms() - t0)
end
buffer:free()

-- load: open + this rank's rows into existing shards.
local tr = trainer_mod.new{ spec = spec, device = device, comm = comm, rank = rank, world = world,
                            dtype = cfg.param_dtype, seed = 1 }
local load_ms = math.huge
for _ = 1, cfg.iters do
    barrier()
    local t0 = ws.now_ms()
    local ck = checkpoint.open_model(spec)
    checkpoint.load_shards(ck, tr.base_params)
    ck:free()
    load_ms = math.min(load_ms, slowest(ws.now_ms() - t0))
end
tr:free()

-- cold: a trainer built from the checkpoint.
barrier()
local t0 = ws.now_ms()
local ck = checkpoint.open_model(spec)
local cold = trainer_mod.new{ spec = spec, device = device, comm = comm, rank = rank,
                              world = world, dtype = cfg.param_dtype, checkpoint = ck }
ck:free()
local cold_ms = slowest(ws.now_ms() - t0)
cold:free()

local function rate(ms) return bytes / (ms / 1e3) / 1e9 end
log("#case        time_ms    GB/s   vs_read")
log("read       %9.1f %7.2f %8.2fx", read_ms, rate(read_ms), 1.0)
log("load       %9.1f %7.2f %8.2fx   (target >= 0.80x)", load_ms, rate(load_ms), read_ms / load_ms)
log("cold       %9.1f %7.2f %8.2fx   (shards allocated and first touched too)", cold_ms,
    rate(cold_ms), read_ms / cold_ms)
if rank == 0 and opts.json then
    local f = assert(io.open(opts.json, "w"))
    f:write(json.encode{ bench = "load", model = cfg.model, world = world, bytes = bytes,
                         read_ms = read_ms, load_ms = load_ms, cold_ms = cold_ms,
                         load_vs_read = read_ms / load_ms }, "\n")
    f:close()
end
