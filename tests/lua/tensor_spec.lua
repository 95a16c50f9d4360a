-- tensor_spec.lua: ws.tensor and every ws.Tensor method (docs/lua-api.md),
-- checked against values computed independently in Lua.
local ws = require "ws"

-- f32 bits of a number, and back (string.pack rounds to f32 like a C cast).
local function f32_bits(x) return string.unpack("<I4", string.pack("<f", x)) end
local function bits_f32(b) return (string.unpack("<f", string.pack("<I4", b))) end
local function to_f32(x) return bits_f32(f32_bits(x)) end

-- bf16: keep the top 16 bits, round to nearest even (finite inputs).
local function bf16_round(x)
  local b = f32_bits(x)
  local r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
  return bits_f32((r & 0xFFFF) << 16)
end

-- f16 for normal-range values: 10 mantissa bits, round to nearest even.
local function f16_round(x)
  local b = f32_bits(x)
  local sign = b & 0x80000000
  local exp = (b >> 23) & 0xFF
  local mant = b & 0x7FFFFF
  assert(exp - 127 >= -14 and exp - 127 <= 15, "f16_round: normal range only")
  local keep = mant >> 13
  local rest = mant & 0x1FFF
  if rest > 0x1000 or (rest == 0x1000 and (keep & 1) == 1) then keep = keep + 1 end
  if keep == 0x400 then keep = 0; exp = exp + 1 end
  return bits_f32(sign | (exp << 23) | (keep << 13))
end

-- The shard-composable checksum, written again in Lua (integer ops wrap mod 2^64).
local function hash_elem(index, bits)
  local x = bits ~ (index * 0x9E3779B97F4A7C15)
  x = x ~ (x >> 32)
  x = x * 0xD6E8FEB86659FD93
  x = x ~ (x >> 32)
  x = x * 0xD6E8FEB86659FD93
  x = x ~ (x >> 32)
  return x
end

local function random_elem(seed, index, scale)
  local z = seed * 0xBF58476D1CE4E5B9 + index + 0x9E3779B97F4A7C15
  z = (z ~ (z >> 30)) * 0xBF58476D1CE4E5B9
  z = (z ~ (z >> 27)) * 0x94D049BB133111EB
  z = z ~ (z >> 31)
  local u = ((z >> 40) - (1 << 23)) / 8388608.0
  return to_f32(to_f32(u) * to_f32(scale))
end

local function cpu_tensor(opts)
  opts.device = opts.device or "cpu"
  return assert(ws.tensor(opts))
end

