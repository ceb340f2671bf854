"""LLaMA, readable top to bottom: RMSNorm pre-norm, rotate-half RoPE, SwiGLU, GQA, optional tied embeddings.

Parameter names equal HF `LlamaForCausalLM`'s (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`, ...),
so HF state dicts load with `load_state_dict` and export is a rename-free save.

Decoding uses a static KV cache (`KVCache`): fixed-size buffers written at `input_pos`, attention over the whole
buffer with a mask. Shapes never change between steps, so the decode step compiles once and can be CUDA-graphed.
`fuse_projections` adds q|k|v and gate|up weight copies that decoding forwards use (fewer, larger kernels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from babyllama.model.config import ModelConfig
from babyllama.model.fused_cross_entropy import fused_linear_cross_entropy, mask_padding

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 like HF, then cast back before scaling (matches HF bit-for-bit in fp32).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, D); cos/sin: (B or 1, T, D) already gathered at the token positions."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Static per-layer key/value buffers of shape (B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.cache: KVCache | None = None
        self.register_buffer("qkv_weight", None, persistent=False)  # decoding copy, see Llama.fuse_projections

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        if input_pos is not None and self.qkv_weight is not None:
            q, k, v = F.linear(x, self.qkv_weight).split(
                [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:  # decoding: the cache is used only when positions are given
            k, v = self.cache.update(input_pos, k, v)
        gqa = self.n_kv_heads != self.n_heads
        if mask is None:  # training / full-sequence scoring: the fast causal kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.register_buffer("gate_up_weight", None, persistent=False)  # decoding copy, see Llama.fuse_projections

    def forward(self, x: Tensor, decoding: bool = False) -> Tensor:
        if decoding and self.gate_up_weight is not None:
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, -1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x), decoding=input_pos is not None)


class Backbone(nn.Module):
    """Embeddings, blocks and the final norm: HF's `LlamaModel` (the `model.` prefix of parameter names)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


