-- bench/sweep_sleep.lua: the sleep/sync sweep of a pipeline over a grid.
--
--   wshost bench/sweep_sleep.lua                      # qwen3-0.6b, 6 points, ~20 s on the cpu
--   wshost bench/sweep_sleep.lua preset=tiny          # tiny model, every axis varies: seconds
--   wshost bench/sweep_sleep.lua preset=large         # 0.6b and 1.7b, more ranks and buckets
--   wshost bench/sweep_sleep.lua lora_rank=8,16,32 bucket_mb=16,512 repeats=5 out=results/r
--
-- Any key of the pipeline's configuration is an axis (comma-separated
-- values); the rest are sweep options: preset, steps, repeats, out, resume,
-- retry_failed, charts, pipeline (default pipelines/verl_lora.lua), progress.
-- Points where the engine never sleeps (free_cache_engine=false) are run for
-- the first sleep_level only: the level cannot matter there.
-- Writes <out>.jsonl, <out>.csv, <out>.png/.svg; rerun the same command after
-- an interruption and the finished points are skipped.
local dir = (debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") or "./")
local ws = require("ws")
local sweep = require("ws.sweep")

local PRESETS = {
    -- About 20 seconds on the 2-core cpu machines: the real 0.6b shapes.
    default = { model = { "qwen3-0.6b" }, free_cache_engine = { true, false },
                sleep_level = { 1, 2 }, lora_rank = { 32 }, bucket_mb = { 64, 512 },
                steps = 4, repeats = 1 },
    -- Seconds: every axis varies, on the tiny model.
    tiny = { model = { "tiny" }, free_cache_engine = { true, false }, sleep_level = { 1, 2 },
             lora_rank = { 8, 32 }, bucket_mb = { 1, 16 }, steps = 4, repeats = 3 },
    -- Tens of minutes on the cpu; minutes on a GPU.
    large = { model = { "qwen3-0.6b", "qwen3-1.7b" }, free_cache_engine = { true, false },
              sleep_level = { 1, 2 }, lora_rank = { 8, 32, 64 }, bucket_mb = { 16, 128, 512 },
              steps = 5, repeats = 3 },
}
local AXIS_ORDER = { "model", "free_cache_engine", "sleep_level", "lora_rank", "bucket_mb" }
local OPTION_KEYS = { preset = true, steps = true, repeats = true, out = true, resume = true,
                      retry_failed = true, charts = true, pipeline = true, progress = true }

local function fail(msg)
    io.stderr:write("sweep_sleep: ", msg, "\n")
    os.exit(2)
end

-- "true" -> true, "32" -> 32, "0.5" -> 0.5, anything else stays a string.
local function typed(s)
    if s == "true" then return true end
    if s == "false" then return false end
    return math.tointeger(tonumber(s)) or tonumber(s) or s
end

local function split(s)
    local out = {}
    for item in s:gmatch("[^,]+") do out[#out + 1] = typed(item) end
    if #out == 0 then fail("empty value list '" .. s .. "'") end
    return out
end

local args = {}
for i = 1, #arg do
    local k, v = arg[i]:match("^([%w_]+)=(.*)$")
    if not k then
        fail("cannot parse '" .. arg[i] .. "': expected key=value (see the header of " ..
             arg[0] .. ")")
    end
    args[k] = v
end

local preset_name = args.preset or "default"
local preset = PRESETS[preset_name]
if not preset then fail("unknown preset '" .. preset_name .. "' (default, tiny, large)") end

local pipeline_path = args.pipeline or (dir .. "../pipelines/verl_lora.lua")
local P = dofile(pipeline_path)

-- Axes: the preset's, replaced or extended by any pipeline key on the command line.
local axes_map = {}
for _, k in ipairs(AXIS_ORDER) do axes_map[k] = preset[k] end
local order = {}
for _, k in ipairs(AXIS_ORDER) do order[#order + 1] = k end
local extra = {}
for k, v in pairs(args) do
    if not OPTION_KEYS[k] then
        if not P.schema[k] then
            local keys = {}
            for name in pairs(P.schema) do keys[#keys + 1] = name end
            for name in pairs(OPTION_KEYS) do keys[#keys + 1] = name end
            table.sort(keys)
            fail(string.format("unknown key '%s' (known: %s)", k, table.concat(keys, ", ")))
        end
        if not axes_map[k] then extra[#extra + 1] = k end
        axes_map[k] = split(v)
    end
end
table.sort(extra)
for _, k in ipairs(extra) do order[#order + 1] = k end
local axes = {}
for _, k in ipairs(order) do axes[#axes + 1] = { k, axes_map[k] } end

local steps = math.tointeger(typed(args.steps or tostring(preset.steps)))
local repeats = math.tointeger(typed(args.repeats or tostring(preset.repeats)))
if not steps or steps < 1 then fail("steps must be a positive integer") end
if not repeats or repeats < 1 then fail("repeats must be a positive integer") end

local comm = ws.comm and ws.comm() or nil
local rank, world = comm and comm.rank or 0, comm and comm.size or 1
local writer = rank == 0
local out = args.out
    or ("results/sweep_sleep" .. (preset_name ~= "default" and ("_" .. preset_name) or ""))
local first_level = axes_map.sleep_level[1]

local device = ws.default_device()
if writer then
    print(string.format("# wshost %s sweep_sleep: preset %s, pipeline %s", ws.version,
                        preset_name, pipeline_path))
    print(string.format("# device %s, world %d, %d steps x %d repeats per point", tostring(device),
                        world, steps, repeats))
    for _, a in ipairs(axes) do
        local vals = {}
        for i, v in ipairs(a[2]) do vals[i] = tostring(v) end
        print(string.format("# axis %-18s %s", a[1], table.concat(vals, ", ")))
    end
end

local result = sweep.run{
    name = "sweep_sleep " .. (P.name or ""),
    axes = axes,
    -- Without sleeping, the sleep level is irrelevant: keep one of them.
    filters = { function(p)
        return p.free_cache_engine ~= false or p.sleep_level == nil or p.sleep_level == first_level
    end },
    repeats = repeats,
    out = out,
    resume = args.resume ~= "false",
    retry_failed = args.retry_failed == "true",
    charts = args.charts ~= "false" and writer,
    progress = args.progress ~= "false" and writer,
    writer = writer,
    run_point = function(point, rep)
        local cfg = { steps = steps, progress = "off" }
        for k, v in pairs(point) do cfg[k] = v end
        local records = P.run(cfg, { quiet = true })
        return records
    end,
}

if writer then
    print(string.format("# %-58s %10s %17s %9s %9s %9s %9s %s", "point", "step ms",
                        "[min, max]", "1st ms", "MB/step", "dev MB", "host MB", "verified"))
    for _, r in ipairs(result.rows) do
        local label = sweep.point_label(r, result.axes)
        if r.status == "ok" then
            print(string.format("  %-58s %10.2f [%7.2f, %7.2f] %9.2f %9.1f %9.1f %9.1f %s", label,
                                r.step_ms.median, r.step_ms.min, r.step_ms.max,
                                r.first_step_ms and r.first_step_ms.median or r.step_ms.median,
                                (r.bytes_per_step or 0) / 1e6, r.peak_device_bytes / 1e6,
                                r.peak_host_bytes / 1e6, r.verified and "yes" or "NO"))
        else
            print(string.format("  %-58s FAILED: %s", label, tostring(r.error)))
        end
    end
    print(string.format("# %d points (%d run, %d already done), %d failed, %d left memory held",
                        #result.rows, result.ran, result.skipped, result.failed, result.leaked))
    for _, k in ipairs({ "jsonl", "csv", "png", "svg" }) do
        if result.files[k] then print(string.format("# %-5s %s", k, result.files[k])) end
    end
end
if result.failed > 0 or result.leaked > 0 then os.exit(1) end
