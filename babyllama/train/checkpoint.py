"""Atomic, full-state checkpoints: `step_00000100.pt` files in a directory, the newest K kept.

A checkpoint holds everything an exact resume needs (model, optimizer, scheduler, grad scaler, RNG states,
data-sampler position, step) plus the model config, so that loading into another architecture is a clear error,
and (in `extra`) the fingerprint of the tokenizer it was trained with, so that another tokenizer is one too.
"""
from __future__ import annotations

import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from babyllama.data.tokenizer import Tokenizer, check_tokenizer
from babyllama.errors import UserError
from babyllama.files import atomic_file, is_partial_write
from babyllama.model.config import ModelConfig

_STEP_FILE = r"step_(\d{8})\.pt"
_NAME = re.compile(rf"^{_STEP_FILE}$")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in `directory`, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file: `path` itself, or the newest step_*.pt in a stage directory."""
    p = Path(path)
    found = latest_checkpoint(p) if p.is_dir() else p
    if found is None or not found.is_file():
        raise UserError(f"{path}: no checkpoint (step_*.pt) here; train the stage first or pass --ckpt")
    return found


def last_good_hint(directory: str | Path) -> str:
    """What to do after a diverged run: the newest checkpoint (only finite weights are ever saved) and how to
    continue from it."""
    found = latest_checkpoint(directory)
    if found is None:
        return "no checkpoint was saved before it; start again with a lower --lr"
    return f"the last good checkpoint is {found}: continue from it with --resume and a lower --lr"


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through `outdir.atomic_file`: a crash never leaves half a file, and a power loss right after does
    not lose the rename."""
    with atomic_file(Path(path)) as f:
        torch.save(obj, f)


def remove_partial_writes(directory: str | Path) -> None:
    """Delete the temp files of checkpoint writes that were killed midway (they would pile up otherwise)."""
    d = Path(directory)
    if d.is_dir():
        for p in d.iterdir():
            if is_partial_write(p, _STEP_FILE):
                p.unlink(missing_ok=True)


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep: int | None = None) -> Path:
    path = checkpoint_path(directory, step)
    atomic_save(state, path)
    if keep:
        for old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, or the newest one in a directory."""
    p = Path(path)
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise UserError(f"{p}: no checkpoint (step_*.pt) in this directory; train the stage first")
        p = found
    if not p.is_file():
        raise UserError(f"{p}: checkpoint not found")
    check_integrity(p)
    try:
        return torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated or foreign files fail deep inside pickle/zip
        raise UserError(f"{p}: not a readable checkpoint ({type(e).__name__}: {e}); "
                        "delete it or pick another") from None


def check_integrity(path: Path) -> None:
    """A checkpoint is a zip whose every entry (each tensor's bytes) carries a CRC-32: a flipped or overwritten byte
    anywhere is a one-line error here, where torch.load would read it silently."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path}: not a readable checkpoint ({e}); {_previous_hint(path)}") from None
    if bad is not None:
        raise UserError(f"{path}: corrupted (its entry {bad} fails its checksum); {_previous_hint(path)}")


def _previous_hint(path: Path) -> str:
    older = [p for p in list_checkpoints(path.parent) if p.name < path.name]
    return f"delete it and use the previous checkpoint {older[-1]}" if older else "delete it or pick another"