describe("ws.tensor", function()
  it("creates tensors with the documented defaults", function()
    local t = cpu_tensor{shape = {2, 3}}
    assert.are.same({2, 3}, t:shape())
    assert.are.equal(2, t:dim())
    assert.are.equal(6, t:numel())
    assert.are.equal(24, t:nbytes())
    assert.are.equal("f32", t:dtype())
    assert.are.equal("cpu", t:device().name)
    assert.is_nil(t:name())
    assert.is_true(t:is_contiguous())
    assert.is_false(t:is_freed())
  end)

  it("accepts every dtype and long names", function()
    local sizes = {f32 = 4, bf16 = 2, f16 = 2, fp8 = 1, u8 = 1, i32 = 4, i64 = 8}
    for dt, size in pairs(sizes) do
      local t = cpu_tensor{shape = {5}, dtype = dt}
      assert.are.equal(dt, t:dtype())
      assert.are.equal(5 * size, t:nbytes())
    end
    assert.are.equal("bf16", cpu_tensor{shape = {1}, dtype = "bfloat16"}:dtype())
    assert.are.equal("f16", cpu_tensor{shape = {1}, dtype = "float16"}:dtype())
  end)

  it("fills on creation and names the tensor", function()
    local t = cpu_tensor{shape = {3}, fill = 2.5, name = "w"}
    assert.are.equal("w", t:name())
    for i = 1, 3 do assert.are.equal(2.5, t:get(i)) end
  end)

  it("prints like ws.Tensor(bf16[2048,1024] cpu 'name')", function()
    local t = cpu_tensor{shape = {2048, 1024}, dtype = "bf16", name = "model.layers.0.q.weight"}
    assert.are.equal("ws.Tensor(bf16[2048,1024] cpu 'model.layers.0.q.weight')", tostring(t))
    assert.are.equal("ws.Tensor(f32[2,3] cpu)", tostring(cpu_tensor{shape = {2, 3}}))
  end)

  it("rejects unknown options, naming the option", function()
    assert.has_error(function() ws.tensor{shape = {2}, shap = 1} end)
    local ok, err = pcall(ws.tensor, {shape = {2}, dtyp = "f32"})
    assert.is_false(ok)
    assert.matches("unknown option 'dtyp'", err, 1, true)
  end)

  it("rejects negative dimensions with the index", function()
    local ok, err = pcall(ws.tensor, {shape = {2, -1}, device = "cpu"})
    assert.is_false(ok)
    assert.matches("shape[2] = -1: dimensions must be >= 0", err, 1, true)
  end)

  it("rejects an unknown dtype and lists the valid ones", function()
    local ok, err = pcall(ws.tensor, {shape = {2}, dtype = "f64", device = "cpu"})
    assert.is_false(ok)
    assert.matches("unknown dtype 'f64'", err, 1, true)
    assert.matches("bf16", err, 1, true)
    assert.matches("fp8", err, 1, true)
  end)

  it("rejects a missing shape and a non-integer dimension", function()
    assert.has_error(function() ws.tensor{device = "cpu"} end)
    local ok, err = pcall(ws.tensor, {shape = {2, 1.5}, device = "cpu"})
    assert.is_false(ok)
    assert.matches("shape[2] must be an integer", err, 1, true)
  end)

  it("rejects an unknown device name", function()
    local ok, err = pcall(ws.tensor, {shape = {2}, device = "gpu"})
    assert.is_false(ok)
    assert.matches("unknown device 'gpu'", err, 1, true)
  end)

  it("returns nil, message, 'nomem' when memory runs out", function()
    local t, msg, code = ws.tensor{shape = {1 << 45}, device = "cpu", name = "huge"}
    assert.is_nil(t)
    assert.are.equal("nomem", code)
    assert.is_string(msg)
    assert.matches("huge", msg, 1, true)
  end)

  it("creates pinned host tensors on the cpu", function()
    local t = assert(ws.tensor{shape = {16}, pinned = true, fill = 1})
    assert.are.equal("cpu", t:device().name)
    assert.are.equal(1, t:get(16))
  end)
end)

describe("wrong argument types", function()
  it("say which type was expected", function()
    local t = cpu_tensor{shape = {2}}
    local ok, err = pcall(t.copy_, t, nil)
    assert.is_false(ok)
    assert.matches("ws.Tensor expected, got nil", err, 1, true)
    ok, err = pcall(t.shape, "x")
    assert.is_false(ok)
    assert.matches("ws.Tensor expected, got string", err, 1, true)
  end)
end)

describe("views", function()
  it("narrow with 1-based dim and start", function()
    local t = cpu_tensor{shape = {4, 3}, name = "m"}
    for i = 1, 12 do t:set(i, i) end
    local v = t:narrow(1, 2, 2)
    assert.are.same({2, 3}, v:shape())
    assert.are.equal(4, v:get(1))   -- row 2, col 1
    assert.are.equal(9, v:get(2, 3))
    local c = t:narrow(2, 3, 1)
    assert.is_false(c:is_contiguous())
    assert.are.same({3, 6, 9, 12}, {c:get(1), c:get(2), c:get(3), c:get(4)})
    v:fill(0)
    assert.are.equal(0, t:get(2, 1))
    assert.are.equal(10, t:get(4, 1))
  end)

  it("narrow out of range names the tensor", function()
    local t = cpu_tensor{shape = {4, 3}, name = "m"}
    local ok, err = pcall(t.narrow, t, 1, 3, 5)
    assert.is_false(ok)
    assert.matches("out of range", err, 1, true)
    assert.matches("'m'", err, 1, true)
    assert.has_error(function() t:narrow(3, 1, 1) end)
    assert.has_error(function() t:narrow(1, 0, 1) end)
  end)

  it("view/reshape infer -1; flat and bytes", function()
    local t = cpu_tensor{shape = {2, 6}}
    for i = 1, 12 do t:set(i, i) end
    local v = t:view{3, -1}
    assert.are.same({3, 4}, v:shape())
    assert.are.equal(8, v:get(2, 4))
    assert.are.same({4, 3}, t:reshape{4, 3}:shape())
    assert.are.same({12}, t:flat():shape())
    local b = t:bytes()
    assert.are.equal("u8", b:dtype())
    assert.are.same({48}, b:shape())
    -- 1.0f is 0x3F800000: little-endian bytes 00 00 80 3F
    assert.are.same({0, 0, 0x80, 0x3F}, {b:get(1), b:get(2), b:get(3), b:get(4)})
    assert.has_error(function() t:view{5, -1} end)
    assert.has_error(function() t:narrow(2, 1, 3):view{6} end)
  end)

  it("stay alive after the base is freed", function()
    local t = cpu_tensor{shape = {8}, name = "base"}
    for i = 1, 8 do t:set(i, i * 10) end
    local v = t:narrow(1, 3, 4)
    t:free()
    assert.is_true(t:is_freed())
    collectgarbage(); collectgarbage()
    assert.are.equal(30, v:get(1))
    assert.are.equal(60, v:get(4))
  end)
end)

