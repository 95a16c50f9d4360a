-- pipelines/primitives.lua: a short tour of the ws primitives a sync pipeline
-- is built from: devices, tensors and conversions, views, packing into one
-- bucket, checksums, and a sleepable pool.
--
--   wshost pipelines/primitives.lua [--device cpu|cuda[:N]]
local ws = require "ws"
local must = require("ws.errors").must

local dev_name
for i = 1, #arg do
  if arg[i] == "--device" then dev_name = arg[i + 1] end
end
local dev, why
if dev_name then
  dev, why = ws.device(dev_name)
  if not dev then error("primitives: " .. why, 0) end
  why = "--device"
else
  dev, why = ws.default_device()
end
ws.log("device %s (%s): %s", dev.name, why, dev.description)

-- A trainer-side weight in f32 and the engine's bf16 copy of it.
local hidden, inter = 256, 768
local w = must("primitives", ws.tensor{shape = {inter, hidden}, device = dev,
  name = "mlp.up_proj.weight"})
w:random_(1, 0.02)
local e = must("primitives", ws.tensor{shape = {inter, hidden}, dtype = "bf16", device = dev,
  name = "engine.mlp.up_proj.weight"})
e:copy_(w)
ws.log("%s -> %s", tostring(w), tostring(e))
ws.log("checksum as bf16: trainer %016x, engine %016x", w:checksum(0, "bf16"), e:checksum())

-- FSDP-style shards compose: the checksum of the whole equals the sum over
-- shards, each hashed from its global first index.
local half = inter // 2
local s1, s2 = w:narrow(1, 1, half), w:narrow(1, half + 1, half)
assert(s1:checksum(0) + s2:checksum(half * hidden) == w:checksum(), "shards must compose")
ws.log("shard checksums compose: %016x", w:checksum())

-- Pack several tensors into one bucket (one transfer), unpack on the other side.
local params = {}
for i = 1, 4 do
  params[i] = must("primitives", ws.tensor{shape = {64, 32}, device = dev, name = "p" .. i})
  params[i]:random_(10 + i)
end
local bucket = must("primitives", ws.tensor{shape = {4 * 64 * 32}, dtype = "bf16", device = dev,
  name = "bucket"})
ws.pack(bucket, params)
local outs = {}
for i = 1, 4 do
  outs[i] = must("primitives", ws.tensor{shape = {64, 32}, dtype = "bf16", device = dev})
end
ws.unpack(bucket, outs)
for i = 1, 4 do assert(outs[i]:checksum() == params[i]:checksum(0, "bf16")) end
ws.log("packed %d tensors into %s and back", #params, tostring(bucket))

-- A sleepable pool: level 1 keeps the weights, level 2 discards them.
local pool = must("primitives", ws.pool{device = dev, tag = "weights", bytes = 8 * 1024 * 1024})
local pw = must("primitives", pool:tensor{shape = {inter, hidden}, dtype = "bf16",
  name = "pool.up_proj.weight"})
pw:copy_(w)
local sum = pw:checksum()
must("primitives", pool:sleep(1, "demo level 1"))
must("primitives", pool:wake())
assert(pw:checksum() == sum, "level-1 sleep must restore the weights")
ws.log("sleep(1)/wake kept the weights: %s", tostring(pool))
must("primitives", pool:sleep(2, "demo level 2"))
must("primitives", pool:wake())
local ok, err = pcall(pw.checksum, pw)
assert(not ok)
ws.log("after sleep(2), reading fails as it should:\n  %s", err)
pw:copy_(w)
assert(pw:checksum() == sum)
ws.log("re-sent the weights; checksum matches again")
pw:free()
pool:free()
local mem = dev:memory()
ws.log("done: %s holds %d bytes (peak %d); host rss %.1f MiB", dev.name, mem.held, mem.peak,
  ws.host_memory().rss / 1048576)
