"""LoRA (Hu et al. 2021): train a low-rank update B A of chosen projections while every weight of the model stays
frozen. A wrapped projection computes W x + (alpha / r) B A dropout(x), with A (r x in) Kaiming-uniform and B
(out x r) zeros, so training starts exactly at the model it wraps; `merge_lora` folds (alpha / r) B A into W.

Why our own ~100 lines and not `peft`: peft wraps our `nn.Linear`s fine (tests/test_lora.py checks that ours gives
its outputs and gradients for the same weights, bit for bit), but its wrapper's `.weight` is the base weight alone,
so `Llama.fuse_projections` (the decoding copies of a compiled `Generator`) would silently decode without the
adapters, and it would make peft (and accelerate) a dependency of every install. Here the layout is peft's
(`q_proj.base_layer`, `q_proj.lora_A`, `q_proj.lora_B`) and `.weight` of a wrapped projection is the effective
W + (alpha / r) B A, so the fused decoding copies include the adapters.

    policy = add_lora(model, LoRASpec(rank=8, alpha=16))   # only the adapters require gradients now
    adapters = lora_state_dict(policy)                     # the small part a checkpoint needs
    plain = merge_lora(policy)                             # a plain Llama again, the update folded in
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from babyllama.model.llama import Llama

# The linear layers of every block, by name (`model.layers.N.self_attn.q_proj`, ...): what adapters may wrap.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRASpec:
    """What adapters a model gets: rank r, scale alpha (the update is alpha / r x B A), dropout on their input,
    and the projections they wrap (names of `LORA_TARGETS`)."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=LORA_TARGETS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))  # a list from a checkpoint or the flags
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if self.rank < 1 or not self.targets or unknown:
            raise ValueError(f"LoRASpec: rank must be at least 1 and targets among {', '.join(LORA_TARGETS)} "
                             f"(got rank {self.rank}, targets {list(self.targets)})")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}


class LoRALinear(nn.Module):
    """`base_layer` (frozen by `add_lora`) plus the trainable low-rank update: the layout and the computation of
    peft's `lora.Linear` with a single adapter, so state-dict keys are `...q_proj.lora_A.weight`."""

    def __init__(self, base_layer: nn.Linear, spec: LoRASpec, generator: torch.Generator | None = None):
        super().__init__()
        w = base_layer.weight
        self.base_layer = base_layer
        self.scaling = spec.alpha / spec.rank
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, spec.rank, bias=False, device="meta")
        self.lora_B = nn.Linear(spec.rank, base_layer.out_features, bias=False, device="meta")
        # A: Kaiming-uniform with a = sqrt(5) as peft (nn.Linear's own), drawn on the CPU from `generator` so that
        # the adapters start alike on every device; B: zeros
        a = torch.empty(spec.rank, base_layer.in_features, dtype=w.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A.weight = nn.Parameter(a.to(w.device))
        self.lora_B.weight = nn.Parameter(torch.zeros(base_layer.out_features, spec.rank, dtype=w.dtype,
                                                      device=w.device))

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    @property
    def weight(self) -> Tensor:
        """The effective weight W + (alpha / r) B A (no dropout: what evaluation and decoding compute), for code
        that reads a projection's weight, such as `Llama.fuse_projections`."""
        return torch.addmm(self.base_layer.weight, self.lora_B.weight, self.lora_A.weight, alpha=self.scaling)


def add_lora(model: Llama, spec: LoRASpec, seed: int = 0) -> Llama:
    """Wrap `spec.targets` of every block of `model` in place and freeze everything but the adapters. Returns it.
    The adapters' random start depends on `seed` alone (not on the global random state: what ran before)."""
    generator = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    for block in model.model.layers:
        for part in (block.self_attn, block.mlp):
            for name, child in list(part.named_children()):
                if name in spec.targets and type(child) is nn.Linear:
                    setattr(part, name, LoRALinear(child, spec, generator))
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' weights only (`...lora_A.weight`, `...lora_B.weight`)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its projection, which becomes a plain `nn.Linear` again. The merged weights are new
    tensors: a model that shares its base weights with another (`sharing_copy`) leaves the other as it was."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                layer = child.base_layer
                layer.weight = nn.Parameter(child.weight, requires_grad=layer.weight.requires_grad)
                setattr(parent, name, layer)
    return model


def sharing_copy(model: Llama) -> Llama:
    """Another `Llama` module tree over the very same weight tensors (no copy): adapters added to it leave `model`
    untouched, so `model` can be its frozen reference (DPO, PPO, GRPO) at no memory cost. The weights must then stay
    frozen in both, as `add_lora` leaves them."""
    with torch.device("meta"):  # no memory and no random numbers for weights that are replaced at once
        copy = Llama(model.config)
    copy.load_state_dict(model.state_dict(keep_vars=True), assign=True)  # tied weights stay tied
    copy.rope_cos, copy.rope_sin = model.rope_cos, model.rope_sin
    copy.gradient_checkpointing, copy.chunked_loss = model.gradient_checkpointing, model.chunked_loss
    return copy


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of every weight's name, dtype, shape and bytes: what an adapter checkpoint records of its base, so
    that adapters are never merged onto other weights than those they were trained on."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]
