-- ws.json: the one JSON encoder and decoder of the Lua side.
--
-- Used for `--json` step records (ws.report), sweep rows (ws.sweep) and the
-- benchmarks' result files. Objects are written with their keys sorted so
-- that output is stable and diffable; Lua integers stay integers both ways
-- (64-bit, beyond 2^53), floats are written with 17 significant digits so
-- they read back exactly.
--
--   local json = require("ws.json")
--   local text = json.encode{ a = 1, list = json.array() }   -- {"a":1,"list":[]}
--   local v = json.decode(text)                             -- v.list is marked as an array
local M = {}

-- Marks a table to be encoded as an array even when it is empty ([] rather
-- than {}); decode marks every array it returns, so [] round-trips.
M.array_mt = {}
function M.array(t) return setmetatable(t or {}, M.array_mt) end

-- Encodes as null where a value must be present (an array slot); decode
-- gives nil for null, as a missing field reads in Lua.
M.null = setmetatable({}, { __tostring = function() return "null" end })

-- Deeper nesting is refused both ways: an error that says so rather than a
-- stack overflow (and no real record comes close).
M.max_depth = 1000

-- ------------------------------------------------------------------ encode

local escapes = { ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
                  ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }

local function encode_string(s)
    return '"' .. s:gsub('[%c"\\]', function(c)
        return escapes[c] or string.format("\\u%04x", c:byte())
    end) .. '"'
end

local function is_array(t)
    local n = 0
    for _ in pairs(t) do n = n + 1 end
    return n == #t and (n > 0 or getmetatable(t) == M.array_mt)
end

