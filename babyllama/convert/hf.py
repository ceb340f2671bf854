"""Convert between babyllama checkpoints and the Hugging Face and bert4torch LLaMA formats.

    export_hf("out/baby/sft", "out/baby/tokenizer", "hf_dir")      # transformers.AutoModelForCausalLM loads hf_dir
    import_hf("hf_dir", "imported/")             # -> imported/step_00000000.pt and imported/tokenizer
    export_bert4torch("out/baby/sft", "b4t_dir")                    # bert4torch_config.json + bert4torch_model.pt
    import_bert4torch("b4t_dir", "imported/")

Any stage's checkpoint exports (a file or a stage directory, whose newest checkpoint is taken): PPO checkpoints
give their policy and reward checkpoints their language-model backbone (`checkpoint.load_model` reads both).

Hugging Face directory: `config.json` (LlamaForCausalLM), `model.safetensors` (fp32; `lm_head.weight` left out
when tied, as transformers does), `generation_config.json` (stops at `</s>` and `<|im_end|>`), and the tokenizer
(`tokenizer.json` for `PreTrainedTokenizerFast`/`AutoTokenizer`, `tokenizer.model`, and `tokenizer_config.json`
with the special tokens and the ChatML `chat_template` of `babyllama.data.chat_template`). A `bert4torch_config.json` is added
too, so bert4torch's `build_transformer_model(config_path=..., checkpoint_path=".../model.safetensors")` loads
the same directory (bert4torch maps HF names itself).

bert4torch directory: `bert4torch_config.json` plus `bert4torch_model.pt`, a state dict with bert4torch's own
parameter names (`decoderLayer.0.multiHeadAttention.q.weight`, ...), i.e. what torch4keras `save_weights` writes
and `model.load_state_dict` / `load_weights` reads. The `.pt` suffix keeps bert4torch's directory auto-loader
(which expects HF names in `*.bin`/`*.safetensors`) from picking it up and silently loading nothing.

Imported checkpoints hold `model` and `model_config` (step 0, no optimizer state): what `checkpoint.load_model`
and the stages' `--init` read; a source whose embedding is larger than its tokenizer gets the rest masked
(`ModelConfig.tokenizer_vocab_size`).

Padded vocabularies: exports cut the embedding and lm_head to the tokenizer's ids (`unpadded`), so the consumer's
`vocab_size` is its tokenizer's size and no padding id can be produced by a consumer that does not mask.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import tempfile
import types
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from babyllama.data.chat_template import IM_END, IM_START
from babyllama.train.checkpoint import atomic_save, checkpoint_path, load_model
from babyllama.model.config import ModelConfig, load_bert4torch_config
from babyllama.errors import UserError
from babyllama.model.llama import Llama
from babyllama.data.tokenizer import Tokenizer

HF_WEIGHTS = "model.safetensors"
B4T_CONFIG = "bert4torch_config.json"  # the only name bert4torch's build_transformer_model reads
B4T_WEIGHTS = "bert4torch_model.pt"

# babyllama.data.chat_template's template in Jinja: `<s>` then `<|im_start|>{role}\n{content}<|im_end|>\n` per message.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    f"{IM_START}{{{{ message['role'] }}}}\n{{{{ message['content'] }}}}{IM_END}\n"
    "{% endfor %}{% if add_generation_prompt %}"
    f"{IM_START}assistant\n"
    "{% endif %}"
)

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


# ======================================================================= Hugging Face
def export_hf(checkpoint: str | Path, tokenizer: str | Path, out_dir: str | Path) -> Path:
    """Write a transformers `LlamaForCausalLM` directory (see the module docstring) for a babyllama checkpoint."""
    tok = Tokenizer.load(tokenizer)
    model, out = load_model(checkpoint, tokenizer=tok), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, weights = unpadded(model)
    ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}  # transformers >= 5 reads rope_parameters
    _write_json(out / "config.json", {**cfg.to_hf(), **ids, "rope_parameters": rope, "torch_dtype": "float32",
                                      "use_cache": True})
    stops = [i for i in (tok.eos_id, tok.token_to_id(IM_END)) if i is not None]
    _write_json(out / "generation_config.json", {**ids, "eos_token_id": stops})
    _write_json(out / B4T_CONFIG, bert4torch_config(cfg))
    # safetensors refuses shared storage; transformers re-ties lm_head from tie_word_embeddings.
    skip = {"lm_head.weight"} if cfg.tie_embeddings else set()
    save_file({k: v.float() for k, v in weights.items() if k not in skip}, str(out / HF_WEIGHTS),
              metadata={"format": "pt"})
    _save_hf_tokenizer(tok, out, cfg.max_seq_len)
    return out


def unpadded(model: Llama) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The config and weights an export writes: the embedding and lm_head cut to the tokenizer's ids. Training
    masks the padding rows, so they hold untrained weights that transformers, bert4torch or llama.cpp (which do not
    mask) would sample; without them their `vocab_size` is the tokenizer's size, as their loaders expect."""
    n = model.config.n_tokens
    cfg = replace(model.config, vocab_size=n, tokenizer_vocab_size=None)
    cut = {"model.embed_tokens.weight", "lm_head.weight"}
    return cfg, {k: (v[:n] if k in cut else v).detach().clone() for k, v in model.state_dict().items()}


