"""Moving models in and out: Hugging Face `LlamaForCausalLM` (and GGUF import through transformers) and
bert4torch (`hf`)."""
