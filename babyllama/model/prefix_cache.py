"""A bounded cache of the keys and values of sequences already decoded, keyed by their tokens: a prompt that starts
like one of them (a chat's earlier turns, a server batch restarted with the same rows) copies that prefix's KV
instead of computing it again (`Generator(model, prefix_cache=PrefixCache(...))`).

The KV of a token depends only on the tokens up to it (causal attention; RoPE turns K by the token's position counted
from the sequence's real start, whichever cache slot it lands in), so an entry's KV for its first c tokens serves any
sequence that starts with the same c tokens. Entries are kept sorted by their tokens, so the entry sharing the
longest prefix with a sequence is one of its two neighbours in that order (found by bisection, not by a scan).
When the byte budget is reached the least recently used entries go first.

The KV belongs to the weights it was computed with: `clear()` the cache after they change. Not thread-safe (the
server decodes on one thread).
"""
from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

Tokens = tuple[int, ...]


@dataclass(eq=False)
class PrefixEntry:
    tokens: Tokens
    k: Tensor  # (layers, kv heads, len(tokens), head dim), RoPE applied
    v: Tensor

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class PrefixCache:
    """Entries (tokens, per-layer K and V of those tokens) within `max_bytes` of tensors, least recently used
    evicted first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._lru: OrderedDict[Tokens, PrefixEntry] = OrderedDict()  # least recently used first
        self._sorted: list[Tokens] = []  # the same keys, in lexicographic order

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, tokens: Sequence[int]) -> tuple[int, PrefixEntry | None]:
        """(c, entry): the entry whose first c tokens are the longest prefix of `tokens` that any entry holds,
        marked as used; (0, None) when no entry shares even the first token."""
        c, entry = max(((_common_prefix(e.tokens, tokens), e) for e in self._neighbours(tuple(tokens))),
                       key=lambda found: found[0], default=(0, None))
        if not c:
            return 0, None
        self._lru.move_to_end(entry.tokens)
        return c, entry

    def holds(self, tokens: Sequence[int]) -> bool:
        """Whether an entry already holds the KV of all of `tokens` (storing them would add nothing)."""
        key = tuple(tokens)
        return any(e.tokens[:len(key)] == key for e in self._neighbours(key))

    def store(self, tokens: Sequence[int], k: Tensor, v: Tensor) -> bool:
        """Keep the KV `k`, `v` (layers, kv heads, len(tokens), head dim) of `tokens`, evicting the least recently
        used entries to stay within the budget; entries that are a prefix of `tokens` go (the new one serves
        them). False, and nothing kept, when an entry already holds them or they alone exceed the budget."""
        entry = PrefixEntry(tuple(tokens), k, v)
        if entry.nbytes > self.max_bytes or self.holds(entry.tokens):
            return False
        for near in self._neighbours(entry.tokens):
            if entry.tokens[:len(near.tokens)] == near.tokens:
                self._drop(near.tokens)
        while self.nbytes + entry.nbytes > self.max_bytes:
            self._drop(next(iter(self._lru)))
        bisect.insort(self._sorted, entry.tokens)
        self._lru[entry.tokens] = entry
        self.nbytes += entry.nbytes
        return True

    def clear(self) -> None:
        self._lru.clear()
        self._sorted.clear()
        self.nbytes = 0

    def _neighbours(self, key: Tokens) -> list[PrefixEntry]:
        """The entries just before and from `key` in sorted order: among them the longest common prefix with
        `key`, and the longest entry that `key` is a prefix of (any entry between shares as much with `key`)."""
        i = bisect.bisect_left(self._sorted, key)
        return [self._lru[t] for t in self._sorted[max(i - 1, 0):i + 1]]

    def _drop(self, key: Tokens) -> None:
        del self._sorted[bisect.bisect_left(self._sorted, key)]
        self.nbytes -= self._lru.pop(key).nbytes


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
