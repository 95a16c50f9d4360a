-- ws.errors: failures of the environment, reported in one line.
--
-- Two kinds of failure reach a user. A bug or a misuse (a wrong argument, a
-- freed tensor) is raised as a string, and the host prints it with the
-- traceback that locates it. A failure of the environment (out of memory, an
-- absent device, an unreadable file) comes back from the ws calls as
-- `nil, message, code`; when the library cannot go on without the result it
-- raises an error object of this module instead of a string. wshost (and
-- stock lua5.4 with ws.so) prints such an object as its message alone, one
-- line with no traceback: `wshost: <message>`, exit status 1. Anything that
-- catches errors sees the object: `tostring(e)` (and `..`) give the message,
-- `e.code` the code.
--
--   local errors = require "ws.errors"
--   local t = errors.check(ws.tensor{shape = {n}, name = "x"})  -- t, or raises
--
-- errors.check(v, msg, code, ...)  returns all its arguments when v is
--     neither nil nor false (a drop-in for assert); otherwise raises
--     errors.new(code or "env", msg). An error object given as msg is raised
--     as it is.
-- errors.raise(code, fmt, ...)  raises errors.new(code, string.format(fmt, ...)).
-- errors.new(code, msg)  the error object {code = code, message = msg}.
-- errors.is(e [, code])  whether e is such an object (with that code).
-- errors.context(e, fmt, ...)  e with string.format(fmt, ...) .. ": " in
--     front of its message, same code; a string error stays a string.
-- errors.must(what, v, msg, code, ...)  the library's way to use a ws call
--     that reports failure as nil, msg, code: returns all but `what` when v
--     is neither nil nor false; otherwise raises errors.new(code or "env",
--     "<what>: <msg>") (`what` is not repeated when msg already starts with
--     it), so a failure is never dropped and read later as a success:
--         local must = require("ws.errors").must
--         must("engine", pool:sleep(1, note))
--     A policy that reacts to a failure (a smaller bucket, a level-2 sleep)
--     calls the function itself and looks at the code.
--
-- Codes are the ones the C API returns ("nomem", "device", "io", "format",
-- "comm", "timeout") or any other short word naming the kind of failure.
local M = {}

local Error = { __name = "ws.Error" }
Error.__tostring = function(e) return e.message end
-- Code written for string errors (`"failed: " .. err`) keeps working.
Error.__concat = function(a, b) return tostring(a) .. tostring(b) end

function M.new(code, msg)
    return setmetatable({ code = tostring(code or "env"), message = tostring(msg) }, Error)
end

function M.is(e, code)
    return getmetatable(e) == Error and (code == nil or e.code == code)
end

function M.raise(code, fmt, ...)
    error(M.new(code, string.format(fmt, ...)), 0)
end

function M.check(v, msg, code, ...)
    if v ~= nil and v ~= false then return v, msg, code, ... end
    if M.is(msg) then error(msg, 0) end
    error(M.new(code, msg == nil and "failed" or msg), 0)
end

function M.context(e, fmt, ...)
    local prefix = string.format(fmt, ...)
    if M.is(e) then return M.new(e.code, prefix .. ": " .. e.message) end
    if type(e) == "string" then return prefix .. ": " .. e end
    return e
end

function M.must(what, v, msg, code, ...)
    if v ~= nil and v ~= false then return v, msg, code, ... end
    if M.is(msg) then
        if what then error(M.context(msg, "%s", what), 0) end
        error(msg, 0)
    end
    msg = msg == nil and "failed without a message" or tostring(msg)
    if what and msg:sub(1, #what + 1) ~= what .. ":" then msg = what .. ": " .. msg end
    error(M.new(code, msg), 0)
end

return M
