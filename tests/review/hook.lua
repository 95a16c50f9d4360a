-- A debug hook that is not an interrupt must not stop a wait; the stop hook
-- that Ctrl-C sets (all events, count 1) must. engine.py's sleep takes 1 s.
local ws = require("ws")
local s = assert(ws.sender(arg[1], { slot_bytes = 4096 }))
local ok, err = pcall(s.sleep, s, 1)
print("sleep(1) without a hook:", ok, err)
debug.sethook(function() end, "", 1000000) -- a profiler's count hook
ok, err = pcall(s.sleep, s, 1)
debug.sethook()
print("sleep(1) with a profiler's hook:", ok, err)
debug.sethook(function() end, "l") -- a coverage tool's line hook
ok, err = pcall(s.sleep, s, 1)
debug.sethook()
print("sleep(1) with a line hook:", ok, err)
debug.sethook(function() end, "crl", 1) -- what Ctrl-C sets
ok, err = pcall(s.sleep, s, 1)
debug.sethook()
print("sleep(1) with the stop hook's shape:", ok, err)
s:close()
