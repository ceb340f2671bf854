"""`ResumableSampler`: a `DistributedSampler`-like sampler whose position can be saved and restored mid-epoch, so
an interrupted run resumes on exactly the next batch. Each epoch's order is `IndexPermutation`, a seeded
permutation computed index by index in O(1) memory (no array of N indices for N windows)."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from babyllama.errors import UserError


class IndexPermutation:
    """A seeded pseudo-random permutation of `range(n)` evaluated per index in O(1) memory.

    A 4-round Feistel network over `2**bits >= n` (`bits` even, so `2**bits < 4n` for n > 1) is a bijection of
    that range; values that land at `n` or beyond are mapped again until they fall inside (cycle walking), which
    keeps it a bijection of `range(n)`. Round keys come from `seed` via `np.random.SeedSequence`; the round function
    is the splitmix64 finaliser, so neighbouring indices land far apart. Vectorised over uint64 arrays.
    """

    _ROUNDS = 4

    def __init__(self, n: int, seed: int | tuple[int, ...]):
        if n < 1:
            raise ValueError(f"need n >= 1, got {n}")
        bits = max(2, (n - 1).bit_length())
        self.n, self.half = n, (bits + bits % 2) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        entropy = list(seed) if isinstance(seed, tuple) else [seed]
        self.keys = np.random.SeedSequence(entropy).generate_state(self._ROUNDS, np.uint64)

    def __call__(self, index: np.ndarray) -> np.ndarray:
        out = self._feistel(np.asarray(index, dtype=np.uint64))
        outside = out >= self.n
        while outside.any():  # a few passes: fewer than 3/4 of the range lies outside
            out[outside] = self._feistel(out[outside])
            outside = out >= self.n
        return out

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << half) | right


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijective avalanche hash of uint64); uint64 arithmetic wraps modulo 2**64."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class ResumableSampler(Sampler[int]):
    """Sample indices for one rank, shuffled per epoch, that can resume mid-epoch.

    Epoch `e` shuffles with `IndexPermutation(num_samples, (seed, e))` (or keeps the order without shuffle): a
    permutation computed index by index, so the sampler's memory stays O(1) however many windows the corpus has
    (`torch.randperm`, as in `DistributedSampler`, would hold 80 MB per rank for 10M windows). Like
    `DistributedSampler`, the permutation is padded by repeating its start to a multiple of `world_size` (or cut
    down to one with `drop_last`) and rank `r` gets `indices[r::world_size]`; so `world_size` ranks with batch `b`
    see the same global batches as one process with batch `world_size * b`.

    Position: `state_dict()` is `{"epoch", "consumed", ...}` with `consumed` = samples of this rank's epoch handed
    out so far; `load_state_dict({"epoch": e, "consumed": c})` makes the next pass yield this rank's epoch-`e`
    indices from position `c` on. A DataLoader fetches ahead of training, so a trainer should store the samples
    it actually trained on, not the sampler's count. Iterating again without `load_state_dict`/`set_epoch`
    repeats the same pass, except that a pass that ran to the end moves on to the next epoch (from position 0).
    """

    def __init__(self, num_samples: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        if num_samples < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need num_samples >= 1 and 0 <= rank < world_size; got {num_samples=}, {rank=}, "
                             f"{world_size=}")
        if drop_last and num_samples < world_size:
            raise ValueError(f"drop_last with {num_samples} samples leaves nothing for {world_size} ranks")
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.per_rank = num_samples // world_size if drop_last else math.ceil(num_samples / world_size)
        self.epoch, self._start, self._yielded = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._start, self._yielded = epoch, 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self._start + self._yielded, "num_samples": self.num_samples,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at `state["consumed"]` of epoch `state["epoch"]` (the other keys are checked when present)."""
        for key in ("num_samples", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(f"the data position was saved with {key}={state[key]} but this run has "
                                f"{getattr(self, key)}; resume with the same data and number of processes")
        consumed = int(state["consumed"])
        if not 0 <= consumed <= self.per_rank:
            raise UserError(f"the data position ({consumed} samples into the epoch) is beyond this rank's "
                            f"{self.per_rank} samples per epoch; was the data re-prepared since the checkpoint?")
        self.epoch, self._start, self._yielded = int(state["epoch"]), consumed, 0

    def rank_indices(self, epoch: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """This rank's indices for `epoch` at its positions `start:stop` (default: all), int64."""
        positions = np.arange(start, self.per_rank if stop is None else stop, dtype=np.uint64)
        slots = (positions * np.uint64(self.world_size) + np.uint64(self.rank)) % np.uint64(self.num_samples)
        if self.shuffle:  # slots past the end wrapped around above: the padding repeats the permutation's start
            slots = IndexPermutation(self.num_samples, (self.seed, epoch))(slots)
        return torch.from_numpy(slots.astype(np.int64))

    def __iter__(self) -> Iterator[int]:
        self._yielded = 0
        for begin in range(self._start, self.per_rank, 1 << 16):  # blocks: memory O(block), not O(samples)
            for i in self.rank_indices(self.epoch, begin, min(begin + (1 << 16), self.per_rank)).tolist():
                self._yielded += 1
                yield i
        self.set_epoch(self.epoch + 1)

    def __len__(self) -> int:
        return self.per_rank - self._start