@dataclass
class Output:
    logits: Tensor | None = None  # (B, T, vocab) fp32; None when only the loss was asked for
    loss: Tensor | None = None
    hidden: Tensor | None = None  # final-norm hidden states (B, T, dim), for value / reward heads


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False  # recompute each block in backward: less memory for big configs
        self.chunked_loss = True  # False = plain full-logits cross-entropy (kept for benchmarks and debugging)
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 style: scale residual-branch outputs so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)

    def _ensure_rope(self, length: int) -> None:
        """Grow the RoPE table past max_seq_len (long chats); a Python int check, so no host sync per step."""
        if length > self.rope_cos.shape[0]:
            cos, sin = rope_cos_sin(self.config.head_dim, length, self.config.rope_theta)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, *, input_pos: Tensor | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                return_logits: bool | None = None, return_hidden: bool = False) -> Output:
        """Run the model.

        input_ids: (B, T). targets: (B, T) next-token ids already shifted (IGNORE_INDEX = no loss); the loss is
        computed chunk-wise without materialising the full fp32 logits, and logits are skipped unless asked for.
        input_pos: (T,) cache slots to write when decoding with the `KVCache` from `setup_cache`; without it the
        cache (if any) is ignored, so training and scoring never touch it.
        attention_mask: (B, S) 1 = real token, 0 = padding, S = T without cache or the cache length with one
        (left-padded batches); position_ids: (B, T), default `input_pos` or `arange(T)`.
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = (input_pos if input_pos is not None else torch.arange(T, device=input_ids.device))
            position_ids = position_ids.unsqueeze(0)
        if input_pos is None:
            self._ensure_rope(T)
        cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        mask = self._attention_mask(T, input_pos, attention_mask)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, input_pos)
        h = self.model.norm(x)
        out = Output(hidden=h if return_hidden else None)
        if targets is not None and self.chunked_loss:
            out.loss = fused_linear_cross_entropy(h, self.lm_head.weight, targets, IGNORE_INDEX, self._padded_from())
        elif targets is not None:
            out.logits = self.head(h)
            out.loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        if out.logits is None and (return_logits or (return_logits is None and targets is None)):
            out.logits = self.head(h)
        return out

    def mask_beyond(self, n_tokens: int) -> "Llama":
        """Mask the ids from `n_tokens` on (the tokenizer's size) if the embedding has more: checkpoints written
        before `ModelConfig.tokenizer_vocab_size` was recorded, and imports, do not say so themselves. Returns self."""
        self.config = self.config.for_tokenizer(n_tokens)
        return self

    def head(self, h: Tensor) -> Tensor:
        """fp32 logits of final-norm hidden states, the padding ids (past the tokenizer's) masked."""
        return mask_padding(self.lm_head(h).float(), self._padded_from())

    def _padded_from(self) -> int | None:
        """The first padding id, or None when the embedding has exactly the tokenizer's ids (no masking work)."""
        n = self.config.n_tokens
        return n if n < self.config.vocab_size else None

    def _attention_mask(self, T: int, input_pos: Tensor | None, attention_mask: Tensor | None) -> Tensor | None:
        """Boolean (B|1, 1, T, S) mask, or None for plain causal attention over the T tokens."""
        cache = self.model.layers[0].self_attn.cache if input_pos is not None else None
        if cache is None and attention_mask is None:
            return None
        device = (input_pos if input_pos is not None else attention_mask).device
        pos = input_pos if cache is not None else torch.arange(T, device=device)
        slots = torch.arange(cache.k.shape[2] if cache is not None else T, device=device)
        mask = (slots[None, :] <= pos[:, None])[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, : slots.numel()].bool()
            # A padding query would attend to nothing; let it see itself so softmax stays finite (output unused).
            mask = mask | (slots[None, :] == pos[:, None])[None, None]
        return mask

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate static KV caches; every forward then reads/writes them at `input_pos`. Their dtype: `dtype`, else
        the autocast dtype when decoding under autocast (PPO samples in the precision it trains in), else the
        weights'."""
        p = self.lm_head.weight
        if dtype is None and torch.is_autocast_enabled(p.device.type):
            dtype = torch.get_autocast_dtype(p.device.type)
        self._ensure_rope(max_len)
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.cache = KVCache(batch, attn.n_kv_heads, max_len, attn.head_dim, dtype or p.dtype, p.device)

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.cache = None

    def fuse_projections(self) -> None:
        """Give each block one q|k|v and one gate|up weight matrix for decoding (forwards with `input_pos`): at
        batch 1 a decode step is a chain of small kernels, and this makes five matrix products per block two.
        The copies are refreshed in place (same memory, so a CUDA graph stays valid): call this again after the
        weights change; `unfuse_projections` frees them. Training and scoring always use the separate weights."""
        with torch.no_grad():
            for layer in self.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                attn.qkv_weight = _concat_into(attn.qkv_weight, attn.q_proj.weight, attn.k_proj.weight,
                                               attn.v_proj.weight)
                mlp.gate_up_weight = _concat_into(mlp.gate_up_weight, mlp.gate_proj.weight, mlp.up_proj.weight)

    def unfuse_projections(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.qkv_weight = layer.mlp.gate_up_weight = None

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def _concat_into(out: Tensor | None, *parts: Tensor) -> Tensor:
    """torch.cat(parts) written into `out` when it still fits (same storage), else a new tensor."""
    rows = sum(p.shape[0] for p in parts)
    fits = (out is not None and out.shape == (rows, *parts[0].shape[1:]) and out.dtype == parts[0].dtype
            and out.device == parts[0].device and (torch.is_inference_mode_enabled() or not out.is_inference()))
    return torch.cat(parts, out=out) if fits else torch.cat(parts)


def frozen(model: nn.Module) -> nn.Module:
    """`model` itself in eval mode with gradients off: a reference or a reward model that is only read."""
    return model.eval().requires_grad_(False)


def frozen_copy(model: Llama) -> Llama:
    """A frozen copy of `model` on its device and dtype (the DPO and PPO reference). Rebuilt from the config and
    loaded rather than deep-copied, so no hooks, compile wrappers or fused decoding copies come along."""
    copy = Llama(model.config)
    copy.load_state_dict(model.state_dict())
    p = model.lm_head.weight
    return frozen(copy.to(device=p.device, dtype=p.dtype))
