-- Qwen2ForCausalLM: q/k/v projections carry biases; no q/k norms.
return require("ws.family.decoder").family{
    name = "qwen2",
    architectures = { "Qwen2ForCausalLM" },
    qkv_bias = true,
}
