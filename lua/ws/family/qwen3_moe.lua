-- Qwen3MoeForCausalLM: Qwen3 attention; the MLP of every `decoder_sparse_step`-th
-- layer not in `mlp_only_layers` is a router (`mlp.gate`) over `num_experts`
-- experts of `moe_intermediate_size`; the other layers keep a dense MLP.
-- LoRA wraps attention and dense MLPs only: the engine's fused experts take no
-- adapter here.
return require("ws.family.decoder").family{
    name = "qwen3_moe",
    architectures = { "Qwen3MoeForCausalLM" },
    qk_norm = true,
    read = function(spec, r)
        -- num_experts 0: every layer keeps a dense MLP, as in transformers.
        spec.experts = r.int("num_experts", nil, 0)
        spec.moe_intermediate = r.int("moe_intermediate_size")
        spec.experts_per_token = r.int("num_experts_per_tok", 8)
        local step = r.int("decoder_sparse_step", 1)
        local dense = {}
        for _, l in ipairs(r.int_list("mlp_only_layers")) do dense[l] = true end
        spec.sparse = {}
        for l = 0, spec.layers - 1 do
            if spec.experts > 0 and not dense[l] and (l + 1) % step == 0 then
                spec.sparse[l] = true
            end
        end
    end,
}
