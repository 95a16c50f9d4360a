-- Configuration parsing: defaults, command-line overrides and the messages
-- for unknown keys and bad values.
local config = require("ws.config")

local schema = {
    steps = { default = 5, type = "integer", min = 1 },
    sleep_level = { default = 1, type = "enum", values = { 1, 2 } },
    free_cache_engine = { default = true, type = "boolean" },
    bucket_mb = { default = 512, type = "number", min = 0.001 },
    model = { default = "tiny", type = "enum", values = { "qwen3-0.6b", "tiny" } },
    device = { default = "auto", type = "string" },
}

local function message_of(fn)
    local ok, err = pcall(fn)
    assert.is_false(ok, "expected an error")
    assert.is_true(config.is_error(err), "expected a config error, got " .. tostring(err))
    return tostring(err)
end

describe("config.parse", function()
    it("returns the defaults for an empty command line", function()
        local cfg, opts = config.parse(schema, {})
        assert.are.same({ steps = 5, sleep_level = 1, free_cache_engine = true, bucket_mb = 512,
                          model = "tiny", device = "auto" }, cfg)
        assert.is_nil(opts.json)
    end)

    it("applies typed overrides and --json", function()
        local cfg, opts = config.parse(schema, { "steps=20", "sleep_level=2",
            "free_cache_engine=false", "bucket_mb=0.5", "model=qwen3-0.6b", "--json", "out.jsonl" })
        assert.are.equal(20, cfg.steps)
        assert.are.equal("integer", math.type(cfg.steps))
        assert.are.equal(2, cfg.sleep_level)
        assert.is_false(cfg.free_cache_engine)
        assert.are.equal(0.5, cfg.bucket_mb)
        assert.are.equal("qwen3-0.6b", cfg.model)
        assert.are.equal("out.jsonl", opts.json)
        local _, o2 = config.parse(schema, { "--json=x.jsonl" })
        assert.are.equal("x.jsonl", o2.json)
    end)

    it("names an unknown key and lists the known ones", function()
        assert.are.equal("unknown config key 'step' (known: bucket_mb, device, " ..
                         "free_cache_engine, model, sleep_level, steps)",
                         message_of(function() config.parse(schema, { "step=3" }) end))
    end)

    it("explains bad values", function()
        assert.are.equal("config key 'steps' expects an integer, got '2.5'",
                         message_of(function() config.parse(schema, { "steps=2.5" }) end))
        assert.are.equal("config key 'steps' expects an integer, got 'many'",
                         message_of(function() config.parse(schema, { "steps=many" }) end))
        assert.are.equal("config key 'steps' must be >= 1, got 0",
                         message_of(function() config.parse(schema, { "steps=0" }) end))
        assert.are.equal("config key 'sleep_level' must be one of 1, 2, got '3'",
                         message_of(function() config.parse(schema, { "sleep_level=3" }) end))
        assert.are.equal("config key 'free_cache_engine' expects a boolean (true/false), got 'maybe'",
                         message_of(function() config.parse(schema, { "free_cache_engine=maybe" }) end))
        assert.are.equal("config key 'steps' given twice",
                         message_of(function() config.parse(schema, { "steps=1", "steps=2" }) end))
        assert.are.equal("cannot parse argument 'steps': expected key=value, --json FILE or --help",
                         message_of(function() config.parse(schema, { "steps" }) end))
        assert.are.equal("--json needs a file name",
                         message_of(function() config.parse(schema, { "--json" }) end))
    end)
end)

describe("config.resolve", function()
    it("takes typed values from a table (in-process sweeps)", function()
        local cfg = config.resolve(schema, { steps = 3, free_cache_engine = false, sleep_level = 2 })
        assert.are.equal(3, cfg.steps)
        assert.is_false(cfg.free_cache_engine)
        assert.are.equal(2, cfg.sleep_level)
        assert.are.equal("unknown config key 'sleep' (known: bucket_mb, device, " ..
                         "free_cache_engine, model, sleep_level, steps)",
                         message_of(function() config.resolve(schema, { sleep = 2 }) end))
        assert.are.equal("config key 'device' expects a string, got number",
                         message_of(function() config.resolve(schema, { device = 3 }) end))
    end)
end)
