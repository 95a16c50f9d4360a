-- misuse_spec.lua: every public function and method of docs/lua-api.md called
-- with bad arguments of every kind (nil, strings, tables, floats, NaN/inf,
-- huge and negative integers, booleans, functions, userdata of the wrong
-- type) must raise a Lua error naming the function, never crash or misbehave.
-- Run under the ASan/UBSan build too: a crash, UB or leak fails the test run.
-- Also: use after free(), __gc order (views after bases, plans and pools
-- after tensors), <close> with an error in flight, re-entrant callbacks.
local ws = require "ws"

local CPU = ws.device("cpu")
local KiB = 1024

local function cpu_tensor(shape, dtype, name)
  return ws.tensor{shape = shape, dtype = dtype or "f32", device = "cpu", name = name}
end

local POOL = assert(ws.pool{device = "cpu", tag = "misuse", bytes = 1024 * KiB})
local EVENT = CPU:event()

-- Bad values; a kind lists the ones that must be refused.
local BAD = {
  {"nil", nil}, {"string", "x"}, {"table", {}}, {"float", 1.5}, {"nan", 0 / 0},
  {"inf", math.huge}, {"-inf", -math.huge}, {"maxint", math.maxinteger},
  {"minint", math.mininteger}, {"negative", -1}, {"boolean", true}, {"function", print},
  {"pool", POOL}, {"device", CPU}, {"event", EVENT},
}

local function except(...)
  local skip = {}
  for _, k in ipairs{...} do skip[k] = true end
  local set = {}
  for _, b in ipairs(BAD) do if not skip[b[1]] then set[b[1]] = true end end
  return set
end

local NOT_NUMBERS = {"nan", "inf", "-inf", "maxint", "minint", "negative", "float"}
local KIND = {
  any = except(), -- tensors, lists, tables of options
  device = except("device"), -- a ws.Device or a name
  opt_device = except("device", "nil"),
  shape = except("table"), -- {} is the shape of a scalar
  scale = except("nil", "float", "negative", "maxint", "minint"), -- finite, within f32
  opt_number = except("nil", table.unpack(NOT_NUMBERS)),
  event = except("event"),
  opt_count = except("nil", "maxint"), -- an integer >= 0
  opt_pool = except("nil", "pool"),
  opt_function = except("nil", "function"),
  opt_mb = except("nil", "float"), -- a positive number
  bytes = except("maxint"), -- too large returns nil, message, "nomem" (the environment)
  opt = except("nil"), -- optional argument of a type that none of BAD has
  int = except("maxint", "minint", "negative"), -- any integer
  index = except(), -- an integer in range (1-based index, size, rank)
  opt_index = except("nil"),
  opt_int = except("nil", "maxint", "minint", "negative"),
  number = except(table.unpack(NOT_NUMBERS)),
  opt_string = except("nil", "float", "nan", "inf", "-inf", "maxint", "minint", "negative",
                      "string"), -- numbers convert to strings in Lua
  opts = except("nil", "table"), -- an options table; {} takes every default
  string = except("float", "nan", "inf", "-inf", "maxint", "minint", "negative", "string"),
  table = except(),
  opt_table = except("nil"),
}

