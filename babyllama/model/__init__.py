"""The model: its configuration and presets (`config`), the LLaMA network (`llama`), the memory-light fused
output-layer loss (`fused_cross_entropy`) and decoding (`generate`)."""
