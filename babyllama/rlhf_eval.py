"""Evaluation of a policy on held-out prompts: generate replies, score them with a reward model, measure the KL
to the reference (SFT) model on those replies. Used by the RLHF stages to report before/after numbers.

A reply is scored as the reward model was trained: prompt (chat template) + reply tokens + `<|im_end|>`.
KL = mean over reply tokens of log pi(token) - log pi_ref(token) on the policy's own replies: with sampled
replies (temperature 1) a per-token Monte-Carlo estimate of KL(pi || pi_ref); with greedy replies the mean
log-ratio on the policy's preferred tokens, which can be negative when the policy became flatter than the
reference. 0 for the reference itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from babyllama.chat import IM_END, Message, render_prompt, special_id, stop_ids
from babyllama.dpo import sequence_logps
from babyllama.generation import Generator, SamplingConfig
from babyllama.model import Llama
from babyllama.preference import pad_rows


@dataclass
class Generations:
    prompts: list[list[int]]
    replies: list[list[int]]  # without the stop token

    def rows(self, im_end: int) -> list[tuple[list[int], int]]:
        """(prompt + reply + <|im_end|>, prompt length) of each generation."""
        return [(p + r + [im_end], len(p)) for p, r in zip(self.prompts, self.replies)]


@torch.no_grad()
def generate_replies(model: Llama, tokenizer: Any, prompts: Sequence[list[Message]], max_new_tokens: int = 64,
                     temperature: float = 0.0, batch_size: int = 16, system: str | None = None,
                     seed: int = 0) -> Generations:
    """Replies of `model` to chat prompts (greedy by default), fitted to the model's max_seq_len."""
    was_training = model.training
    model.eval()
    ids = [render_prompt(p, tokenizer, system)[-(model.config.max_seq_len - max_new_tokens - 1):] for p in prompts]
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    gen, rng = Generator(model), torch.Generator().manual_seed(seed)
    replies = []
    for start in range(0, len(ids), batch_size):
        replies += gen.generate(ids[start:start + batch_size], cfg, stop_ids(tokenizer), rng)
    model.clear_cache()  # free the KV cache before training or scoring
    model.train(was_training)
    return Generations(ids, replies)


@torch.no_grad()
def reward_scores(reward_model: nn.Module, gens: Generations, tokenizer: Any, batch_size: int = 16) -> torch.Tensor:
    """Reward-model score of each generated reply, (N,) on CPU."""
    device = next(reward_model.parameters()).device
    rows = gens.rows(special_id(tokenizer, IM_END))
    out = []
    for start in range(0, len(rows), batch_size):
        ids, mask, _ = pad_rows(rows[start:start + batch_size], tokenizer.pad_id)
        out.append(reward_model(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def kl_to_reference(policy: nn.Module, reference: nn.Module, gens: Generations, tokenizer: Any,
                    batch_size: int = 16) -> float:
    """Mean per-token log pi - log pi_ref over the reply tokens (and <|im_end|>) of `gens`."""
    device = next(policy.parameters()).device
    rows = gens.rows(special_id(tokenizer, IM_END))
    diff, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = tuple(t.to(device) for t in pad_rows(rows[start:start + batch_size], tokenizer.pad_id))
        diff += float((sequence_logps(policy, *batch) - sequence_logps(reference, *batch)).sum())
        tokens += int(batch[2][:, 1:].sum())
    return diff / max(tokens, 1)