describe("free", function()
  it("is idempotent and later use names the tensor", function()
    local t = cpu_tensor{shape = {2}, name = "gone"}
    t:free()
    t:free()
    assert.is_true(t:is_freed())
    local ok, err = pcall(t.fill, t, 1)
    assert.is_false(ok)
    assert.matches("'gone' was freed", err, 1, true)
    assert.matches("freed 'gone'", tostring(t), 1, true)
  end)

  it("happens at the end of a <close> block", function()
    collectgarbage()
    collectgarbage("stop") -- only the <close> may free memory in this test
    local held_before = ws.device("cpu"):memory().held
    local ref
    do
      local t <close> = cpu_tensor{shape = {1024, 1024}, name = "scoped"}
      ref = t
      assert.is_true(ws.device("cpu"):memory().held >= held_before + 4 * 1024 * 1024)
    end
    assert.is_true(ref:is_freed())
    local held_after = ws.device("cpu"):memory().held
    collectgarbage("restart")
    assert.are.equal(held_before, held_after)
  end)

  it("freed tensors in a list are named", function()
    local a = cpu_tensor{shape = {2}, name = "a"}
    local b = cpu_tensor{shape = {2}, name = "b"}
    b:free()
    local ok, err = pcall(ws.copy_many, {a}, {b})
    assert.is_false(ok)
    assert.matches("'b' was freed", err, 1, true)
    ok, err = pcall(ws.copy_many, {a}, {nil, a})
    assert.is_false(ok)
    assert.matches("ws.Tensor expected, got nil", err, 1, true)
  end)
end)

