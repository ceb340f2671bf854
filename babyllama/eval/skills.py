"""The verifiable skill suite: items a program can check, the check, and greedy held-out accuracy per skill.

An item (one JSON line of data/skills/skills_{train,heldout}.jsonl, made by `babyllama data build skills`):

    {"skill": "add", "lang": "zh", "prompt": "计算：23+45", "answer": "68", "check": "exact"}

`answer` is a right reply (what SFT learns); `check` says what counts as right, so that a skill may have more than
one right reply:
- `exact`: the reply equals `answer`, ignoring surrounding white space and final full stops (`。` `.` `!` `！`),
  case and the spelling of number words ("forty-two" = "forty two");
- `zh_chars:N`: the reply, punctuation aside, is exactly N Chinese characters (a length instruction, or a next
  line as long as the one given);
- `words:N`: the reply is exactly N English words.

`skill_metrics` asks every item as a one-turn chat (the chat template with the assistant header), decodes a
greedy reply of at most `max_new_tokens` and checks it: `skill_acc` overall and `skill_acc_<skill>` per skill, with
their item counts. GRPO's reward is the same `check_reply`.
"""
from __future__ import annotations

import random
import re
import unicodedata
from collections import Counter, defaultdict
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Sequence

import torch
from torch import nn

from babyllama.data.chat_template import Message, render_prompt, stop_ids
from babyllama.data.jsonl import json_values
from babyllama.errors import UserError
from babyllama.train.callbacks import Evaluator
from babyllama.train.trainer import Trainer

SkillItem = dict[str, Any]  # {"skill", "lang", "prompt", "answer", "check"}
_KEYS = ("skill", "lang", "prompt", "answer", "check")
_CHECK = re.compile(r"exact|zh_chars:\d+|words:\d+")
_CJK = re.compile(r"[\u4e00-\u9fff]")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_FINAL_STOP = ("。", ".", "!", "！")


# ======================================================================= items
def load_skill_items(path: Any, skills: Sequence[str] | None = None) -> list[SkillItem]:
    """The items of a skill file (JSON lines), checked field by field; only `skills` when given."""
    items = []
    for loc, record in json_values(path):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in _KEYS):
            raise UserError(f"{loc}: a skill item needs the string fields {', '.join(_KEYS)}")
        if not _CHECK.fullmatch(record["check"]):
            raise UserError(f"{loc}: 'check' must be exact, zh_chars:N or words:N, got {record['check']!r}")
        items.append(record)
    if skills:
        unknown = sorted(set(skills) - {item["skill"] for item in items})
        if unknown:
            raise UserError(f"{path}: no items of skill {', '.join(unknown)}; its skills: "
                            f"{', '.join(sorted({item['skill'] for item in items}))}")
        items = [item for item in items if item["skill"] in skills]
    if not items:
        raise UserError(f"{path}: no skill items")
    return items


def skill_messages(item: SkillItem) -> list[Message]:
    return [{"role": "user", "content": item["prompt"]}]


def skill_prompt_ids(item: SkillItem, tokenizer: Any, system: str | None = None) -> list[int]:
    """The item asked as a one-turn chat, ready for generation (ends with the assistant header)."""
    return render_prompt(skill_messages(item), tokenizer, system)


# ======================================================================= the check
def _normal(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).strip()
    while text.endswith(_FINAL_STOP):
        text = text[:-1].rstrip()
    return re.sub(r"[\s-]+", " ", text.lower())


def check_reply(item: SkillItem, reply: str) -> bool:
    """Is `reply` (decoded, without the stop token) right for `item` (see the module docstring)?"""
    kind, _, n = item["check"].partition(":")
    if kind == "exact":
        return _normal(reply) == _normal(item["answer"])
    if kind == "zh_chars":
        kept = [c for c in reply if not unicodedata.category(c).startswith(("P", "Z", "C"))]
        return len(kept) == int(n) and all(_CJK.match(c) for c in kept)
    words = _WORD.findall(reply)
    return len(words) == int(n) and not _CJK.search(reply)