def _save_hf_tokenizer(tok: Tokenizer, out: Path, max_len: int) -> None:
    tok.save(out)
    if not (out / "tokenizer.json").is_file():
        raise UserError(f"{tok.source}: this tokenizer has no Hugging Face tokenizer.json equivalent; "
                        "transformers could not load it (use a tokenizer trained by babyllama or an HF one)")
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(chat_template=CHAT_TEMPLATE, model_max_length=max_len)
    _write_json(config_path, config)


def import_hf(src: str | Path, out_dir: str | Path, gguf_file: str | None = None) -> Path:
    """A babyllama checkpoint (`out_dir/step_00000000.pt`, tokenizer in `out_dir/tokenizer`) from an HF LLaMA
    directory; with `gguf_file`, from a GGUF file in `src` that transformers dequantizes (needs
    requirements-gguf.txt: `gguf`, `accelerate`)."""
    src = Path(src)
    if gguf_file:
        hf_config, weights, tok = _read_gguf(src, gguf_file)
        cfg = hf_model_config(hf_config, str(src / gguf_file))
    else:
        cfg = hf_model_config(_read_json(src / "config.json"), str(src / "config.json"))
        weights, tok = _read_hf_weights(src), Tokenizer.load(src) if _has_tokenizer(src) else None
    model = _load_weights(cfg, weights, str(src))
    if tok is not None:  # e.g. an HF model padded past its tokenizer: the checkpoint masks the rest
        model.mask_beyond(tok.vocab_size)
    path = save_imported(model, out_dir, str(src))
    if tok is not None:
        tok.save(Path(out_dir) / "tokenizer")
    return path


def hf_model_config(hf: dict[str, Any], source: str) -> ModelConfig:
    """`ModelConfig` of an HF config dict, refusing what `babyllama.model.llama.Llama` does not implement."""
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in (hf.get("architectures") or []):
        raise UserError(f"{source}: model_type {hf.get('model_type')!r} is not a LLaMA; only LlamaForCausalLM "
                        "checkpoints import")
    unsupported = {k: hf.get(k) for k, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False))
                   if hf.get(k, ok) != ok}
    ropes = [r for r in (hf.get("rope_parameters"), hf.get("rope_scaling")) if r]  # transformers 5 / 4 spelling
    scaled = {r.get("rope_type", r.get("type", "default")) for r in ropes} - {"default"}
    if scaled:
        unsupported["rope_type"] = sorted(scaled)
    if unsupported:
        raise UserError(f"{source}: {unsupported} not supported (babyllama implements silu, no biases, plain RoPE)")
    theta = next((r["rope_theta"] for r in ropes if "rope_theta" in r), hf.get("rope_theta"))
    return ModelConfig.from_hf({**hf, "rope_theta": theta}, source)


def _read_hf_weights(src: Path) -> dict[str, Tensor]:
    shards = sorted(src.glob("*.safetensors"))
    if shards:
        return {k: v for f in shards for k, v in load_file(str(f)).items()}
    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise UserError(f"{src}: no *.safetensors or pytorch_model*.bin weights; pass a save_pretrained directory")
    return {k: v for f in bins for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}


