-- MistralForCausalLM: Llama's parameters (sliding-window attention changes
-- no weight).
return require("ws.family.decoder").family{
    name = "mistral",
    architectures = { "MistralForCausalLM" },
}
