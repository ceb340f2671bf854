"""What the reward-model and DPO stages share: their preference-data flags and loaders, and the held-out
evaluation of a pair loss."""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from babyllama.cli import Rule
from babyllama.data.preference import FORMATS, PreferenceDataset, PreferenceLoader, build_preference_loader, read_pairs
from babyllama.shipped import PREFERENCE
from babyllama.train.distributed import all_reduce_mean


def add_preference_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-data", default=str(PREFERENCE / "pref_train.jsonl"),
                        help="preference pairs to train on (JSON lines or a JSON array, see --pref-format)")
    parser.add_argument("--valid-data", default=str(PREFERENCE / "pref_valid.jsonl"), help="pairs for validation")
    parser.add_argument("--pref-format", default="auto", choices=("auto", *FORMATS),
                        help="pairs: prompt/chosen/rejected; hh: Anthropic hh-rlhf texts")
    parser.add_argument("--system", default=None, help="system prompt for prompts that have none (as in SFT)")


PREFERENCE_RULES: tuple[Rule, ...] = (  # of `add_preference_flags`, for `cli.check_ranges`
    ("train_data", lambda v: Path(v).is_file(), "an existing file"),
    ("valid_data", lambda v: Path(v).is_file(), "an existing file"))


def preference_loaders(args: argparse.Namespace, tokenizer: Any, max_len: int, batch_size: int, seed: int,
                       rank: int = 0, world_size: int = 1) -> tuple[PreferenceLoader, PreferenceLoader]:
    """(shuffled training loader, fixed-order validation loader) from the `add_preference_flags` flags."""
    def dataset(path: str) -> PreferenceDataset:
        return PreferenceDataset(read_pairs(path, args.pref_format), tokenizer, max_len, args.system)

    shard = dict(batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
    return (build_preference_loader(dataset(args.train_data), **shard),
            build_preference_loader(dataset(args.valid_data), shuffle=False, **shard))


def evaluate_pairs(trainer: Any, loss_fn: Callable, loader: Iterable, max_batches: int | None = None,
                   prefix: str = "val_") -> dict[str, float]:
    """Mean loss and metrics of a pair loss (`loss_fn(model, batch) -> (loss, metrics)`) over a loader."""
    model, device = trainer.network, trainer.env.device
    model.eval()
    sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    n = 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            with trainer.autocast():
                loss, metrics = loss_fn(model, tuple(t.to(device) for t in batch))
            size = len(batch[0])  # weigh batches by their number of pairs
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] += v.float() * size
            n += size
    model.train()
    return {prefix + k: float(all_reduce_mean(v / max(n, 1))) for k, v in sums.items()}
