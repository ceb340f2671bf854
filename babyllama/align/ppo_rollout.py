"""PPO's experience: sample a rollout with the policy, score it (policy and reference log-probs, values, the
reward model's score, KL-penalised rewards, GAE advantages), make one whenever training needs it (`Rollouts`, a
trainer callback), serve it as minibatches (`RolloutLoader`, the stage's data loader), and the sampled held-out
evaluation. The iteration as a whole: `babyllama.align.ppo`'s docstring."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from babyllama.align.ppo import (
    PolicyWithValue,
    PPOConfig,
    gae,
    kl_controller,
    kl_divergence,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    response_slice,
)
from babyllama.model.generate import Generator, SamplingConfig
from babyllama.model.llama import Llama
from babyllama.model.scoring import token_logprobs
from babyllama.train.distributed import all_reduce_mean
from babyllama.train.trainer import Callback, Trainer


@dataclass
class Rollout:
    input_ids: Tensor  # (B, P + R): left-padded prompts, then responses (pad_id after the stop token)
    attention_mask: Tensor  # (B, P + R) 1 = real token
    position_ids: Tensor  # (B, P + R) counted over real tokens
    response_mask: Tensor  # (B, R) float, 1 up to and including the first stop token
    stopped: Tensor  # (B,) bool: the reply ends with a stop token (else it was cut at max_new_tokens)
    prompt_len: int  # P

    @property
    def responses(self) -> Tensor:
        return self.input_ids[:, self.prompt_len:]

    def response_lists(self) -> list[list[int]]:
        """Responses without padding (the stop token kept)."""
        lengths = self.response_mask.sum(1).long().tolist()
        return [row[:n] for row, n in zip(self.responses.tolist(), lengths)]

    def rows(self, idx: slice) -> "Rollout":
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self) if f.name != "prompt_len"})

    def reward_inputs(self, end_id: int) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask), one column wider, of prompt + reply + `end_id` (`<|im_end|>`): the form the
        reward model was trained on (`babyllama.data.preference.encode_side`). The stop token becomes `end_id`, and a
        reply cut at max_new_tokens gets one appended (OpenRLHF likewise ends every sequence with EOS), so that
        it is not scored out of distribution; the policy's tokens and log-probs are unchanged."""
        ids, mask = F.pad(self.input_ids, (0, 1), value=end_id), F.pad(self.attention_mask, (0, 1))
        end = self.prompt_len + self.response_mask.sum(1).long() - self.stopped.long()
        rows = torch.arange(len(ids), device=ids.device)
        ids[rows, end], mask[rows, end] = end_id, 1
        return ids, mask


def generate_rollout(policy: Llama, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                     stop_ids: Sequence[int], pad_id: int, rng: torch.Generator | None = None) -> Rollout:
    """Sample one response per prompt. A fresh Generator each time: a Generator assumes it owns the model's
    KV cache, and training and evaluation sample from the same policy with different batch sizes."""
    steps = list(Generator(policy).generate_batch(prompts, sampling, stop_ids, rng))
    policy.clear_cache()  # free it while training (and keep it out of DDP's buffers)
    responses = torch.stack(steps, 1).clone()  # out of inference mode: training reads these ids
    device = responses.device
    is_stop = torch.isin(responses, torch.tensor(list(stop_ids) or [-1], device=device))
    after_stop = (is_stop.long().cumsum(1) - is_stop.long()) > 0
    responses = responses.masked_fill(after_stop, pad_id)
    P = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
    prompt_mask = torch.zeros_like(prompt_ids)
    for i, p in enumerate(prompts):
        prompt_ids[i, P - len(p):] = torch.tensor(list(p), device=device)
        prompt_mask[i, P - len(p):] = 1
    response_mask = (~after_stop).long()
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    return Rollout(torch.cat([prompt_ids, responses], 1), attention_mask,
                   (attention_mask.cumsum(1) - 1).clamp(min=0), response_mask.float(), is_stop.any(1), P)


@torch.no_grad()
def policy_outputs(model: nn.Module, roll: Rollout) -> tuple[Tensor, Tensor | None]:
    """(logits, values) of a PolicyWithValue, or (logits, None) of a plain Llama, at the response tokens."""
    out = model(roll.input_ids, attention_mask=roll.attention_mask, position_ids=roll.position_ids)
    logits, values = out if isinstance(out, tuple) else (out.logits, None)
    P = roll.prompt_len
    return response_slice(logits, P), None if values is None else response_slice(values, P)


