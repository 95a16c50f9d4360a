local ws = require("ws")
local s = assert(ws.sender(arg[1], { slot_bytes = 4096 }))
local ok, err = pcall(s.sleep, s, 1)
print("sleep(1) without a hook:", ok, err)
debug.sethook(function() end, "", 1000000) -- a profiler's / coverage tool's count hook
ok, err = pcall(s.sleep, s, 1)
print("sleep(1) with a debug hook set:", ok, err)
debug.sethook()
s:close()
