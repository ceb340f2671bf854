"""bert4torch: export a babyllama checkpoint as a bert4torch LLaMA directory and import one back (parameter
names mapped both ways; see `babyllama.convert.hf`'s docstring for the directory layout)."""
from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from babyllama.convert.weights import claim_import_dir, load_weights, save_imported, unpadded, write_json
from babyllama.errors import UserError
from babyllama.files import claim_out_dir, staged_dir
from babyllama.model.config import ModelConfig, load_bert4torch_config
from babyllama.train.checkpoint import atomic_save, load_model

B4T_CONFIG = "bert4torch_config.json"  # the only name bert4torch's build_transformer_model reads
B4T_WEIGHTS = "bert4torch_model.pt"

# bert4torch 0.6.2 builds a LLaMA only from these keys (without them it silently builds a BERT-like decoder);
# `segment_vocab_size: 0` drops the segment embedding it otherwise adds, whose forward then expects segment ids.
_B4T_ARCH = dict(model="llama", layer_type="LLMLayer", attn_type="RopeAttention", pos_emb_type="rotary",
                 mlp_type="LlamaFeedForward", layer_norm_mode="rmsnorm", final_layernorm=True, use_bias=False,
                 rope_rank="updown", _attn_implementation="sdpa", hidden_act="silu", segment_vocab_size=0)

# bert4torch name -> HF name, per layer; from LLaMA.variable_mapping in bert4torch/models/llama/modeling_llama.py.
_B4T_LAYER = {
    "multiHeadAttention.q": "self_attn.q_proj", "multiHeadAttention.k": "self_attn.k_proj",
    "multiHeadAttention.v": "self_attn.v_proj", "multiHeadAttention.o": "self_attn.o_proj",
    "attnLayerNorm": "input_layernorm", "feedForward.intermediateDense": "mlp.gate_proj",
    "feedForward.intermediateDense2": "mlp.up_proj", "feedForward.outputDense": "mlp.down_proj",
    "ffnLayerNorm": "post_attention_layernorm",
}
_B4T_GLOBAL = {"embeddings.word_embeddings.weight": "model.embed_tokens.weight",
               "LayerNormFinal.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}


def bert4torch_config(cfg: ModelConfig) -> dict[str, Any]:
    """The `bert4torch_config.json` that makes bert4torch 0.6.2 build this exact LLaMA."""
    hf = cfg.to_hf()
    sizes = {k: hf[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "intermediate_size", "max_position_embeddings",
                                "rope_theta", "tie_word_embeddings", "initializer_range")}
    return {**_B4T_ARCH, **sizes, "layer_norm_eps": cfg.norm_eps}


def bert4torch_names(n_layers: int) -> dict[str, str]:
    """bert4torch parameter name -> HF (= babyllama) parameter name."""
    names = dict(_B4T_GLOBAL)
    for i in range(n_layers):
        names.update({f"decoderLayer.{i}.{b4t}.weight": f"model.layers.{i}.{hf}.weight"
                      for b4t, hf in _B4T_LAYER.items()})
    return names


def bert4torch_builder() -> Callable[..., torch.nn.Module]:
    """bert4torch's `build_transformer_model`, imported with a stand-in for torchvision: its one unguarded
    torchvision import is in the Qwen2-VL video processor, never used for LLaMA, and PyPI's torchvision does not
    load beside the CPU torch wheel (see requirements-bert4torch.txt). torch4keras deletes `nn.Module.compile` on
    import; it is put back."""
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional"]
    stand_ins = {n: types.ModuleType(n) for n in names if n not in sys.modules}
    for n, m in stand_ins.items():
        m.__spec__ = importlib.machinery.ModuleSpec(n, None)  # no dist metadata: bert4torch sees "not installed"
    compile_method = torch.nn.Module.compile
    sys.modules.update(stand_ins)
    try:
        from bert4torch.models import build_transformer_model
    finally:
        for n in stand_ins:
            del sys.modules[n]
        torch.nn.Module.compile = compile_method
    return build_transformer_model


def export_bert4torch(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `bert4torch_config.json` + `bert4torch_model.pt` (bert4torch parameter names) for a checkpoint, both or
    neither (`files.staged_dir`). A non-empty `out_dir` is refused unless `overwrite`, which replaces these two
    files there (others stay)."""
    out = Path(out_dir)
    claim_out_dir(out, overwrite, "bert4torch export")
    model = load_model(checkpoint)
    cfg, ours = unpadded(model)  # holds lm_head.weight even when tied, as bert4torch's state dict does
    weights = {b4t: ours[hf] for b4t, hf in bert4torch_names(cfg.n_layers).items()}
    with staged_dir(out) as tmp:
        write_json(tmp / B4T_CONFIG, bert4torch_config(cfg))
        atomic_save(weights, tmp / B4T_WEIGHTS)
    return out


def import_bert4torch(src: str | Path, out_dir: str | Path, weights: str | Path | None = None,
                      overwrite: bool = False) -> Path:
    """A babyllama checkpoint from a bert4torch LLaMA: `src` is the directory with `bert4torch_config.json`
    (or that file); `weights` defaults to `bert4torch_model.pt` there. bert4torch names or HF names both load.
    A non-empty `out_dir` is refused unless `overwrite` (`weights.save_imported` says what is replaced)."""
    src = Path(src)
    claim_import_dir(out_dir, overwrite)
    config_path = src if src.is_file() else src / B4T_CONFIG
    cfg = load_bert4torch_config(config_path)
    weights = Path(weights) if weights else config_path.parent / B4T_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{weights}: weights not found; pass --weights (a torch4keras save_weights file)")
    raw = load_file(str(weights)) if weights.suffix == ".safetensors" else torch.load(weights, map_location="cpu",
                                                                                        weights_only=True)
    names = bert4torch_names(cfg.n_layers)
    model = load_weights(cfg, {names.get(k, k): v for k, v in raw.items()}, str(weights))
    return save_imported(model, out_dir, str(weights))
