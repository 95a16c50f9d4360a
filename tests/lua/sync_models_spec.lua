-- Model specs: exact HF names, shapes, parameter counts and
-- LoRA adapter sizes for the Qwen3 presets.
local models = require("ws.models")
local lora = require("ws.lora")

local function by_name(list)
    local t = {}
    for _, p in ipairs(list) do t[p.name] = p end
    return t
end

describe("model presets", function()
    it("have the published Qwen3 parameter counts", function()
        assert.are.equal(596049920, models.param_count(models.get("qwen3-0.6b")))
        assert.are.equal(1720574976, models.param_count(models.get("qwen3-1.7b")))
        assert.are.equal(8190735360, models.param_count(models.get("qwen3-8b")))
    end)

    it("have the bf16 sizes of §2", function()
        local function gb(name) return string.format("%.2f", models.param_count(models.get(name)) * 2 / 1e9) end
        assert.are.equal("1.19", gb("qwen3-0.6b"))
        assert.are.equal("3.44", gb("qwen3-1.7b"))
        assert.are.equal("16.38", gb("qwen3-8b"))
    end)

    it("tie the embeddings of 0.6b and 1.7b but not of 8b", function()
        assert.is_nil(by_name(models.params(models.get("qwen3-0.6b")))["lm_head.weight"])
        assert.is_nil(by_name(models.params(models.get("qwen3-1.7b")))["lm_head.weight"])
        assert.are.same({ 151936, 4096 }, by_name(models.params(models.get("qwen3-8b")))["lm_head.weight"].shape)
    end)

    it("use the HF names and [out, in] shapes", function()
        local p = by_name(models.params(models.get("qwen3-8b")))
        assert.are.same({ 151936, 4096 }, p["model.embed_tokens.weight"].shape)
        assert.are.same({ 4096 }, p["model.norm.weight"].shape)
        local l = "model.layers.35."
        assert.are.same({ 4096 }, p[l .. "input_layernorm.weight"].shape)
        assert.are.same({ 4096 }, p[l .. "post_attention_layernorm.weight"].shape)
        assert.are.same({ 4096, 4096 }, p[l .. "self_attn.q_proj.weight"].shape)
        assert.are.same({ 1024, 4096 }, p[l .. "self_attn.k_proj.weight"].shape)
        assert.are.same({ 1024, 4096 }, p[l .. "self_attn.v_proj.weight"].shape)
        assert.are.same({ 4096, 4096 }, p[l .. "self_attn.o_proj.weight"].shape)
        assert.are.same({ 128 }, p[l .. "self_attn.q_norm.weight"].shape)
        assert.are.same({ 128 }, p[l .. "self_attn.k_norm.weight"].shape)
        assert.are.same({ 12288, 4096 }, p[l .. "mlp.gate_proj.weight"].shape)
        assert.are.same({ 12288, 4096 }, p[l .. "mlp.up_proj.weight"].shape)
        assert.are.same({ 4096, 12288 }, p[l .. "mlp.down_proj.weight"].shape)
        assert.is_nil(p["model.layers.36.input_layernorm.weight"])
        local small = by_name(models.params(models.get("qwen3-0.6b")))
        assert.are.same({ 2048, 1024 }, small["model.layers.0.self_attn.q_proj.weight"].shape)
        assert.are.same({ 1024, 2048 }, small["model.layers.0.self_attn.o_proj.weight"].shape)
        assert.are.equal(3 + 28 * 11 - 1, #models.params(models.get("qwen3-0.6b")))
    end)

    it("has a tiny preset of the same structure, a few MB, with uneven shards", function()
        local spec = models.get("tiny")
        local list = models.params(spec)
        local bytes = models.param_count(spec) * 2
        assert.is_true(bytes > 1e6 and bytes < 8e6, "tiny is " .. bytes .. " bytes")
        assert.are.equal(2 + spec.layers * 11, #list)
        local odd = 0
        for _, p in ipairs(list) do if p.numel % 2 == 1 then odd = odd + 1 end end
        assert.is_true(odd > 0, "tiny needs odd-sized parameters to exercise FSDP padding")
    end)

    it("rejects an unknown model, naming the choices", function()
        assert.has_error(function() models.get("qwen3-70b") end,
            "unknown model 'qwen3-70b': not a preset (known: qwen3-0.6b, qwen3-1.7b, "
            .. "qwen3-235b-a22b, qwen3-30b-a3b, qwen3-8b, tiny, tiny-moe) and not a directory "
            .. "holding config.json")
    end)
end)

describe("LoRA adapters", function()
    local function mb(name, r)
        local cfg = lora.config{ r = r or 32 }
        return string.format("%.1f", lora.param_count(models.get(name), cfg) * 2 / 1e6)
    end

    it("have the all-linear r=32 bf16 sizes of §2", function()
        assert.are.equal("40.4", mb("qwen3-0.6b"))
        assert.are.equal("69.7", mb("qwen3-1.7b"))
        assert.are.equal("174.6", mb("qwen3-8b"))
    end)

    it("use PEFT names with lora_A [r, in] and lora_B [out, r]", function()
        local p = by_name(lora.params(models.get("qwen3-0.6b"), lora.config{ r = 8 }))
        local a = p["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
        local b = p["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
        assert.are.same({ 8, 1024 }, a.shape)
        assert.are.same({ 2048, 8 }, b.shape)
        assert.are.equal("model.layers.0.self_attn.q_proj.weight", a.base)
        assert.are.same({ 8, 3072 }, p["base_model.model.model.layers.27.mlp.down_proj.lora_A.weight"].shape)
        assert.are.equal(28 * 7 * 2, #lora.params(models.get("qwen3-0.6b"), lora.config{ r = 8 }))
    end)

    it("default to all-linear and accept a target list", function()
        local cfg = lora.config{ r = 4 }
        assert.are.same(lora.all_linear, cfg.targets)
        assert.are.equal(16 / 4, cfg.scale)
        local qv = lora.config{ r = 4, target_modules = "q_proj,v_proj" }
        assert.are.same({ "q_proj", "v_proj" }, qv.targets)
        assert.are.equal(2 * 2 * 2, #lora.params(models.get("tiny"), qv))
        assert.is_nil(lora.config{ r = 0 })
    end)

    it("rejects an unknown target module", function()
        assert.has_error(function() lora.config{ r = 4, target_modules = "q_proj,qkv" } end)
    end)
end)
