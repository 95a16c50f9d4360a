-- sweep_spec.lua: ws.sweep, the experiment-sweep library (grid, statistics,
-- results files, resume, failed points, memory check, charts).
package.path = "lua/?.lua;" .. package.path
local sweep = require("ws.sweep")

local function tmpdir()
    local p = os.tmpname()
    os.remove(p)
    assert(os.execute("mkdir -p '" .. p .. "'"))
    return p
end

local function read_lines(path)
    local lines = {}
    for line in io.lines(path) do lines[#lines + 1] = line end
    return lines
end

-- Per-step records shaped like ws.pipeline's, derived from the point so the
-- summaries are predictable.
local function fake_steps(point, nsteps)
    local recs = {}
    for s = 1, nsteps do
        local base = s == 1 or point.level == 2
        recs[s] = { step = s, base_sent = base, adapter_sent = true,
                    bytes_sent = (base and 1000 or 0) + 10 * point.rank,
                    verified = true, step_ms = s == 1 and 100 or 10 + s,
                    phase_ms = { gather = s == 1 and 60 or 4, copy_out = 2 + s },
                    peak_device_bytes = 5000 + point.rank, peak_host_bytes = 7000 + s }
    end
    return recs
end

describe("ws.sweep.grid", function()
    it("expands the cartesian product in order, last axis fastest", function()
        local pts = sweep.grid({ { "a", { 1, 2 } }, { "b", { "x", "y", "z" } } })
        assert.are.equal(6, #pts)
        assert.are.same({ a = 1, b = "x" }, pts[1])
        assert.are.same({ a = 1, b = "y" }, pts[2])
        assert.are.same({ a = 2, b = "x" }, pts[4])
        assert.are.same({ a = 2, b = "z" }, pts[6])
    end)

    it("accepts a map of axes, expanded in name order", function()
        local pts, axes = sweep.grid({ zeta = { 1, 2 }, alpha = { true, false } })
        assert.are.equal("alpha", axes[1][1])
        assert.are.same({ alpha = true, zeta = 1 }, pts[1])
        assert.are.same({ alpha = true, zeta = 2 }, pts[2])
        assert.are.same({ alpha = false, zeta = 1 }, pts[3])
    end)

    it("drops the points a filter rejects (one function or a list)", function()
        local axes = { { "fce", { true, false } }, { "level", { 1, 2 } }, { "r", { 8, 32 } } }
        local one = sweep.grid(axes, function(p) return p.fce or p.level == 1 end)
        assert.are.equal(6, #one)
        for _, p in ipairs(one) do assert.is_true(p.fce or p.level == 1) end
        local two = sweep.grid(axes, { function(p) return p.fce end,
                                       function(p) return p.r == 32 end })
        assert.are.same({ { fce = true, level = 1, r = 32 }, { fce = true, level = 2, r = 32 } },
                        two)
    end)

    it("rejects an empty or repeated axis", function()
        assert.has_error(function() sweep.grid({ { "a", {} } }) end,
                         "sweep: axis 'a' has no values")
        assert.has_error(function() sweep.grid({ { "a", { 1 } }, { "a", { 2 } } }) end,
                         "sweep: axis 'a' given twice")
    end)

    it("keys a point independently of the axis order", function()
        assert.are.equal("a=1,b=true", sweep.point_key({ b = true, a = 1 }, { "b", "a" }))
        assert.are.equal(sweep.point_key({ a = 1, b = 2 }), sweep.point_key({ b = 2, a = 1 }))
    end)
end)

describe("ws.sweep statistics", function()
    it("computes median, quartiles and range", function()
        local s = sweep.stats({ 5, 1, 4, 2, 3 })
        assert.are.same({ n = 5, median = 3, q1 = 2, q3 = 4, min = 1, max = 5 }, s)
        local e = sweep.stats({ 1, 2, 3, 4 })
        assert.are.equal(2.5, e.median)
        assert.are.equal(1.75, e.q1)
        assert.is_nil(sweep.stats({}))
    end)

    it("summarizes steady steps apart from the first and keeps the worst memory", function()
        local p = { level = 1, rank = 8 }
        local row = sweep.summarize(p, { fake_steps(p, 4), fake_steps(p, 4) })
        assert.are.equal(1, row.level)
        assert.are.equal(2, row.repeats)
        assert.are.equal(4, row.steps)
        -- steady steps are 2..4 of both runs: 12, 13, 14 twice
        assert.are.equal(13, row.step_ms.median)
        assert.are.equal(12, row.step_ms.min)
        assert.are.equal(14, row.step_ms.max)
        assert.are.equal(100, row.first_step_ms.median)
        assert.are.equal(4, row.phase_ms.gather.max)   -- the first step's 60 is not steady
        assert.are.equal(5, row.phase_ms.copy_out.median)
        assert.are.equal(1, row.base_sent_steps)
        assert.are.equal(4, row.adapter_sent_steps)
        assert.are.equal(1000 + 4 * 80, row.bytes_total)
        assert.are.equal(5008, row.peak_device_bytes)
        assert.are.equal(7004, row.peak_host_bytes)
        assert.is_true(row.verified)
        assert.are.equal(8, row.verified_steps)
    end)

    it("reports a point unverified when any step was not verified", function()
        local p = { level = 2, rank = 8 }
        local recs = fake_steps(p, 3)
        recs[3].verified = false
        local row = sweep.summarize(p, { recs })
        assert.is_false(row.verified)
        assert.are.equal(2, row.verified_steps)
        assert.are.equal(3, row.base_sent_steps)
    end)

    it("rejects a run that returned no records, naming the point", function()
        assert.has_error(function() sweep.summarize({ a = 1 }, { {} }) end,
                         "sweep: run 1 of point a=1 returned no step records")
    end)
end)

describe("ws.sweep JSON", function()
    it("round-trips rows", function()
        local row = { key = "a=1,b=x", status = "failed", error = 'bad "quote", \\ and\nnewline',
                      n = 42, f = 1.5, ok = false, nested = { median = 3.25, list = { 1, 2 } } }
        local back = sweep.json.decode(sweep.json.encode(row))
        assert.are.same(row, back)
        assert.are.equal("integer", math.type(back.n))
        assert.has_error(function() sweep.json.decode('{"a": 1') end)
    end)
end)

describe("ws.sweep.run", function()
    local axes = { { "level", { 1, 2 } }, { "rank", { 8, 32 } } }

    it("writes one JSON line and one CSV row per point, in grid order", function()
        local dir = tmpdir()
        local calls = 0
        local res = sweep.run{
            axes = axes, repeats = 2, out = dir .. "/r", progress = false, charts = false,
            memory = function() return 0 end,
            run_point = function(p, rep)
                calls = calls + 1
                assert.is_true(rep == 1 or rep == 2)
                return fake_steps(p, 3)
            end,
        }
        assert.are.equal(8, calls)
        assert.are.equal(4, res.ran)
        assert.are.equal(0, res.failed)
        local lines = read_lines(dir .. "/r.jsonl")
        assert.are.equal(4, #lines)
        local first = sweep.json.decode(lines[1])
        assert.are.equal("level=1,rank=8", first.key)
        assert.are.equal("ok", first.status)
        assert.are.equal(2, first.repeats)
        assert.are.equal(12.5, first.step_ms.median) -- steady steps 2 and 3: 12, 13
        local csv = read_lines(dir .. "/r.csv")
        assert.are.equal(5, #csv)
        local head = csv[1]
        assert.truthy(head:find("^level,rank,status,repeats,steps,step_ms_median,"))
        assert.truthy(head:find("phase_copy_out_ms_median,phase_copy_out_ms_min", 1, true))
        assert.truthy(head:find("peak_device_bytes,peak_host_bytes,verified", 1, true))
        assert.truthy(csv[2]:find("^1,8,ok,2,3,12.5,"))
        assert.truthy(csv[5]:find("^2,32,ok,2,3,"))
        local ncols = select(2, head:gsub(",", ",")) + 1
        for i = 2, 5 do
            assert.are.equal(ncols, select(2, csv[i]:gsub(",", ",")) + 1)
        end
    end)

    it("records a failed point with its error and carries on", function()
        local dir = tmpdir()
        local res = sweep.run{
            axes = axes, out = dir .. "/f", progress = false, charts = false,
            memory = function() return 0 end,
            run_point = function(p)
                if p.level == 2 and p.rank == 8 then error('engine "x" ran out, badly', 0) end
                return fake_steps(p, 2)
            end,
        }
        assert.are.equal(4, res.ran)
        assert.are.equal(1, res.failed)
        local rows = {}
        for _, line in ipairs(read_lines(dir .. "/f.jsonl")) do
            local r = sweep.json.decode(line)
            rows[r.key] = r
        end
        assert.are.equal("failed", rows["level=2,rank=8"].status)
        assert.are.equal('engine "x" ran out, badly', rows["level=2,rank=8"].error)
        assert.are.equal("ok", rows["level=2,rank=32"].status)
        local csv = read_lines(dir .. "/f.csv")
        assert.truthy(csv[4]:find('^2,8,failed,'))
        assert.truthy(csv[4]:find('"engine ""x"" ran out, badly"$'))
    end)

    it("resumes: points already in the results file are skipped", function()
        local dir = tmpdir()
        local ran = {}
        local function run(grid, extra)
            local opts = {
                axes = grid, out = dir .. "/s", progress = false, charts = false,
                memory = function() return 0 end,
                run_point = function(p)
                    ran[#ran + 1] = sweep.point_key(p)
                    if p.rank == 32 and p.level == 1 and not extra then error("flaky") end
                    return fake_steps(p, 2)
                end,
            }
            for k, v in pairs(extra or {}) do opts[k] = v end
            return sweep.run(opts)
        end
        local first = run({ { "level", { 1 } }, { "rank", { 8, 32 } } })
        assert.are.equal(2, first.ran)
        -- A kill in the middle of a write leaves half a line: it is ignored.
        local f = assert(io.open(dir .. "/s.jsonl", "a"))
        f:write('{"key":"level=2,rank=8","sta')
        f:close()
        ran = {}
        local second = run({ { "level", { 1, 2 } }, { "rank", { 8, 32 } } })
        assert.are.same({ "level=2,rank=8", "level=2,rank=32" }, ran)
        assert.are.equal(2, second.skipped)
        assert.are.equal(4, #second.rows)
        -- A failed point is kept until asked to retry it.
        ran = {}
        local third = run({ { "level", { 1, 2 } }, { "rank", { 8, 32 } } }, { retry_failed = true })
        assert.are.same({ "level=1,rank=32" }, ran)
        assert.are.equal(3, third.skipped)
        assert.are.equal("ok", third.rows[2].status)
        assert.are.equal(4, #read_lines(dir .. "/s.csv") - 1)
        -- resume = false runs everything again
        ran = {}
        run({ { "level", { 1 } }, { "rank", { 8 } } }, { resume = false })
        assert.are.same({ "level=1,rank=8" }, ran)
    end)

    it("resumes only rows of the same repeats, and survives a corrupt results file", function()
        local dir = tmpdir()
        local ran = {}
        local function run(repeats)
            return sweep.run{
                axes = { { "level", { 1, 2 } }, { "rank", { 8 } } }, out = dir .. "/r",
                progress = false, charts = false, repeats = repeats,
                memory = function() return 0 end,
                run_point = function(p, rep)
                    if rep == 1 then ran[#ran + 1] = sweep.point_key(p) end
                    return fake_steps(p, 2)
                end,
            }
        end
        run(1)
        -- Garbage, a row of another grid and a half-written row: none of them is a match.
        local f = assert(io.open(dir .. "/r.jsonl", "a"))
        f:write("\0\1garbage\n", '{"key":"model=tiny","status":"ok","repeats":1}\n',
                string.rep("[", 5000), "\n", '{"key":"level=1,rank=8","status":"ok","rep')
        f:close()
        ran = {}
        local again = run(1)
        assert.are.same({}, ran)
        assert.are.equal(2, again.skipped)
        -- Rows made with repeats=1 do not stand in for repeats=3.
        local more = run(3)
        assert.are.same({ "level=1,rank=8", "level=2,rank=8" }, ran)
        assert.are.equal(0, more.skipped)
        assert.are.equal(3, more.rows[1].repeats)
        ran = {}
        assert.are.equal(2, run(3).skipped)
        assert.are.same({}, ran)
    end)

    it("checks that memory goes back to the baseline after each point", function()
        local dir = tmpdir()
        local held = 4096
        local res = sweep.run{
            axes = { { "level", { 1, 2 } }, { "rank", { 8 } } }, out = dir .. "/m",
            progress = false, charts = false,
            memory = function() return held end,
            run_point = function(p)
                if p.level == 2 then held = held + 512 end -- a leak in this point
                return fake_steps(p, 2)
            end,
        }
        assert.are.equal(1, res.leaked)
        assert.are.equal(4096, res.baseline_held_bytes)
        assert.are.equal(0, res.rows[1].leaked_bytes)
        assert.are.equal(512, res.rows[2].leaked_bytes)
        assert.are.equal(4608, res.rows[2].held_after_bytes)
    end)

    it("frees memory held by tensors between points (real wshost device)", function()
        local ws = require("ws")
        local dir = tmpdir()
        local dev = ws.device("cpu")
        local res = sweep.run{
            axes = { { "level", { 1, 2 } }, { "rank", { 8 } } }, out = dir .. "/g",
            progress = false, charts = false,
            memory = function() return dev:memory().held end,
            run_point = function(p)
                -- dropped without :free(): the sweep's collection must release it
                local t = ws.tensor{ shape = { 1 << 20 }, dtype = "f32", device = dev }
                t:fill(1)
                return fake_steps(p, 2)
            end,
        }
        assert.are.equal(0, res.leaked)
        assert.are.equal(0, res.rows[2].leaked_bytes)
    end)

    it("raises naming the file when the CSV cannot be written (a full disk)", function()
        local f = io.open("/dev/full", "w")
        if not f then
            pending("no /dev/full")
            return
        end
        f:close()
        local dir = tmpdir()
        -- The CSV goes through a temporary, renamed only when whole: on a
        -- full disk the write fails, names the file, and no CSV appears.
        assert(os.execute("ln -s /dev/full '" .. dir .. "/t.csv.tmp'"))
        local ok, err = pcall(sweep.write_csv, dir .. "/t.csv", { "level", "rank" },
                        { { level = 1, rank = 8, status = "ok" } })
        assert.is_false(ok)
        assert.truthy(tostring(err):find("sweep: cannot write " .. dir .. "/t.csv.tmp: ", 1, true))
        assert.is_nil(io.open(dir .. "/t.csv"))
        os.execute("rm -rf '" .. dir .. "'")
    end)

    it("validates its options", function()
        assert.has_error(function() sweep.run{ axes = axes, run_point = print, colour = 1 } end)
        assert.has_error(function() sweep.run{ axes = axes, run_point = print, repeats = 0 } end,
                         "sweep: repeats must be a positive integer, got 0")
        assert.has_error(function() sweep.run{ axes = axes } end, "sweep: run_point is required")
    end)

    it("draws PNG and SVG charts with gnuplot", function()
        if not os.execute("command -v gnuplot >/dev/null 2>&1") then
            pending("gnuplot not installed")
            return
        end
        local dir = tmpdir()
        local res = sweep.run{
            axes = axes, out = dir .. "/c", progress = false, name = "spec",
            memory = function() return 0 end,
            run_point = function(p) return fake_steps(p, 3) end,
        }
        assert.are.equal(dir .. "/c.png", res.files.png)
        assert.are.equal(dir .. "/c.svg", res.files.svg)
        local png = assert(io.open(res.files.png, "rb")):read("a")
        assert.are.equal("\137PNG", png:sub(1, 4))
        local svg = assert(io.open(res.files.svg, "r")):read("a")
        assert.truthy(svg:find("<svg", 1, true))
        assert.truthy(svg:find("level=2 rank=32", 1, true)) -- labels name the varying axes
        assert.are.equal(5, #read_lines(dir .. "/c.dat"))
    end)
end)

describe("ws.sweep progress", function()
    it("draws a bar with counts, elapsed time and an ETA", function()
        local line = sweep.progress_line(3, 12, "level=1 rank=8", 30, 90, 12)
        assert.are.equal("[###.........] 3/12  25% level=1 rank=8  elapsed 0:30 ETA 1:30", line)
        assert.truthy(sweep.progress_line(0, 4, "", 0, nil):find("ETA ?", 1, true))
    end)
end)
