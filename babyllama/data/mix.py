"""Pretraining text mixed into SFT batches (`babyllama sft --pretrain-mix`), to bound what fine-tuning makes the
model forget of its pretraining.

A batch of B rows holds B - k conversations, exactly as the SFT loader batches them with batch size B - k, then
k = `pretrain_rows(mix, B)` windows of pretraining token data (the train split of out/<name>/data). The windows
come in the order pretraining's train loader draws them (`ResumableSampler`, same seed, same rank sharding), each
a `max_seq_len + 1`-token sample of `TokenWindowDataset` cut to its first W + 1 tokens, W being the width of the
batch's conversations: the batch is no wider than without the mix, and a window row has no padding. Its targets
are every next token (no -100), so the loss, a mean over target tokens, weighs the windows by their tokens.

Position: the trainer keeps `epoch` and `consumed` (rows of both kinds trained on this epoch) and hands them back to
`loader.sampler.load_state_dict` on resume. The conversations' position follows from them, and the windows of a
batch are a function of how many batches came before it (k windows each, across the windows' own epochs), so a
resumed run sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from babyllama.data.sampler import ResumableSampler
from babyllama.data.sft import BucketBatchSampler, SFTDataset, collate_sft
from babyllama.data.token_bins import TokenWindowDataset, check_tokenizer_matches
from babyllama.errors import UserError


def pretrain_rows(mix: float, batch_size: int) -> int:
    """Rows of pretraining text in a batch of `batch_size` rows at `mix` (rounded half up). A small batch may round
    to 0 (the default mix of a batch of 2: no window, conversations only); a mix that leaves no conversation is
    refused."""
    rows = math.floor(mix * batch_size + 0.5)
    if rows >= batch_size:
        raise UserError(f"--pretrain-mix {mix}: {rows} of the {batch_size} rows of a batch (--batch-size) would be "
                        f"pretraining text, leaving no conversation; lower --pretrain-mix or raise --batch-size")
    return rows


class MixedBatchSampler:
    """Yields `(conversation indices, window indices)` per batch; resumable in the trainer's units (rows)."""

    def __init__(self, sft: BucketBatchSampler, num_windows: int, rows: int):
        self.sft, self.rows = sft, rows
        self.windows = ResumableSampler(num_windows, seed=sft.seed, rank=sft.rank, world_size=sft.world_size,
                                        drop_last=True)  # as pretraining's train loader
        self.per_epoch = len(sft.batches(0))  # every epoch has as many batches

    def _batches_done(self) -> int:
        # full batches, then (last in the epoch) one short one: a ceiling counts it
        return -(-self.sft.consumed // self.sft.batch_size)

    def __iter__(self) -> Iterator[tuple[list[int], list[int]]]:
        first = self.sft.epoch * self.per_epoch + self._batches_done()
        for n, batch in enumerate(self.sft, start=first):
            yield batch, self.window_indices(n * self.rows, self.rows)

    def window_indices(self, start: int, count: int) -> list[int]:
        """Windows `start:start + count` of this rank's stream, epoch after epoch of the windows' sampler."""
        out: list[int] = []
        while count:
            epoch, pos = divmod(start, self.windows.per_rank)
            take = min(count, self.windows.per_rank - pos)
            out += self.windows.rank_indices(epoch, pos, pos + take).tolist()
            start, count = start + take, count - take
        return out

    def __len__(self) -> int:
        return len(self.sft)

    def set_epoch(self, epoch: int) -> None:
        self.sft.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sft.epoch, "consumed": self.sft.consumed + self.rows * self._batches_done()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """`consumed` counts the rows of both kinds: each batch so far had `rows` windows."""
        consumed = int(state["consumed"])
        batches = -(-consumed // (self.sft.batch_size + self.rows))
        self.sft.load_state_dict({"epoch": int(state["epoch"]), "consumed": consumed - self.rows * batches})


class MixedLoader:
    """`(input_ids, targets)` batches: the conversations' rows (right-padded, as `collate_sft`), then the windows'."""

    def __init__(self, dataset: SFTDataset, windows: TokenWindowDataset, sampler: MixedBatchSampler):
        self.dataset, self.windows, self.sampler = dataset, windows, sampler

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch, window_ids in self.sampler:
            x, y = collate_sft([self.dataset[i] for i in batch], self.dataset.pad_id)
            width = x.shape[1]
            w = torch.from_numpy(np.stack([self.windows.window(i)[:width + 1] for i in window_ids]).astype(np.int64))
            yield torch.cat([x, w[:, :-1]]), torch.cat([y, w[:, 1:]])

    def __len__(self) -> int:
        return len(self.sampler)


def build_mixed_loader(dataset: SFTDataset, data_dir: str | Path, mix: float, batch_size: int, seed: int = 0,
                       rank: int = 0, world_size: int = 1, tokenizer: Any = None) -> MixedLoader:
    """Batches of `batch_size` rows, `pretrain_rows(mix, batch_size)` of them windows of the token data in
    `data_dir` (checked against `tokenizer` when given), the rest conversations of `dataset`."""
    if not (Path(data_dir) / "meta.json").is_file():
        raise UserError(f"--pretrain-mix {mix}: no pretraining token data in {data_dir}; run `babyllama pretrain` "
                        f"for this run first, or `babyllama data prepare --dest {data_dir}`, or pass --pretrain-data "
                        "(or --pretrain-mix 0: no pretraining text, more forgetting)")
    if tokenizer is not None:
        check_tokenizer_matches(data_dir, tokenizer)
    rows = pretrain_rows(mix, batch_size)
    windows = TokenWindowDataset(data_dir, "train", seq_len=dataset.max_len - 1)  # a conversation's longest row
    if len(windows) < world_size:
        raise UserError(f"{data_dir}: {len(windows)} training windows of {dataset.max_len} tokens, fewer than the "
                        f"{world_size} processes")
    sft = BucketBatchSampler(dataset.lengths, batch_size - rows, seed, True, rank, world_size)
    return MixedLoader(dataset, windows, MixedBatchSampler(sft, len(windows), rows))
