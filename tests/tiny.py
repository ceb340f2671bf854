"""The one tiny model configuration the tests build their models from (a test states only what it changes)."""
from __future__ import annotations

from typing import Any

from babyllama.model.config import ModelConfig

TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


def tiny_config(vocab_size: int = 64, **changes: Any) -> ModelConfig:
    """A 2-layer, 32-wide GQA LLaMA (a few tens of thousands of parameters): seconds to train on a CPU."""
    return ModelConfig(vocab_size=vocab_size, **{**TINY, **changes})