def in_chunks(fn: Callable[[Rollout], dict[str, Tensor]], roll: Rollout, size: int) -> dict[str, Tensor]:
    """`fn` over chunks of `size` rows, its outputs concatenated: the (size, T, vocab) logits `fn` makes are freed
    after each chunk, and `fn` keeps only per-token or per-row results."""
    return concat([fn(roll.rows(slice(start, start + size))) for start in range(0, len(roll.input_ids), size)])


def concat(parts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-row results of consecutive row chunks, joined along the rows."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def experience(model: PolicyWithValue, ref: Llama, reward_model: nn.Module, roll: Rollout, kl_coef: float,
               cfg: PPOConfig, end_id: int, chunk_size: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Everything the PPO loss needs for a rollout (a batch dict), and the rollout's statistics; the rollout is
    scored in chunks of `chunk_size` rows (see `in_chunks`). `end_id`: see `Rollout.reward_inputs`."""
    def scored(r: Rollout) -> dict[str, Tensor]:
        logits, values = policy_outputs(model, r)
        out = {"logp": token_logprobs(logits, r.responses), "values": values}
        del logits  # before the reference's logits exist
        out["ref_logp"] = token_logprobs(policy_outputs(ref, r)[0], r.responses)
        out["score"] = reward_model(*r.reward_inputs(end_id)).float()
        return out

    s = in_chunks(scored, roll, chunk_size)
    logp, ref_logp, values, score = s["logp"], s["ref_logp"], s["values"], s["score"]
    mask = roll.response_mask
    rewards, kl = per_token_rewards(score, logp, ref_logp, mask, kl_coef)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    batch = {"input_ids": roll.input_ids, "attention_mask": roll.attention_mask, "position_ids": roll.position_ids,
             "response_mask": mask, "old_logp": logp, "old_values": values, "returns": returns,
             "advantages": masked_whiten(advantages, mask), "prompt_len": roll.prompt_len}
    stats = {"score": score.mean().item(), "kl": kl.sum(1).mean().item(), "kl_coef": kl_coef,
             "response_len": mask.sum(1).mean().item(), "value_mean": masked_mean(values, mask).item()}
    return batch, stats


def minibatches(batch: dict[str, Any], size: int) -> Iterator[dict[str, Any]]:
    """Shuffled row subsets of a rollout batch (ints such as prompt_len are shared)."""
    n = batch["input_ids"].shape[0]
    for idx in torch.randperm(n).split(size):
        idx = idx.to(batch["input_ids"].device)
        yield {k: v[idx] if isinstance(v, Tensor) else v for k, v in batch.items()}


# ======================================================================= the loader and the rollouts
class RolloutLoader:
    """PPO's "data loader" for `Trainer.fit`: `ppo_epochs` shuffled passes over the current rollout in minibatches of
    `batch_size`, then the same over the next rollout, forever (bound the run with `fit(max_steps=...)`). It only
    serves batches: `Rollouts`, a callback, `put`s a new rollout in before a batch is drawn from a used-up one."""

    def __init__(self, ppo_epochs: int, batch_size: int):
        self.ppo_epochs, self.batch_size = ppo_epochs, batch_size
        self.rollout: dict[str, Any] = {}
        self.left = 0  # minibatches of `rollout` still to be served

    def put(self, rollout: dict[str, Any]) -> None:
        self.rollout = rollout
        self.left = self.ppo_epochs * math.ceil(len(rollout["input_ids"]) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            if not self.left:
                raise RuntimeError("RolloutLoader has no rollout to serve: pass its Rollouts to fit's callbacks")
            rollout = self.rollout
            for _ in range(self.ppo_epochs):
                for minibatch in minibatches(rollout, self.batch_size):
                    self.left -= 1
                    yield minibatch


class Rollouts(Callback):
    """Makes PPO's experience during `Trainer.fit(rollouts.loader, callbacks=[rollouts, ...])`: before the trainer
    draws a batch from a used-up rollout, samples replies to the next `rollout_size` prompts with the policy (in eval
    mode), scores them (`experience`), puts the result in `loader` and updates the KL coefficient from its KL.

    The KL coefficient and the prompt cursor are kept in `trainer.extra_state` (read at every rollout), so a resumed
    trainer continues with them (and with a fresh rollout)."""

    def __init__(self, ref: Llama, reward_model: nn.Module, prompts: Sequence[Sequence[int]], cfg: PPOConfig,
                 batch_size: int, stop_ids: Sequence[int], pad_id: int, end_id: int, seed: int = 0):
        if not prompts:
            raise ValueError("Rollouts needs at least one prompt")
        self.ref, self.reward_model = ref, reward_model
        self.prompts, self.cfg, self.batch_size = list(prompts), cfg, batch_size
        self.stop_ids, self.pad_id, self.end_id, self.seed = list(stop_ids), pad_id, end_id, seed
        self.loader = RolloutLoader(cfg.ppo_epochs, batch_size)
        self.kl_ctl = kl_controller(cfg)
        self.sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=0,
                                       top_p=1.0)
        self._pass, self._shuffled = -1, []

    def on_batch_begin(self, trainer: Trainer) -> None:
        if not self.loader.left:
            self.loader.put(self.collect(trainer))

    def prompts_at(self, cursor: int) -> list[Sequence[int]]:
        """`rollout_size` prompts from position `cursor` of a seeded shuffle per pass over the prompts."""
        return [self.prompts[self._order(i // len(self.prompts))[i % len(self.prompts)]]
                for i in range(cursor, cursor + self.cfg.rollout_size)]

    def _order(self, pass_index: int) -> list[int]:
        if self._pass != pass_index:
            self._pass, self._shuffled = pass_index, list(range(len(self.prompts)))
            random.Random(self.seed + pass_index).shuffle(self._shuffled)
        return self._shuffled

    def collect(self, trainer: Trainer) -> dict[str, Any]:
        """A new rollout as a batch dict (its statistics under "stats", logged with the steps that train on it);
        advances the prompt cursor and updates the KL coefficient from the rollout's KL."""
        state, model = trainer.extra_state, trainer.network
        self.kl_ctl.value = state.get("kl_coef", self.kl_ctl.value)
        cursor = state.get("prompt_cursor", 0)
        state["prompt_cursor"] = cursor + self.cfg.rollout_size
        model.eval()
        with trainer.autocast():  # the precision the loss runs in, so that old and new log-probs agree
            roll = generate_rollout(model.policy, self.prompts_at(cursor), self.sampling, self.stop_ids, self.pad_id)
            batch, stats = experience(model, self.ref, self.reward_model, roll, self.kl_ctl.value, self.cfg,
                                      self.end_id, self.batch_size)
        model.train()
        # every rank must update the coefficient with the same KL, or their coefficients drift apart
        kl = float(all_reduce_mean(torch.tensor(stats["kl"], device=roll.input_ids.device)))
        self.kl_ctl.update(kl, len(roll.input_ids) * trainer.env.world_size)
        state["kl_coef"] = self.kl_ctl.value
        return {**batch, "stats": stats}


# ======================================================================= evaluation
@torch.no_grad()
def evaluate_policy(policy: Llama, ref: Llama | None, reward_model: nn.Module | None, prompts: Sequence[Sequence[int]],
                    sampling: SamplingConfig, stop_ids: Sequence[int], pad_id: int, end_id: int, batch_size: int = 16,
                    seed: int = 0, chunk_size: int | None = None) -> dict[str, float]:
    """Over responses sampled for `prompts` with a fixed seed: the mean reward-model `score` (without a reward
    model: none), `kl` = KL(policy || ref) per response, the exact per-token KL summed over the response tokens
    (without a ref: none), and `response_len`. Generation runs `batch_size` prompts at a time, the scoring
    `chunk_size` rows at a time (default: the whole generation batch); `end_id`: see `Rollout.reward_inputs`."""
    def measured(r: Rollout) -> dict[str, Tensor]:
        out = {}
        if reward_model is not None:
            out["score"] = reward_model(*r.reward_inputs(end_id)).float()
        if ref is not None:
            logits, _ = policy_outputs(policy, r)
            out["kl"] = (kl_divergence(logits, policy_outputs(ref, r)[0]) * r.response_mask).sum(1)
        return {**out, "response_len": r.response_mask.sum(1)}

    was_training = policy.training
    policy.eval()
    rng = torch.Generator(device=policy.lm_head.weight.device).manual_seed(seed)
    parts = []
    for start in range(0, len(prompts), batch_size):
        roll = generate_rollout(policy, prompts[start:start + batch_size], sampling, stop_ids, pad_id, rng)
        parts.append(in_chunks(measured, roll, chunk_size or len(roll.input_ids)))
    policy.train(was_training)
    return {k: v.mean().item() for k, v in concat(parts).items()}
