-- ws.sweep: experiment sweeps over a grid of configurations.
--
-- A sweep expands named axes into their cartesian product (minus filtered
-- points), runs every point `repeats` times through a user function, and
-- writes one summary row per point to a JSON-lines file (appended and flushed
-- as each point finishes, so an interrupted sweep resumes by skipping the
-- points already there) and to a CSV file (rewritten after every point).
-- A point that raises is recorded with its error and the sweep goes on.
-- Between points all garbage is collected and the memory wshost holds is
-- compared with the baseline taken before the first point.
--
--   local sweep = require("ws.sweep")
--   local res = sweep.run{
--       axes = { { "model", { "tiny" } }, { "sleep_level", { 1, 2 } } },
--       filters = { function(p) return p.model == "tiny" or p.sleep_level == 2 end },
--       repeats = 3,
--       out = "results/sleep",            -- results/sleep.jsonl, .csv, .png, .svg
--       run_point = function(point, rep) return steps end,
--   }
--
-- `run_point` returns the per-step records of one run: a list of tables with
-- step, base_sent, adapter_sent, bytes_sent, verified, phase_ms (phase -> ms),
-- peak_device_bytes, peak_host_bytes and optionally step_ms (else the sum of
-- phase_ms). Step 1 is the first sync (it always sends the base); statistics
-- of steps 2.. are reported as the steady state, step 1 separately.
local json = require("ws.json")

local M = {}

-- Rows are written and read back (resume) with ws.json, also exposed as
-- sweep.json as documented.
M.json = json

-- ---------------------------------------------------------------- the grid

