-- safetensors_spec.lua: ws.safetensors and ws.Checkpoint on files written
-- here with string.pack (values known independently of the reader).
local ws = require "ws"

local dir
local function path(name) return dir .. "/" .. name end

-- A safetensors file from a list of {name, dtype, shape, packfmt, values}.
local function write_st(file, tensors, metadata)
  local header, data = {}, {}
  local offset = 0
  local fields = {}
  for _, t in ipairs(tensors) do
    local raw = string.pack("<" .. string.rep(t[4], #t[5]), table.unpack(t[5]))
    local dims = {}
    for i, d in ipairs(t[3]) do dims[i] = tostring(d) end
    fields[#fields + 1] = string.format('"%s": {"dtype": "%s", "shape": [%s], ' ..
      '"data_offsets": [%d, %d]}', t[1], t[2], table.concat(dims, ", "), offset, offset + #raw)
    offset = offset + #raw
    data[#data + 1] = raw
  end
  if metadata then
    local kv = {}
    for k, v in pairs(metadata) do kv[#kv + 1] = string.format('"%s": "%s"', k, v) end
    table.insert(fields, 1, '"__metadata__": {' .. table.concat(kv, ", ") .. "}")
  end
  header[1] = "{" .. table.concat(fields, ", ") .. "}"
  local h = header[1]
  local f = assert(io.open(path(file), "wb"))
  f:write(string.pack("<I8", #h), h, table.concat(data))
  f:close()
end

local function write_text(file, text)
  local f = assert(io.open(path(file), "w"))
  f:write(text)
  f:close()
end

-- bf16 bits of small exact values: the top half of the f32 bits.
local function bf16(x) return string.unpack("<I4", string.pack("<f", x)) >> 16 end

setup(function()
  dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p '" .. dir .. "/one' '" .. dir .. "/sharded' '" .. dir .. "/miss'"))
  write_st("one/model.safetensors", {
    {"w", "F32", {2, 3}, "f", {1.5, -2, 3, 4, 5, 6.25}},
    {"ids", "I64", {2}, "i8", {7, -(1 << 40)}},
  }, {format = "pt"})
  write_text("sharded/model.safetensors.index.json", [[
{"metadata": {"total_size": 22},
 "weight_map": {
  "layers.1.w": "model-00002-of-00002.safetensors",
  "layers.0.w": "model-00001-of-00002.safetensors",
  "layers.0.b": "model-00001-of-00002.safetensors"}}
]])
  write_st("sharded/model-00001-of-00002.safetensors", {
    {"layers.0.w", "BF16", {2, 2}, "I2", {bf16(1), bf16(-0.5), bf16(2), bf16(0.25)}},
    {"layers.0.b", "U8", {2}, "B", {9, 200}},
  })
  write_st("sharded/model-00002-of-00002.safetensors", {
    {"layers.1.w", "I32", {1, 1, 2}, "i4", {-3, 100000}},
  })
  write_text("miss/model.safetensors.index.json",
             '{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}')
  write_st("miss/s1.safetensors", {{"a", "U8", {1}, "B", {1}}})
end)

teardown(function()
  if dir then os.execute("rm -rf '" .. dir .. "'") end
end)

describe("ws.safetensors", function()
  it("opens a single file by directory or by path", function()
    for _, p in ipairs({path("one"), path("one/model.safetensors")}) do
      local ck = assert(ws.safetensors(p))
      assert.are.same({"w", "ids"}, ck:names())
      assert.are.equal(2, #ck)
      assert.are.equal(2, ck:count())
      assert.are.same({"model.safetensors"}, ck:files())
      assert.are.same({format = "pt"}, ck:metadata())
      assert.are.equal(p, ck:path())
      assert.are.equal("ws.Checkpoint('" .. p .. "', 1 file, 2 tensors)", tostring(ck))
      ck:free()
    end
  end)

  it("describes tensors with info", function()
    local ck = assert(ws.safetensors(path("one")))
    assert.are.same({dtype = "f32", shape = {2, 3}, numel = 6, nbytes = 24,
                     file = "model.safetensors"}, ck:info("w"))
    assert.are.same({dtype = "i64", shape = {2}, numel = 2, nbytes = 16,
                     file = "model.safetensors"}, ck:info("ids"))
    assert.is_nil(ck:info("absent"))
    ck:free()
  end)

  it("hands out read-only tensors holding the file's values", function()
    local ck = assert(ws.safetensors(path("one")))
    local w = ck:tensor("w")
    assert.are.equal("ws.Tensor(f32[2,3] cpu 'w')", tostring(w))
    local want = {1.5, -2, 3, 4, 5, 6.25}
    for i = 1, 6 do assert.are.equal(want[i], w:get(i)) end
    local ids = ck:tensor("ids")
    assert.are.equal(7, ids:get(1))
    assert.are.equal(-(1 << 40), ids:get(2))
    local ok, err = pcall(function() w:set(1, 0) end)
    assert.is_false(ok)
    assert.matches("tensor 'w' is read%-only %(mapped from '" .. path("one"):gsub("%p", "%%%0") ..
                   "/model%.safetensors'%); copy it into a tensor of its own to change it", err)
    ok, err = pcall(function() w:fill(0) end)
    assert.is_false(ok)
    assert.matches("is read%-only", err)
    -- A copy of its own can change.
    local mine = w:to("cpu")
    mine:set(1, 9)
    assert.are.equal(9, mine:get(1))
    assert.are.equal(1.5, w:get(1))
    ck:free()
  end)

  it("keeps tensors valid after the checkpoint is freed or collected", function()
    local ck = assert(ws.safetensors(path("sharded")))
    local b = ck:tensor("layers.0.b")
    ck:free()
    ck:free() -- idempotent
    assert.are.equal("ws.Checkpoint('" .. path("sharded") .. "' freed)", tostring(ck))
    local ok, err = pcall(ck.names, ck)
    assert.is_false(ok)
    assert.matches("was freed", err)
    ck = nil
    collectgarbage()
    collectgarbage()
    assert.are.equal(200, b:get(2))
    do
      local ck2 <close> = assert(ws.safetensors(path("one")))
      b = ck2:tensor("ids")
    end
    collectgarbage()
    assert.are.equal(7, b:get(1))
  end)

  it("reads a sharded checkpoint through its index", function()
    for _, p in ipairs({path("sharded"), path("sharded/model.safetensors.index.json")}) do
      local ck = assert(ws.safetensors(p))
      assert.are.same({"layers.1.w", "layers.0.w", "layers.0.b"}, ck:names())
      assert.are.same({"model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"},
                      ck:files())
      assert.are.same({total_size = "22"}, ck:metadata())
      assert.are.equal("ws.Checkpoint('" .. p .. "', 2 files, 3 tensors)", tostring(ck))
      assert.are.same({dtype = "i32", shape = {1, 1, 2}, numel = 2, nbytes = 8,
                       file = "model-00002-of-00002.safetensors"}, ck:info("layers.1.w"))
      local w = ck:tensor("layers.0.w")
      assert.are.same({1, -0.5, 2, 0.25}, {w:get(1), w:get(2), w:get(3), w:get(4)})
      assert.are.equal(100000, ck:tensor("layers.1.w"):get(2))
      ck:free()
    end
  end)

  it("raises for a tensor the checkpoint lacks, and for wrong arguments", function()
    local ck = assert(ws.safetensors(path("sharded")))
    local ok, err = pcall(function() return ck:tensor("layers.9.w") end)
    assert.is_false(ok)
    assert.matches("safetensors checkpoint '.*sharded' has no tensor 'layers.9.w'", err)
    assert.has_error(function() ck:info(3) end)
    assert.has_error(function() ws.safetensors() end)
    assert.has_error(function() ws.safetensors({}) end)
    ck:free()
  end)

  it("returns nil, message, code for missing and malformed checkpoints", function()
    local ck, msg, code = ws.safetensors(path("absent"))
    assert.is_nil(ck)
    assert.are.equal("io", code)
    assert.matches("absent': cannot open: No such file or directory", msg)

    ck, msg, code = ws.safetensors(path("miss"))
    assert.is_nil(ck)
    assert.are.equal("io", code)
    assert.matches("shard 's2.safetensors' %(listed in the index for tensor 'b'%)", msg)

    write_st("miss/s2.safetensors", {{"c", "U8", {1}, "B", {1}}})
    ck, msg, code = ws.safetensors(path("miss"))
    assert.is_nil(ck)
    assert.are.equal("format", code)
    assert.matches("tensor 'b' is listed in the index for shard 's2.safetensors', which does " ..
                   "not hold it", msg)

    write_st("miss/s2.safetensors", {{"b", "F64", {1}, "d", {1}}})
    ck, msg, code = ws.safetensors(path("miss"))
    assert.is_nil(ck)
    assert.are.equal("format", code)
    assert.matches("s2.safetensors': tensor 'b': dtype 'F64' is not supported", msg)
  end)
end)
