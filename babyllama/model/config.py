"""Model configuration: one dataclass, presets by name, and readers for HF / bert4torch config files."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from babyllama.errors import UserError


@dataclass
class ModelConfig:
    """LLaMA architecture sizes. Field names follow nanoGPT; `to_hf()` gives the HF LlamaConfig names."""

    vocab_size: int = 32000
    dim: int = 1024
    n_layers: int = 12
    n_heads: int = 8
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head attention); fewer = GQA
    ffn_dim: int = 2752
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Ids the tokenizer has when the embedding is padded past them (`padded_vocab`); the model masks the logits of
    # the rest, so they are never sampled nor given probability. None = every id is the tokenizer's.
    tokenizer_vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.tokenizer_vocab_size is not None and not 0 < self.tokenizer_vocab_size <= self.vocab_size:
            raise UserError(f"config: tokenizer_vocab_size={self.tokenizer_vocab_size} is not in 1..vocab_size="
                            f"{self.vocab_size}")
        if self.dim % self.n_heads:
            raise UserError(f"config: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"config: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_tokens(self) -> int:
        """The ids the model may produce: the tokenizer's, not the padding rows."""
        return self.tokenizer_vocab_size or self.vocab_size

    def for_tokenizer(self, n_tokens: int) -> "ModelConfig":
        """This config with the ids from `n_tokens` on masked: for an embedding larger than its tokenizer."""
        return dataclasses.replace(self, tokenizer_vocab_size=n_tokens if n_tokens < self.vocab_size else None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"{source}: unknown model config field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_hf(self) -> dict[str, Any]:
        """The HF `LlamaConfig` keyword arguments describing the same architecture."""
        return dict(
            vocab_size=self.vocab_size, hidden_size=self.dim, num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
            intermediate_size=self.ffn_dim, max_position_embeddings=self.max_seq_len,
            rope_theta=self.rope_theta, rms_norm_eps=self.norm_eps, tie_word_embeddings=self.tie_embeddings,
            initializer_range=self.init_std, hidden_act="silu", attention_bias=False, mlp_bias=False,
            head_dim=self.head_dim, model_type="llama", architectures=["LlamaForCausalLM"],
        )

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        return _from_mapping(cls, hf, _HF_KEYS, source)

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, kv = self.dim, self.n_kv_heads * self.head_dim
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * self.ffn_dim + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul params + 12 L d T for attention (the nanoGPT/PaLM convention,
        which the MFU numbers of docs/performance.md use)."""
        d, kv = self.dim, self.n_kv_heads * self.head_dim
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * self.ffn_dim
        matmul = self.n_layers * per_layer + self.vocab_size * d  # lm_head runs even when tied
        return 6 * matmul + 12 * self.n_layers * d * seq_len


_HF_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_dim",
    "max_position_embeddings": "max_seq_len", "rope_theta": "rope_theta", "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings", "initializer_range": "init_std",
}
# bert4torch names its keys like HF except the norm epsilon (`layer_norm_eps`, not `rms_norm_eps`).
_B4T_KEYS = {**{k: v for k, v in _HF_KEYS.items() if k != "rms_norm_eps"}, "layer_norm_eps": "norm_eps"}
_REQUIRED = ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim")


def _from_mapping(cls: type[ModelConfig], raw: dict[str, Any], keys: dict[str, str], source: str) -> ModelConfig:
    kwargs = {ours: raw[theirs] for theirs, ours in keys.items() if raw.get(theirs) is not None}
    missing = [k for k, v in keys.items() if v in _REQUIRED and v not in kwargs]
    if missing:
        raise UserError(f"{source}: missing field(s) {missing}; this does not look like a LLaMA config")
    if raw.get("head_dim") not in (None, kwargs["dim"] // kwargs["n_heads"]):
        raise UserError(f"{source}: head_dim={raw['head_dim']} != hidden_size/num_attention_heads; not supported")
    return cls(**kwargs)


def load_bert4torch_config(path: str | Path) -> ModelConfig:
    """Read a bert4torch `bert4torch_config.json` describing a LLaMA model (rotary, rmsnorm, LlamaFeedForward)."""
    raw = read_json(path)
    not_llama = {k: raw[k] for k, want in (("pos_emb_type", "rotary"), ("layer_norm_mode", "rmsnorm"))
                 if k in raw and raw[k] != want}
    if not_llama or raw.get("use_bias"):
        raise UserError(f"{path}: not a LLaMA bert4torch config ({not_llama or 'use_bias: true'}); "
                        "babyllama loads rotary + rmsnorm + bias-free configs only")
    return _from_mapping(ModelConfig, raw, _B4T_KEYS, str(path))


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON config file as a dict; a missing, undecodable or non-object file is a one-line UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{p}:{e.lineno}: invalid JSON ({e.msg}); fix the file") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text; is it a JSON config?") from None
    if not isinstance(raw, dict):
        raise UserError(f"{p}: expected a JSON object of config fields, got {type(raw).__name__}")
    return raw


# A vocabulary padded to a multiple of 64 keeps the embedding and lm_head matrix shapes multiples of 64, which GPU
# matmul kernels tile without ragged edges (nanoGPT pads GPT-2's 50,257 to 50,304 for this; see docs/architecture.md).
VOCAB_MULTIPLE = 64


def padded_vocab(n_tokens: int) -> int:
    """The embedding size for a tokenizer of `n_tokens` ids: rounded up to a multiple of `VOCAB_MULTIPLE`."""
    return -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


# Presets by name. vocab_size=None means "take it from the tokenizer"; a number is the seed's vocabulary, kept for a
# tokenizer of exactly that size (another tokenizer gets its own size, padded: `runs.model_config_for`).
PRESETS: dict[str, dict[str, Any]] = {
    # Trains in minutes on 2 CPU cores on the shipped corpus; GQA so the small path exercises it too.
    "baby": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=704, max_seq_len=256,
                 tie_embeddings=True, vocab_size=None),
    # Seconds on one CPU core: for tests and smoke runs of the scripts.
    "tiny": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                 tie_embeddings=True, vocab_size=None),
    # The seed project's 0.2B (baby-llama2-chinese / build_MiniLLM_from_scratch), ChatGLM2 vocab.
    "0.2b": dict(dim=1024, n_layers=12, n_heads=8, ffn_dim=2752, max_seq_len=1024,
                 tie_embeddings=True, vocab_size=64793),
    # The seed's 1.1B with grouped-query attention (TinyLlama shapes).
    "1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, max_seq_len=1024,
                 tie_embeddings=False, vocab_size=64793),
}


def preset(name: str, vocab_size: int | None = None, **overrides: Any) -> ModelConfig:
    """Model config for a preset name; `vocab_size` fills presets that take it from the tokenizer."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset '{name}'; choose one of {sorted(PRESETS)}")
    kw = {**PRESETS[name], **overrides}
    if kw["vocab_size"] is None:
        if vocab_size is None:
            raise UserError(f"preset '{name}' takes its vocab size from the tokenizer; pass vocab_size")
        kw["vocab_size"] = vocab_size
    return ModelConfig(**kw)