def _read_gguf(src: Path, gguf_file: str) -> tuple[dict[str, Any], dict[str, Tensor], Tokenizer]:
    """transformers reads GGUF (dequantizing to fp32); its tokenizer is saved and reloaded as ours."""
    import transformers  # only this path needs it

    if not (src / gguf_file).is_file():
        raise UserError(f"{src / gguf_file}: GGUF file not found")
    # transformers reads GGUF metadata with `gguf` and refuses gguf_file without `accelerate`
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--gguf-file needs {' and '.join(missing)}: pip install -r requirements-gguf.txt")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        transformers.AutoTokenizer.from_pretrained(src, gguf_file=gguf_file).save_pretrained(tmp)
        tok = Tokenizer.load(Path(tmp) / "tokenizer.json")
    return hf_model.config.to_dict(), hf_model.state_dict(), tok


def _has_tokenizer(src: Path) -> bool:
    return any((src / n).is_file() for n in ("tokenizer.model", "tokenizer.json"))


# ======================================================================= bert4torch
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


def export_bert4torch(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write `bert4torch_config.json` + `bert4torch_model.pt` (bert4torch parameter names) for a checkpoint."""
    model, out = load_model(checkpoint), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, ours = unpadded(model)  # holds lm_head.weight even when tied, as bert4torch's state dict does
    _write_json(out / B4T_CONFIG, bert4torch_config(cfg))
    weights = {b4t: ours[hf] for b4t, hf in bert4torch_names(cfg.n_layers).items()}
    torch.save(weights, out / B4T_WEIGHTS)
    return out


def import_bert4torch(src: str | Path, out_dir: str | Path, weights: str | Path | None = None) -> Path:
    """A babyllama checkpoint from a bert4torch LLaMA: `src` is the directory with `bert4torch_config.json`
    (or that file); `weights` defaults to `bert4torch_model.pt` there. bert4torch names or HF names both load."""
    src = Path(src)
    config_path = src if src.is_file() else src / B4T_CONFIG
    cfg = load_bert4torch_config(config_path)
    weights = Path(weights) if weights else config_path.parent / B4T_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{weights}: weights not found; pass --weights (a torch4keras save_weights file)")
    raw = load_file(str(weights)) if weights.suffix == ".safetensors" else torch.load(weights, map_location="cpu",
                                                                                        weights_only=True)
    names = bert4torch_names(cfg.n_layers)
    model = _load_weights(cfg, {names.get(k, k): v for k, v in raw.items()}, str(weights))
    return save_imported(model, out_dir, str(weights))


# ======================================================================= shared
def _load_weights(cfg: ModelConfig, weights: dict[str, Tensor], source: str) -> Llama:
    """A `Llama` with exactly these weights; rotary tables (buffers in some exports) are ignored."""
    model = Llama(cfg)
    weights = {k: v.float() for k, v in weights.items() if "rotary_emb" not in k}
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
        weights["lm_head.weight"] = weights.get("model.embed_tokens.weight")
    expected = set(model.state_dict())
    missing = sorted(k for k in expected if weights.get(k) is None)
    unexpected = sorted(set(weights) - expected)
    if missing or unexpected:
        raise UserError(f"{source}: weights do not match the config (missing {_few(missing)}, "
                        f"unexpected {_few(unexpected)}); is it a LLaMA checkpoint of this config?")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{source}: weight shapes do not match the config ({detail})") from None
    return model.eval()


def save_imported(model: Llama, out_dir: str | Path, source: str) -> Path:
    """Write the model as `out_dir/step_00000000.pt`: the layout `--init` and `load_model` read."""
    path = checkpoint_path(out_dir, 0)
    atomic_save({"model": model.state_dict(), "model_config": model.config.to_dict(), "step": 0,
                 "extra": {"imported_from": source}}, path)
    return path


def _few(names: Iterable[str], n: int = 3) -> str:
    names = list(names)
    return "none" if not names else ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: not found; pass a directory written by save_pretrained")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
