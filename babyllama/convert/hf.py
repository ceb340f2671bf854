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
with the special tokens and the ChatML `chat_template` of `babyllama.data.chat_template`). A
`bert4torch_config.json` is added too, so bert4torch's `build_transformer_model(config_path=...,
checkpoint_path=".../model.safetensors")` loads the same directory (bert4torch maps HF names itself).

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

import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from babyllama.convert.bert4torch import B4T_CONFIG, bert4torch_config
from babyllama.convert.weights import claim_import_dir, load_weights, save_imported, unpadded, write_json
from babyllama.data.chat_template import IM_END, IM_START
from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.files import claim_out_dir, io_error_of, mode_like_open, staged_dir
from babyllama.model.config import ModelConfig, read_json
from babyllama.train.checkpoint import load_model

HF_WEIGHTS = "model.safetensors"
# what an HF export writes (tokenizer.model only for a SentencePiece tokenizer): what --overwrite replaces
HF_FILES = ("config.json", "generation_config.json", B4T_CONFIG, HF_WEIGHTS, "tokenizer.json", "tokenizer.model",
            "tokenizer_config.json")

# babyllama.data.chat_template's template in Jinja: `<s>` then `<|im_start|>{role}\n{content}<|im_end|>\n` per message.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    f"{IM_START}{{{{ message['role'] }}}}\n{{{{ message['content'] }}}}{IM_END}\n"
    "{% endfor %}{% if add_generation_prompt %}"
    f"{IM_START}assistant\n"
    "{% endif %}"
)


def export_hf(checkpoint: str | Path, tokenizer: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a transformers `LlamaForCausalLM` directory (see the module docstring) for a babyllama checkpoint,
    all or nothing (`files.staged_dir`). A non-empty `out_dir` is refused unless `overwrite`, which replaces the
    export's files there (others stay)."""
    out = Path(out_dir)
    claim_out_dir(out, overwrite, "Hugging Face export")
    tok = Tokenizer.load(tokenizer)
    model = load_model(checkpoint, tokenizer=tok)
    cfg, weights = unpadded(model)
    ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}  # transformers >= 5 reads rope_parameters
    stops = [i for i in (tok.eos_id, tok.token_to_id(IM_END)) if i is not None]
    # safetensors refuses shared storage; transformers re-ties lm_head from tie_word_embeddings.
    skip = {"lm_head.weight"} if cfg.tie_embeddings else set()
    with staged_dir(out, replaces=lambda entry: entry.name in HF_FILES) as tmp:
        write_json(tmp / "config.json", {**cfg.to_hf(), **ids, "rope_parameters": rope, "torch_dtype": "float32",
                                         "use_cache": True})
        write_json(tmp / "generation_config.json", {**ids, "eos_token_id": stops})
        write_json(tmp / B4T_CONFIG, bert4torch_config(cfg))
        _save_safetensors({k: v.float() for k, v in weights.items() if k not in skip}, tmp / HF_WEIGHTS)
        _save_hf_tokenizer(tok, tmp, cfg.max_seq_len)
    return out


def _save_safetensors(weights: dict[str, Tensor], path: Path) -> None:
    """`save_file`, whose I/O errors (a bare SafetensorError "... (os error N)") are raised as the OSError they are:
    a full disk or a file size limit is then one line (`files.staged_dir`, `cli.main_guard`)."""
    try:
        save_file(weights, str(path), metadata={"format": "pt"})
    except Exception as e:
        refused = io_error_of(e, path)
        if refused is None:
            raise
        raise refused from e
    mode_like_open(path)  # safetensors writes it 0600: an export is meant to be read by others (a model server)


def _save_hf_tokenizer(tok: Tokenizer, out: Path, max_len: int) -> None:
    tok.save(out)
    if not (out / "tokenizer.json").is_file():
        raise UserError(f"{tok.source}: this tokenizer has no Hugging Face tokenizer.json equivalent; "
                        "transformers could not load it (use a tokenizer trained by babyllama or an HF one)")
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(chat_template=CHAT_TEMPLATE, model_max_length=max_len)
    write_json(config_path, config)


def import_hf(src: str | Path, out_dir: str | Path, gguf_file: str | None = None, overwrite: bool = False) -> Path:
    """A babyllama checkpoint (`out_dir/step_00000000.pt`, tokenizer in `out_dir/tokenizer`) from an HF LLaMA
    directory; with `gguf_file`, from a GGUF file in `src` that transformers dequantizes (needs
    requirements-gguf.txt: `gguf`, `accelerate`). A non-empty `out_dir` is refused unless `overwrite`
    (`weights.save_imported` says what is replaced)."""
    src = Path(src)
    claim_import_dir(out_dir, overwrite)
    if gguf_file:
        hf_config, weights, tok = _read_gguf(src, gguf_file)
        cfg = hf_model_config(hf_config, str(src / gguf_file))
    else:
        config = src / "config.json"
        if not config.is_file():
            raise UserError(f"{config}: not found; pass a directory written by save_pretrained")
        cfg = hf_model_config(read_json(config), str(config))
        weights, tok = _read_hf_weights(src), Tokenizer.load(src) if _has_tokenizer(src) else None
    model = load_weights(cfg, weights, str(src))
    if tok is not None:  # e.g. an HF model padded past its tokenizer: the checkpoint masks the rest
        model.mask_beyond(tok.vocab_size)
    return save_imported(model, out_dir, str(src), tok)


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