-- path: the tables being encoded, from the root down (a cycle check), with
-- the key that led into each one, for the error message.
local function path_text(path, depth)
    local parts = {}
    for i = 2, depth do
        local k = path.keys[i]
        parts[#parts + 1] = type(k) == "number" and ("[" .. k .. "]")
            or ((#parts > 0 and "." or "") .. k)
    end
    return table.concat(parts)
end

local function encode(v, out, path, depth, key)
    local tv = type(v)
    if v == nil or v == M.null then
        out[#out + 1] = "null"
    elseif tv == "boolean" then
        out[#out + 1] = v and "true" or "false"
    elseif tv == "number" then
        if math.type(v) == "integer" then
            out[#out + 1] = string.format("%d", v)
        elseif v ~= v or v == math.huge or v == -math.huge then
            out[#out + 1] = "null"   -- JSON has no NaN or infinity
        else
            out[#out + 1] = string.format("%.17g", v)
        end
    elseif tv == "string" then
        out[#out + 1] = encode_string(v)
    elseif tv == "table" then
        depth = depth + 1
        path.keys[depth] = key
        if path.open[v] then
            error("json: cannot encode a cyclic table (at " .. path_text(path, depth) .. ")", 0)
        end
        if depth > M.max_depth then error("json: nesting deeper than " .. M.max_depth, 0) end
        path.open[v] = true
        if is_array(v) then
            out[#out + 1] = "["
            for i, x in ipairs(v) do
                if i > 1 then out[#out + 1] = "," end
                encode(x, out, path, depth, i)
            end
            out[#out + 1] = "]"
        else
            local keys = {}
            for k in pairs(v) do
                if type(k) ~= "string" then
                    error("json: object keys must be strings, got " .. type(k), 0)
                end
                keys[#keys + 1] = k
            end
            table.sort(keys)
            out[#out + 1] = "{"
            for i, k in ipairs(keys) do
                if i > 1 then out[#out + 1] = "," end
                out[#out + 1] = encode_string(k)
                out[#out + 1] = ":"
                encode(v[k], out, path, depth, k)
            end
            out[#out + 1] = "}"
        end
        path.open[v] = nil
    else
        error("json: cannot encode a " .. tv, 0)
    end
end

function M.encode(v)
    local out = {}
    encode(v, out, { open = {}, keys = {} }, 0, nil)
    return table.concat(out)
end

-- ------------------------------------------------------------------ decode

local unescapes = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n",
                    r = "\r", t = "\t" }

-- Decodes one JSON value; raises "json: <what> at byte <n>" on bad input.
function M.decode(text)
    local pos, depth = 1, 0
    local function fail(what)
        error(string.format("json: %s at byte %d", what, pos), 0)
    end
    local function skip() pos = text:find("[^ \t\r\n]", pos) or #text + 1 end
    local function hex4(at)
        local hex = text:sub(at, at + 3)
        if not hex:match("^%x%x%x%x$") then fail("bad \\u escape") end
        return tonumber(hex, 16)
    end
    local function str()
        local out = {}
        pos = pos + 1
        while true do
            local c = text:sub(pos, pos)
            if c == "" then fail("unterminated string") end
            if c == '"' then pos = pos + 1; break end
            if c == "\\" then
                local e = text:sub(pos + 1, pos + 1)
                if e == "u" then
                    local cp = hex4(pos + 2)
                    pos = pos + 6
                    -- A UTF-16 surrogate pair is one code point.
                    if cp >= 0xD800 and cp <= 0xDBFF and text:sub(pos, pos + 1) == "\\u" then
                        local lo = hex4(pos + 2)
                        if lo >= 0xDC00 and lo <= 0xDFFF then
                            cp = 0x10000 + (cp - 0xD800) * 0x400 + (lo - 0xDC00)
                            pos = pos + 6
                        end
                    end
                    out[#out + 1] = utf8.char(cp)
                elseif unescapes[e] then
                    out[#out + 1] = unescapes[e]
                    pos = pos + 2
                else
                    fail("bad escape")
                end
            else
                local stop = text:find('["\\]', pos) or #text + 1
                out[#out + 1] = text:sub(pos, stop - 1)
                pos = stop
            end
        end
        return table.concat(out)
    end
    local function number()
        local int = text:match("^-?%d+", pos)
        if not int then fail("unexpected character '" .. text:sub(pos, pos) .. "'") end
        local frac = text:match("^%.%d+", pos + #int) or ""
        local exp = text:match("^[eE][-+]?%d+", pos + #int + #frac) or ""
        local num = int .. frac .. exp
        pos = pos + #num
        if frac == "" and exp == "" then
            -- Integers stay integers (math.tointeger fails only past 64 bits).
            return math.tointeger(tonumber(num)) or tonumber(num)
        end
        return tonumber(num)
    end
    local value
    local function enter()
        depth = depth + 1
        if depth > M.max_depth then fail("nesting deeper than " .. M.max_depth) end
        pos = pos + 1
    end
    function value()
        skip()
        local c = text:sub(pos, pos)
        if c == "{" then
            local obj = {}
            enter()
            skip()
            if text:sub(pos, pos) == "}" then pos, depth = pos + 1, depth - 1; return obj end
            while true do
                skip()
                if text:sub(pos, pos) ~= '"' then fail("expected a key") end
                local k = str()
                skip()
                if text:sub(pos, pos) ~= ":" then fail("expected ':'") end
                pos = pos + 1
                obj[k] = value()
                skip()
                local d = text:sub(pos, pos)
                if d == "}" then pos, depth = pos + 1, depth - 1; return obj end
                if d ~= "," then fail("expected ',' or '}'") end
                pos = pos + 1
            end
        elseif c == "[" then
            local arr, n = M.array(), 0
            enter()
            skip()
            if text:sub(pos, pos) == "]" then pos, depth = pos + 1, depth - 1; return arr end
            while true do
                n = n + 1
                arr[n] = value()
                skip()
                local d = text:sub(pos, pos)
                if d == "]" then pos, depth = pos + 1, depth - 1; return arr end
                if d ~= "," then fail("expected ',' or ']'") end
                pos = pos + 1
            end
        elseif c == '"' then
            return str()
        elseif c == "" then
            fail("unexpected end of input")
        elseif text:sub(pos, pos + 3) == "true" then
            pos = pos + 4; return true
        elseif text:sub(pos, pos + 4) == "false" then
            pos = pos + 5; return false
        elseif text:sub(pos, pos + 3) == "null" then
            pos = pos + 4; return nil
        end
        return number()
    end
    local v = value()
    skip()
    if pos <= #text then fail("trailing characters") end
    return v
end

-- Reads a JSON-lines file (one value per line, blank lines skipped) into a
-- list; a line that does not parse raises naming the file and line.
function M.load_jsonl(path)
    local f, err = io.open(path, "r")
    if not f then error("json: cannot read " .. tostring(err), 2) end
    local out, lineno = {}, 0
    for line in f:lines() do
        lineno = lineno + 1
        if line:match("%S") then
            local ok, v = pcall(M.decode, line)
            if not ok then
                f:close()
                error(string.format("%s:%d: %s", path, lineno, v), 2)
            end
            out[#out + 1] = v
        end
    end
    f:close()
    return out
end

return M
