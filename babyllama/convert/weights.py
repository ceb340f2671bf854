"""What every conversion shares: a `Llama` from foreign weights (`load_weights`), the imported-checkpoint
layout (`save_imported`), cutting a padded vocabulary for export (`unpadded`), small JSON helpers."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

from torch import Tensor

from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.files import claim_out_dir, is_partial_write, staged_dir, write_atomic
from babyllama.model.config import ModelConfig
from babyllama.model.llama import Llama
from babyllama.train.checkpoint import atomic_save, checkpoint_path

_CHECKPOINT = r"step_\d+\.pt"


def unpadded(model: Llama) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The config and weights an export writes: the embedding and lm_head cut to the tokenizer's ids. Training
    masks the padding rows, so they hold untrained weights that transformers, bert4torch or llama.cpp (which do not
    mask) would sample; without them their `vocab_size` is the tokenizer's size, as their loaders expect."""
    n = model.config.n_tokens
    cfg = replace(model.config, vocab_size=n, tokenizer_vocab_size=None)
    cut = {"model.embed_tokens.weight", "lm_head.weight"}
    return cfg, {k: (v[:n] if k in cut else v).detach().clone() for k, v in model.state_dict().items()}


def load_weights(cfg: ModelConfig, weights: dict[str, Tensor], source: str) -> Llama:
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
        raise UserError(f"{source}: weights do not match the config (missing {few(missing)}, "
                        f"unexpected {few(unexpected)}); is it a LLaMA checkpoint of this config?")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{source}: weight shapes do not match the config ({detail})") from None
    return model.eval()


def claim_import_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an import into a non-empty directory unless `overwrite` (before anything is read)."""
    claim_out_dir(Path(out_dir), overwrite, "checkpoints (step_*.pt) and tokenizer with the imported ones")


def save_imported(model: Llama, out_dir: str | Path, source: str, tokenizer: Tokenizer | None = None) -> Path:
    """Write the model as `out_dir/step_00000000.pt` (the layout `--init` and `load_model` read) and `tokenizer`
    to `out_dir/tokenizer`, all or nothing (`files.staged_dir`). Into an existing directory they replace the
    checkpoints and the tokenizer there (a newer step_*.pt would be loaded instead of the import); other files stay."""
    out = Path(out_dir)
    with staged_dir(out, replaces=_imported_kind) as tmp:
        atomic_save({"model": model.state_dict(), "model_config": model.config.to_dict(), "step": 0,
                     "extra": {"imported_from": source}}, checkpoint_path(tmp, 0))
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
    return checkpoint_path(out, 0)


def _imported_kind(entry: Path) -> bool:
    """What an import replaces: checkpoints (and a killed write's temp files of them) and the tokenizer."""
    return entry.name == "tokenizer" or re.fullmatch(_CHECKPOINT, entry.name) is not None \
        or is_partial_write(entry, _CHECKPOINT)


def few(names: Iterable[str], n: int = 3) -> str:
    names = list(names)
    return "none" if not names else ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def write_json(path: Path, obj: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
