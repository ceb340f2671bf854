"""What the reward-model and DPO stages share: their preference-data loaders and the held-out evaluation of a
pair loss."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from babyllama.data.preference import PreferenceDataset, PreferenceLoader, build_preference_loader, read_pairs
from babyllama.train.distributed import all_reduce_mean
from babyllama.train.run_config import PreferenceData


def preference_loaders(data: PreferenceData, tokenizer: Any, max_len: int, batch_size: int, seed: int,
                       rank: int = 0, world_size: int = 1) -> tuple[PreferenceLoader, PreferenceLoader]:
    """(shuffled training loader, fixed-order validation loader) of the run's preference data settings."""
    def dataset(path: str) -> PreferenceDataset:
        return PreferenceDataset(read_pairs(path, data.pref_format), tokenizer, max_len, data.system)

    shard = dict(batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
    return (build_preference_loader(dataset(data.train_data), **shard),
            build_preference_loader(dataset(data.valid_data), shuffle=False, **shard))


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
