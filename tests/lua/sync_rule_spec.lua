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
            local ctx = { state = { base_sync_done = done },
                          cfg = { free_cache_engine = free, sleep_level = level } }
            assert.are.equal(want, verl:need_base(ctx))
        end)
    end

    -- What a user reads before choosing a key=value: docs/pipelines.md's table
    -- must list every key of the schema with the default the schema applies.
    it("its configuration keys and defaults are the ones docs/pipelines.md lists", function()
        local documented = {}
        for line in io.lines("docs/pipelines.md") do
            local keys, defaults = line:match("^| (`[%w_`, ]+`) | ([^|]+) |")
            if keys then
                local names, values = {}, {}
                for k in keys:gmatch("`([%w_]+)`") do names[#names + 1] = k end
                for v in defaults:gmatch("[^,]+") do
                    values[#values + 1] = (v:gsub("^%s+", ""):gsub("%s+$", ""):gsub("`", ""))
                end
                assert.are.equal(#names, #values, line)
                -- "(none)": an empty string default (a path not given).
                for i, k in ipairs(names) do
                    documented[k] = values[i] == "(none)" and "" or values[i]
                end
            end
        end
        for key, spec in pairs(verl.schema) do
            assert.is_not_nil(documented[key], "key '" .. key .. "' is not in docs/pipelines.md")
            assert.are.equal(documented[key], tostring(spec.default), "default of " .. key)
        end
        for key in pairs(documented) do
            assert.is_not_nil(verl.schema[key], "docs/pipelines.md lists '" .. key .. "'")
        end
    end)

    it("the skip_base fixture differs from the rule only after a level-2 sleep", function()
        local skip = dofile("tests/e2e/fixtures/skip_base.lua")
        local cfg = { free_cache_engine = true, sleep_level = 2 }
        assert.is_false(skip:need_base({ state = { base_sync_done = true }, cfg = cfg }))
        assert.is_true(skip:need_base({ state = { base_sync_done = false }, cfg = cfg }))
    end)
end)
