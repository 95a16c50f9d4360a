-- verify=all|sent|off: what each rollout proves. `sent` checksums the plans
-- a step sent and proves every other engine tensor readable from the pools'
-- bookkeeping (ws.readable); it must still catch the base skipped after a
-- level-2 sleep and a sent plan that left a tensor out. `off` proves nothing
-- and says so on every row.
local ws = require("ws")
local config = require("ws.config")

local P = dofile("pipelines/verl_lora.lua")
local tiny = { model = "tiny", steps = 3, kv_cache_mb = 1, progress = "off" }

local function with(extra)
    local c = {}
    for k, v in pairs(tiny) do c[k] = v end
    for k, v in pairs(extra or {}) do c[k] = v end
    return c
end

-- Runs a pipeline, returning its records, summary and the lines it logged.
local function run(p, extra)
    local lines = {}
    local recs, summary = p.run(with(extra), { log = function(msg)
        for l in (msg .. "\n"):gmatch("(.-)\n") do lines[#lines + 1] = l end
    end })
    return recs, summary, lines
end

local function failure(p, extra)
    local ok, err = pcall(p.run, with(extra), { quiet = true })
    assert.is_false(ok, "expected the run to fail")
    return tostring(err)
end

-- The number of trainer tensors of one kind ("base" or "adapter") of tiny with LoRA r=32.
local function count(kind)
    local t = require("ws.trainer").new{ spec = require("ws.models").get("tiny"),
                                         device = ws.device("cpu"),
                                         lora = require("ws.lora").config{ r = 32 } }
    local n = 0
    for _, e in ipairs(t.params) do if e.kind == kind then n = n + 1 end end
    t:free()
    return n
end

describe("ws.readable", function()
    local cpu = ws.device("cpu")

    it("counts tensors whose contents may be read, reading none of them", function()
        local pool = assert(ws.pool{ device = cpu, tag = "weights", bytes = 1 << 20 })
        local a = assert(pool:tensor{ shape = { 64, 32 }, dtype = "bf16", name = "layer.a" })
        local b = assert(pool:tensor{ shape = { 16 }, dtype = "f32", name = "layer.b" })
        a:fill(1); b:fill(2)
        local plain = assert(ws.tensor{ shape = { 8 }, device = cpu })
        assert.are.equal(3, ws.readable({ a, b, plain }))
        assert.are.equal(0, ws.readable({}))
        local rows = a:narrow(1, 3, 4)
        assert.are.equal(1, ws.readable({ rows }))
        rows:free()
        -- A level-1 sleep keeps the contents: readable again once awake.
        assert(pool:sleep(1, "spec level 1"))
        local ok, err = pcall(ws.readable, { a })
        assert.is_false(ok)
        assert.matches("'layer.a'", tostring(err), 1, true)
        assert.matches("pool 'weights'", tostring(err), 1, true)
        assert(pool:wake())
        assert.are.equal(2, ws.readable({ a, b }))
        -- A level-2 sleep discards them: the first such tensor is named, with the sleep.
        assert(pool:sleep(2, "spec step 7"))
        assert(pool:wake())
        b:fill(3)
        assert.are.equal(1, ws.readable({ b }))
        ok, err = pcall(ws.readable, { b, a })
        assert.is_false(ok)
        err = tostring(err)
        assert.matches("^readable: tensor 'layer.a'", err)
        assert.matches("in pool 'weights'", err, 1, true)
        assert.matches("sleep(level=2)", err, 1, true)
        assert.matches("spec step 7", err, 1, true)
        a:fill(1)
        assert.are.equal(2, ws.readable({ a, b }))
        a:free(); b:free(); plain:free(); pool:free()
    end)

    it("raises for a list that holds something else or a freed tensor", function()
        local t = assert(ws.tensor{ shape = { 4 }, device = cpu, name = "gone" })
        assert.has_error(function() ws.readable(t) end)
        assert.has_error(function() ws.readable({ t, 5 }) end)
        t:free()
        local ok, err = pcall(ws.readable, { t })
        assert.is_false(ok)
        assert.matches("gone", tostring(err), 1, true)
    end)
end)

describe("verify=", function()
    it("is a common key: all by default, all|sent|off accepted", function()
        assert.are.equal("all", P.schema.verify.default)
        local ok, err = pcall(P.run, with{ verify = "some" }, { quiet = true })
        assert.is_false(ok)
        assert.is_true(config.is_error(err))
        assert.matches("config key 'verify' must be one of all, sent, off, got 'some'",
                       tostring(err), 1, true)
    end)

    it("all: checksums every engine tensor every step", function()
        local recs, summary, lines = run(P, { verify = "all", sleep_level = 1 })
        local n = count("base") + count("adapter")
        for _, r in ipairs(recs) do
            assert.are.equal("all", r.verify)
            assert.is_true(r.verified)
            assert.are.equal(n, r.verified_tensors)
            assert.are.equal(0, r.readable_tensors)
        end
        assert.are.equal("all", summary.verify)
        assert.truthy(table.concat(lines, "\n"):find("verified 3 of 3; ", 1, true))
    end)

    it("sent: checksums what was sent, proves the unchanged base readable", function()
        local recs, summary, lines = run(P, { verify = "sent", sleep_level = 1 })
        local nb, na = count("base"), count("adapter")
        assert.are.equal(nb + na, recs[1].verified_tensors) -- step 1 sends both
        for i = 2, #recs do
            assert.is_false(recs[i].base_sent)
            assert.are.equal(na, recs[i].verified_tensors)
            assert.are.equal(nb, recs[i].readable_tensors)
        end
        for _, r in ipairs(recs) do assert.is_true(r.verified); assert.are.equal("sent", r.verify) end
        assert.are.equal(3, summary.verified_steps)
        local rows = 0
        for _, l in ipairs(lines) do
            if l:match("^%s+%d+ ") then
                rows = rows + 1
                assert.truthy(l:find(" sent ", 1, true), l)
            end
        end
        assert.are.equal(3, rows)
        assert.truthy(table.concat(lines, "\n"):find("verified 3 of 3 (verify=sent", 1, true))
    end)

    it("sent: the base sent after every level-2 sleep is checksummed every step", function()
        local recs = run(P, { verify = "sent", sleep_level = 2 })
        for _, r in ipairs(recs) do
            assert.is_true(r.base_sent)
            assert.are.equal(0, r.readable_tensors)
        end
    end)

    it("sent: catches the base skipped after a level-2 sleep, naming tensor, pool and sleep",
       function()
        local skip = dofile("tests/e2e/fixtures/skip_base.lua")
        local err = failure(skip, { verify = "sent", sleep_level = 2 })
        assert.matches("skip_base: step 2 failed", err, 1, true)
        assert.matches("verify (step 2 rollout): readable: tensor 'model.embed_tokens.weight' " ..
                       "in pool 'weights': contents were discarded by sleep(level=2)", err, 1, true)
        assert.matches("(step 1)", err, 1, true)
        -- Without the sleep the skip is harmless, and sent proves it cheaply.
        local recs = run(skip, { verify = "sent", sleep_level = 2, free_cache_engine = false })
        assert.are.equal(count("base"), recs[2].readable_tensors)
    end)

    it("sent and all: catch a sent plan that left a tensor out", function()
        local drop = dofile("tests/e2e/fixtures/drop_sent.lua")
        for _, mode in ipairs({ "sent", "all" }) do
            local err = failure(drop, { verify = mode, sleep_level = 1 })
            assert.matches("drop_sent: step 2 failed", err, 1, true)
            assert.matches("verify %(step 2 rollout%): engine tensor '[^']*lora_[AB][^']*' does " ..
                           "not hold trainer parameter '[^']*lora_[AB][^']*'", err)
        end
    end)

    it("sent: a plan the trainer changed but the step did not send is checksummed", function()
        local forgetful = P:with{ step = function(self, ctx, step)
            if step < 2 then return P.step(self, ctx, step) end
            ctx:train() -- the adapter changes, nothing is sent
            ctx:rollout()
        end }
        local err = failure(forgetful, { verify = "sent", free_cache_engine = false })
        assert.matches("verify %(step 2 rollout%): engine tensor '[^']*lora_", err)
        -- No trainer change, nothing sent: both plans only proven readable.
        local idle = P:with{ step = function(self, ctx, step)
            if step < 2 then return P.step(self, ctx, step) end
            ctx:rollout()
        end }
        local recs = run(idle, { verify = "sent", free_cache_engine = false })
        assert.are.equal(0, recs[3].verified_tensors)
        assert.are.equal(count("base") + count("adapter"), recs[3].readable_tensors)
    end)

    it("off: proves nothing and says so on every row, in the summary and the records", function()
        local path = os.tmpname()
        local lines = {}
        local recs, summary = P.run(with{ verify = "off", steps = 2 }, { json = path,
            log = function(msg) for l in (msg .. "\n"):gmatch("(.-)\n") do lines[#lines + 1] = l end end })
        local header, rows = nil, 0
        for _, l in ipairs(lines) do
            if l:match("^#%s*step ") then header = l end
            if l:match("^%s+%d+ ") then
                rows = rows + 1
                -- The row keeps its columns: `off` sits under `verified`.
                local cols, hcols = {}, {}
                for w in l:gmatch("%S+") do cols[#cols + 1] = w end
                for w in header:gsub("^#", ""):gmatch("%S+") do hcols[#hcols + 1] = w end
                assert.are.equal(#hcols, #cols, l)
                for i, h in ipairs(hcols) do
                    if h == "verified" then assert.are.equal("off", cols[i], l) end
                end
            end
        end
        assert.are.equal(2, rows)
        assert.truthy(table.concat(lines, "\n"):find("verify=off: nothing verified", 1, true))
        assert.are.equal("off", summary.verify)
        assert.are.equal(0, summary.verified_steps)
        for _, r in ipairs(require("ws.report").load_jsonl(path)) do
            assert.are.equal("off", r.verify)
            assert.is_false(r.verified)
        end
        assert.are.equal(2, #recs)
        os.remove(path)
    end)
end)
