-- ws.report: per-step records, the end-of-run summary and JSON lines.
--
-- A record holds the wall time of each phase (ms) the step used, bytes
-- moved, what was sent, the verification result and memory figures. The
-- columns are the phases the run used, in the order they first ran (a
-- policy's own ctx:phase shows too); the header is printed again when a
-- later step adds one. The summary prints the mean of each phase over all
-- steps and over steps 2..N (steady state, after the first base sync), like
-- the table in verl PR #5147. `--json FILE` gets one JSON object per step,
-- written as the step ends.
local ws = require("ws")
local json = require("ws.json")

local M = {}
local Report = {}
Report.__index = Report

-- Step records are written with ws.json; reading a --json file back is
-- json.load_jsonl, kept here under its documented name.
M.load_jsonl = json.load_jsonl

-- Report --------------------------------------------------------------------

-- Adds ms to phase `name` of a record, noting the phase's first use.
function M.add_ms(rec, name, ms)
    local pm = rec.phase_ms
    if pm[name] == nil then
        pm[name] = 0
        rec.phases[#rec.phases + 1] = name
    end
    pm[name] = pm[name] + ms
end

-- opts: title, cfg, device, rank, json (path or nil), log (function(msg)).
function M.new(opts)
    local self = setmetatable({}, Report)
    self.title, self.cfg, self.device = opts.title, opts.cfg, opts.device
    self.rank, self.log = opts.rank or 0, opts.log or function() end
    self.records = {}
    -- The phases seen so far, in the order they first ran.
    self.phases, self.phase_seen = {}, {}
    if opts.json and self.rank == 0 then
        local f, err = io.open(opts.json, "w")
        if not f then error("cannot write " .. tostring(err), 2) end
        self.json_file = f
    end
    return self
end

function Report:begin_step(step)
    if self.device.reset_peak then self.device:reset_peak() end
    local rec = { step = step, phase_ms = {}, phases = {}, base_sent = false, adapter_sent = false,
                  bytes_sent = 0, base_bytes = 0, adapter_bytes = 0, bytes_gathered = 0,
                  bytes_gathered_full = 0, exchanged = false,
                  staging_bytes = 0, engine_bytes = 0, quant_ms = 0, seal_ms = 0,
                  verified = false, verify = self.cfg and self.cfg.verify or "all" }
    rec.t0 = ws.now_ms()
    return rec
end

function Report:end_step(rec)
    rec.step_ms = ws.now_ms() - rec.t0
    rec.t0 = nil
    local mem = self.device:memory()
    local host = ws.host_memory()
    rec.peak_device_bytes = mem.peak
    rec.device_held_bytes = mem.held
    rec.device_free_bytes = mem.free
    rec.peak_host_bytes = host.peak_rss
    rec.rss_bytes = host.rss
    self.records[#self.records + 1] = rec
    for _, name in ipairs(rec.phases) do
        if not self.phase_seen[name] then
            self.phase_seen[name] = true
            self.phases[#self.phases + 1] = name
            self.cols, self.header_done = nil, false
        end
    end
    if self.json_file then
        local ok, err = self.json_file:write(json.encode(rec), "\n")
        if ok then ok, err = self.json_file:flush() end
        -- A full disk must not leave a silently short results file.
        if not ok then error("writing the --json file failed: " .. tostring(err), 0) end
    end
    self:print_row(rec)
end

-- What the `verified` column shows for a record: `yes` (verify=all: every
-- engine tensor checksummed), `sent` (the plans sent checksummed, the rest
-- proven readable), `off` (verify=off: nothing was checked, on every row),
-- `NO` (the step did not verify).
function M.verified_cell(r)
    if r.verify == "off" then return "off" end
    if not r.verified then return "NO" end
    return r.verify == "sent" and "sent" or "yes"
end

-- The per-step row: phase times, what was sent, verification, and memory.
-- `engine_MB` is the engine memory still mapped after the step (it drops to
-- 0 when the engine sleeps); the last column shows that the memory really
-- went back: process RSS on the cpu, free device memory on a GPU.
function Report:columns()
    if self.cols then return self.cols end
    local cols = {
        { "step", "%5d", function(r) return r.step end },
        { "total_ms", "%8.1f", function(r) return r.step_ms end },
    }
    for _, p in ipairs(self.phases) do
        cols[#cols + 1] = { p, "%7.1f", function(r) return r.phase_ms[p] or 0 end }
    end
    local on_gpu = self.device.kind == "cuda"
    for _, c in ipairs({
        { "base", "%4s", function(r) return r.base_sent and "yes" or "no" end },
        { "MB_sent", "%7.1f", function(r) return r.bytes_sent / 1e6 end },
        { "verified", "%8s", M.verified_cell },
        { "engine_MB", "%9.1f", function(r) return (r.engine_mapped_after or 0) / 1e6 end },
        on_gpu and { "dev_free_MB", "%11.1f", function(r) return r.device_free_bytes / 1e6 end }
               or { "rss_MB", "%8.1f", function(r) return r.rss_bytes / 1e6 end },
        { "peak_dev_MB", "%11.1f", function(r) return r.peak_device_bytes / 1e6 end },
        { "peak_host_MB", "%12.1f", function(r) return r.peak_host_bytes / 1e6 end },
    }) do cols[#cols + 1] = c end
    self.cols = cols
    return cols
end

function Report:print_row(rec)
    local cols, cells = self:columns(), {}
    if not self.header_done then
        self.header_done = true
        for i, c in ipairs(cols) do
            local width = #string.format(c[2], c[3](rec))
            cells[i] = string.format("%" .. math.max(width, #c[1]) .. "s", c[1])
        end
        self.log("#" .. table.concat(cells, " "):sub(2))
    end
    for i, c in ipairs(cols) do
        local text = string.format(c[2], c[3](rec))
        cells[i] = string.format("%" .. math.max(#text, #c[1]) .. "s", text)
    end
    self.log(table.concat(cells, " "))
end

local function mean(records, first, field, sub)
    local sum, n = 0, 0
    for i = first, #records do
        local v = records[i][field]
        if sub then v = v[sub] end
        sum, n = sum + (v or 0), n + 1
    end
    return n > 0 and sum / n or nil
end

local function fmt(v, unit)
    if v == nil then return "-" end
    return string.format(unit == "MB" and "%.1f" or "%.2f", v)
end

-- The end-of-run table; returns the summary as a table too. A run without
-- steps (a dry run, steps=0) has no table.
function Report:summary()
    local r = self.records
    if #r == 0 then return { steps = 0, phase_ms = {}, phase_ms_steady = {} } end
    local lines = {}
    local function line(s) lines[#lines + 1] = s end
    line(string.format("# %s: %d steps", self.title or "pipeline", #r))
    line(string.format("# %-16s %12s %14s", "phase (ms)", "mean 1..N", "mean 2..N"))
    local summary = { steps = #r, phase_ms = {}, phase_ms_steady = {} }
    for _, p in ipairs(self.phases) do
        local a, b = mean(r, 1, "phase_ms", p), mean(r, 2, "phase_ms", p)
        summary.phase_ms[p], summary.phase_ms_steady[p] = a, b
        line(string.format("  %-16s %12s %14s", p, fmt(a), fmt(b)))
    end
    local sa, sb = mean(r, 1, "step_ms"), mean(r, 2, "step_ms")
    line(string.format("  %-16s %12s %14s", "step total", fmt(sa), fmt(sb)))
    local ba, bb = mean(r, 1, "bytes_sent"), mean(r, 2, "bytes_sent")
    line(string.format("  %-16s %12s %14s", "MB sent", fmt(ba and ba / 1e6, "MB"),
                       fmt(bb and bb / 1e6, "MB")))
    -- What landed in the engine's weights, when it differs from what was
    -- sent (engine_dtype=fp8_block: one byte per quantized element).
    local ea, eb = mean(r, 1, "engine_bytes"), mean(r, 2, "engine_bytes")
    if ea ~= ba then
        line(string.format("  %-16s %12s %14s", "MB into engine", fmt(ea and ea / 1e6, "MB"),
                           fmt(eb and eb / 1e6, "MB")))
    end
    -- What this rank received through the collectives, and what a gather of
    -- whole tensors would have brought it (they differ when a tensor-parallel
    -- engine's plans exchange only what each rank's shard needs).
    local ga, gb = mean(r, 1, "bytes_gathered"), mean(r, 2, "bytes_gathered")
    local fa, fb = mean(r, 1, "bytes_gathered_full"), mean(r, 2, "bytes_gathered_full")
    local exchanged = false
    for _, rec in ipairs(r) do exchanged = exchanged or rec.exchanged end
    if exchanged and fa and fa > 0 and fa ~= ga then
        line(string.format("  %-16s %12s %14s", "MB received", fmt(ga / 1e6, "MB"),
                           fmt(gb and gb / 1e6, "MB")))
        line(string.format("  %-16s %12s %14s", "MB full gather", fmt(fa / 1e6, "MB"),
                           fmt(fb and fb / 1e6, "MB")))
    end
    local base_steps, verified, peak_dev, peak_host = 0, 0, 0, 0
    for _, rec in ipairs(r) do
        if rec.base_sent then base_steps = base_steps + 1 end
        if rec.verified then verified = verified + 1 end
        peak_dev = math.max(peak_dev, rec.peak_device_bytes or 0)
        peak_host = math.max(peak_host, rec.peak_host_bytes or 0)
    end
    local mode = self.cfg and self.cfg.verify or "all"
    local proof = mode == "off" and "verify=off: nothing verified"
        or string.format("verified %d of %d%s", verified, #r,
                         mode == "sent" and " (verify=sent: sent plans by checksum, the rest " ..
                                            "readable)" or "")
    line(string.format("# base sent in %d of %d steps; %s; peak device %.1f MB; " ..
                       "peak host RSS %.1f MB", base_steps, #r, proof, peak_dev / 1e6,
                       peak_host / 1e6))
    summary.step_ms, summary.step_ms_steady = sa, sb
    summary.base_steps, summary.verified_steps = base_steps, verified
    summary.verify = mode
    summary.peak_device_bytes, summary.peak_host_bytes = peak_dev, peak_host
    self.log(table.concat(lines, "\n"))
    return summary
end

function Report:close()
    if self.json_file then self.json_file:close() end
    self.json_file = nil
end

return M
