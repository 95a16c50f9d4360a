-- Server mode's ws.verify (pairs.remote) against a stand-in engine process
-- that records what it is asked. docs/pipelines.md: verify=all proves every
-- plan by checksum at every rollout, and so sees a stray write into a tensor
-- after its sync's FINISH; in-process, M.check checksums the engine's
-- tensors every time, and in server mode the engine process is asked every
-- time too, also after a FINISH it refused.
local ws = require("ws")
local verify = require("ws.verify")

local function setup()
    local t = assert(ws.tensor{ shape = { 8 }, dtype = "bf16", device = "cpu", name = "p" })
    local asked = {}
    local engine = { epoch = 0, sender = { verify = function(_, _, sums)
        asked[#asked + 1] = sums and "checksums" or "validity"
    end } }
    local plist = { { src = { view = t, first = 0, name = "p", trainable = false },
                      dst_offset = 0, dst_tensor = "w", dst_name = "w" } }
    plist.remote = { engine = engine,
                     proofs = ws.proofs{ { tensor = "w", label = "p", offset = 0, count = 8 } } }
    local ctx = { trainer = { loads = 0, generation = 0 }, world = 1 }
    return plist, engine, ctx, asked, t
end

describe("server mode verify=all", function()
    it("asks the engine process for checksums at every rollout of an unsent plan", function()
        local plist, engine, ctx, asked, t = setup()
        verify.remote_sums(plist, ctx)
        verify.remote_proven(plist, engine) -- step 1: the sync's FINISH was proven
        for step = 2, 4 do                  -- no send, no sleep (free_cache_engine=false)
            ctx.trainer.generation = step
            verify.check(plist, ctx)
        end
        assert.equals(3, #asked)
        verify.release(plist)
        t:free()
    end)

    it("asks again after a sync of the plan whose FINISH was refused", function()
        local plist, engine, ctx, asked, t = setup()
        verify.remote_sums(plist, ctx)
        verify.remote_proven(plist, engine)
        -- The plan is sent again: begin, buckets, and the engine refuses the
        -- FINISH (its tensors are invalid there); send_remote raises before
        -- remote_proven. A caller that goes on to a rollout:
        verify.check(plist, ctx)
        assert.equals(1, #asked)
        verify.release(plist)
        t:free()
    end)
end)
