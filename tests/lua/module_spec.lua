-- module_spec.lua: the misc part of the ws table (version, log, clocks,
-- memory, interruption, reference copy) and the module search path.
local ws = require "ws"

describe("ws misc", function()
  it("has a version string", function()
    assert.is_string(ws.version)
    assert.matches("^%d+%.%d+", ws.version)
  end)

  it("now_ms is monotonic milliseconds", function()
    local a = ws.now_ms()
    local t0 = os.clock()
    while os.clock() - t0 < 0.01 do end
    local b = ws.now_ms()
    assert.is_true(b - a >= 5 and b - a < 5000)
  end)

  it("host_memory reports rss and peak in bytes", function()
    local m = ws.host_memory()
    assert.is_true(m.rss > 1024 * 1024)
    assert.is_true(m.peak_rss >= m.rss)
  end)

  it("interrupted is false when nobody pressed Ctrl-C", function()
    assert.is_false(ws.interrupted())
  end)

  it("log formats its arguments", function()
    assert.has_no_error(function() ws.log("spec %s %d", "log", 3) end)
    assert.has_error(function() ws.log("%d", "x") end)
  end)

  it("reference_copy copies bytes exactly", function()
    local a = ws.tensor{shape = {1000}, device = "cpu"}:random_(4)
    local b = ws.tensor{shape = {1000}, device = "cpu"}
    assert.are.equal(b, ws.reference_copy(b, a))
    assert.are.equal(a:checksum(), b:checksum())
    local c = ws.tensor{shape = {999}, device = "cpu"}
    assert.has_error(function() ws.reference_copy(c, a) end)
  end)
end)

describe("module search path", function()
  it("finds the host's lua/ws through a searcher of its own", function()
    local _, file = require("ws.json")
    assert.matches("/lua/ws/json%.lua$", file)
    assert.is_nil(package.path:find("/lua/?.lua", 1, true))
  end)

  -- Scripts written for wshost use the global; scripts written for lua5.4 +
  -- ws.so require it: in wshost both must reach the one table (one default
  -- device, one set of metatables), not ws.so loaded beside it.
  it("in wshost, the global ws and require 'ws' are the same table", function()
    assert.is_table(_G.ws)
    assert.is_function(_G.ws.tensor)
    assert.are.equal(_G.ws, ws)
  end)
end)
