-- PR #5147's rule, as pipelines/verl_lora.lua states it: the base weights go
-- to the engine only when it does not hold them.
local verl = dofile("pipelines/verl_lora.lua")

describe("verl_lora need_base", function()
    -- {base_sync_done, free_cache_engine, sleep_level, expected}
    local truth = {
        { false, false, 1, true }, { false, false, 2, true },
        { false, true, 1, true },  { false, true, 2, true },
        { true, false, 1, false }, { true, false, 2, false },
        { true, true, 1, false },  { true, true, 2, true },
    }
    for _, row in ipairs(truth) do
        local done, free, level, want = table.unpack(row)
        it(string.format("base_sync_done=%s free_cache_engine=%s sleep_level=%d -> %s",
                         done, free, level, want), function()
            assert.are.equal(want, verl.need_base({ base_sync_done = done },
                                                  { free_cache_engine = free, sleep_level = level }))
        end)
    end

    it("loads without running and exposes its config schema", function()
        assert.are.equal("verl_lora", verl.name)
        assert.are.equal(32, verl.schema.lora_rank.default)
        assert.are.equal("qwen3-0.6b", verl.schema.model.default)
        assert.is_function(verl.run)
    end)

    it("the skip_base fixture differs from the rule only after a level-2 sleep", function()
        local skip = dofile("tests/e2e/fixtures/skip_base.lua")
        assert.is_false(skip.need_base({ base_sync_done = true },
                                       { free_cache_engine = true, sleep_level = 2 }))
        assert.is_true(skip.need_base({ base_sync_done = false },
                                      { free_cache_engine = true, sleep_level = 2 }))
    end)
end)
