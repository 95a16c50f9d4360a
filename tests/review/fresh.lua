-- ws.verify's server-mode path with a stand-in engine: which checks reach the engine process?
local ws = require("ws")
local verify = require("ws.verify")
local cpu = ws.device("cpu")
local t = assert(ws.tensor{ shape = { 8 }, dtype = "bf16", device = cpu, name = "p" })
local calls = {}
local engine = { epoch = 0, sender = { verify = function(_, proofs, sums)
    calls[#calls + 1] = sums and "checksums" or "validity" end } }
local pairs_ = { { src = { view = t, first = 0, name = "p", trainable = false }, dst_offset = 0,
                   dst_tensor = "w", dst_name = "w" } }
pairs_.remote = { engine = engine, proofs = ws.proofs{ { tensor = "w", label = "p", offset = 0, count = 8 } } }
local trainer = { loads = 0, generation = 0 }
local ctx = { trainer = trainer, world = 1 }
-- step 1: a sync whose FINISH the engine accepted
verify.remote_sums(pairs_, ctx); verify.remote_proven(pairs_, engine)
verify.check(pairs_, ctx) ; print("step 1 rollout, verify=all: engine asked", #calls, "times")
-- steps 2..4: plan not sent, no sleep (free_cache_engine=false), frozen base unchanged
for step = 2, 4 do trainer.generation = trainer.generation + 1; verify.check(pairs_, ctx) end
print("steps 2-4 rollouts, verify=all: engine asked", #calls, "times in all")
-- step 5: the plan is sent again and the engine REFUSES the finish (send_remote raises before
-- remote_proven); a caller that catches the error and rolls out anyway:
verify.check(pairs_, ctx)
print("after a refused finish, verify=all: engine asked", #calls, "times in all")
