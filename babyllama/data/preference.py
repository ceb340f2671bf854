"""Preference data: pair builders from the shipped corpus, readers for users' files, dataset and batching.

A pair is a prompt (chat messages) with a `chosen` and a `rejected` assistant reply (`PreferencePair`).

Readers (`read_pairs(path, fmt="auto")`); a file is JSON lines or one JSON array:

| fmt | record |
|---|---|
| `pairs` | `{"prompt": str or [messages], "chosen": str or [messages], "rejected": str or [messages]}` |
| `hh` | Anthropic hh-rlhf: `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}` |

In `pairs`, a message-list reply must end with an assistant message; messages before it continue the prompt
(so TRL's conversational `{"chosen": [user, assistant], "rejected": [user, assistant]}` works without `prompt`).
In `hh`, each text is split at its last `Assistant:` turn: what precedes is the prompt (the same for both
texts), what follows the reply. A record that does not fit raises `UserError` naming `path:line` and the field.

Builders (`poetry_pairs`, `shakespeare_pairs`) template questions like the SFT set's (`babyllama.data.sft`):
chosen is the true answer, rejected one of `REJECTIONS` (recorded in the `rejection` field).

Batching: a side of a pair is tokenized as `render_prompt(prompt)` + reply + `<|im_end|>`; with `max_len`
the reply keeps at least one token and the prompt keeps `<s>` and its end. A batch is
`(input_ids, attention_mask, response_mask)`, each `(B, 2, T)` with `[:, 0]` chosen and `[:, 1]` rejected,
right-padded; `PreferenceDataset.ref_logps` (DPO's precomputed reference log-probs) adds a 4th `(B, 2)` tensor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from babyllama.data.chat_template import IM_END, Message, check_messages, encode_text, render_prompt, special_id
from babyllama.data.jsonl import json_values
from babyllama.data.sft import BucketBatchSampler
from babyllama.errors import UserError

FORMATS = ("pairs", "hh")
REJECTIONS = ("wrong_line", "wrong_author", "wrong_play", "shuffled", "truncated", "off_topic")


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: str
    rejected: str


# ======================================================================= readers
def read_pairs(path: str | Path, fmt: str = "auto") -> list[PreferencePair]:
    """All pairs of a `pairs` or `hh` file (see the module docstring)."""
    if fmt not in ("auto", *FORMATS):
        raise UserError(f"unknown preference format {fmt!r}; choose one of {', '.join(FORMATS)} or 'auto'")
    out = []
    for loc, record in json_values(path):
        if not isinstance(record, dict):
            raise UserError(f"{loc}: expected a JSON object with 'chosen' and 'rejected', got {type(record).__name__}")
        missing = [key for key in ("chosen", "rejected") if key not in record]
        if missing:
            raise UserError(f"{loc}: missing field '{missing[0]}' (keys: {sorted(record)}); a preference record "
                            "needs 'chosen' and 'rejected' (and 'prompt' unless they are hh-rlhf texts)")
        if fmt == "auto":
            fmt = detect_format(record)
        out.append(_checked(_hh_pair(record, loc) if fmt == "hh" else _pairs_pair(record, loc), loc))
    if not out:
        raise UserError(f"{path}: no records")
    return out


def _checked(pair: PreferencePair, loc: str) -> PreferencePair:
    """Refuse pairs that teach nothing: an empty reply, or the same reply on both sides."""
    for key in ("chosen", "rejected"):
        if not getattr(pair, key).strip():
            raise UserError(f"{loc}: field '{key}' has an empty reply; drop the record or fill in the reply")
    if pair.chosen == pair.rejected:
        raise UserError(f"{loc}: fields 'chosen' and 'rejected' have the same reply; a pair needs two different "
                        "replies, drop the record")
    return pair


def detect_format(record: dict) -> str:
    """`pairs` when the record has `prompt` or message-list replies, `hh` for bare Human/Assistant texts."""
    return "pairs" if "prompt" in record or isinstance(record.get("chosen"), list) else "hh"


def _pairs_pair(record: dict, loc: str) -> PreferencePair:
    prompt = _prompt_messages(record.get("prompt"), loc) if "prompt" in record else []
    context_c, chosen = _reply(record.get("chosen"), "chosen", loc)
    context_r, rejected = _reply(record.get("rejected"), "rejected", loc)
    if context_c != context_r:
        raise UserError(f"{loc}: 'chosen' and 'rejected' have different messages before the final reply; "
                        "both must answer the same conversation")
    prompt = check_messages(prompt + context_c, loc)
    if not prompt:
        raise UserError(f"{loc}: no prompt; add a 'prompt' field (a string or a list of messages)")
    return PreferencePair(prompt, chosen, rejected)


def _prompt_messages(value: Any, loc: str) -> list[Message]:
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        return check_messages(value, f"{loc}: field 'prompt'")
    raise UserError(f"{loc}: field 'prompt' must be a non-empty string or a list of chat messages")


def _reply(value: Any, key: str, loc: str) -> tuple[list[Message], str]:
    """(messages before the reply, reply text) of a string or a message list ending with the assistant."""
    if isinstance(value, str):
        return [], value
    if isinstance(value, list) and value:
        messages = check_messages(value, f"{loc}: field '{key}'")
        if messages[-1]["role"] == "assistant":
            return messages[:-1], messages[-1]["content"]
    raise UserError(f"{loc}: field '{key}' must be a string or a list of chat messages ending with an "
                    "assistant message")


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_pair(record: dict, loc: str) -> PreferencePair:
    prompt_c, chosen = _split_hh(record.get("chosen"), "chosen", loc)
    prompt_r, rejected = _split_hh(record.get("rejected"), "rejected", loc)
    if prompt_c != prompt_r:
        raise UserError(f"{loc}: 'chosen' and 'rejected' differ before their last 'Assistant:' turn; "
                        "an hh-rlhf pair must share the conversation and differ in the last reply only")
    return PreferencePair(prompt_c, chosen, rejected)


def _split_hh(text: Any, key: str, loc: str) -> tuple[list[Message], str]:
    """hh-rlhf text -> (prompt messages, last assistant reply)."""
    if not isinstance(text, str):
        raise UserError(f"{loc}: field '{key}' must be a string (hh-rlhf format), got {type(text).__name__}")
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 5 or parts[-2] != "Assistant":
        raise UserError(f"{loc}: field '{key}' is not '\\n\\nHuman: ...\\n\\nAssistant: ...' text ending with an "
                        "Assistant turn; fix the record or pass the `pairs` format")
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1:-2:2], parts[2:-2:2])]
    return messages, parts[-1].strip()


def read_prompts(path: str | Path) -> list[list[Message]]:
    """Prompts for generation: records with `messages` (a list) or `prompt` (a string or a list), each up to its
    last non-assistant message (trailing assistant replies are dropped: what the policy is asked to answer)."""
    out = []
    for loc, record in json_values(path):
        key = "messages" if isinstance(record, dict) and "messages" in record else "prompt"
        value = record.get(key) if isinstance(record, dict) else None
        if value is None:
            raise UserError(f"{loc}: expected an object with 'messages' (chat messages) or 'prompt'")
        out.append(_without_replies(_prompt_messages(value, loc), f"{loc}: field '{key}'"))
    if not out:
        raise UserError(f"{path}: no prompts")
    return out


def _without_replies(messages: list[Message], loc: str) -> list[Message]:
    end = max((i + 1 for i, m in enumerate(messages) if m["role"] != "assistant"), default=0)
    if not any(m["role"] == "user" for m in messages[:end]):
        raise UserError(f"{loc} has no user message to answer (trailing assistant replies are dropped); add one")
    return messages[:end]


# ======================================================================= tokenization, dataset, batching
def encode_side(prompt_ids: Sequence[int], response: str, tokenizer: Any,
                max_len: int | None = None) -> tuple[list[int], int]:
    """(ids, prompt length) of prompt + reply + `<|im_end|>`; truncation keeps >= 1 reply token (see module doc)."""
    reply = encode_text(tokenizer, response) + [special_id(tokenizer, IM_END)]
    prompt = list(prompt_ids)
    if max_len is not None and len(prompt) + len(reply) > max_len:
        if max_len < 2:
            raise UserError(f"max_len={max_len} cannot hold a prompt token and a reply token")
        reply = reply[: max(1, max_len - len(prompt))]
        keep = max_len - len(reply)
        prompt = prompt[:1] + prompt[len(prompt) - keep + 1:] if keep < len(prompt) else prompt
    return prompt + reply, len(prompt)


class PreferenceDataset(torch.utils.data.Dataset):
    """Pairs tokenized once; item i is `(chosen_ids, chosen_prompt_len, rejected_ids, rejected_prompt_len[, ref])`."""

    def __init__(self, pairs: Iterable[PreferencePair], tokenizer: Any, max_len: int, system: str | None = None):
        self.pad_id = tokenizer.pad_id
        self._sides: list[tuple[np.ndarray, int, np.ndarray, int]] = []
        for p in pairs:
            prompt = render_prompt(p.prompt, tokenizer, system)
            c, c_len = encode_side(prompt, p.chosen, tokenizer, max_len)
            r, r_len = encode_side(prompt, p.rejected, tokenizer, max_len)
            self._sides.append((np.asarray(c, dtype=np.int32), c_len, np.asarray(r, dtype=np.int32), r_len))
        if not self._sides:
            raise UserError("no preference pairs")
        self.ref_logps: np.ndarray | None = None  # (N, 2) reference log-probs, set by DPO's --precompute-ref

    def __len__(self) -> int:
        return len(self._sides)

    def __getitem__(self, i: int) -> tuple:
        c, c_len, r, r_len = self._sides[i]
        item = (torch.from_numpy(c.astype(np.int64)), c_len, torch.from_numpy(r.astype(np.int64)), r_len)
        return item if self.ref_logps is None else (*item, torch.from_numpy(self.ref_logps[i]))

    @property
    def lengths(self) -> list[int]:
        return [max(len(c), len(r)) for c, _, r, _ in self._sides]


def pad_rows(rows: Sequence[tuple[Sequence[int] | Tensor, int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad `(ids, prompt_len)` rows into `(input_ids, attention_mask, response_mask)`, each (N, T)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    response = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (seq, prompt_len) in enumerate(rows):
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.as_tensor(seq), 1
        response[i, prompt_len: len(seq)] = True
    return ids, mask, response


def collate_pairs(samples: Sequence[tuple], pad_id: int) -> tuple[Tensor, ...]:
    """Right-pad into `(input_ids, attention_mask, response_mask[, ref_logps])`, shapes (B, 2, T) [and (B, 2)]."""
    rows = [side for s in samples for side in ((s[0], s[1]), (s[2], s[3]))]
    batch = tuple(t.view(len(samples), 2, -1) for t in pad_rows(rows, pad_id))
    return batch if len(samples[0]) == 4 else (*batch, torch.stack([s[4] for s in samples]).float())


class PreferenceLoader:
    """Iterable of collated pair batches; `loader.sampler` is the resumable sampler the Trainer saves/restores."""

    def __init__(self, dataset: PreferenceDataset, sampler: BucketBatchSampler):
        self.dataset, self.sampler = dataset, sampler

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for batch in self.sampler:
            yield collate_pairs([self.dataset[i] for i in batch], self.dataset.pad_id)

    def __len__(self) -> int:
        return len(self.sampler)


def build_preference_loader(dataset: PreferenceDataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                            rank: int = 0, world_size: int = 1) -> PreferenceLoader:
    """Length-bucketed, seeded, rank-sharded, resumable batches of pairs (`babyllama.data.sft.BucketBatchSampler`)."""
    return PreferenceLoader(dataset, BucketBatchSampler(dataset.lengths, batch_size, seed, shuffle, rank, world_size))
