"""SFT data: readers for common instruction formats, builders from shipped material, dataset and batching.

Readers (`read_conversations(path, fmt="auto")` -> list of message lists, see `babyllama.data.chat_template`); a
file is JSON lines or one JSON array, and the format is told by the keys of the first record:

| fmt | record |
|---|---|
| `openai` | `{"messages": [{"role": "system"/"user"/"assistant", "content": str}]}` |
| `sharegpt` | `{"conversations": [{"from": "human"/"gpt"/"system", "value": str}], "system"?: str}` |
| `alpaca` | `{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}` |
| `belle` | alpaca-style `instruction/input/output`, or `conversations` with `from: human/assistant` |
| `firefly` | `{"conversation": [{"human", "assistant"}], ...}` or `{"kind", "input", "target"}` |
| `prompt` | `{"prompt", "answer", ...}`: one turn, user = prompt, assistant = answer (the skill files of data/skills) |

A record that does not fit raises `UserError` naming `path:line` and the field.

Batching: `SFTDataset` tokenizes every conversation once with `encode_chat` and keeps the ids in memory;
`build_sft_loader` makes length-bucketed batches (no packing, so attention never crosses samples) with right
padding. A batch is `(input_ids, targets)`, both `(B, T)` int64: `targets` are the labels shifted by one
(next-token targets, -100 on prompt and pad positions), ready for `Llama(input_ids, targets)`. Right padding
with causal attention needs no attention mask: real tokens never attend to the pads after them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from babyllama.data.chat_template import IGNORE_INDEX, Message, NoSupervisedTokens, check_messages, encode_chat
from babyllama.data.jsonl import json_values
from babyllama.errors import UserError

FORMATS = ("openai", "sharegpt", "alpaca", "belle", "firefly", "prompt")


# ======================================================================= readers
def read_conversations(path: str | Path, fmt: str = "auto") -> list[list[Message]]:
    """All conversations in a JSON-lines or JSON-array file of `fmt` (or auto-detected) records."""
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"unknown SFT format {fmt!r}; choose one of {', '.join(FORMATS)} or 'auto'")
    out: list[list[Message]] = []
    detected = fmt == "auto"
    for loc, record in json_values(path):
        if not isinstance(record, dict):
            raise UserError(f"{loc}: expected a JSON object, got {type(record).__name__}")
        if fmt == "auto":
            fmt = detect_format(record, loc)
        try:
            out.append(record_to_messages(record, fmt, loc))
        except UserError as e:
            if detected and out:  # the record may just be of another format than the first one
                raise UserError(f"{e} (read as {fmt!r}, the format detected from the first record; "
                                f"one file holds one format)") from e
            raise
    if not out:
        raise UserError(f"{path}: no records")
    return out


def detect_format(record: dict, loc: str = "record") -> str:
    """Format name from a record's keys (see the module docstring)."""
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "conversation" in record or {"input", "target"} <= record.keys():
        return "firefly"
    if {"instruction", "output"} <= record.keys():
        return "alpaca"
    if {"prompt", "answer"} <= record.keys():
        return "prompt"
    raise UserError(f"{loc}: cannot tell the SFT format from keys {sorted(record)}; expected messages / "
                    f"conversations / conversation / instruction+output / prompt+answer, or pass the format")


def record_to_messages(record: dict, fmt: str, loc: str = "record") -> list[Message]:
    """One record of a known format as a validated message list."""
    if fmt == "belle":
        fmt = "sharegpt" if "conversations" in record else "alpaca"
    messages = _READERS[fmt](record, loc)
    messages = check_messages(messages, loc)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{loc}: the conversation has no assistant reply")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():  # refused like an empty alpaca 'output'
            raise UserError(f"{loc}: message {i} (assistant) has an empty 'content'; an assistant reply needs text")
    return messages


