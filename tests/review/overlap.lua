-- Two trainer parameters a (1..4) and b (5..8) land, by a layout mistake, on the
-- same range [0,4) of engine tensor w (8 elements); [4,8) is never written.
local ws = require("ws")
local name = arg[1]
local N = 2048
local cpu = ws.device("cpu")
local a = assert(ws.tensor{ shape = { N }, dtype = "bf16", device = cpu, name = "a" })
local b = assert(ws.tensor{ shape = { N }, dtype = "bf16", device = cpu, name = "b" })
for i = 1, N do a:set(i, i % 100); b:set(i, 100 + i % 100) end
local s = assert(ws.sender(name, { slot_bytes = 4096 }))
local plan = assert(ws.plan{ bucket_bytes = 4096, device = cpu, name = "p", role = "remote", sender = s })
plan:add({ a, b }, nil, { N, N }, nil, nil, { "bf16", "bf16" })
plan:targets({ 0, 0 }, { 0, 0 })
local proofs = ws.proofs{ { tensor = "w", label = "a", offset = 0, count = N },
                          { tensor = "w", label = "b", offset = 0, count = N } }
local sums = assert(ws.checksums({ a, b }, { 0, 0 }, "bf16"))
s:begin({ { name = "w", dtype = "bf16", shape = { 2 * N } } }, 1, false, false)
plan:execute()
local ok, err = pcall(s.finish, s, proofs, sums)
print("finish accepted:", ok, err)
ok, err = pcall(s.verify, s, proofs)
print("verify (validity) accepted:", ok, err)
ok, err = pcall(s.verify, s, proofs, sums)
print("verify (checksums) accepted:", ok, err)
plan:free()
s:close()
