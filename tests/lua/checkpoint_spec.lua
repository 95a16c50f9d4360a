-- checkpoint_spec.lua: ws.checkpoint and the trainer on a tiny Hugging Face
-- directory written by tests/fixtures/hf_tiny.py (a two-shard Qwen3 and a
-- PEFT adapter): each rank's FSDP rows, on one rank and on three simulated
-- ranks, compose to exactly the checkpoint's tensors (by the shard-composable
-- checksum, summed over ranks as verification does); bf16 -> f32 loads are
-- exact; save_model writes back the same tensors; shard splitting and
-- adapter_config.json errors. Pending when /usr/bin/python3 lacks torch.
local ws = require("ws")
local json = require("ws.json")
local errors = require("ws.errors")
local models = require("ws.models")
local lora = require("ws.lora")
local checkpoint = require("ws.checkpoint")
local trainer_mod = require("ws.trainer")

local PYTHON = "/usr/bin/python3"
local cpu = ws.device("cpu")

local function have_torch()
    return os.execute(PYTHON .. " -c 'import torch' > /dev/null 2>&1") == true
end

local function tmpdir()
    local p = os.tmpname()
    os.remove(p)
    assert(ws.mkdir(p))
    return p
end

local function rmtree(p) os.execute("rm -rf '" .. p .. "'") end

local function write_file(path, text)
    local f = assert(io.open(path, "wb"))
    f:write(text)
    f:close()
end