def _text(record: dict, key: str, loc: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise UserError(f"{loc}: missing field '{key}'")
    if not isinstance(value, str):
        raise UserError(f"{loc}: field '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise UserError(f"{loc}: field '{key}' is empty")
    return value


def _list(record: dict, key: str, loc: str, required: bool = True) -> list:
    value = record.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise UserError(f"{loc}: field '{key}' must be a non-empty list")
    return value


def _system(record: dict, loc: str) -> list[Message]:
    system = _text(record, "system", loc, required=False)
    return [{"role": "system", "content": system}] if system else []


def _from_openai(record: dict, loc: str) -> list[Message]:
    return _list(record, "messages", loc)


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


def _from_sharegpt(record: dict, loc: str) -> list[Message]:
    messages = _system(record, loc)
    for i, turn in enumerate(_list(record, "conversations", loc)):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict) or turn.get("from") not in _SHAREGPT_ROLES:
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise UserError(f"{loc}: {field}.from must be one of {sorted(_SHAREGPT_ROLES)}, got {got!r:.60}")
        messages.append({"role": _SHAREGPT_ROLES[turn["from"]], "content": _text(turn, "value", f"{loc}: {field}")})
    return messages


def _from_alpaca(record: dict, loc: str) -> list[Message]:
    messages = _system(record, loc)
    for i, pair in enumerate(_list(record, "history", loc, required=False)):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)):
            raise UserError(f"{loc}: history[{i}] must be a [user, assistant] pair of non-empty strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = _text(record, "instruction", loc)
    extra = _text(record, "input", loc, required=False)
    user = f"{prompt}\n{extra}" if extra.strip() else prompt
    reply = _text(record, "output", loc)
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _from_firefly(record: dict, loc: str) -> list[Message]:
    if "conversation" not in record:  # firefly-train-1.1M: {"kind", "input", "target"}
        return [{"role": "user", "content": _text(record, "input", loc)},
                {"role": "assistant", "content": _text(record, "target", loc)}]
    messages = _system(record, loc)
    for i, turn in enumerate(_list(record, "conversation", loc)):
        field = f"{loc}: conversation[{i}]"
        if not isinstance(turn, dict):
            raise UserError(f"{field} must be an object with 'human' and 'assistant'")
        messages += [{"role": "user", "content": _text(turn, "human", field)},
                     {"role": "assistant", "content": _text(turn, "assistant", field)}]
    return messages


def _from_prompt(record: dict, loc: str) -> list[Message]:
    # a skill item {"skill", "lang", "prompt", "answer", "check"}: the other keys are for its checker
    return [{"role": "user", "content": _text(record, "prompt", loc)},
            {"role": "assistant", "content": _text(record, "answer", loc)}]


_READERS = {"openai": _from_openai, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca, "firefly": _from_firefly,
            "prompt": _from_prompt}


# ======================================================================= dataset and batching
class SFTDataset(torch.utils.data.Dataset):
    """Conversations tokenized once with `encode_chat`; item i is `(input_ids, labels)` (aligned, int64).

    Conversations with no supervised token left after truncation to `max_len` are dropped (`self.dropped`);
    `source` (the data file) names them in the error when none is left."""

    def __init__(self, conversations: Iterable[Sequence[Message]], tokenizer: Any, max_len: int,
                 system: str | None = None, source: str | Path = "SFT data"):
        self.max_len, self.pad_id = max_len, tokenizer.pad_id
        self._ids: list[np.ndarray] = []
        self._mask: list[np.ndarray] = []  # True where the token is supervised (compact form of the labels)
        self.dropped = 0
        for messages in conversations:
            try:
                ids, labels = encode_chat(messages, tokenizer, max_len, system)
            except NoSupervisedTokens:
                self.dropped += 1
                continue
            self._ids.append(np.asarray(ids, dtype=np.int32))
            self._mask.append(np.asarray(labels, dtype=np.int64) != IGNORE_INDEX)
        if not self._ids:
            raise UserError(f"{source}: no SFT sample fits max_len={max_len} ({self.dropped} dropped: no room for a "
                            f"reply after <s> and the system message); shorten the system message or raise --seq-len")

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        ids = torch.from_numpy(self._ids[i].astype(np.int64))
        labels = torch.where(torch.from_numpy(self._mask[i]), ids, IGNORE_INDEX)
        return ids, labels

    @property
    def lengths(self) -> list[int]:
        """Row length of each sample in a batch (tokens - 1, after the next-token shift)."""
        return [len(ids) - 1 for ids in self._ids]

    def supervised_tokens(self) -> int:
        return int(sum(m.sum() for m in self._mask))


def collate_sft(samples: Sequence[tuple[Tensor, Tensor]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad aligned `(input_ids, labels)` samples into `(input_ids, targets)` with targets shifted by one."""
    width = max(len(ids) for ids, _ in samples) - 1
    x = torch.full((len(samples), width), pad_id, dtype=torch.long)
    y = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, labels) in enumerate(samples):
        x[b, : len(ids) - 1] = ids[:-1]
        y[b, : len(ids) - 1] = labels[1:]
    return x, y


class BucketBatchSampler:
    """Seeded, resumable, rank-sharded batches of similar-length samples.

    Each epoch: shuffle the indices (seed + epoch), cut them into chunks of `bucket_batches` batches, sort each
    chunk by length, cut it into batches, shuffle the batch order (a short last batch stays last). Rank r of
    `world_size` takes batches r, r + world_size, ... (every rank gets the same number). `bucket_batches=1` is
    plain random batching.
    `state_dict()` is `{"epoch", "consumed"}` with `consumed` = samples this rank has been given this epoch;
    a completed pass moves on to the next epoch by itself (`set_epoch` also works, as for DistributedSampler).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, bucket_batches: int = 128, drop_last: bool = False):
        if batch_size < 1 or bucket_batches < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: batch_size={batch_size}, bucket_batches={bucket_batches}, "
                             f"rank={rank}, world_size={world_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size, self.bucket_batches, self.drop_last = rank, world_size, bucket_batches, drop_last
        self.epoch = self.consumed = 0

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of an epoch."""
        g = np.random.default_rng([self.seed, epoch])
        order = g.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        chunk = self.batch_size * self.bucket_batches
        batches = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[i:i + self.batch_size].tolist() for i in range(0, len(part), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle:
            full = [full[i] for i in g.permutation(len(full))]
        # the one short batch goes last, so every rank's `consumed` is a multiple of batch_size before it
        batches = full + ([] if self.drop_last else [b for b in batches if len(b) < self.batch_size])
        usable = len(batches) // self.world_size * self.world_size  # equal counts keep DDP ranks in step
        return batches[self.rank:usable:self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        seen = 0
        for batch in self.batches(self.epoch):
            seen += len(batch)
            if seen <= self.consumed:  # resuming: skip what was already given out
                continue
            self.consumed = seen
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


class SFTLoader:
    """Iterable of collated batches; `loader.sampler` is the resumable sampler the Trainer saves and restores."""

    def __init__(self, dataset: SFTDataset, sampler: BucketBatchSampler):
        self.dataset, self.sampler = dataset, sampler

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.sampler:
            yield collate_sft([self.dataset[i] for i in batch], self.dataset.pad_id)

    def __len__(self) -> int:
        return len(self.sampler)


def build_sft_loader(dataset: SFTDataset, batch_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                     world_size: int = 1, bucket_batches: int = 128, drop_last: bool = False) -> SFTLoader:
    """Length-bucketed `(input_ids, targets)` batches over `dataset` (see `BucketBatchSampler`)."""
    sampler = BucketBatchSampler(dataset.lengths, batch_size, seed, shuffle, rank, world_size, bucket_batches,
                                 drop_last)
    return SFTLoader(dataset, sampler)


def padding_fraction(lengths: Sequence[int], batch_size: int, max_len: int | None = None, bucketed: bool = True,
                     seed: int = 0, bucket_batches: int = 128) -> float:
    """Fraction of pad positions over one epoch of batches (right padding to the longest row of each batch)."""
    lengths = [min(n, max_len) if max_len else n for n in lengths]
    sampler = BucketBatchSampler(lengths, batch_size, seed, bucket_batches=bucket_batches if bucketed else 1)
    real = total = 0
    for batch in sampler.batches(0):
        rows = [lengths[i] for i in batch]
        real, total = real + sum(rows), total + max(rows) * len(rows)
    return 1 - real / total if total else 0.0
