-- ws.config: pipeline configuration, validated once at the edge.
--
-- A schema maps each key to {default=, type=, min=, above=, max=, values=,
-- per_rank=, help=} (above: an exclusive minimum);
-- types are "integer", "number", "boolean", "string" and "enum" (one of
-- `values`). `config.parse(schema, argv)` reads `key=value` words and
-- `--json FILE` from a command line; `config.resolve(schema, overrides)` does
-- the same for a table (a sweep running a pipeline in-process). Every problem
-- raises a config error (unknown key, wrong type, out of range) whose message
-- says what is accepted; `config.is_error(e)` tells it apart from a crash.
local errors = require("ws.errors")

local M = {}

-- Config errors are ws.errors objects with code "config": one line, no
-- traceback, wherever they are raised.
local function fail(fmt, ...) errors.raise("config", fmt, ...) end

function M.is_error(e) return errors.is(e, "config") end

-- Raises a config error (for checks made after parsing: model, device, ...).
function M.raise(fmt, ...) fail(fmt, ...) end

-- Runs fn(...); any error it raises becomes a config error about `key`.
function M.check(key, fn, ...)
    local ok, v = pcall(fn, ...)
    if ok then return v end
    if M.is_error(v) then error(v, 0) end
    local msg = tostring(v):gsub("^[^:]*:%d+: ", "")
    fail("config key '%s': %s", key, msg)
end

