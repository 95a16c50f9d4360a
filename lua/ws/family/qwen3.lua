-- Qwen3ForCausalLM: q/k RMS norms per head, no biases (attention_bias aside).
return require("ws.family.decoder").family{
    name = "qwen3",
    architectures = { "Qwen3ForCausalLM" },
    qk_norm = true,
}
