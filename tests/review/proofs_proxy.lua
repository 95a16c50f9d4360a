local ws = require("ws")
local n = 0
local e = setmetatable({}, { __index = function(_, k)
    if k == "tensor" or k == "label" then
        n = n + 1
        return n <= 2 and "w" or string.rep("X", 1 << 20)  -- 2 bytes counted, 1 MiB copied
    end
    return 0
end })
local p = ws.proofs({ e })
print("made", p)
collectgarbage()
print("survived")
