local ws = require("ws")
local s = assert(ws.sender(arg[1], { slot_bytes = 4096 }))
local junk = {}
local e = setmetatable({}, { __index = function(_, k)
    if k == "name" then return string.rep("w", 60) .. "_" .. tostring(math.random(1e9)) end  -- a fresh long string, not kept
    if k == "dtype" then return "bf16" end
    if k == "shape" then
        collectgarbage(); collectgarbage()
        for i = 1, 1000 do junk[i] = string.rep("Z", 60) .. "_" .. tostring(1e9 + i) end
        return { 8 }
    end
end })
local ok, err = pcall(s.begin, s, { e }, 1, true)
print("begin:", ok, err)