-- Normalizes axes to a list of {name, values}. Accepts a list of pairs (the
-- order given is the expansion order, last axis fastest) or a map (sorted by
-- name).
local function normalize_axes(axes)
    if type(axes) ~= "table" then error("sweep: axes must be a table", 3) end
    local list = {}
    if #axes > 0 then
        for i, a in ipairs(axes) do
            if type(a) ~= "table" or type(a[1]) ~= "string" or type(a[2]) ~= "table" then
                error(string.format("sweep: axis %d must be {name, {values...}}", i), 3)
            end
            list[#list + 1] = { a[1], a[2] }
        end
    else
        for name, values in pairs(axes) do
            if type(values) ~= "table" then
                error(string.format("sweep: axis '%s' must be a list of values", name), 3)
            end
            list[#list + 1] = { name, values }
        end
        table.sort(list, function(a, b) return a[1] < b[1] end)
    end
    local seen = {}
    for _, a in ipairs(list) do
        if seen[a[1]] then error("sweep: axis '" .. a[1] .. "' given twice", 3) end
        seen[a[1]] = true
        if #a[2] == 0 then error("sweep: axis '" .. a[1] .. "' has no values", 3) end
    end
    return list
end

-- The points of a grid: tables axis -> value, in expansion order, keeping
-- those for which every filter returns true.
function M.grid(axes, filters)
    local list = normalize_axes(axes)
    if type(filters) == "function" then filters = { filters } end
    filters = filters or {}
    local points = {}
    local idx = {}
    for i = 1, #list do idx[i] = 1 end
    while true do
        local p = {}
        for i, a in ipairs(list) do p[a[1]] = a[2][idx[i]] end
        local keep = true
        for _, f in ipairs(filters) do
            if not f(p) then keep = false; break end
        end
        if keep then points[#points + 1] = p end
        local i = #list
        while i >= 1 do
            idx[i] = idx[i] + 1
            if idx[i] <= #list[i][2] then break end
            idx[i] = 1
            i = i - 1
        end
        if i < 1 then break end
    end
    return points, list
end

-- A stable identity for a point: axis names sorted, so reordering axes keeps
-- resume working.
function M.point_key(point, names)
    if not names then
        names = {}
        for k in pairs(point) do names[#names + 1] = k end
    end
    local sorted = {}
    for _, n in ipairs(names) do sorted[#sorted + 1] = n end
    table.sort(sorted)
    local parts = {}
    for _, n in ipairs(sorted) do parts[#parts + 1] = n .. "=" .. tostring(point[n]) end
    return table.concat(parts, ",")
end

-- "name=value ..." of the axes that vary (all axes when none does), in axis
-- order: what a person reads in progress lines, tables and charts.
function M.point_label(point, axes, short)
    local parts = {}
    for _, a in ipairs(axes) do
        if #a[2] > 1 then
            parts[#parts + 1] = (short and short(a[1]) or a[1]) .. "=" .. tostring(point[a[1]])
        end
    end
    if #parts == 0 then
        for _, a in ipairs(axes) do parts[#parts + 1] = a[1] .. "=" .. tostring(point[a[1]]) end
    end
    return table.concat(parts, " ")
end

-- --------------------------------------------------------------- statistics

-- {n, median, q1, q3, min, max} of a list of numbers (linear interpolation
-- between order statistics, like numpy's default percentile); nil when empty.
function M.stats(values)
    local v = {}
    for _, x in ipairs(values) do v[#v + 1] = x end
    if #v == 0 then return nil end
    table.sort(v)
    local function q(f)
        local pos = 1 + f * (#v - 1)
        local lo = math.floor(pos)
        local hi = math.min(lo + 1, #v)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)
    end
    return { n = #v, median = q(0.5), q1 = q(0.25), q3 = q(0.75), min = v[1], max = v[#v] }
end

local function step_ms(rec)
    if rec.step_ms then return rec.step_ms end
    local sum = 0
    for _, ms in pairs(rec.phase_ms or {}) do sum = sum + ms end
    return sum
end

-- Summarizes the runs of one point (a list of per-step record lists) into a
-- row: the point's config plus the statistics named in docs/sweeps.md.
function M.summarize(point, runs)
    local row = { status = "ok", repeats = #runs }
    for k, v in pairs(point) do row[k] = v end
    local steady, first, phases, phase_order = {}, {}, {}, {}
    local bytes_step, bytes_total = {}, 0
    local peak_dev, peak_host = 0, 0
    local verified, verified_steps, steps = true, 0, 0
    local base_steps, adapter_steps = 0, 0
    for r, recs in ipairs(runs) do
        if type(recs) ~= "table" or #recs == 0 then
            error(string.format("sweep: run %d of point %s returned no step records", r,
                                M.point_key(point)), 2)
        end
        local total = 0
        for i, rec in ipairs(recs) do
            local is_first = (rec.step or i) == 1
            local ms = step_ms(rec)
            if is_first and #recs > 1 then
                first[#first + 1] = ms
            else
                steady[#steady + 1] = ms
                for name, pms in pairs(rec.phase_ms or {}) do
                    if not phases[name] then
                        phases[name] = {}
                        phase_order[#phase_order + 1] = name
                    end
                    table.insert(phases[name], pms)
                end
            end
            bytes_step[#bytes_step + 1] = rec.bytes_sent or 0
            total = total + (rec.bytes_sent or 0)
            peak_dev = math.max(peak_dev, rec.peak_device_bytes or 0)
            peak_host = math.max(peak_host, rec.peak_host_bytes or 0)
            if rec.verified == true then
                verified_steps = verified_steps + 1
            else
                verified = false
            end
            if r == 1 then
                steps = steps + 1
                if rec.base_sent then base_steps = base_steps + 1 end
                if rec.adapter_sent then adapter_steps = adapter_steps + 1 end
            end
        end
        bytes_total = math.max(bytes_total, total)
    end
    row.steps = steps
    row.step_ms = M.stats(steady)
    row.first_step_ms = M.stats(first)
    table.sort(phase_order)
    row.phase_ms = {}
    for _, name in ipairs(phase_order) do row.phase_ms[name] = M.stats(phases[name]) end
    local bs = M.stats(bytes_step)
    row.bytes_per_step = bs and bs.median
    row.bytes_total = bytes_total
    row.base_sent_steps = base_steps
    row.adapter_sent_steps = adapter_steps
    row.peak_device_bytes = peak_dev
    row.peak_host_bytes = peak_host
    row.verified = verified
    row.verified_steps = verified_steps
    return row
end

-- ------------------------------------------------------------------ output

-- Rows already in a JSON-lines file, keyed by their `key`; a line that does
-- not parse (a write cut short by a kill) is skipped with a warning.
function M.read_results(path)
    local f = io.open(path, "r")
    if not f then return {}, {} end
    local by_key, order, lineno = {}, {}, 0
    for line in f:lines() do
        lineno = lineno + 1
        if line:match("%S") then
            local ok, row = pcall(json.decode, line)
            if ok and type(row) == "table" and type(row.key) == "string" then
                if not by_key[row.key] then order[#order + 1] = row.key end
                by_key[row.key] = row
            else
                io.stderr:write(string.format("sweep: %s:%d: skipping an unreadable row\n",
                                              path, lineno))
            end
        end
    end
    f:close()
    return by_key, order
end

local function csv_cell(v)
    if v == nil then return "" end
    if type(v) == "number" then
        if math.type(v) == "integer" then return string.format("%d", v) end
        return string.format("%.6g", v)
    end
    local s = tostring(v)
    if s:find('[,"\r\n]') then s = '"' .. s:gsub('"', '""') .. '"' end
    return s
end

local STAT_COLS = { "median", "q1", "q3", "min", "max" }

-- The CSV columns for a set of rows: axes, then the fixed metrics, then one
-- median/min/max triple per phase seen in any row.
function M.csv_columns(axis_names, rows)
    local cols = {}
    for _, n in ipairs(axis_names) do cols[#cols + 1] = { n, function(r) return r[n] end } end
    local function add(name, get) cols[#cols + 1] = { name, get } end
    add("status", function(r) return r.status end)
    add("repeats", function(r) return r.repeats end)
    add("steps", function(r) return r.steps end)
    for _, s in ipairs(STAT_COLS) do
        add("step_ms_" .. s, function(r) return r.step_ms and r.step_ms[s] end)
    end
    add("first_step_ms_median", function(r) return r.first_step_ms and r.first_step_ms.median end)
    local phases, seen = {}, {}
    for _, r in ipairs(rows) do
        for name in pairs(r.phase_ms or {}) do
            if not seen[name] then seen[name] = true; phases[#phases + 1] = name end
        end
    end
    table.sort(phases)
    for _, p in ipairs(phases) do
        for _, s in ipairs({ "median", "min", "max" }) do
            add("phase_" .. p .. "_ms_" .. s, function(r)
                local st = r.phase_ms and r.phase_ms[p]
                return st and st[s]
            end)
        end
    end
    for _, n in ipairs({ "bytes_per_step", "bytes_total", "base_sent_steps",
                         "adapter_sent_steps", "peak_device_bytes", "peak_host_bytes",
                         "verified", "verified_steps", "leaked_bytes", "elapsed_s", "error" }) do
        add(n, function(r) return r[n] end)
    end
    return cols
end

-- An io result that failed (a full disk, a closed file) raises, naming the
-- file: a sweep must not run on while its results go nowhere.
local function written(path, ok, err)
    if not ok then error(string.format("sweep: cannot write %s: %s", path, tostring(err)), 0) end
    return ok
end

function M.write_csv(path, axis_names, rows)
    local cols = M.csv_columns(axis_names, rows)
    local tmp = path .. ".tmp"
    local f = written(tmp, io.open(tmp, "w"))
    local head = {}
    for i, c in ipairs(cols) do head[i] = c[1] end
    local ok, err = f:write(table.concat(head, ","), "\n")
    for _, r in ipairs(rows) do
        if not ok then break end
        local cells = {}
        for i, c in ipairs(cols) do cells[i] = csv_cell(c[2](r)) end
        ok, err = f:write(table.concat(cells, ","), "\n")
    end
    -- A buffered write fails at the latest when the file is closed.
    local closed, cerr = f:close()
    if not ok or not closed then
        os.remove(tmp)
        written(tmp, nil, err or cerr)
    end
    written(path, os.rename(tmp, path))
end

-- ---------------------------------------------------------------- progress

local function clock_s()
    local ok, ws = pcall(require, "ws")
    if ok and type(ws) == "table" and ws.now_ms then return ws.now_ms() / 1000 end
    return os.time()
end

local function hms(s)
    s = math.max(0, math.floor(s + 0.5))
    if s >= 3600 then
        return string.format("%d:%02d:%02d", s // 3600, s % 3600 // 60, s % 60)
    end
    return string.format("%d:%02d", s // 60, s % 60)
end

-- One line on stderr, redrawn in place with a carriage return.
function M.progress_line(done, total, label, elapsed_s, eta_s, width)
    width = width or 24
    local filled = total > 0 and math.floor(width * done / total + 0.5) or width
    local bar = string.rep("#", filled) .. string.rep(".", width - filled)
    local eta = eta_s and hms(eta_s) or "?"
    local line = string.format("[%s] %d/%d %3d%% %s  elapsed %s ETA %s", bar, done, total,
                               total > 0 and math.floor(100 * done / total) or 100,
                               label or "", hms(elapsed_s), eta)
    if #line > 160 then line = line:sub(1, 157) .. "..." end
    return line
end

-- ------------------------------------------------------------------ charts

-- Short axis names for chart labels: initials of snake_case names.
local function short_name(name)
    if not name:find("_") then return name end
    return (name:gsub("([^_])[^_]*_?", "%1"))
end

local function shell_quote(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function gp_string(s)
    return '"' .. tostring(s):gsub('[\\"]', "\\%0") .. '"'
end

-- The gnuplot script that draws the charts (bench/plot.gp beside lua/).
function M.plot_script()
    local src = debug.getinfo(1, "S").source
    local dir = src:sub(1, 1) == "@" and src:sub(2):match("^(.*)/lua/ws/[^/]*$") or "."
    return dir .. "/bench/plot.gp"
end

-- Writes <out>.dat (one line per successful point: label, step time
-- median/min/max/q1/q3, first step, peak device and host MB, MB per step) and
-- draws <out>.png and <out>.svg with gnuplot. Returns the two paths, or nil
-- and a message when gnuplot is missing or fails.
function M.charts(rows, axes, out, opts)
    opts = opts or {}
    local fixed = {}
    for _, a in ipairs(axes) do
        if #a[2] == 1 then fixed[#fixed + 1] = a[1] .. "=" .. tostring(a[2][1]) end
    end
    local dat = out .. ".dat"
    local f = written(dat, io.open(dat, "w"))
    f:write("# label step_ms_median step_ms_min step_ms_max step_ms_q1 step_ms_q3 ",
            "first_step_ms peak_device_MB peak_host_MB MB_per_step\n")
    local n = 0
    for _, r in ipairs(rows) do
        if r.status == "ok" and r.step_ms then
            local label = M.point_label(r, axes, short_name)
            local st, fs = r.step_ms, r.first_step_ms
            f:write(string.format("%s %.6g %.6g %.6g %.6g %.6g %.6g %.6g %.6g %.6g\n",
                                  gp_string(label), st.median, st.min, st.max, st.q1, st.q3,
                                  fs and fs.median or st.median, (r.peak_device_bytes or 0) / 1e6,
                                  (r.peak_host_bytes or 0) / 1e6, (r.bytes_per_step or 0) / 1e6))
            n = n + 1
        end
    end
    written(dat, f:close())
    if n == 0 then return nil, "no successful points to draw" end
    local script = M.plot_script()
    local title = opts.title or "sweep"
    if #fixed > 0 then title = title .. " (" .. table.concat(fixed, " ") .. ")" end
    local gnuplot = opts.gnuplot or os.getenv("GNUPLOT") or "gnuplot"
    local paths = {}
    for _, fmt in ipairs({ "png", "svg" }) do
        local path = out .. "." .. fmt
        local defs = string.format("datafile=%s; outfile=%s; fmt=%s; title=%s; npoints=%d",
                                   gp_string(out .. ".dat"), gp_string(path), gp_string(fmt),
                                   gp_string(title), n)
        local cmd = string.format("%s -e %s %s 2>&1", shell_quote(gnuplot), shell_quote(defs),
                                  shell_quote(script))
        local p = io.popen(cmd, "r")
        local msg = p:read("a")
        local ok, _, code = p:close()
        if not ok then
            return nil, string.format("gnuplot failed (%s): %s", tostring(code), msg)
        end
        paths[#paths + 1] = path
    end
    return paths[1], paths[2]
end

-- ---------------------------------------------------------------- the sweep

local function default_memory()
    local ok, ws = pcall(require, "ws")
    if not ok or type(ws) ~= "table" or not ws.default_device then return nil end
    return ws.default_device():memory().held
end

local function interrupted(err)
    local ok, ws = pcall(require, "ws")
    if ok and type(ws) == "table" and ws.interrupted and ws.interrupted() then return true end
    return type(err) == "string" and err:find("interrupted", 1, true) ~= nil
end

-- Linux keeps the peak RSS (VmHWM, what ws.host_memory().peak_rss reads)
-- for the life of the process; writing 5 to clear_refs resets it, so each
-- point reports its own peak. Returns false where that is not possible.
function M.reset_host_peak()
    local f = io.open("/proc/self/clear_refs", "w")
    if not f then return false end
    local ok = f:write("5")
    f:close()
    return ok ~= nil
end

local function release()
    collectgarbage("collect")
    collectgarbage("collect")
end

local function ensure_dir(path)
    local dir = path:match("^(.*)/[^/]*$")
    if dir and dir ~= "" then os.execute("mkdir -p '" .. dir:gsub("'", "'\\''") .. "'") end
end

local OPTIONS = {
    axes = "table", filters = "any", repeats = "number", out = "string", run_point = "function",
    resume = "boolean", retry_failed = "boolean", progress = "boolean", charts = "boolean",
    memory = "function", name = "string", on_row = "function", chart_title = "string",
    gnuplot = "string", writer = "boolean",
}

-- Runs a sweep; returns {rows = (grid order), ran, skipped, failed, leaked,
-- files = {jsonl, csv, png, svg}}.
function M.run(opts)
    for k, v in pairs(opts) do
        local want = OPTIONS[k]
        if not want then
            local known = {}
            for name in pairs(OPTIONS) do known[#known + 1] = name end
            table.sort(known)
            error(string.format("sweep: unknown option '%s' (known: %s)", tostring(k),
                                table.concat(known, ", ")), 2)
        end
        if want ~= "any" and type(v) ~= want then
            error(string.format("sweep: option '%s' expects a %s, got %s", k, want, type(v)), 2)
        end
    end
    if not opts.run_point then error("sweep: run_point is required", 2) end
    local repeats = opts.repeats or 1
    if math.type(repeats) ~= "integer" or repeats < 1 then
        error("sweep: repeats must be a positive integer, got " .. tostring(repeats), 2)
    end
    local points, axes = M.grid(opts.axes, opts.filters)
    local names = {}
    for i, a in ipairs(axes) do names[i] = a[1] end
    local out = opts.out or ("results/" .. (opts.name or "sweep"))
    local files = { jsonl = out .. ".jsonl", csv = out .. ".csv" }
    -- Under mpirun every rank runs the points; only the writer (rank 0) writes.
    local writer = opts.writer ~= false
    if writer then ensure_dir(out) end

    local done = {}
    if opts.resume ~= false then done = M.read_results(files.jsonl) end
    local pending, other_repeats = {}, 0
    for _, p in ipairs(points) do
        local key = M.point_key(p, names)
        local prev = done[key]
        -- A row made with other repeats is not this point's result: run it again.
        if prev and prev.repeats ~= nil and prev.repeats ~= repeats then
            prev, other_repeats = nil, other_repeats + 1
            done[key] = nil
        end
        if not prev or (opts.retry_failed and prev.status ~= "ok") then pending[#pending + 1] = p end
    end
    local skipped = #points - #pending
    if other_repeats > 0 and writer then
        io.stderr:write(string.format("sweep: %d point(s) in %s ran with other repeats than %d; " ..
                                      "running them again\n", other_repeats, files.jsonl, repeats))
    end

    local memory = opts.memory or default_memory
    release()
    local baseline = memory()
    local show = writer and opts.progress ~= false
    local t_start = clock_s()
    local rows_by_key = {}
    for k, r in pairs(done) do rows_by_key[k] = r end
    local ran, failed, leaked = 0, 0, 0
    local jsonl = writer and written(files.jsonl, io.open(files.jsonl, "a+"))
    if jsonl then
        -- A row cut short by a kill has no newline: start on a fresh line.
        local size = jsonl:seek("end")
        if size > 0 then
            jsonl:seek("set", size - 1)
            if jsonl:read(1) ~= "\n" then jsonl:write("\n") end
        end
    end

    local function ordered_rows()
        local rows = {}
        for _, p in ipairs(points) do
            local r = rows_by_key[M.point_key(p, names)]
            if r then rows[#rows + 1] = r end
        end
        return rows
    end

    for i, p in ipairs(pending) do
        local key = M.point_key(p, names)
        local label = M.point_label(p, axes)
        if show then
            local elapsed = clock_s() - t_start
            local eta = i > 1 and elapsed / (i - 1) * (#pending - i + 1) or nil
            io.stderr:write("\r", M.progress_line(i - 1, #pending, label, elapsed, eta), "\27[K")
            io.stderr:flush()
        end
        local t0 = clock_s()
        local ok, row = pcall(function()
            local runs = {}
            for rep = 1, repeats do
                M.reset_host_peak()
                local point = {}
                for k, v in pairs(p) do point[k] = v end
                runs[rep] = opts.run_point(point, rep)
                release()
            end
            return M.summarize(p, runs)
        end)
        if not ok then
            if interrupted(row) then
                if jsonl then jsonl:close() end
                if show then io.stderr:write("\n") end
                error(row, 0)
            end
            local msg = tostring(row)
            row = { status = "failed", error = msg, repeats = repeats }
            for k, v in pairs(p) do row[k] = v end
            failed = failed + 1
            if show then io.stderr:write("\r\27[K") end
            io.stderr:write(string.format("sweep: point %s failed: %s\n", key, msg))
        end
        release()
        local held = memory()
        if baseline and held then
            row.held_after_bytes = held
            row.leaked_bytes = held - baseline
            if held > baseline then
                leaked = leaked + 1
                if show then io.stderr:write("\r\27[K") end
                io.stderr:write(string.format(
                    "sweep: point %s left %d bytes held after collection (baseline %d); " ..
                    "free tensors and pools explicitly in run_point\n", key, held - baseline,
                    baseline))
            end
        end
        row.key = key
        row.elapsed_s = clock_s() - t0
        rows_by_key[key] = row
        ran = ran + 1
        if writer then
            local ok, err = jsonl:write(json.encode(row), "\n")
            if ok then ok, err = jsonl:flush() end
            if not ok then
                jsonl:close()
                if show then io.stderr:write("\n") end
                written(files.jsonl, nil, err)
            end
            M.write_csv(files.csv, names, ordered_rows())
        end
        if opts.on_row then opts.on_row(row) end
    end
    if jsonl then jsonl:close() end
    if show then
        local elapsed = clock_s() - t_start
        io.stderr:write("\r", M.progress_line(#pending, #pending, "done", elapsed, 0), "\27[K\n")
        if skipped > 0 then
            io.stderr:write(string.format("sweep: %d point(s) already in %s, skipped\n",
                                          skipped, files.jsonl))
        end
    end
    local rows = ordered_rows()
    if writer then M.write_csv(files.csv, names, rows) end
    if writer and opts.charts ~= false then
        local png, svg = M.charts(rows, axes, out, { title = opts.chart_title or opts.name,
                                                     gnuplot = opts.gnuplot })
        if png then
            files.png, files.svg = png, svg
        else
            io.stderr:write("sweep: no charts: " .. tostring(svg) .. "\n")
        end
    end
    return { rows = rows, ran = ran, skipped = skipped, failed = failed, leaked = leaked,
             files = files, baseline_held_bytes = baseline, axes = axes }
end

return M
