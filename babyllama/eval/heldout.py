"""Held-out evaluation of a policy, shared by the RLHF stages (babyllama ppo, babyllama dpo) so that their numbers
compare. `HeldOut.measure(policy, ref, reward_model)` gives:

- `score`, `kl`, `response_len` on replies sampled from the policy to the held-out prompts (a fixed seed, the
  sampling temperature, at most max_new_tokens; `babyllama.align.ppo_rollout.evaluate_policy`): the reward model's
  mean score; KL(policy || ref) per reply, the exact KL between the two next-token distributions summed over the
  reply tokens (>= 0, 0 for the reference itself; at temperature 1 an unbiased estimate of the KL between the
  reply distributions); the mean reply length in tokens (the stop token included);
- `greedy_score`: the reward model's mean score of the greedy replies (deterministic);
- `choice_acc` (and per language): held-out multiple-choice accuracy (`babyllama.eval.choice`);
- `skill_acc` (and per skill): greedy held-out accuracy on the verifiable skill suite (`babyllama.eval.skills`).

Replies are scored as the reward model was trained: prompt + reply + `<|im_end|>`, also when a reply was cut at
max_new_tokens (`babyllama.align.ppo_rollout.Rollout.reward_inputs`).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any, Callable, Sequence

from torch import nn

from babyllama.align.ppo_rollout import evaluate_policy
from babyllama.data.chat_template import IM_END, render_prompt, special_id, stop_ids
from babyllama.data.preference import read_prompts
from babyllama.errors import UserError
from babyllama.eval.choice import choice_accuracy, load_choice_items
from babyllama.eval.skills import load_skill_items, skill_metrics
from babyllama.model.generate import SamplingConfig
from babyllama.model.llama import Llama
from babyllama.train.run_config import HeldOutEvaluation

LABELS = {"score": "score", "kl": "KL to SFT (nats/reply)", "response_len": "reply tokens",
          "greedy_score": "greedy score"}


def check_reply_budget(max_prompt_len: int, max_new_tokens: int, max_seq_len: int) -> None:
    if max_prompt_len + max_new_tokens > max_seq_len:
        raise UserError(f"--max-prompt-len {max_prompt_len} + --max-new-tokens {max_new_tokens} exceeds the "
                        f"model's max_seq_len {max_seq_len}; lower one of them")


def fitting_prompts(paths: Sequence[str], tokenizer: Any, max_len: int, system: str | None) -> list[list[int]]:
    """Distinct rendered prompts (`read_prompts`: replies dropped) of at most `max_len` tokens, in file order."""
    seen: dict[tuple[int, ...], None] = {}
    for path in paths:
        for messages in read_prompts(path):
            ids = tuple(render_prompt(messages, tokenizer, system))
            if len(ids) <= max_len:
                seen.setdefault(ids)
    if not seen:
        raise UserError(f"{', '.join(paths)}: no prompt of at most {max_len} tokens; raise --max-prompt-len")
    return [list(ids) for ids in seen]


class HeldOut:
    """The before/after numbers of an RLHF stage (see the module docstring) on fixed prompts and choice items."""

    def __init__(self, settings: HeldOutEvaluation, tokenizer: Any, sampling: SamplingConfig, max_prompt_len: int,
                 seed: int, chunk_size: int | None = None,
                 precision: Callable[[], AbstractContextManager] = nullcontext):
        """`settings`: the stage's held-out evaluation settings (and its `system` prompt); `chunk_size`: see
        `evaluate_policy`; `precision`: e.g. `trainer.autocast`, to evaluate in the precision the policy trains in."""
        self.tok, self.sampling, self.seed, self.chunk_size = tokenizer, sampling, seed, chunk_size
        self.precision = precision
        self.system, self.batch_size = settings.system, settings.eval_batch_size
        off = settings.eval_prompts.lower() == "none"
        self.prompts = [] if off else fitting_prompts([settings.eval_prompts], tokenizer, max_prompt_len,
                                                      settings.system)[: settings.eval_prompt_count]
        self.items = None if settings.choice_data.lower() == "none" else load_choice_items(settings.choice_data)
        self.skills = None if settings.skill_data.lower() == "none" else load_skill_items(settings.skill_data)

    def sampled(self, policy: Llama, ref: Llama | None, reward_model: nn.Module | None,
                sampling: SamplingConfig | None = None) -> dict[str, float]:
        """score / kl / response_len of replies sampled for the held-out prompts (greedy at temperature 0)."""
        if not self.prompts:
            return {}
        with self.precision():
            return evaluate_policy(policy, ref, reward_model, self.prompts, sampling or self.sampling,
                                   stop_ids(self.tok), self.tok.pad_id, special_id(self.tok, IM_END), self.batch_size,
                                   self.seed, self.chunk_size)

    def measure(self, policy: Llama, ref: Llama | None, reward_model: nn.Module | None) -> dict[str, float]:
        out = self.sampled(policy, ref, reward_model)
        if self.prompts and reward_model is not None:
            greedy = self.sampled(policy, None, reward_model, replace(self.sampling, temperature=0.0))
            out["greedy_score"] = greedy["score"]
        if self.items:
            with self.precision():
                out.update(choice_accuracy(policy, self.tok, self.items, self.batch_size, system=self.system))
        if self.skills:
            out.update(skill_metrics(policy, self.tok, self.skills, self.batch_size, system=self.system,
                                     precision=self.precision))
        return out


def describe(m: dict[str, float]) -> str:
    return ", ".join(f"{LABELS.get(k, k)} {v:.4g}" for k, v in m.items())
