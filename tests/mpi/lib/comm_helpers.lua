-- comm_helpers.lua: shared by the multi-rank scripts in tests/mpi (loaded with dofile;
-- kept in lib/ so CTest, which runs tests/mpi/*.lua, does not run it as a test).
local ws = require "ws"

local H = {}

-- check(cond, fmt, ...): raises "rank R: <message>" at the caller when cond is
-- false; counted.n is how many checks ran.
function H.checker(rank)
  local counted = {n = 0}
  local function check(cond, fmt, ...)
    counted.n = counted.n + 1
    if not cond then error(string.format("rank %d: " .. fmt, rank, ...), 2) end
  end
  return check, counted
end

function H.ceil_div(a, b) return (a + b - 1) // b end

function H.tensor(n, dtype, name)
  return ws.tensor{shape = {n}, dtype = dtype or "f32", device = "cpu", name = name}
end

-- Raises with both values and the context when they differ.
function H.eq(got, want, what)
  if got ~= want then
    error(string.format("%s: got %s, want %s", what, tostring(got), tostring(want)), 2)
  end
end

-- Exact i64 access through the byte view (get/set go through double).
function H.set_i64(t, i, v)
  local b = t:bytes()
  for k = 0, 7 do b:set(8 * (i - 1) + k + 1, (v >> (8 * k)) & 0xff) end
end

function H.get_i64(t, i)
  local b, v = t:bytes(), 0
  for k = 0, 7 do v = v | (b:get(8 * (i - 1) + k + 1) << (8 * k)) end
  return v
end

-- pcall that must fail with a message containing `needle` (plain text).
function H.raises(needle, f, ...)
  local ok, err = pcall(f, ...)
  if ok then error("expected an error containing '" .. needle .. "', got success", 2) end
  if not tostring(err):find(needle, 1, true) then
    error("expected an error containing '" .. needle .. "', got: " .. tostring(err), 2)
  end
  return err
end

return H