def check_model_config(state: dict[str, Any], cfg: ModelConfig, source: str | Path) -> None:
    """Refuse to load weights trained for another architecture, naming the fields that differ."""
    saved = state.get("model_config")
    if saved is None:
        raise UserError(f"{source}: checkpoint has no model_config; it was not written by babyllama")
    diff = {k: (saved.get(k), v) for k, v in cfg.to_dict().items() if saved.get(k) != v}
    if diff:
        pretty = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in diff.items())
        raise UserError(f"{source}: checkpoint is for another model config ({pretty}); "
                        "use the same --name/preset and tokenizer, or a fresh output directory")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               strict: bool = False, tokenizer: "Tokenizer | None" = None, base: str | Path | None = None):
    """A `Llama` with the weights of a checkpoint file (or the newest in a directory), in eval mode.

    `strict=True` also refuses weights the model does not use (e.g. a reward model's value head), for stages
    that must start from a plain language model. `tokenizer`: refuse it unless it is the one the checkpoint was
    trained with (and fits its vocabulary); the ids past it are masked (`Llama.mask_beyond`: checkpoints from
    before the padding was recorded, and imports, do not say so themselves).

    The checkpoint of a --lora-rank stage holds adapters only (`extra.lora`): they are merged onto the checkpoint
    they were trained on (`base`, else the one the record names, relative to the adapters' directory), which must
    hold the very weights they were trained on (its fingerprint), so every consumer reads such a stage as any
    other."""
    from babyllama.model.llama import Llama  # local import: the model module does not need checkpoint code
    from babyllama.model.lora import lora_state_dict, merge_lora

    state = load_checkpoint(path)
    if state.get("model_config") is None:
        raise UserError(f"{path}: checkpoint has no model_config; it was not written by babyllama")
    cfg = ModelConfig.from_dict(state["model_config"], str(path))
    if tokenizer is not None:
        check_tokenizer(tokenizer, cfg.vocab_size, trained_tokenizer(state), path)
    adapters = adapter_record(state)
    if adapters is None:
        model = Llama(cfg)
        expected = set(model.state_dict())
    else:
        model = _adapted_base(resolve_checkpoint(path), adapters, cfg, tokenizer, base)
        expected = set(lora_state_dict(model))
    weights = {k.removeprefix("policy."): v for k, v in state["model"].items()}
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # size mismatch: the weights do not match the checkpoint's own model_config
        first = str(e).strip().splitlines()[1:2] or [str(e)]  # line 0 is "Error(s) in loading state_dict ..."
        raise UserError(f"{path}: weights do not fit the checkpoint's model_config ({first[0].strip()}); "
                        "the file is damaged or not babyllama's") from None
    missing = [k for k in missing if k in expected]  # an adapter checkpoint lacks the base's weights, by design
    if missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} model weights (e.g. {missing[0]}); "
                        "is it a babyllama language-model checkpoint?")
    if strict and unexpected:
        raise UserError(f"{path}: checkpoint has {len(unexpected)} weights a language model does not use "
                        f"(e.g. {unexpected[0]}); is it a reward/value model? pass a pretrain or SFT checkpoint")
    if adapters is not None:
        merge_lora(model).requires_grad_(True)  # a plain model, as any other checkpoint loads
    if tokenizer is not None:
        model.mask_beyond(tokenizer.vocab_size)
    return model.to(device=device, dtype=dtype).eval()


def adapter_record(state: dict[str, Any]) -> dict[str, Any] | None:
    """What the checkpoint of a --lora-rank stage records of its adapters (rank, alpha, dropout, targets) and of the
    checkpoint they sit on (`base`, relative to the adapters' directory; `base_fingerprint`); None for a checkpoint
    of every weight."""
    return (state.get("extra") or {}).get("lora")


def _adapted_base(path: Path, adapters: dict[str, Any], cfg: ModelConfig, tokenizer: "Tokenizer | None",
                  base: str | Path | None):
    """The model the adapters of checkpoint `path` were trained on (loaded as any checkpoint: adapters on adapters
    merge down the chain), with empty adapters of their shape added."""
    from babyllama.model.lora import LoRASpec, add_lora, weights_fingerprint

    base_path = Path(base) if base is not None else path.parent / adapters["base"]
    if not base_path.exists():
        raise UserError(f"{path}: its LoRA adapters sit on {base_path}, which is missing; restore that checkpoint, "
                        f"or merge them onto a copy of it: babyllama lora merge --ckpt {path} --base COPY --dest DIR")
    model = load_model(base_path, tokenizer=tokenizer)
    found = weights_fingerprint(model)
    if found != adapters["base_fingerprint"]:
        raise UserError(f"{path}: its LoRA adapters were trained on other weights than those of {base_path} "
                        f"(fingerprint {found}, the adapters' base {adapters['base_fingerprint']}); pass the "
                        "checkpoint they were trained on (babyllama lora merge --base)")
    model.config = cfg  # the adapters' own record of it (the tokenizer's size included)
    spec = LoRASpec(adapters["rank"], adapters["alpha"], adapters["dropout"], adapters["targets"])
    return add_lora(model, spec)


def trained_tokenizer(state: dict[str, Any]) -> str | None:
    """The fingerprint of the tokenizer a checkpoint was trained with (None if not recorded)."""
    return (state.get("extra") or {}).get("tokenizer")