describe("copy_ and conversions", function()
  local values = {1.0, -2.75, 0.1, 1 / 3, 3.14159265, 1000.5, -0.000123, 65504, 1e-3}

  it("f32 -> bf16 rounds to nearest even", function()
    local n = #values
    local src = cpu_tensor{shape = {n}}
    local dst = cpu_tensor{shape = {n}, dtype = "bf16"}
    for i, v in ipairs(values) do src:set(i, v) end
    assert.are.equal(dst, dst:copy_(src))
    for i, v in ipairs(values) do assert.are.equal(bf16_round(v), dst:get(i)) end
    -- exactly halfway between two bf16 values: ties go to the even mantissa
    local tie = bits_f32(0x3F808000) -- 1 + 2^-8
    src:set(1, tie)
    dst:copy_(src)
    assert.are.equal(1.0, dst:get(1))
    src:set(1, bits_f32(0x3F818000)) -- 1 + 3*2^-8 rounds up to 1 + 2^-6
    dst:copy_(src)
    assert.are.equal(bits_f32(0x3F820000), dst:get(1))
  end)

  it("f32 -> f16 rounds to nearest even", function()
    local src = cpu_tensor{shape = {#values}}
    local dst = cpu_tensor{shape = {#values}, dtype = "f16"}
    for i, v in ipairs(values) do src:set(i, v) end
    dst:copy_(src)
    for i, v in ipairs(values) do
      if math.abs(v) >= 2 ^ -14 then assert.are.equal(f16_round(v), dst:get(i)) end
    end
  end)

  it("f32 -> fp8 (e4m3) spot values", function()
    local src = cpu_tensor{shape = {4}}
    local dst = cpu_tensor{shape = {4}, dtype = "fp8"}
    src:set(1, 1.0); src:set(2, 0.3); src:set(3, -2.75); src:set(4, 448)
    dst:copy_(src)
    assert.are.same({1.0, 0.3125, -2.75, 448}, {dst:get(1), dst:get(2), dst:get(3), dst:get(4)})
  end)

  it("bf16 -> f32 is exact and strided copies work", function()
    local a = cpu_tensor{shape = {3, 4}, dtype = "bf16"}
    for i = 1, 12 do a:set(i, i + 0.5) end
    local col = a:narrow(2, 2, 2)
    local out = cpu_tensor{shape = {3, 2}}
    out:copy_(col)
    assert.are.same({2.5, 3.5, 6.5, 7.5, 10.5, 11.5},
      {out:get(1), out:get(2), out:get(3), out:get(4), out:get(5), out:get(6)})
  end)

  it("shape mismatch names both tensors", function()
    local a = cpu_tensor{shape = {2, 3}, name = "a"}
    local b = cpu_tensor{shape = {3, 2}, name = "b"}
    local ok, err = pcall(function() a:copy_(b) end)
    assert.is_false(ok)
    assert.matches("bad argument #1 to 'copy_' (shape mismatch: dst 'a' is f32[2,3], src 'b' f32[3,2])",
      err, 1, true)
  end)
end)

describe("element access", function()
  it("get/set with flat and multi indices, bounds named", function()
    local t = cpu_tensor{shape = {2, 3}, dtype = "i32", name = "ints"}
    t:fill(0)
    t:set(2, 3, 7)
    assert.are.equal(7, t:get(6))
    assert.is_true(math.type(t:get(6)) == "integer")
    local ok, err = pcall(t.get, t, 7)
    assert.is_false(ok)
    assert.matches("'ints'", err, 1, true)
    assert.has_error(function() t:get(3, 1) end)
    assert.has_error(function() t:get(1, 1, 1) end)
  end)
end)

describe("random_ and checksum", function()
  it("random_ matches the documented generator", function()
    local t = cpu_tensor{shape = {64}}
    t:random_(42)
    for i = 1, 64 do assert.are.equal(random_elem(42, i - 1, 1.0), t:get(i)) end
    t:random_(7, 0.5, 1000)
    for i = 1, 64 do assert.are.equal(random_elem(7, 1000 + i - 1, 0.5), t:get(i)) end
  end)

  it("checksum is the sum of per-element hashes (Lua integer, wraps)", function()
    local t = cpu_tensor{shape = {100}}
    t:random_(3)
    local want = 0
    for i = 1, 100 do want = want + hash_elem(i - 1, f32_bits(t:get(i))) end
    local got = t:checksum()
    assert.is_true(math.type(got) == "integer")
    assert.are.equal(want, got)
  end)

  it("composes across shards with first_index", function()
    local t = cpu_tensor{shape = {10, 8}}
    t:random_(11)
    local a, b = t:narrow(1, 1, 4), t:narrow(1, 5, 6)
    assert.are.equal(t:checksum(), a:checksum(0) + b:checksum(32))
    assert.are_not.equal(t:checksum(), a:checksum() + b:checksum())
  end)

  it("checksum as another dtype hashes the converted bits", function()
    local t = cpu_tensor{shape = {16}}
    t:random_(5)
    local h = cpu_tensor{shape = {16}, dtype = "bf16"}:copy_(t)
    assert.are.equal(h:checksum(), t:checksum(0, "bf16"))
    assert.are_not.equal(t:checksum(), t:checksum(0, "bf16"))
  end)
end)

describe("to", function()
  it("copies to a device and dtype, keeping the name", function()
    local t = cpu_tensor{shape = {4}, name = "x"}
    t:random_(1)
    local h = t:to("cpu", "bf16")
    assert.are.equal("bf16", h:dtype())
    assert.are.equal("x", h:name())
    for i = 1, 4 do assert.are.equal(bf16_round(t:get(i)), h:get(i)) end
    local same = t:to(ws.device("cpu"))
    assert.are.equal(t:checksum(), same:checksum())
  end)
end)

describe("batched", function()
  it("pack / unpack round-trip, with and without offsets", function()
    local a = cpu_tensor{shape = {2, 2}, name = "a"}
    local b = cpu_tensor{shape = {3}, name = "b"}
    a:random_(1); b:random_(2)
    local flat = cpu_tensor{shape = {7}}
    ws.pack(flat, {a, b})
    assert.are.equal(a:get(4), flat:get(4))
    assert.are.equal(b:get(1), flat:get(5))
    local a2 = cpu_tensor{shape = {2, 2}}
    local b2 = cpu_tensor{shape = {3}}
    ws.unpack(flat, {a2, b2})
    assert.are.equal(a:checksum(), a2:checksum())
    assert.are.equal(b:checksum(), b2:checksum())

    local big = cpu_tensor{shape = {16}, fill = 0}
    ws.pack(big, {a, b}, {8, 0}) -- 0-based element offsets
    assert.are.equal(b:get(3), big:get(3))
    assert.are.equal(a:get(1), big:get(9))
    assert.are.equal(0, big:get(4))
    assert.has_error(function() ws.pack(big, {a, b}, {0}) end)
  end)

  it("pack converts to the flat tensor's dtype", function()
    local a = cpu_tensor{shape = {5}}
    a:random_(9)
    local flat = cpu_tensor{shape = {5}, dtype = "bf16"}
    ws.pack(flat, {a})
    for i = 1, 5 do assert.are.equal(bf16_round(a:get(i)), flat:get(i)) end
  end)

  it("copy_many copies each pair and checks shapes", function()
    local srcs, dsts = {}, {}
    for i = 1, 10 do
      srcs[i] = cpu_tensor{shape = {i}}
      srcs[i]:random_(i)
      dsts[i] = cpu_tensor{shape = {i}, dtype = "f32"}
    end
    ws.copy_many(dsts, srcs)
    for i = 1, 10 do assert.are.equal(srcs[i]:checksum(), dsts[i]:checksum()) end
    local ok, err = pcall(ws.copy_many, {dsts[2]}, {srcs[3]})
    assert.is_false(ok)
    assert.matches("shape mismatch", err, 1, true)
    assert.has_error(function() ws.copy_many({dsts[1]}, {}) end)
  end)

  it("checksums returns every tensor's checksum, exactly, as an i64 tensor", function()
    local a = cpu_tensor{shape = {1000}, dtype = "bf16"}
    a:random_(3)
    local b = a:narrow(1, 11, 90)
    local empty = a:narrow(1, 1, 0)
    local sums = ws.checksums({a, b, empty}, {0, 10, 7}, "f32")
    assert.are.equal("i64", sums:dtype())
    assert.are.same({3}, sums:shape())
    assert.are.equal(a:checksum(0, "f32"), sums:get(1))
    assert.are.equal(b:checksum(10, "f32"), sums:get(2))
    assert.are.equal(0, sums:get(3))
    -- Without first indices and dtype: index 0, each tensor's own dtype.
    assert.are.equal(b:checksum(), ws.checksums({b}):get(1))
    local ok, err = pcall(ws.checksums, {a, b}, {0})
    assert.is_false(ok)
    assert.matches("2 tensors but 1 first indices", err, 1, true)
    b:free()
    ok, err = pcall(ws.checksums, {a, b})
    assert.is_false(ok)
    assert.matches("freed", err, 1, true)
  end)

  it("i64 elements keep all 64 bits through get and set", function()
    local t = cpu_tensor{shape = {3}, dtype = "i64"}
    t:set(1, (1 << 62) + 3)
    t:set(2, -1)
    t:set(3, math.mininteger)
    assert.are.equal((1 << 62) + 3, t:get(1))
    assert.are.equal(-1, t:get(2))
    assert.are.equal(math.mininteger, t:get(3))
    assert.is_true(math.type(t:get(1)) == "integer")
  end)
end)