local function sorted_keys(schema)
    local keys = {}
    for k in pairs(schema) do keys[#keys + 1] = k end
    table.sort(keys)
    return keys
end

-- Converts a command-line string or a Lua value to the key's type.
local function coerce(key, spec, v)
    local t = spec.type
    if t == "boolean" then
        if type(v) == "boolean" then return v end
        local s = tostring(v):lower()
        if s == "true" or s == "1" or s == "yes" or s == "on" then return true end
        if s == "false" or s == "0" or s == "no" or s == "off" then return false end
        fail("config key '%s' expects a boolean (true/false), got '%s'", key, tostring(v))
    elseif t == "integer" or t == "number" then
        local n = type(v) == "number" and v or tonumber(v)
        if n == nil then
            fail("config key '%s' expects %s, got '%s'", key,
                 t == "integer" and "an integer" or "a number", tostring(v))
        end
        if n ~= n or n == math.huge or n == -math.huge then
            fail("config key '%s' expects a finite number, got '%s'", key, tostring(v))
        end
        if t == "integer" then
            local i = math.tointeger(n)
            if i == nil then fail("config key '%s' expects an integer, got '%s'", key, tostring(v)) end
            n = i
        end
        if spec.min and n < spec.min then
            fail("config key '%s' must be >= %s, got %s", key, tostring(spec.min), tostring(n))
        end
        if spec.above and n <= spec.above then
            fail("config key '%s' must be > %s, got %s", key, tostring(spec.above), tostring(n))
        end
        if spec.max and n > spec.max then
            fail("config key '%s' must be <= %s, got %s", key, tostring(spec.max), tostring(n))
        end
        return n
    elseif t == "enum" then
        local s = tostring(v)
        for _, ok in ipairs(spec.values) do
            if s == tostring(ok) then return ok end
        end
        local vals = {}
        for _, ok in ipairs(spec.values) do vals[#vals + 1] = tostring(ok) end
        fail("config key '%s' must be one of %s, got '%s'", key, table.concat(vals, ", "), s)
    elseif t == "string" then
        if type(v) ~= "string" then
            fail("config key '%s' expects a string, got %s", key, type(v))
        end
        return v
    end
    error("config schema: key '" .. key .. "' has unknown type '" .. tostring(t) .. "'")
end

local function check_known(schema, key)
    if schema[key] == nil then
        fail("unknown config key '%s' (known: %s)", tostring(key),
             table.concat(sorted_keys(schema), ", "))
    end
end

-- Defaults, then `overrides` (a table of key -> value or string).
function M.resolve(schema, overrides)
    local cfg = {}
    for k, spec in pairs(schema) do cfg[k] = spec.default end
    for k, v in pairs(overrides or {}) do
        check_known(schema, k)
        cfg[k] = coerce(k, schema[k], v)
    end
    return cfg
end

-- argv: list of strings. Returns cfg, opts ({json=path, help=bool,
-- explicit = set of the keys the command line gave}).
function M.parse(schema, argv)
    local overrides, opts, seen = {}, {}, {}
    local i = 1
    while i <= #argv do
        local a = argv[i]
        if a == "--json" or a:match("^%-%-json=") then
            if opts.json then fail("--json given twice") end
            if a == "--json" then
                opts.json = argv[i + 1]
                i = i + 1
            else
                opts.json = a:sub(8)
            end
            if not opts.json or opts.json == "" then fail("--json needs a file name") end
        elseif a == "--help" or a == "-h" then
            opts.help = true
        else
            local k, v = a:match("^([%w_]+)=(.*)$")
            if not k then
                fail("cannot parse argument '%s': expected key=value, --json FILE or --help", a)
            end
            check_known(schema, k)
            if seen[k] then fail("config key '%s' given twice", k) end
            seen[k] = true
            overrides[k] = v
        end
        i = i + 1
    end
    opts.explicit = seen
    return M.resolve(schema, overrides), opts
end

-- Text for --help: one line per key with its default and what it does.
function M.usage(schema, title)
    local lines = { title or "configuration (key=value):" }
    for _, k in ipairs(sorted_keys(schema)) do
        local s = schema[k]
        local kind = s.type == "enum" and table.concat(s.values, "|") or s.type
        lines[#lines + 1] = string.format("  %-18s %-10s default %-12s %s", k, kind,
                                          tostring(s.default), s.help or "")
    end
    lines[#lines + 1] = "  --json FILE        write one JSON line per step"
    return table.concat(lines, "\n")
end

-- A value as the agreement below shows it: strings quoted, numbers exact.
local function repr(v)
    if type(v) == "string" then return string.format("%q", v) end
    if math.type(v) == "float" and tonumber(tostring(v)) ~= v then
        return string.format("%.17g", v)
    end
    return tostring(v)
end

-- 64-bit FNV-1a of a string, non-negative so that its negation is exact too.
local function digest(s)
    local h = -3750763034362895579 -- 0xcbf29ce484222325
    for i = 1, #s do h = (h ~ s:byte(i)) * 1099511628211 end
    return h & math.maxinteger
end

-- Makes every rank of `comm` check that all ranks resolved the same
-- configuration (keys whose schema says per_rank = true excepted: a rank's
-- own GPU, say), before anything is built: ranks that disagree (on `steps`,
-- above all) would run out of step until one waits forever in a collective.
-- `label` (the pipeline's name) is compared too. One all_reduce of a digest
-- when they agree; when they do not, one all_gather of the configurations so
-- that every rank raises the same config error naming the key and the values.
function M.agree(comm, cfg, schema, label)
    local world = comm and comm.size or 1
    if world <= 1 then return end
    local ws = require("ws")
    local must = require("ws.errors").must
    local keys = {}
    for _, k in ipairs(sorted_keys(cfg)) do
        if not (schema[k] and schema[k].per_rank) then keys[#keys + 1] = k end
    end
    local entries = { "pipeline\0" .. repr(label or "") }
    for _, k in ipairs(keys) do entries[#entries + 1] = k .. "\0" .. repr(cfg[k]) end
    -- %q never leaves a raw NUL or newline in a string, so these separate safely.
    local text = table.concat(entries, "\n")
    local d = digest(text)
    local probe <close> = must("config", ws.tensor{ shape = { 3 }, dtype = "i64", device = "cpu",
                                                    name = "config digest" })
    probe:set(1, d):set(2, -d):set(3, #text)
    comm:all_reduce(probe, "max")
    if probe:get(1) == d and probe:get(2) == -d then return end

    -- They differ: every rank gets every configuration and names the first
    -- key (in sorted order) on which some rank differs from rank 0.
    local words = (probe:get(3) + 7) // 8
    local padded = text .. string.rep("\0", words * 8 - #text)
    local mine <close> = must("config", ws.tensor{ shape = { words }, dtype = "i64",
                                                   device = "cpu", name = "config text" })
    for i = 1, words do mine:set(i, (string.unpack("<i8", padded, (i - 1) * 8 + 1))) end
    local all <close> = must("config", ws.tensor{ shape = { words * world }, dtype = "i64",
                                                  device = "cpu", name = "config texts" })
    comm:all_gather(mine, all)
    local ranks, order, seen = {}, {}, {}
    for r = 0, world - 1 do
        local parts = {}
        for i = 1, words do parts[i] = string.pack("<i8", all:get(r * words + i)) end
        local map = {}
        for line in (table.concat(parts):gsub("\0+$", "") .. "\n"):gmatch("(.-)\n") do
            local k, v = line:match("^(.-)\0(.*)$")
            if k then
                map[k] = v
                if not seen[k] then seen[k], order[#order + 1] = true, k end
            end
        end
        ranks[r] = map
    end
    table.sort(order, function(a, b)
        if (a == "pipeline") ~= (b == "pipeline") then return a == "pipeline" end
        return a < b
    end)
    for _, k in ipairs(order) do
        for r = 1, world - 1 do
            local a, b = ranks[0][k], ranks[r][k]
            if a ~= b then
                fail("config: ranks disagree on '%s': rank 0 has %s, rank %d has %s", k,
                     a or "no such key", r, b or "no such key")
            end
        end
    end
    -- Equal texts cannot give different digests; a rank whose text did not
    -- arrive whole still must not go on alone.
    fail("config: ranks disagree on the configuration (digests differ)")
end

-- "k=v k=v" in key order, for report headers.
function M.describe(cfg)
    local parts = {}
    for _, k in ipairs(sorted_keys(cfg)) do parts[#parts + 1] = k .. "=" .. tostring(cfg[k]) end
    return table.concat(parts, " ")
end

return M