-- Calls `call` with the valid arguments, one replaced by each bad value of its
-- kind, and checks that every such call raises naming `name`.
local function each_bad(name, call, args)
  local checked = 0
  for pos, arg in ipairs(args) do
    local kind, valid = arg[1], arg[2]
    for _, bad in ipairs(BAD) do
      if KIND[kind][bad[1]] then
        local a = {}
        for i = 1, #args do a[i] = args[i][2] end
        a[pos] = bad[2]
        local ok, err = pcall(call, table.unpack(a, 1, #args))
        local what = string.format("%s: argument %d = %s", name, pos, bad[1])
        assert.is_false(ok, what .. " was accepted")
        assert.is_string(err, what)
        assert.matches(name, err, 1, true)
        checked = checked + 1
      end
    end
    assert(valid ~= nil or kind:sub(1, 3) == "opt", name .. ": a required argument needs a value")
  end
  return checked
end

-- A function calling obj.<name>(...): a constant field name, so Lua's error
-- messages can name the function ("bad argument #2 to 'all_gather'").
local function caller(name)
  local f = assert(load("local obj, a, b, c, d = ...; return obj." .. name .. "(a, b, c, d)"))
  return function(obj, ...) return f(obj, ...) end
end

local T = cpu_tensor({4, 4}, "f32", "t")
local U = cpu_tensor({16}, "f32", "u")
local I32 = cpu_tensor({4}, "i32", "ints")

describe("every function raises on bad arguments", function()
  local total = 0

  it("devices and events", function()
    total = total + each_bad("device", function(a) return ws.device(a) end, {{"device", "cpu"}})
    total = total + each_bad("elapsed_ms", function(a) return EVENT:record():elapsed_ms(a) end,
                             {{"event", EVENT}})
    total = total + each_bad("isatty", function(a) return ws.isatty(a) end, {{"index", 1}})
  end)

  it("tensor methods", function()
    total = total + each_bad("narrow", function(a, b, c) return T:narrow(a, b, c) end,
                             {{"index", 1}, {"index", 1}, {"index", 2}})
    total = total + each_bad("view", function(a) return T:view(a) end, {{"table", {16}}})
    total = total + each_bad("reshape", function(a) return T:reshape(a) end, {{"table", {16}}})
    total = total + each_bad("copy_", function(a) return T:copy_(a) end, {{"any", T}})
    total = total + each_bad("fill", function(a) return T:fill(a) end, {{"number", 1}})
    total = total + each_bad("random_", function(a, b, c) return T:random_(a, b, c) end,
                             {{"int", 7}, {"scale", 1.0}, {"opt_count", 0}})
    total = total + each_bad("to", function(a, b) return T:to(a, b) end,
                             {{"device", "cpu"}, {"opt", "bf16"}})
    total = total + each_bad("get", function(a) return T:get(a) end, {{"index", 1}})
    total = total + each_bad("get", function(a, b) return T:get(a, b) end,
                             {{"index", 1}, {"index", 2}})
    total = total + each_bad("set", function(a, b) return T:set(a, b) end,
                             {{"index", 1}, {"number", 2}})
    total = total + each_bad("set", function(a, b, c) return T:set(a, b, c) end,
                             {{"index", 1}, {"index", 2}, {"number", 3}})
    total = total + each_bad("get", function(a) return I32:get(a) end, {{"index", 4}})
    total = total + each_bad("checksum", function(a, b) return T:checksum(a, b) end,
                             {{"opt_count", 0}, {"opt", "f32"}})
  end)

  it("batched functions", function()
    local parts = {cpu_tensor({8}), cpu_tensor({8})}
    total = total + each_bad("pack", function(a, b, c) return ws.pack(a, b, c) end,
                             {{"any", U}, {"table", parts}, {"opt_table", {0, 8}}})
    total = total + each_bad("unpack", function(a, b, c) return ws.unpack(a, b, c) end,
                             {{"any", U}, {"table", parts}, {"opt_table", {0, 8}}})
    total = total + each_bad("copy_many", function(a, b) return ws.copy_many(a, b) end,
                             {{"table", parts}, {"table", parts}})
    total = total + each_bad("checksums", function(a, b, c) return ws.checksums(a, b, c) end,
                             {{"table", parts}, {"opt_table", {0, 0}}, {"opt", "f32"}})
    total = total + each_bad("reference_copy",
                             function(a, b) return ws.reference_copy(a, b) end,
                             {{"any", U}, {"any", U}})
    -- bad list items and offsets
    for _, item in ipairs{"x", 1, {}, POOL, true, 0.5} do
      for _, f in ipairs{"pack", "unpack"} do
        local ok, err = pcall(function() return ws[f](U, {parts[1], item}) end)
        assert.is_false(ok)
        assert.matches("item 2", err, 1, true)
      end
      local ok, err = pcall(function() return ws.copy_many({item}, {parts[1]}) end)
      assert.is_false(ok)
      assert.matches("copy_many", err, 1, true)
      if item ~= 1 then -- 1 is a valid offset
        ok, err = pcall(function() return ws.pack(U, parts, {0, item}) end)
        assert.is_false(ok)
        assert.matches("pack", err, 1, true)
        ok, err = pcall(function() return ws.checksums(parts, {0, item}) end)
        assert.is_false(ok)
        assert.matches("checksums", err, 1, true)
      end
    end
    for _, off in ipairs{-1, 1.5, 0 / 0, math.huge, math.mininteger} do
      local ok, err = pcall(function() return ws.unpack(U, parts, {0, off}) end)
      assert.is_false(ok)
      assert.matches("unpack", err, 1, true)
    end
  end)

  it("tensor constructors, per option", function()
    local function opts_bad(name, make, valid, field, kind)
      return each_bad(name, function(v)
        local o = {}
        for k, x in pairs(valid) do o[k] = x end
        o[field] = v
        return make(o)
      end, {{kind, valid[field]}})
    end
    local function ctor(o) return ws.tensor(o) end
    local function pctor(o) return POOL:tensor(o) end
    local valid = {shape = {2}, dtype = "f32", device = "cpu", name = "n"}
    total = total + opts_bad("ws.tensor", ctor, valid, "shape", "shape")
    total = total + opts_bad("ws.tensor", ctor, valid, "dtype", "opt")
    total = total + opts_bad("tensor", ctor, valid, "device", "opt_device")
    total = total + opts_bad("ws.tensor", ctor, valid, "name", "opt_string")
    total = total + opts_bad("ws.tensor", ctor, {shape = {2}, device = "cpu"}, "fill", "opt_number")
    total = total + opts_bad("ws.tensor", ctor, {shape = {2}}, "pool", "opt_pool")
    local pvalid = {shape = {2}, dtype = "f32", name = "n"}
    total = total + opts_bad("pool:tensor", pctor, pvalid, "shape", "shape")
    total = total + opts_bad("pool:tensor", pctor, pvalid, "dtype", "opt")
    total = total + opts_bad("pool:tensor", pctor, pvalid, "name", "opt_string")
    total = total + each_bad("tensor", ctor, {{"table", valid}})
    -- shapes: non-integers, negatives, too many dimensions, unknown keys
    for _, shape in ipairs{{1.5}, {-2}, {0 / 0}, {"x"}, {{}}, {1, 1, 1, 1, 1, 1, 1, 1, 1, 1}} do
      local ok, err = pcall(function() return ws.tensor{shape = shape, device = "cpu"} end)
      assert.is_false(ok)
      assert.matches("ws.tensor", err, 1, true)
    end
    for _, key in ipairs{"shap", 1, true} do
      local ok, err = pcall(function() return ws.tensor{shape = {2}, device = "cpu", [key] = 1} end)
      assert.is_false(ok)
      assert.matches("ws.tensor", err, 1, true)
    end
  end)

  it("views with huge or negative shapes raise instead of overflowing", function()
    -- These overflowed int64 in the element count (UB) before the checks.
    for _, shape in ipairs{{2 ^ 40, 2 ^ 40, 2 ^ 40}, {-1, 1 << 62, 4}, {1 << 62, 1 << 62},
                           {math.maxinteger, 2}, {-2, 8}, {-1, -1}, {5, -1}} do
      for _, int_shape in ipairs{shape} do
        for i, v in ipairs(int_shape) do int_shape[i] = math.tointeger(v) or v end
        local ok, err = pcall(function() return U:view(int_shape) end)
        assert.is_false(ok)
        assert.matches("view", err, 1, true)
      end
    end
    -- narrow: start + length past the end without overflow
    for _, a in ipairs{{1, math.maxinteger, math.maxinteger}, {1, 2, math.maxinteger},
                       {1, math.maxinteger, 1}, {1, 1, math.mininteger}} do
      local ok, err = pcall(function() return U:narrow(a[1], a[2], a[3]) end)
      assert.is_false(ok)
      assert.matches("narrow", err, 1, true)
    end
    assert.are.equal(0, U:narrow(1, 17, 0):numel()) -- an empty tail is fine
    assert.are.same({0, 3}, cpu_tensor({0, 3}):view{-1, 3}:shape())
    assert.are.same({5, 0}, cpu_tensor({0, 3}):view{5, 0}:shape())
  end)

  it("pools", function()
    local function pool_with(field, v)
      local o = {device = "cpu", tag = "p", bytes = 64 * KiB}
      o[field] = v
      return ws.pool(o)
    end
    total = total + each_bad("pool", function(v) return pool_with("device", v) end,
                             {{"opt_device", "cpu"}})
    total = total + each_bad("ws.pool", function(v) return pool_with("tag", v) end,
                             {{"opt_string", "p"}})
    total = total + each_bad("ws.pool", function(v) return pool_with("bytes", v) end,
                             {{"bytes", 1024}})
    total = total + each_bad("pool", function(v) return ws.pool(v) end,
                             {{"table", {bytes = 1024}}})
    local p = assert(ws.pool{device = "cpu", tag = "s", bytes = 64 * KiB})
    total = total + each_bad("sleep", function(a, b) return p:sleep(a, b) end,
                             {{"index", 1}, {"opt_string", "note"}})
    p:free()
  end)

  it("misc", function()
    total = total + each_bad("log", function(a) return ws.log(a) end, {{"opt_string", "%s"}})
  end)

  it("saves", function()
    local dir = os.tmpname()
    os.remove(dir)
    local path = dir .. "/m.safetensors"
    for _, name in ipairs{"save_safetensors", "save_checkpoint"} do
      local target = name == "save_safetensors" and path or dir
      local call = caller(name)
      total = total + each_bad(name, function(a, b, c, d) return call(ws, a, b, c, d) end,
                               {{"string", target}, {"table", {"u"}}, {"table", {U}},
                                {"opts", {}}})
      local function with(field, v)
        return call(ws, target, {"u"}, {U}, {[field] = v})
      end
      for field, kind in pairs{metadata = "opts", staging_mb = "opt_mb",
                               progress = "opt_function"} do
        total = total + each_bad(name, function(v) return with(field, v) end, {{kind, nil}})
      end
      total = total + each_bad(name, function(v) return with("metadata", {k = v}) end,
                               {{"opt_string", "v"}})
    end
    total = total + each_bad("save_checkpoint", function(v)
      return ws.save_checkpoint(dir, {"u"}, {U}, {max_shard_bytes = v})
    end, {{"opt_count", nil}})
    total = total + each_bad("save_checkpoint", function(v)
      return ws.save_checkpoint(dir, {"u"}, {U}, {prefix = v})
    end, {{"opt_string", nil}})
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it("plans", function()
    local function plan_with(field, v)
      local o = {bucket_bytes = 4 * KiB, device = "cpu", name = "p"}
      o[field] = v
      return ws.plan(o)
    end
    total = total + each_bad("ws.plan", function(v) return plan_with("bucket_bytes", v) end,
                             {{"opt_index", 4096}})
    total = total + each_bad("ws.plan", function(v)
      return ws.plan{bucket_mb = v, device = "cpu"}
    end, {{"opt_mb", 1}})
    total = total + each_bad("plan", function(v) return plan_with("device", v) end,
                             {{"opt_device", "cpu"}})
    total = total + each_bad("ws.plan", function(v) return plan_with("comm", v) end,
                             {{"opt", nil}})
    total = total + each_bad("ws.plan", function(v) return plan_with("name", v) end,
                             {{"opt_string", "p"}})
    total = total + each_bad("plan", function(v) return ws.plan(v) end, {{"shape", {}}})
    local p = ws.plan{bucket_bytes = 4 * KiB, device = "cpu", name = "pl"}
    local s, d = {cpu_tensor({8})}, {cpu_tensor({8})}
    total = total + each_bad("add", function(a, b, c) return p:add(a, b, c) end,
                             {{"table", s}, {"table", d}, {"opt_table", {8}}})
    total = total + each_bad("execute", function(a) return p:execute(a) end,
                             {{"opt_function", nil}})
    p:free()
  end)

  it("communicators", function()
    local c = ws.comm()
    local a, b = cpu_tensor({4}), cpu_tensor({4})
    total = total + each_bad("split", function(x, y) return c:split(x, y) end,
                             {{"int", 0}, {"opt_int", 0}})
    for _, async in ipairs{"", "_async"} do
      local function op(name, args)
        local call = caller(name .. async)
        -- (the core's messages name the collective without "_async")
        total = total + each_bad(name, function(x, y, z) return call(c, c, x, y, z) end, args)
      end
      op("all_gather", {{"any", a}, {"any", b}})
      op("broadcast", {{"any", a}, {"index", 0}})
      op("send", {{"any", a}, {"index", 0}})
      op("recv", {{"any", a}, {"index", 0}})
      op("all_reduce", {{"any", a}, {"opt", "sum"}})
      op("reduce_scatter", {{"any", a}, {"any", b}, {"opt", "sum"}})
    end
    total = total + each_bad("reference", function(x, y, z) return c:reference(x, y, z) end,
                             {{"opt_string", "all_gather"}, {"index", 1024}, {"opt_index", 1}})
  end)

  it("covered every kind of argument", function()
    assert.is_true(total > 600, "only " .. total .. " bad calls checked")
  end)
end)

describe("error regimes (docs/lua-api.md)", function()
  -- A policy reacts to the environment (nil, msg, code) and fixes misuse
  -- (raised): a constructor must not do one for the other.
  it("an absent device is returned as nil, msg, 'device' by every constructor", function()
    for name, make in pairs{
      ["ws.device"] = function() return ws.device("cuda:9") end,
      ["ws.tensor"] = function() return ws.tensor{shape = {2}, device = "cuda:9"} end,
      ["ws.pool"] = function() return ws.pool{device = "cuda:9", bytes = KiB} end,
      ["ws.plan"] = function() return ws.plan{device = "cuda:9", bucket_bytes = 4 * KiB} end,
      ["t:to"] = function() return T:to("cuda:9") end,
    } do
      local ok, v, msg, code = pcall(make)
      assert.is_true(ok, name .. " raised: " .. tostring(v))
      assert.is_nil(v, name)
      assert.matches("cuda:9", msg, 1, true)
      assert.are.equal("device", code, name)
    end
  end)

  it("a malformed device name is misuse and raises naming the call", function()
    for name, make in pairs{
      ["tensor"] = function() return ws.tensor{shape = {2}, device = "gpu"} end,
      ["pool"] = function() return ws.pool{device = "gpu", bytes = KiB} end,
      ["plan"] = function() return ws.plan{device = "gpu", bucket_bytes = 4 * KiB} end,
    } do
      local ok, err = pcall(make)
      assert.is_false(ok, name)
      assert.matches("unknown device 'gpu'", err, 1, true)
      assert.matches(name, err, 1, true)
    end
  end)

  it("the calls that return nil for the environment still raise for misuse", function()
    local gone = cpu_tensor({2}, "f32", "gone")
    gone:free()
    assert.has_error(function() ws.checksums({gone}) end)
    assert.has_error(function() ws.plan{bucket_bytes = 1, device = "cpu"} end)
    assert.has_error(function() POOL:tensor{shape = {-1}} end)
    assert.has_error(function() POOL:sleep(3) end)
  end)
end)

describe("methods called on the wrong type", function()
  local tensor_methods = getmetatable(T).__index
  local pool_methods = getmetatable(POOL).__index
  local plan = ws.plan{bucket_bytes = 4 * KiB, device = "cpu"}
  local plan_methods = getmetatable(plan).__index

  it("ws.Tensor methods with a ws.Pool, a device, a plan, nil ... as self", function()
    local n = 0
    for name in pairs(tensor_methods) do
      local f = caller(name)
      for _, self in ipairs{POOL, CPU, plan, EVENT, "t", 1, {}} do
        local ok, err = pcall(function() return f(tensor_methods, self, T) end)
        assert.is_false(ok, name)
        assert.matches(name, err, 1, true)
        n = n + 1
      end
    end
    local ok, err = pcall(function() return cpu_tensor{2}.copy_(POOL, T) end)
    assert.is_false(ok)
    assert.matches("ws.Tensor expected, got ws.Pool", err, 1, true)
    assert.is_true(n > 100)
  end)

  it("ws.Pool, ws.Plan, ws.Device, ws.Comm, ws.Event methods with a tensor as self", function()
    local comm_methods = {}
    for _, name in ipairs{"split", "all_gather", "broadcast", "all_reduce", "barrier",
                          "set_check", "reference", "free"} do
      comm_methods[name] = ws.comm()[name]
    end
    local ev_methods = getmetatable(EVENT).__index
    for _, set in ipairs{pool_methods, plan_methods, comm_methods, ev_methods,
                         {memory = CPU.memory, event = CPU.event, synchronize = CPU.synchronize,
                          reset_peak = CPU.reset_peak}} do
      for name in pairs(set) do
        local f = caller(name)
        for _, self in ipairs{T, "x", {}} do
          local ok, err = pcall(function() return f(set, self, 1) end)
          assert.is_false(ok, name)
          assert.matches(name, err, 1, true)
        end
      end
    end
  end)
end)

describe("use after free", function()
  it("every tensor method raises naming the freed tensor", function()
    local t = cpu_tensor({4}, "f32", "gone")
    t:free()
    assert.is_true(t:is_freed())
    t:free() -- idempotent
    for name, f in pairs(getmetatable(t).__index) do
      if name ~= "free" and name ~= "is_freed" then
        local ok, err = pcall(function() return f(t, 1, 1, 1) end)
        assert.is_false(ok, name)
        assert.matches("'gone' was freed", err, 1, true)
      end
    end
    for _, call in ipairs{function() return ws.pack(U, {t}) end,
                          function() return ws.copy_many({U}, {t}) end,
                          function() return U:copy_(t) end,
                          function() return ws.comm():all_reduce(t) end} do
      local ok, err = pcall(call)
      assert.is_false(ok)
      assert.matches("'gone' was freed", err, 1, true)
    end
    assert.matches("freed", tostring(t), 1, true)
  end)

  it("pools, plans, comms", function()
    local p = assert(ws.pool{device = "cpu", tag = "spent", bytes = 64 * KiB})
    p:free()
    p:free()
    for _, name in ipairs{"tensor", "sleep", "wake", "stats", "tag", "device"} do
      local ok, err = pcall(function() return p[name](p, {shape = {2}}) end)
      assert.is_false(ok, name)
      assert.matches("pool 'spent' was freed", err, 1, true)
    end
    local plan = ws.plan{bucket_bytes = 4 * KiB, device = "cpu", name = "old"}
    plan:free()
    plan:free()
    for _, name in ipairs{"add", "execute", "stats"} do
      local ok, err = pcall(function() return plan[name](plan, {}, {}) end)
      assert.is_false(ok, name)
      assert.matches("plan 'old' was freed", err, 1, true)
    end
    local c = ws.comm():split(0)
    c:free()
    c:free()
    for _, name in ipairs{"all_reduce", "barrier", "split"} do
      local ok, err = pcall(function() return c[name](c, U, 0) end)
      assert.is_false(ok, name)
      assert.matches("comm 'color 0 of world' was freed", err, 1, true)
    end
  end)

  it("a plan whose comm was freed raises instead of using it", function()
    local c = ws.comm():split(0)
    local plan = ws.plan{bucket_bytes = 4 * KiB, device = "cpu", comm = c, name = "orphan"}
    plan:add({cpu_tensor({8})}, {cpu_tensor({8})})
    c:free()
    local ok, err = pcall(function() return plan:execute() end)
    assert.is_false(ok)
    assert.matches("plan 'orphan': its comm 'color 0 of world' was freed", err, 1, true)
  end)

  it("a comm with a pending request cannot be freed under it", function()
    local c = ws.comm():split(0)
    local req = c:all_reduce_async(cpu_tensor({4}))
    local ok, err = pcall(function() return c:free() end)
    assert.is_false(ok)
    assert.matches("comm:free: 1 pending request", err, 1, true)
    req:wait()
    c:free()
  end)

  it("reference_copy into a sleeping pool raises (it wrote into unmapped memory)", function()
    local p = assert(ws.pool{device = "cpu", bytes = 64 * KiB})
    local pt = p:tensor{shape = {16}, name = "asleep"}
    p:sleep(2)
    local ok, err = pcall(function() return ws.reference_copy(pt, U) end)
    assert.is_false(ok)
    assert.matches("reference_copy: tensor 'asleep'", err, 1, true)
    p:wake()
    pt:free()
    p:free()
  end)
end)

describe("plan progress callbacks cannot change the running plan", function()
  local function busy_plan()
    local src, dst = cpu_tensor({1024}), cpu_tensor({1024})
    src:random_(3)
    local plan = ws.plan{bucket_bytes = 1 * KiB, device = "cpu", name = "busy"}
    plan:add({src}, {dst})
    return plan, src, dst
  end

  for _, case in ipairs{{"free", function(p) p:free() end},
                        {"execute", function(p) p:execute() end},
                        {"add", function(p) p:add({cpu_tensor({4})}, {cpu_tensor({4})}) end}} do
    it("plan:" .. case[1] .. " from the callback raises, the plan stays usable", function()
      local plan, src, dst = busy_plan()
      local ok, err = pcall(function() return plan:execute(function() case[2](plan) end) end)
      assert.is_false(ok)
      assert.matches("plan 'busy' is executing", err, 1, true)
      assert.are.equal(1, plan:execute().entries)
      assert.are.equal(src:checksum(), dst:checksum())
      plan:free()
    end)
  end

  it("comm:free from the callback raises; freeing tensors is safe", function()
    local c = ws.comm():split(0)
    local src, dst = cpu_tensor({1024}), cpu_tensor({1024})
    local plan = ws.plan{bucket_bytes = 1 * KiB, device = "cpu", comm = c}
    plan:add({src}, {dst})
    local ok, err = pcall(function() return plan:execute(function() c:free() end) end)
    assert.is_false(ok)
    assert.matches("comm:free", err, 1, true)
    plan:execute(function() src:free(); dst:free(); collectgarbage() end)
    plan:free()
    c:free()
  end)
end)

describe("collection order", function()
  -- Under the ASan build a pool that is never destroyed is reported as a leak
  -- at exit, and a use of freed memory aborts.
  it("a view outlives its freed base and its dropped pool", function()
    local p = assert(ws.pool{device = "cpu", bytes = 64 * KiB})
    local base = p:tensor{shape = {16}, name = "base"}
    local v = base:narrow(1, 1, 4)
    base:free()
    base, p = nil, nil
    collectgarbage()
    collectgarbage()
    v:fill(2)
    assert.are.equal(2, v:get(1))
    v = nil
    collectgarbage()
    collectgarbage()
  end)

  it("a plan outlives its freed pool tensors and the dropped pool", function()
    local p = assert(ws.pool{device = "cpu", bytes = 64 * KiB})
    local src = p:tensor{shape = {64}, fill = 3}
    local dst = cpu_tensor({64})
    local plan = ws.plan{bucket_bytes = 4 * KiB, device = "cpu"}
    plan:add({src}, {dst})
    src:free()
    src, p = nil, nil
    collectgarbage()
    collectgarbage()
    plan:execute()
    assert.are.equal(3, dst:get(64))
    plan = nil
    collectgarbage()
    collectgarbage()
  end)

  it("views, plans and pools dropped together in any order", function()
    for _ = 1, 3 do
      local p = assert(ws.pool{device = "cpu", bytes = 64 * KiB})
      local t = p:tensor{shape = {8, 8}}
      local views = {t:view{64}, t:narrow(1, 2, 3), t:bytes(), t:flat():narrow(1, 1, 8)}
      local plan = ws.plan{bucket_bytes = 4 * KiB, device = "cpu"}
      plan:add({views[4]}, {cpu_tensor({8})})
      p, t, views, plan = nil, nil, nil, nil
      collectgarbage()
    end
    collectgarbage()
  end)
end)

describe("<close> with an error in flight", function()
  it("keeps the original error and frees what it can", function()
    local ok, err = pcall(function()
      local t <close> = cpu_tensor({4})
      local p <close> = assert(ws.pool{device = "cpu", bytes = 64 * KiB})
      local pt = p:tensor{shape = {4}} -- still alive: the pool cannot go yet
      local plan <close> = ws.plan{bucket_bytes = 4 * KiB, device = "cpu"}
      local c <close> = ws.comm():split(0)
      local req = c:all_reduce_async(t) -- pending: the comm cannot go yet
      error("original failure")
    end)
    assert.is_false(ok)
    assert.matches("original failure", err, 1, true)
    collectgarbage()
    collectgarbage()
  end)

  it("without an error a pool with live tensors still raises", function()
    local ok, err = pcall(function()
      local p <close> = assert(ws.pool{device = "cpu", bytes = 64 * KiB})
      local pt = p:tensor{shape = {4}}
    end)
    assert.is_false(ok)
    assert.matches("still has 1 live tensor", err, 1, true)
    collectgarbage()
  end)
end)

describe("ws.proofs (server mode)", function()
  -- Review: an entry whose fields come from __index may answer differently
  -- on ws.proofs's second pass (sizes counted, then strings copied).
  it("an entry whose strings change between reads raises, never overflows", function()
    for _, later in ipairs{string.rep("X", 1 << 20), false, 7} do
      local n = 0
      local e = setmetatable({}, {__index = function(_, k)
        if k == "tensor" or k == "label" then
          n = n + 1
          if n <= 2 then return "w" end
          return later or nil
        end
        return 0
      end})
      local ok, err = pcall(ws.proofs, {e})
      assert.is_false(ok)
      assert.matches("ws.proofs", tostring(err), 1, true)
      collectgarbage()
    end
  end)

  it("plain entries still make proofs", function()
    local p = ws.proofs{{tensor = "w", label = "a", offset = 0, count = 4}}
    assert.equals("userdata", type(p))
  end)
end)
