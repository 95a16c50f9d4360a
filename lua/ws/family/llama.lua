-- LlamaForCausalLM: plain attention and MLP (attention_bias adds q/k/v/o biases).
return require("ws.family.decoder").family{
    name = "llama",
    architectures = { "LlamaForCausalLM" },
}
