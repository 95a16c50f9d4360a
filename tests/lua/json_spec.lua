-- json_spec.lua: ws.json, the JSON encoder/decoder shared by ws.report,
-- ws.sweep and the benchmarks.
package.path = "lua/?.lua;" .. package.path
local json = require("ws.json")

describe("ws.json", function()
    it("round-trips nested objects and arrays", function()
        local v = { name = "run", steps = { 1, 2, 3 }, phase = { train = 1.5, sleep = 0.25 },
                    nested = { { a = true }, { b = false, list = { "x", { "y" } } } },
                    empty_obj = {}, empty_arr = json.array() }
        local text = json.encode(v)
        local back = json.decode(text)
        assert.are.same(v, back)
        -- An empty array stays an array on the way back; an empty object stays an object.
        assert.are.equal(json.encode(back), text)
        assert.truthy(text:find('"empty_arr":[]', 1, true))
        assert.truthy(text:find('"empty_obj":{}', 1, true))
    end)

    it("writes object keys sorted", function()
        assert.are.equal('{"a":1,"b":2,"c":3}', json.encode{ c = 3, a = 1, b = 2 })
    end)

    it("escapes and unescapes strings", function()
        local s = 'quote " backslash \\ nl \n tab \t cr \r bell \a nul \0 end'
        local text = json.encode(s)
        assert.are.equal('"quote \\" backslash \\\\ nl \\n tab \\t cr \\r bell \\u0007 nul \\u0000 end"',
                         text)
        assert.are.equal(s, json.decode(text))
        assert.are.equal("a/b", json.decode('"a\\/b"'))
        assert.are.equal("é€", json.decode('"\\u00e9\\u20ac"'))
        assert.are.equal("\u{1F600}", json.decode('"\\ud83d\\ude00"'))
        assert.are.equal("ünïcode", json.decode(json.encode("ünïcode")))
    end)

    it("keeps integers and floats apart, beyond 2^53", function()
        local big = (1 << 53) + 1
        assert.are.equal("9007199254740993", json.encode(big))
        local back = json.decode(json.encode{ big = big, neg = -big, max = math.maxinteger })
        assert.are.equal(big, back.big)
        assert.are.equal(-big, back.neg)
        assert.are.equal(math.maxinteger, back.max)
        assert.are.equal("integer", math.type(back.big))
        assert.are.equal("float", math.type(json.decode("1.0")))
        assert.are.equal("integer", math.type(json.decode("7")))
        assert.are.equal(0.1, json.decode(json.encode(0.1)))
        assert.are.equal(-2.5e-7, json.decode("-2.5e-7"))
        assert.are.equal(1e300, json.decode(json.encode(1e300)))
    end)

    it("maps null to nil and non-finite numbers to null", function()
        assert.is_nil(json.decode("null"))
        assert.are.same({ a = 1 }, json.decode('{"a":1,"b":null}'))
        assert.are.equal("[1,null,3]", json.encode{ 1, json.null, 3 })
        assert.are.equal("[null,null]", json.encode{ 0 / 0, math.huge })
        assert.are.equal('{"ok":true}', json.encode{ ok = true, gone = nil })
    end)

    it("refuses what JSON cannot hold", function()
        assert.has_error(function() json.encode{ [1] = 1, [3] = 3 } end,
                         "json: object keys must be strings, got number")
        assert.has_error(function() json.encode{ f = print } end, "json: cannot encode a function")
    end)

    it("refuses a cyclic table with a clear error, but allows a shared one", function()
        local c = { name = "c" }
        c.self = c
        assert.has_error(function() json.encode(c) end, "json: cannot encode a cyclic table (at self)")
        local a = {}
        a[1] = { a }
        assert.has_error(function() json.encode(a) end, "json: cannot encode a cyclic table (at [1][1])")
        local shared = { 1 }
        assert.are.equal('{"a":[1],"b":[1]}', json.encode{ a = shared, b = shared })
    end)

    it("limits nesting depth instead of overflowing the stack", function()
        local ok, msg = pcall(json.decode, string.rep("[", 100000))
        assert.is_false(ok)
        assert.are.equal("json: nesting deeper than 1000 at byte 1001", msg)
        local deep = {}
        for _ = 1, 2000 do deep = { deep } end
        ok, msg = pcall(json.encode, deep)
        assert.is_false(ok)
        assert.are.equal("json: nesting deeper than 1000", msg)
        -- Up to the limit both ways is fine.
        local text = string.rep("[", 1000) .. string.rep("]", 1000)
        assert.are.equal(text, json.encode(json.decode(text)))
    end)

    it("names the byte where malformed input goes wrong", function()
        local function err_of(text)
            local ok, msg = pcall(json.decode, text)
            assert.is_false(ok)
            return msg
        end
        assert.are.equal("json: expected ',' or '}' at byte 8", err_of('{"a": 1'))
        assert.are.equal("json: expected ',' or ']' at byte 4", err_of("[1 2]"))
        assert.are.equal("json: expected a key at byte 2", err_of("{1:2}"))
        assert.are.equal("json: expected ':' at byte 6", err_of('{"a" 1}'))
        assert.are.equal("json: unterminated string at byte 5", err_of('"abc'))
        assert.are.equal("json: bad escape at byte 2", err_of('"\\q"'))
        assert.are.equal("json: bad \\u escape at byte 2", err_of('"\\u12"'))
        assert.are.equal("json: trailing characters at byte 3", err_of("1 x"))
        assert.are.equal("json: unexpected character 'x' at byte 1", err_of("x"))
        assert.are.equal("json: unexpected end of input at byte 1", err_of(""))
    end)

    it("reads JSON lines, naming the line that does not parse", function()
        local path = os.tmpname()
        local f = assert(io.open(path, "w"))
        f:write(json.encode{ step = 1 }, "\n\n", json.encode{ step = 2, list = { 1, 2 } }, "\n")
        f:close()
        assert.are.same({ { step = 1 }, { step = 2, list = { 1, 2 } } }, json.load_jsonl(path))
        f = assert(io.open(path, "a"))
        f:write('{"step": 3\n')
        f:close()
        local ok, msg = pcall(json.load_jsonl, path)
        assert.is_false(ok)
        assert.truthy(msg:find(path .. ":4: json: expected ',' or '}' at byte 11", 1, true), msg)
        os.remove(path)
    end)
end)
