-- errors_spec.lua: ws.errors, the one-line errors for failures of the
-- environment (what they carry, how they print, how they pass through).
local ws = require "ws"
local errors = require "ws.errors"

local HUGE = 25 * 1024 * 1024 * 1024 * 1024 -- f32 elements: 100 TiB

describe("ws.errors", function()
  it("check passes every value through when the first is set", function()
    local a, b, c = errors.check(1, "two", "three")
    assert.are.same({ 1, "two", "three" }, { a, b, c })
    assert.are.equal(false, select(2, errors.check(0, false)))
  end)

  it("check turns nil, msg, code into an error object", function()
    local ok, e = pcall(errors.check, nil, "pool 'kv': out of memory", "nomem")
    assert.is_false(ok)
    assert.is_true(errors.is(e))
    assert.is_true(errors.is(e, "nomem"))
    assert.is_false(errors.is(e, "io"))
    assert.are.equal("nomem", e.code)
    assert.are.equal("pool 'kv': out of memory", e.message)
    assert.are.equal("pool 'kv': out of memory", tostring(e))
    assert.are.equal("failed: pool 'kv': out of memory", "failed: " .. e)
  end)

  it("check gives a code and a message when the call gave none", function()
    local _, e = pcall(errors.check, nil)
    assert.are.equal("env", e.code)
    assert.are.equal("failed", e.message)
  end)

  it("check re-raises an error object given as the message", function()
    local first = errors.new("io", "cannot open x")
    local _, e = pcall(errors.check, false, first)
    assert.are.equal(first, e)
  end)

  it("raise formats the message", function()
    local _, e = pcall(errors.raise, "device", "device '%s' is unusable (%d)", "cuda:3", 7)
    assert.are.equal("device 'cuda:3' is unusable (7)", tostring(e))
    assert.are.equal("device", e.code)
  end)

  it("is tells strings and other tables apart", function()
    assert.is_false(errors.is("nomem"))
    assert.is_false(errors.is({ code = "nomem", message = "x" }))
    assert.is_false(errors.is(nil))
  end)

  it("context prefixes the message and keeps the code; strings stay strings", function()
    local e = errors.context(errors.new("nomem", "out of memory"), "step %d", 3)
    assert.is_true(errors.is(e, "nomem"))
    assert.are.equal("step 3: out of memory", tostring(e))
    assert.are.equal("step 3: boom", errors.context("boom", "step %d", 3))
    local t = {}
    assert.are.equal(t, errors.context(t, "step"))
  end)

  it("carries a ws call's own message and code", function()
    local _, e = pcall(function()
      return errors.check(ws.tensor{ shape = { HUGE }, device = "cpu", name = "huge" })
    end)
    assert.is_true(errors.is(e, "nomem"))
    assert.matches("tensor 'huge'", tostring(e))
    assert.matches("out of memory", tostring(e))
  end)
end)
