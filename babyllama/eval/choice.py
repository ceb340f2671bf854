"""Multiple-choice evaluation by log-likelihood, and a callback that logs it during training.

An item is `{"messages": [...], "choices": [str, ...], "answer": int, "lang"?: str}` (the schema of
`data/sft/choice_eval.jsonl`, built by `build_choice_items` in babyllama/build/builders.py). The prompt is rendered
with the chat template up to the assistant header (`chat.render_prompt`), and each choice is scored as an assistant
reply: its content tokens followed by `<|im_end|>`. The model picks the choice with the highest score.

Score = the SUMMED log-probability of the reply tokens, i.e. the probability that the model writes exactly this
reply and stops. Not the mean per token: with a byte-fallback tokenizer a rare character costs three tokens, the
last two almost certain once the first is chosen, so a per-token mean would favour choices full of rare characters.
The shipped items pair each answer with distractors of similar length (in characters), which keeps the length bias
of the sum small.

Accuracy is reported as `choice_acc` over all items and `choice_acc_<lang>` for each `lang` found in the items.
Every call scores all items (no sharding across ranks), so under DDP/FSDP all ranks run the same forwards and get
the same numbers.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from babyllama.data.chat_template import IM_END, check_messages, encode_text, render_prompt, special_id
from babyllama.data.jsonl import json_values
from babyllama.errors import UserError
from babyllama.model.scoring import continuation_logprobs, unwrap
from babyllama.train.callbacks import Evaluator
from babyllama.train.trainer import Trainer


def load_choice_items(path: str | Path) -> list[dict]:
    """Validated items of a JSON-lines (or JSON array) file; errors name `path:line` and the field."""
    items = [_check_item(record, loc) for loc, record in json_values(path)]
    if not items:
        raise UserError(f"{path}: no multiple-choice items")
    return items


def _check_item(record: Any, loc: str) -> dict:
    if not isinstance(record, dict):
        raise UserError(f"{loc}: expected a JSON object, got {type(record).__name__}")
    messages = check_messages(record.get("messages"), f"{loc}: messages")
    choices, answer = record.get("choices"), record.get("answer")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise UserError(f"{loc}: 'choices' must be a list of at least two non-empty strings")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise UserError(f"{loc}: 'answer' must be the index of the right choice (0..{len(choices) - 1}), "
                        f"got {answer!r}")
    lang = record.get("lang")
    if lang is not None and not isinstance(lang, str):
        raise UserError(f"{loc}: 'lang' must be a string if given")
    return {"messages": messages, "choices": choices, "answer": answer, "lang": lang}


def _rows(items: Sequence[dict], tokenizer: Any, system: str | None, max_len: int) -> list[tuple[list[int], int]]:
    """(prompt + reply ids, reply length) for every choice of every item, in item order.

    A prompt too long for `max_len` loses its oldest tokens; the reply is always scored whole."""
    end = special_id(tokenizer, IM_END)
    rows = []
    for item in items:
        prompt = render_prompt(item["messages"], tokenizer, system)
        for choice in item["choices"]:
            reply = encode_text(tokenizer, choice) + [end]
            keep = max(1, max_len - len(reply))
            rows.append((prompt[-keep:] + reply, len(reply)))
    return rows


def choice_scores(model: nn.Module, tokenizer: Any, items: Sequence[dict], batch_size: int = 64,
                  device: torch.device | str | None = None, system: str | None = None) -> list[list[float]]:
    """Per item, the summed log-probability of each choice as the assistant's reply (see the module docstring)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    max_len = unwrap(model).config.max_seq_len
    rows = _rows(items, tokenizer, system, max_len)
    was_training = model.training
    model.eval()
    try:
        flat = continuation_logprobs(model, rows, batch_size)
    finally:
        model.train(was_training)
    out, pos = [], 0
    for item in items:
        out.append(flat[pos:pos + len(item["choices"])])
        pos += len(item["choices"])
    return out


def choice_accuracy(model: nn.Module, tokenizer: Any, items: Sequence[dict], batch_size: int = 64,
                    device: torch.device | str | None = None, system: str | None = None) -> dict[str, float]:
    """`{"choice_acc": overall, "choice_acc_<lang>": per language}`: share of items whose answer scores highest."""
    scores = choice_scores(model, tokenizer, items, batch_size, device, system)
    hits: dict[str, list[bool]] = defaultdict(list)
    for item, s in zip(items, scores):
        hit = max(range(len(s)), key=s.__getitem__) == item["answer"]
        hits["choice_acc"].append(hit)
        if item.get("lang"):
            hits[f"choice_acc_{item['lang']}"].append(hit)
    return {k: sum(v) / len(v) for k, v in hits.items()}


class ChoiceAccuracy(Evaluator):
    """Every `every` steps, add `choice_acc` (and `choice_acc_<lang>`) of the model being trained to the logs."""

    def __init__(self, items: Sequence[dict], tokenizer: Any, every: int = 100, batch_size: int = 64,
                 system: str | None = None):
        super().__init__(loader=None, every=every)
        self.items, self.tokenizer, self.batch_size, self.system = items, tokenizer, batch_size, system

    def compute(self, trainer: Trainer) -> dict[str, float]:
        with trainer.autocast():
            self.last = choice_accuracy(trainer.network, self.tokenizer, self.items, self.batch_size,
                                        trainer.env.device, self.system)
        return self.last