# ======================================================================= greedy accuracy
@torch.no_grad()
def greedy_replies(model: nn.Module, tokenizer: Any, items: Sequence[SkillItem], batch_size: int = 64,
                   max_new_tokens: int = 24, system: str | None = None,
                   precision: Callable[[], AbstractContextManager] = nullcontext) -> list[str]:
    """The model's greedy reply to every item, decoded without the stop token."""
    from babyllama.align.ppo_rollout import generate_rollout  # the RL stages' sampler (imports the trainer)
    from babyllama.model.generate import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, top_k=0, top_p=1.0)
    stops = set(stop_ids(tokenizer))
    prompts = [skill_prompt_ids(item, tokenizer, system) for item in items]
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))  # similar lengths batch with little padding
    replies: list[str] = [""] * len(items)
    was_training = model.training
    model.eval()
    with precision():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            roll = generate_rollout(model, [prompts[i] for i in rows], sampling, list(stops), tokenizer.pad_id)
            for i, ids in zip(rows, roll.response_lists()):
                replies[i] = tokenizer.decode([t for t in ids if t not in stops])
    model.train(was_training)
    return replies


def skill_metrics(model: nn.Module, tokenizer: Any, items: Sequence[SkillItem], batch_size: int = 64,
                  max_new_tokens: int = 24, system: str | None = None,
                  precision: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, float]:
    """`skill_acc` (share of items answered right by the greedy reply), `skill_acc_<skill>`, and the item counts
    `skill_items`, `skill_items_<skill>` (for the 95% intervals)."""
    if not items:
        raise UserError("no skill items to evaluate")
    replies = greedy_replies(model, tokenizer, items, batch_size, max_new_tokens, system, precision)
    return accuracy_by_skill(items, [check_reply(item, reply) for item, reply in zip(items, replies)])


def per_skill_sample(items: Sequence[SkillItem], n: int | None, seed: int = 0) -> list[SkillItem]:
    """At most `n` items of each skill (a seeded sample, in file order); all items when `n` is None."""
    if n is None:
        return list(items)
    by_skill: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_skill[item["skill"]].append(i)
    rng = random.Random(seed)
    kept = sorted(i for group in by_skill.values() for i in rng.sample(group, min(n, len(group))))
    return [items[i] for i in kept]


class SkillAccuracy(Evaluator):
    """Every `every` steps, add `skill_acc` (and per skill) on a per-skill sample of the items (`per_skill` each,
    cheap enough to log during training) to the logs; `compute_all` scores every item."""

    def __init__(self, items: Sequence[SkillItem], tokenizer: Any, every: int = 100, per_skill: int | None = 30,
                 batch_size: int = 64, system: str | None = None):
        super().__init__(loader=None, every=every)
        self.items, self.sample = list(items), per_skill_sample(items, per_skill)
        self.tokenizer, self.batch_size, self.system = tokenizer, batch_size, system

    def compute(self, trainer: Trainer, items: Sequence[SkillItem] | None = None) -> dict[str, float]:
        self.last = skill_metrics(trainer.network, self.tokenizer, items or self.sample, self.batch_size,
                                  system=self.system, precision=trainer.autocast)
        return self.last

    def compute_all(self, trainer: Trainer) -> dict[str, float]:
        return self.compute(trainer, self.items)


def describe_skills(metrics: dict[str, float]) -> str:
    """`skill_acc` and each skill's accuracy as one line of percentages."""
    per = ", ".join(f"{k.removeprefix('skill_acc_')} {v:.0%}" for k, v in metrics.items() if k.startswith("skill_acc_"))
    return f"{metrics['skill_acc']:.1%} ({per})"


def accuracy_by_skill(items: Sequence[SkillItem], right: Sequence[bool]) -> dict[str, float]:
    total, correct = Counter(item["skill"] for item in items), defaultdict(int)
    for item, ok in zip(items, right):
        correct[item["skill"]] += bool(ok)
    out: dict[str, float] = {"skill_acc": sum(correct.values()) / len(items), "skill_items": len(items)}
    for skill in sorted(total):
        out[f"skill_acc_{skill}"] = correct[skill] / total[skill]
    out.update({f"skill_items_{skill}": total[skill] for skill in sorted(total)})
    return out