local function read_file(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("a")
    f:close()
    return s
end

-- The message of whatever fn(...) raised, and the error itself.
local function err_of(fn, ...)
    local ok, err = pcall(fn, ...)
    assert.is_false(ok, "expected an error")
    return tostring(err), err
end

local function contains(text, part)
    assert.is_truthy(text:find(part, 1, true),
                     string.format("expected [%s] to contain [%s]", text, part))
end

-- The checksum of a whole checkpoint tensor, hashed as `as` (its own dtype if nil).
local function full_checksum(ck, name, as)
    local t = ck:tensor(name)
    local sum = t:checksum(0, as)
    t:free()
    return sum
end

-- Per parameter name, the checksums of this trainer's real shard elements
-- (global first index, as bf16, as verification takes them), for `kind`.
local function shard_checksums(tr, kind)
    local entries = kind == "base" and tr.base_params or tr.adapter_params
    local views, firsts, names = {}, {}, {}
    local out = {}
    for _, e in ipairs(entries) do
        if e.view then
            views[#views + 1], firsts[#firsts + 1], names[#names + 1] = e.view, e.first, e.name
        else
            out[e.name] = 0 -- all padding on this rank
        end
    end
    local sums = assert(ws.checksums(views, firsts, "bf16"))
    for i, name in ipairs(names) do out[name] = sums:get(i) end
    sums:free()
    return out
end

describe("split_shards", function()
    local function numels(shards)
        local out = {}
        for i, s in ipairs(shards) do
            out[i] = {}
            for j, e in ipairs(s) do out[i][j] = e.numel end
        end
        return out
    end
    local function entries(list)
        local out = {}
        for i, n in ipairs(list) do out[i] = { numel = n } end
        return out
    end

    it("fills a shard up to exactly max_bytes and starts the next after it", function()
        -- bf16: 10, 10, 20, 20 bytes under a 20-byte limit.
        assert.are.same({ { 5, 5 }, { 10 }, { 10 } },
                        numels(checkpoint.split_shards(entries{ 5, 5, 10, 10 }, 2, 20)))
        -- f32: 8 + 12 = 20 fits, the next 4 bytes do not.
        assert.are.same({ { 2, 3 }, { 1 } },
                        numels(checkpoint.split_shards(entries{ 2, 3, 1 }, 4, 20)))
    end)

    it("gives a tensor over the limit a shard of its own", function()
        assert.are.same({ { 3 }, { 50 }, { 2, 2 } },
                        numels(checkpoint.split_shards(entries{ 3, 50, 2, 2 }, 2, 20)))
        assert.are.same({ { 50 }, { 1 } },
                        numels(checkpoint.split_shards(entries{ 50, 1 }, 2, 20)))
        assert.are.same({ { 11 } }, numels(checkpoint.split_shards(entries{ 11 }, 2, 20)))
    end)

    it("keeps everything in one shard under a large limit, and nothing gives no shard", function()
        assert.are.same({ { 7, 9, 11 } },
                        numels(checkpoint.split_shards(entries{ 7, 9, 11 }, 2, math.maxinteger)))
        assert.are.same({}, checkpoint.split_shards({}, 2, 20))
    end)
end)

describe("read_adapter_config", function()
    local dir
    before_each(function() dir = tmpdir() end)
    after_each(function() rmtree(dir) end)

    local function with(cfg)
        write_file(dir .. "/adapter_config.json", json.encode(cfg))
        return dir
    end
    local good = { peft_type = "LORA", r = 4, lora_alpha = 8, bias = "none",
                   target_modules = { "q_proj", "v_proj" } }
    local function but(over)
        local c = {}
        for k, v in pairs(good) do c[k] = v end
        for k, v in pairs(over) do c[k] = v end
        return c
    end

    it("reads r, lora_alpha, target_modules and use_rslora", function()
        local c = checkpoint.read_adapter_config(with(but{ use_rslora = true }))
        assert.are.same({ r = 4, alpha = 8, target_modules = "q_proj,v_proj", use_rslora = true,
                          path = dir }, c)
        -- No lora_alpha: PEFT's default is r... here alpha = r (scale 1).
        local bare = but{ target_modules = "all-linear" }
        bare.lora_alpha = nil
        c = checkpoint.read_adapter_config(with(bare))
        assert.are.equal("all-linear", c.target_modules)
        assert.are.equal(4, c.alpha)
        assert.is_false(c.use_rslora)
    end)

    it("refuses what PEFT LoRA would not write, naming the file", function()
        local where = dir .. "/adapter_config.json"
        local cases = {
            { but{ peft_type = "PREFIX_TUNING" },
              where .. ": peft_type is 'PREFIX_TUNING'; only LORA adapters are supported" },
            { but{ bias = "all" }, where .. ": bias 'all' is not supported" },
            { but{ bias = "lora_only" }, where .. ": bias 'lora_only' is not supported" },
            { but{ r = 0 }, where .. ": 'r' must be an integer >= 1, got 0" },
            { but{ r = 2.5 }, where .. ": 'r' must be an integer >= 1, got 2.5" },
            { but{ lora_alpha = "8" }, where .. ": 'lora_alpha' must be a number" },
            { but{ target_modules = 7 }, where .. ": 'target_modules' must be a list" },
        }
        for _, case in ipairs(cases) do
            local msg, err = err_of(checkpoint.read_adapter_config, with(case[1]))
            contains(msg, case[2])
            assert.is_true(errors.is(err), msg)
        end
        local missing_r = but{}
        missing_r.r = nil
        contains(err_of(checkpoint.read_adapter_config, with(missing_r)),
                 where .. ": 'r' must be an integer >= 1, got nil")
        for _, text in ipairs({ "{\"r\": 4,", "\"LORA\"" }) do
            write_file(where, text)
            contains(err_of(checkpoint.read_adapter_config, dir), where .. ": not a JSON object")
        end
        os.remove(where)
        contains(err_of(checkpoint.read_adapter_config, dir),
                 "adapter " .. dir .. ": no adapter_config.json there")
    end)
end)

describe("a Hugging Face directory in the trainer", function()
    if not have_torch() then
        it("needs " .. PYTHON .. " with torch (tests/fixtures/hf_tiny.py)", function()
            pending(PYTHON .. " cannot import torch")
        end)
        return
    end

    local root, model_dir, adapter_dir, spec, lcfg
    setup(function()
        root = tmpdir()
        model_dir, adapter_dir = root .. "/qwen3", root .. "/qwen3_lora"
        -- f32 adapter (PEFT's default) against a bf16 trainer: a conversion on load.
        local cmd = string.format("%s tests/fixtures/hf_tiny.py '%s' --family qwen3 --shards 2 " ..
                                  "--seed 11 --adapter '%s' --rank 4 --alpha 8 " ..
                                  "--targets q_proj,v_proj,down_proj > /dev/null",
                                  PYTHON, model_dir, adapter_dir)
        assert(os.execute(cmd), "hf_tiny.py failed: " .. cmd)
        spec = models.get(model_dir)
        local ac = checkpoint.read_adapter_config(adapter_dir)
        lcfg = lora.config{ r = ac.r, alpha = ac.alpha, target_modules = ac.target_modules,
                            use_rslora = ac.use_rslora }
    end)
    teardown(function() if root then rmtree(root) end end)

    local function open_both()
        local ck = checkpoint.open_model(spec)
        local ack = checkpoint.open_adapter(adapter_dir, lora.params(spec, lcfg))
        return ck, ack
    end

    local function new_trainer(ck, ack, opts)
        local o = { spec = spec, lora = lcfg, device = cpu, dtype = "bf16", checkpoint = ck,
                    adapter_checkpoint = ack }
        for k, v in pairs(opts or {}) do o[k] = v end
        return trainer_mod.new(o)
    end

    it("opens both shards, checked against config.json", function()
        assert.are.equal(model_dir .. "/model.safetensors.index.json", spec.weights)
        local ck = checkpoint.open_model(spec)
        local files = ck:files()
        table.sort(files)
        assert.are.same({ "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors" },
                        files)
        assert.are.equal(#models.params(spec), #ck:names())
        assert.are.equal(8, lcfg.alpha)
        assert.are.same({ "q_proj", "v_proj", "down_proj" }, lcfg.targets)
        ck:free()
    end)

    it("loads a world of one: every shard is its whole checkpoint tensor", function()
        local ck, ack = open_both()
        local tr = new_trainer(ck, ack)
        for kind, src in pairs({ base = ck, adapter = ack }) do
            local sums = shard_checksums(tr, kind)
            local n = 0
            for name, sum in pairs(sums) do
                assert.are.equal(full_checksum(src, name, "bf16"), sum, name)
                n = n + 1
            end
            assert.are.equal(#src:names(), n, kind)
        end
        -- Spot values: bf16 from bf16 is a plain copy.
        local e = tr.base_params[1]
        local t = ck:tensor(e.name)
        local flat = t:flat()
        for _, i in ipairs({ 1, 2, e.numel // 2, e.numel }) do
            assert.are.equal(flat:get(i), e.view:get(i))
        end
        flat:free()
        t:free()
        tr:free()
        ck:free()
        ack:free()
    end)

    it("splits rows over three ranks so that the shards sum to each tensor", function()
        local ck, ack = open_both()
        local totals, ranks = { base = {}, adapter = {} }, {}
        local uneven = 0
        for r = 0, 2 do
            local tr = new_trainer(ck, ack, { rank = r, world = 3 })
            ranks[#ranks + 1] = tr
            for _, kind in ipairs({ "base", "adapter" }) do
                for name, sum in pairs(shard_checksums(tr, kind)) do
                    -- Integer addition wraps modulo 2^64, as the all_reduce does.
                    totals[kind][name] = (totals[kind][name] or 0) + sum
                end
            end
            for _, e in ipairs(tr.params) do
                assert.are.equal((e.numel + 2) // 3, e.shard_numel, e.name)
                assert.are.equal(r * e.shard_numel, e.first, e.name)
                if e.real < e.shard_numel then uneven = uneven + 1 end
            end
        end
        assert.is_true(uneven > 0, "the fixture should give some padded shards")
        for kind, src in pairs({ base = ck, adapter = ack }) do
            local n = 0
            for name, total in pairs(totals[kind]) do
                assert.are.equal(full_checksum(src, name, "bf16"), total, kind .. " " .. name)
                n = n + 1
            end
            assert.are.equal(#src:names(), n, kind)
        end
        -- Each rank holds its own rows: rank 1's first element is element first+1.
        local e = ranks[2].base_params[1]
        local t = ck:tensor(e.name)
        local flat = t:flat()
        assert.are.equal(flat:get(e.first + 1), e.view:get(1))
        assert.are.equal(flat:get(e.first + e.real), e.view:get(e.real))
        flat:free()
        t:free()
        for _, tr in ipairs(ranks) do tr:free() end
        ck:free()
        ack:free()
    end)

    it("loads bf16 into an f32 trainer exactly", function()
        local ck, ack = open_both()
        local tr = new_trainer(ck, ack, { dtype = "f32" })
        for _, e in ipairs(tr.base_params) do
            assert.are.equal("f32", e.view:dtype())
            local t = ck:tensor(e.name)
            local flat = t:flat()
            for i = 1, e.numel do
                local want, got = flat:get(i), e.view:get(i)
                if want ~= got then
                    assert.are.equal(want, got, string.format("%s element %d", e.name, i))
                end
            end
            flat:free()
            t:free()
        end
        -- The f32 adapter lands unchanged too.
        for _, e in ipairs(tr.adapter_params) do
            assert.are.equal(full_checksum(ack, e.name), e.view:checksum(0), e.name)
        end
        tr:free()
        ck:free()
        ack:free()
    end)

    it("save_model from a world of one writes the same tensors, sharded", function()
        local ck, ack = open_both()
        local tr = new_trainer(ck, ack)
        local out = root .. "/saved"
        -- A limit of a quarter of the model: several shards, as split_shards says.
        local bytes = models.param_count(spec) * 2
        local limit = bytes // 4
        local want_shards = #checkpoint.split_shards(tr.base_params, 2, limit)
        assert.is_true(want_shards > 2)
        local files = checkpoint.save_model(tr, out, { rank = 0, world = 1,
                                                       max_shard_bytes = limit })
        assert.are.equal(want_shards + 2, #files) -- the shards, the index, config.json
        assert.are.equal(string.format("model-00001-of-%05d.safetensors", want_shards), files[1])
        assert.are.equal(read_file(model_dir .. "/config.json"), read_file(out .. "/config.json"))
        local index = json.decode(read_file(out .. "/model.safetensors.index.json"))
        assert.are.equal(bytes, index.metadata.total_size)
        local saved = assert(ws.safetensors(out .. "/model.safetensors.index.json"))
        assert.are.equal(#ck:names(), #saved:names())
        for _, name in ipairs(ck:names()) do
            local info = saved:info(name)
            assert.are.equal("bf16", info.dtype)
            assert.are.same(ck:info(name).shape, info.shape)
            assert.are.equal(full_checksum(ck, name), full_checksum(saved, name), name)
            assert.is_truthy(index.weight_map[name], name)
        end
        saved:free()
        -- The adapter: PEFT names, bf16 now (the trainer's dtype), the same values as bf16.
        local adir = root .. "/saved_lora"
        checkpoint.save_adapter(tr, adir, { rank = 0, world = 1 })
        local sa = assert(ws.safetensors(adir .. "/adapter_model.safetensors"))
        for _, name in ipairs(ack:names()) do
            assert.are.equal(full_checksum(ack, name, "bf16"), full_checksum(sa, name), name)
        end
        sa:free()
        local ac = checkpoint.read_adapter_config(adir)
        assert.are.same({ r = 4, alpha = 8, target_modules = "q_proj,v_proj,down_proj",
                          use_rslora = false, path = adir }, ac)
        tr:free()
        ck:free()
        ack:free()
    end)
end)
