-- save_spec.lua: ws.save_safetensors and ws.save_checkpoint, read back with
-- io.open and string.unpack (the header length, the bytes) and ws.json (the
-- header and the checkpoint index), not with the writer's own code.
local ws = require "ws"
local json = require "ws.json"

local function tmpdir()
  local p = os.tmpname()
  os.remove(p)
  assert(os.execute("mkdir -p '" .. p .. "'"))
  return p
end

local function rmtree(p) os.execute("rm -rf '" .. p .. "'") end

-- Names in dir, hidden ones included, sorted.
local function listdir(dir)
  local names = {}
  local h = assert(io.popen("ls -A '" .. dir .. "'"))
  for line in h:lines() do names[#names + 1] = line end
  h:close()
  table.sort(names)
  return names
end

local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

-- A safetensors file as { header_len, header (decoded), data (string) }.
local function load(path)
  local s = read_file(path)
  local n = string.unpack("<I8", s)
  return { header_len = n, header_text = s:sub(9, 8 + n), header = json.decode(s:sub(9, 8 + n)),
           data = s:sub(9 + n) }
end

-- The bytes of entry `name` in a loaded file.
local function bytes_of(file, name)
  local off = file.header[name].data_offsets
  return file.data:sub(off[1] + 1, off[2])
end

local function bf16_value(bits) return (string.unpack("<f", string.pack("<I4", bits << 16))) end

describe("ws.save_safetensors", function()
  local dir
  before_each(function() dir = tmpdir() end)
  after_each(function() rmtree(dir) end)

  it("writes the header, 8-byte aligned data and the tensors' bytes", function()
    local w = ws.tensor{shape = {3, 5}, dtype = "f32", name = "w"}
    w:random_(7, 1.0)
    local b = ws.tensor{shape = {3}, dtype = "bf16"}
    b:set(1, 1.5); b:set(2, -2); b:set(3, 0.1)
    local ids = ws.tensor{shape = {2}, dtype = "i64"}
    ids:set(1, (1 << 40) + 7); ids:set(2, -5)
    local path = dir .. "/m.safetensors"
    assert.is_true(ws.save_safetensors(path, {"layer.w", "layer.b", "ids"}, {w, b, ids},
                                       {metadata = {step = "12", format = "pt"}}))
    local f = load(path)
    assert.are.equal(0, (8 + f.header_len) % 8)
    assert.matches("^{.*} *$", f.header_text)
    assert.are.same({step = "12", format = "pt"}, f.header.__metadata__)
    assert.are.same({dtype = "F32", shape = {3, 5}, data_offsets = {0, 60}}, f.header["layer.w"])
    assert.are.same({dtype = "BF16", shape = {3}, data_offsets = {60, 66}}, f.header["layer.b"])
    assert.are.same({dtype = "I64", shape = {2}, data_offsets = {66, 82}}, f.header.ids)
    assert.are.equal(82, #f.data)
    local wb = bytes_of(f, "layer.w")
    for i = 1, 15 do
      assert.are.equal(w:get(i), (string.unpack("<f", wb, 4 * (i - 1) + 1)))
    end
    local bb = bytes_of(f, "layer.b")
    for i = 1, 3 do
      assert.are.equal(b:get(i), bf16_value((string.unpack("<I2", bb, 2 * (i - 1) + 1))))
    end
    local x, y = string.unpack("<i8i8", bytes_of(f, "ids"))
    assert.are.same({(1 << 40) + 7, -5}, {x, y})
    assert.are.same({"m.safetensors"}, listdir(dir))
  end)

  it("omits __metadata__ without metadata and keeps zero-size tensors", function()
    local e = ws.tensor{shape = {0, 4}, dtype = "f16"}
    local u = ws.tensor{shape = {5}, dtype = "u8"}
    u:fill(9)
    assert.is_true(ws.save_safetensors(dir .. "/z.safetensors", {"empty", "u"}, {e, u}))
    local f = load(dir .. "/z.safetensors")
    assert.is_nil(f.header.__metadata__)
    assert.are.same({dtype = "F16", shape = {0, 4}, data_offsets = {0, 0}}, f.header.empty)
    assert.are.equal(string.rep("\9", 5), bytes_of(f, "u"))
  end)

  it("reports progress and stops cleanly when the progress function raises", function()
    local t = ws.tensor{shape = {1000}, dtype = "f32"}
    t:fill(1)
    local path = dir .. "/p.safetensors"
    local seen = {}
    assert.is_true(ws.save_safetensors(path, {"t"}, {t}, {staging_mb = 1000 / 1048576,
      progress = function(done, total) seen[#seen + 1] = {done, total} end}))
    assert.are.same({4000, 4000}, seen[#seen])
    assert.is_true(#seen >= 4)
    local before = read_file(path)
    t:fill(2)
    local ok, err = pcall(ws.save_safetensors, path, {"t"}, {t}, {staging_mb = 1000 / 1048576,
      progress = function(done) if done >= 2000 then error("stop here") end end})
    assert.is_false(ok)
    assert.matches("stop here", err, 1, true)
    assert.are.equal(before, read_file(path)) -- the old file is untouched
    assert.are.same({"p.safetensors"}, listdir(dir)) -- and no temporary is left
  end)

  it("returns nil, message, 'io' when the file cannot be written", function()
    local t = ws.tensor{shape = {2}, dtype = "f32"}
    local path = dir .. "/missing/x.safetensors"
    local ok, msg, code = ws.save_safetensors(path, {"t"}, {t})
    assert.is_nil(ok)
    assert.are.equal("io", code)
    assert.matches(path, msg, 1, true)
    assert.matches("No such file or directory", msg, 1, true)
    assert.are.same({}, listdir(dir))
  end)

  it("raises on misuse, naming what is wrong", function()
    local t = ws.tensor{shape = {4, 4}, dtype = "f32", name = "t"}
    local p = dir .. "/x.safetensors"
    local function raises(pattern, ...)
      local ok, err = pcall(ws.save_safetensors, ...)
      assert.is_false(ok)
      assert.matches(pattern, err, 1, true)
    end
    raises("names for 1 tensors", p, {"a", "b"}, {t})
    raises("names[1] must be a string", p, {1}, {t})
    raises("ws.Tensor expected", p, {"a"}, {"not a tensor"})
    raises("unknown option 'meta'", p, {"a"}, {t}, {meta = {}})
    raises("metadata['step'] must be a string", p, {"a"}, {t}, {metadata = {step = 3}})
    raises("staging_mb must be", p, {"a"}, {t}, {staging_mb = 0})
    raises("tensor name 'a' is given twice", p, {"a", "a"}, {t, t})
    local cols = t:narrow(2, 2, 2)
    raises("(tensor 2, 'cols')", p, {"x", "cols"}, {t, cols})
    raises("not contiguous", p, {"x", "cols"}, {t, cols})
    local gone = ws.tensor{shape = {2}, dtype = "f32", name = "gone"}
    gone:free()
    raises("'gone' was freed", p, {"g"}, {gone})
    assert.are.same({}, listdir(dir))
  end)
end)

describe("ws.save_checkpoint", function()
  local dir
  before_each(function() dir = tmpdir() end)
  after_each(function() rmtree(dir) end)

  local function tensors(sizes)
    local names, ts = {}, {}
    for i, n in ipairs(sizes) do
      ts[i] = ws.tensor{shape = {n}, dtype = "u8"}
      ts[i]:fill(i)
      names[i] = "model.layers." .. (i - 1) .. ".weight"
    end
    return names, ts
  end

  it("splits into shards like save_pretrained and writes the index last", function()
    local names, ts = tensors({40, 60, 100, 250, 30})
    local ok, files = ws.save_checkpoint(dir .. "/ck", names, ts,
                                         {max_shard_bytes = 100, metadata = {epoch = "1"}})
    assert.is_true(ok)
    local shard = {}
    for i = 1, 4 do shard[i] = string.format("model-%05d-of-00004.safetensors", i) end
    assert.are.same({dir .. "/ck/" .. shard[1], dir .. "/ck/" .. shard[2], dir .. "/ck/" .. shard[3],
                     dir .. "/ck/" .. shard[4], dir .. "/ck/model.safetensors.index.json"}, files)
    local index = json.decode(read_file(dir .. "/ck/model.safetensors.index.json"))
    assert.are.equal(480, index.metadata.total_size)
    -- 40+60 fit exactly; 100 alone; 250 is over the limit, alone; then 30.
    local want = {shard[1], shard[1], shard[2], shard[3], shard[4]}
    for i, name in ipairs(names) do assert.are.equal(want[i], index.weight_map[name]) end
    for i, name in ipairs(names) do
      local f = load(dir .. "/ck/" .. want[i])
      assert.are.same({format = "pt", epoch = "1"}, f.header.__metadata__)
      assert.are.equal(string.rep(string.char(i), ts[i]:nbytes()), bytes_of(f, name))
    end
    table.sort(shard)
    shard[#shard + 1] = "model.safetensors.index.json"
    table.sort(shard)
    assert.are.same(shard, listdir(dir .. "/ck"))
  end)

  it("writes one file and no index when everything fits", function()
    local names, ts = tensors({10, 20})
    local ok, files = ws.save_checkpoint(dir, names, ts, {prefix = "adapter_model"})
    assert.is_true(ok)
    assert.are.same({dir .. "/adapter_model.safetensors"}, files)
    assert.are.same({"adapter_model.safetensors"}, listdir(dir))
    local f = load(files[1])
    assert.are.same({format = "pt"}, f.header.__metadata__)
    assert.are.same({10, 30}, f.header[names[2]].data_offsets)
  end)

  it("is what ws.safetensors opens, tensor for tensor", function()
    local names, ts = {}, {}
    for i, dt in ipairs{"f32", "bf16", "f16", "fp8", "u8", "i32", "i64"} do
      ts[i] = ws.tensor{shape = {3, i}, dtype = dt}
      ts[i]:random_(i, 2.0)
      names[i] = "t." .. dt
    end
    local ok = ws.save_checkpoint(dir, names, ts, {max_shard_bytes = 40, metadata = {k = "v"}})
    assert.is_true(ok)
    local ck <close> = assert(ws.safetensors(dir))
    assert.are.same(names, ck:names())
    assert.is_true(#ck:files() > 1)
    for i, name in ipairs(names) do
      local info = ck:info(name)
      assert.are.same(ts[i]:shape(), info.shape)
      assert.are.equal(ts[i]:dtype(), info.dtype)
      assert.are.equal(ts[i]:checksum(), ck:tensor(name):checksum())
    end
  end)

  it("raises on misuse and returns nil, message, 'io' for the file system", function()
    local names, ts = tensors({10})
    local ok, err = pcall(ws.save_checkpoint, dir, names, ts, {max_shard_bytes = 0})
    assert.is_false(ok)
    assert.matches("max_shard_bytes must be an integer > 0", err, 1, true)
    ok, err = pcall(ws.save_checkpoint, dir, names, ts, {shard_size = 10})
    assert.is_false(ok)
    assert.matches("unknown option 'shard_size'", err, 1, true)
    local file = dir .. "/plain"
    assert(io.open(file, "w")):close()
    local res, msg, code = ws.save_checkpoint(file, names, ts)
    assert.is_nil(res)
    assert.are.equal("io", code)
    assert.matches("'" .. file .. "' exists and is not a directory", msg, 1, true)
  end)
end)

-- A progress function is Lua code running in the middle of a save: whatever it
-- does to the tensors, the argument tables or the target, the save either
-- writes what it was given or raises, and leaves no temporary file behind.
describe("ws.save_* with a progress function that interferes", function()
  local dir
  before_each(function() dir = tmpdir() end)
  after_each(function() rmtree(dir) end)

  local function raises(pattern, ...)
    local ok, err = pcall(...)
    assert.is_false(ok)
    assert.matches(pattern, tostring(err), 1, true)
    return err
  end

  it("raises, naming the tensor, when the progress function frees it", function()
    local t = ws.tensor{shape = {100000}, dtype = "f32"}
    t:fill(3)
    local path = dir .. "/f.safetensors"
    local err = raises("was freed", ws.save_safetensors, path, {"model.w"}, {t},
      {staging_mb = 4096 / 1048576, progress = function() t:free() end})
    assert.matches("'model.w'", err, 1, true)
    assert.are.same({}, listdir(dir))
  end)

  it("raises, naming the tensor, when the progress function puts its pool to sleep", function()
    local pool <close> = assert(ws.pool{device = "cpu", tag = "save.sleep", bytes = 1024 * 1024})
    local t = pool:tensor{shape = {100000}, dtype = "f32"}
    t:fill(3)
    local path = dir .. "/s.safetensors"
    local err = raises("asleep", ws.save_safetensors, path, {"model.w"}, {t},
      {staging_mb = 4096 / 1048576, progress = function() assert(pool:sleep(2)) end})
    assert.matches("'model.w'", err, 1, true)
    assert.are.same({}, listdir(dir))
    assert(pool:wake())
    t:free()
  end)

  it("keeps the names, tensors and metadata it was given when the tables change", function()
    local names, ts = {}, {}
    for i = 1, 2 do
      -- long names are not interned: the collector frees them once unreferenced
      names[i] = string.rep("model.layers." .. i .. ".", 8) .. "weight"
      ts[i] = ws.tensor{shape = {64}, dtype = "u8"}
      ts[i]:fill(i)
    end
    local want2 = names[2]:sub(1)
    local meta = {[string.rep("key.", 12)] = string.rep("value.", 12)}
    local calls = 0
    local ok = ws.save_checkpoint(dir, names, ts, {max_shard_bytes = 64, metadata = meta,
      progress = function()
        calls = calls + 1
        if calls == 1 then
          names[2] = nil; ts[2] = nil
          for k in pairs(meta) do meta[k] = nil end
          collectgarbage(); collectgarbage()
        end
      end})
    assert.is_true(ok)
    local f = load(dir .. "/model-00002-of-00002.safetensors")
    assert.are.equal(string.rep("\2", 64), bytes_of(f, want2))
    assert.are.same({format = "pt", [string.rep("key.", 12)] = string.rep("value.", 12)},
                    f.header.__metadata__)
  end)

  it("publishes an intact file when the progress function saves to the same path", function()
    local outer = ws.tensor{shape = {4000}, dtype = "u8"}
    outer:fill(1)
    local inner = ws.tensor{shape = {10}, dtype = "u8"}
    inner:fill(2)
    local path = dir .. "/same.safetensors"
    local nested = false
    assert.is_true(ws.save_safetensors(path, {"outer"}, {outer}, {staging_mb = 1000 / 1048576,
      progress = function()
        if not nested then
          nested = true
          assert.is_true(ws.save_safetensors(path, {"inner"}, {inner}))
        end
      end}))
    local f = load(path)
    assert.is_nil(f.header.inner)
    assert.are.equal(string.rep("\1", 4000), bytes_of(f, "outer"))
    assert.are.same({"same.safetensors"}, listdir(dir))
  end)

  it("raises the progress function's error from its final call and publishes nothing", function()
    local path = dir .. "/e.safetensors"
    raises("boom", ws.save_safetensors, path, {}, {}, {progress = function() error("boom") end})
    assert.are.same({}, listdir(dir))
    local t = ws.tensor{shape = {10}, dtype = "u8"}
    raises("boom", ws.save_safetensors, path, {"t"}, {t},
           {progress = function(done, total) if done == total then error("boom") end end})
    assert.are.same({}, listdir(dir))
    raises("boom", ws.save_checkpoint, dir, {}, {}, {progress = function() error("boom") end})
    assert.are.same({}, listdir(dir))
  end)

  it("raises for an embedded NUL in a name, the path, the metadata or the prefix", function()
    local t = ws.tensor{shape = {2}, dtype = "f32"}
    local p = dir .. "/n.safetensors"
    raises("names[1] contains a NUL byte", ws.save_safetensors, p, {"w\0evil"}, {t})
    raises("path contains a NUL byte", ws.save_safetensors, p .. "\0x", {"w"}, {t})
    raises("metadata key 'k' contains a NUL byte", ws.save_safetensors, p, {"w"}, {t},
           {metadata = {["k\0x"] = "v"}})
    raises("metadata['k'] contains a NUL byte", ws.save_safetensors, p, {"w"}, {t},
           {metadata = {k = "v\0x"}})
    raises("directory contains a NUL byte", ws.save_checkpoint, dir .. "\0x", {"w"}, {t})
    raises("prefix contains a NUL byte", ws.save_checkpoint, dir, {"w"}, {t},
           {prefix = "m\0x"})
    assert.are.same({}, listdir(dir))
  end)

  it("raises for a prefix that makes file names too long", function()
    local t = ws.tensor{shape = {2}, dtype = "f32"}
    raises("is too long", ws.save_checkpoint, dir, {"w"}, {t}, {prefix = string.rep("p", 300)})
    raises("is too long", ws.save_checkpoint, dir, {"w"}, {t}, {prefix = string.rep("p", 5000)})
    assert.are.same({}, listdir(dir))
  end)
end)

describe("the writer's shard rule and small files, for callers that write shards themselves", function()
    it("ws.shard_split splits as save_pretrained does and names the files", function()
        local shards, files = ws.shard_split({ 4, 4, 9, 1, 1 }, 8)
        -- 4+4 fits 8; 9 alone (larger than the limit); 1+1.
        assert.are.same({ 1, 1, 2, 3, 3 }, shards)
        assert.are.same({ "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                          "model-00003-of-00003.safetensors" }, files)
        shards, files = ws.shard_split({ 3 }, 8, "adapter_model")
        assert.are.same({ 1 }, shards)
        assert.are.same({ "adapter_model.safetensors" }, files)
        assert.has_error(function() ws.shard_split({ -1 }, 8) end)
    end)

    it("ws.save_index and ws.write_text write whole files", function()
        local dir = os.tmpname()
        os.remove(dir)
        assert(ws.mkdir(dir))
        assert(ws.save_index(dir, { "a", "b" }, { 1, 2 }, 40))
        local f = assert(io.open(dir .. "/model.safetensors.index.json"))
        local index = require("ws.json").decode(f:read("a"))
        f:close()
        assert.are.equal(40, index.metadata.total_size)
        assert.are.equal("model-00002-of-00002.safetensors", index.weight_map.b)
        assert(ws.write_text(dir .. "/config.json", "{}\n"))
        f = assert(io.open(dir .. "/config.json"))
        assert.are.equal("{}\n", f:read("a"))
        f:close()
        local ok, msg, code = ws.write_text(dir .. "/missing/x.json", "{}")
        assert.is_nil(ok)
        assert.are.equal("io", code)
        assert.matches("missing", msg)
        os.execute("rm -rf '" .. dir .. "'")
    end)
end)
