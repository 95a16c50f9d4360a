-- ws.must: the one way the library uses a ws call that reports a failure of
-- the environment (out of memory, an unusable device) by returning
-- nil, msg, code instead of raising.
--
--   local pool = must("engine", ws.pool{ ... })
--   must("engine", pool:sleep(1, note))
--
-- On success it returns the call's results; otherwise it raises one line,
-- "<what>: <msg>" (the message already names the pool or tensor at fault), so
-- a failure can never be dropped and read later as a success. A policy that
-- wants to react to a failure (fall back, shrink) calls the function itself
-- and looks at the code.
return function(what, ok, msg, ...)
    if ok == nil or ok == false then
        msg = tostring(msg or "failed without a message")
        if what and msg:sub(1, #what + 1) ~= what .. ":" then msg = what .. ": " .. msg end
        error(msg, 0)
    end
    return ok, msg, ...
end
