-- device_spec.lua: ws.device, ws.devices, ws.default_device, ws.Device and
-- ws.Event; cpu/cuda agreement when a GPU is present (pending otherwise).
local ws = require "ws"

local cuda, cuda_why, cuda_code = ws.device("cuda")

local function need_cuda()
  if not cuda then
    io.stderr:write("device_spec: no GPU, cpu/cuda agreement pending: ", tostring(cuda_why), "\n")
    pending("no usable GPU: " .. tostring(cuda_why))
  end
end

describe("ws.device", function()
  it("returns the cpu device with its fields", function()
    local cpu = ws.device("cpu")
    assert.are.equal("cpu", cpu.name)
    assert.are.equal("cpu", cpu.kind)
    assert.are.equal(0, cpu.index)
    assert.is_string(cpu.description)
    assert.are.equal("ws.Device(cpu '" .. cpu.description .. "')", tostring(cpu))
    assert.are.equal(cpu, ws.device("cpu"))
    assert.are.equal(cpu, ws.device(cpu))
  end)

  it("raises for an unknown name", function()
    local ok, err = pcall(ws.device, "gpu")
    assert.is_false(ok)
    assert.matches("unknown device 'gpu'", err, 1, true)
    assert.has_error(function() ws.device("cuda:x") end)
    assert.has_error(function() ws.device(42) end)
  end)

  it("returns nil, message, 'device' for an absent GPU", function()
    if cuda then
      assert.are.equal("cuda", cuda.kind)
      local n = #ws.devices() - 1
      local d, msg, code = ws.device("cuda:" .. n)
      assert.is_nil(d)
      assert.are.equal("device", code)
      assert.is_string(msg)
    else
      assert.are.equal("device", cuda_code)
      assert.is_string(cuda_why)
      local d, msg, code = ws.device("cuda:3")
      assert.is_nil(d)
      assert.are.equal("device", code)
      assert.is_string(msg)
    end
  end)

  it("lists usable devices, cpu last", function()
    local list = ws.devices()
    assert.is_true(#list >= 1)
    assert.are.equal(ws.device("cpu"), list[#list])
    for i = 1, #list - 1 do assert.are.equal("cuda", list[i].kind) end
    assert.are.equal(cuda ~= nil, #list > 1)
  end)

  it("reports the default device and why", function()
    local d, why = ws.default_device()
    assert.is_string(why)
    assert.is_true(why ~= "")
    if os.getenv("WSHOST_DEVICE") == "cpu" then assert.are.equal("cpu", d.name) end
  end)
end)

describe("ws.Device methods", function()
  it("memory() tracks held and peak bytes", function()
    local cpu = ws.device("cpu")
    collectgarbage()
    local m0 = cpu:memory()
    for _, k in ipairs{"total", "free", "held", "peak"} do assert.is_number(m0[k]) end
    assert.is_true(m0.total > 0)
    local t = ws.tensor{shape = {1 << 20}, device = cpu}
    local m1 = cpu:memory()
    assert.is_true(m1.held >= m0.held + 4 * (1 << 20))
    assert.is_true(m1.peak >= m1.held)
    t:free()
    local m2 = cpu:memory()
    assert.are.equal(m1.held - 4 * (1 << 20), m2.held)
    assert.is_true(m2.peak >= m1.held)
    cpu:reset_peak()
    assert.are.equal(cpu:memory().held, cpu:memory().peak)
  end)

  it("synchronize() and events time work", function()
    local cpu = ws.device("cpu")
    cpu:synchronize()
    local a, b = cpu:event(), cpu:event()
    assert.has_error(function() a:elapsed_ms(b) end)
    a:record()
    local t0 = ws.now_ms()
    while ws.now_ms() - t0 < 20 do end
    b:record()
    local ms = a:elapsed_ms(b)
    assert.is_true(ms >= 15 and ms < 5000, "elapsed " .. ms)
    assert.matches("^ws.Event%(cpu", tostring(a))
  end)
end)

describe("cpu/cuda agreement", function()
  it("random_ and checksum are identical", function()
    need_cuda()
    local c = ws.tensor{shape = {1000, 37}, device = "cpu"}:random_(17, 0.25, 5)
    local g = ws.tensor{shape = {1000, 37}, device = cuda}:random_(17, 0.25, 5)
    assert.are.equal(c:checksum(), g:checksum())
    assert.are.equal(c:checksum(3, "bf16"), g:checksum(3, "bf16"))
  end)

  it("conversions give the same bits", function()
    need_cuda()
    for _, dt in ipairs{"bf16", "f16", "fp8"} do
      local c = ws.tensor{shape = {4096}, device = "cpu"}:random_(1, 300)
      local g = c:to(cuda)
      local c2 = ws.tensor{shape = {4096}, dtype = dt, device = "cpu"}:copy_(c)
      local g2 = ws.tensor{shape = {4096}, dtype = dt, device = cuda}:copy_(g)
      assert.are.equal(c2:checksum(), g2:checksum(), dt)
      assert.are.equal(c2:checksum(), g2:to("cpu"):checksum(), dt)
    end
  end)

  it("copies across devices, strided, and pack/unpack on cuda", function()
    need_cuda()
    local c = ws.tensor{shape = {64, 32}, device = "cpu"}:random_(2)
    local g = c:to(cuda)
    local col = ws.tensor{shape = {64, 8}, device = "cpu"}:copy_(g:narrow(2, 5, 8))
    assert.are.equal(c:narrow(2, 5, 8):checksum(), col:checksum())
    local flat = ws.tensor{shape = {64 * 32 + 10}, device = cuda, dtype = "bf16"}
    ws.pack(flat, {g, g:narrow(1, 1, 1):narrow(2, 1, 10):to(cuda)})
    -- batched ops run on one device: unpack on cuda, then bring it back
    local back = ws.tensor{shape = {64, 32}, device = cuda, dtype = "bf16"}
    ws.unpack(flat, {back})
    assert.are.equal(c:checksum(0, "bf16"), back:to("cpu"):checksum())
    local pinned = ws.tensor{shape = {64, 32}, pinned = true, device = cuda}
    pinned:copy_(g)
    assert.are.equal(c:checksum(), pinned:checksum())
  end)

  it("pools sleep and wake on cuda", function()
    need_cuda()
    local MiB = 1024 * 1024
    local p = assert(ws.pool{device = cuda, tag = "gpu.weights", bytes = 64 * MiB})
    local t = p:tensor{shape = {1024, 1024}, dtype = "bf16", name = "gpu.w"}:random_(3)
    local sum = t:checksum()
    local free_awake = cuda:memory().free
    assert.is_true(p:sleep(1, "gpu step"))
    assert.is_true(cuda:memory().free >= free_awake + 32 * MiB, "sleep must return GPU memory")
    assert.is_true(p:wake())
    assert.are.equal(sum, t:checksum())
    p:sleep(2, "gpu step 2")
    p:wake()
    local ok, err = pcall(t.checksum, t)
    assert.is_false(ok)
    assert.matches("'gpu.w'", err, 1, true)
    assert.matches("'gpu.weights'", err, 1, true)
    t:random_(3)
    assert.are.equal(sum, t:checksum())
    t:free()
    p:free()
  end)

  it("cuda out of memory returns nil, message, 'nomem'", function()
    need_cuda()
    local t, msg, code = ws.tensor{shape = {1 << 45}, device = cuda}
    assert.is_nil(t)
    assert.are.equal("nomem", code)
    assert.is_string(msg)
  end)
end)
