"""GRPO, Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath"), with rule-based rewards: the math,
the loss, and the rollouts of `babyllama grpo` (RL with verifiable rewards on the skill suite).

One GRPO iteration
------------------
1. Rollout: `prompts_per_rollout` skill items (a seeded shuffle per pass over them, as PPO's prompts), each asked
   `group_size` times; one reply sampled per copy with the policy (`generate_rollout` of PPO: plain sampling at
   `temperature`, no top-k/top-p). The `group_size` replies to one item are its group.
2. Reward per reply: 1 when the skill suite's program check says it is right (`check_reply(item, reply)`, the
   decoded reply without its stop token), else 0; with `reward_model_coef > 0` plus that times the reward model's
   score (read on prompt + reply + `<|im_end|>`, as PPO reads it).
3. Advantage per reply, within its group (`group_advantages`): (r - mean) / (std + eps), std with Bessel's
   correction as TRL and verl take it; with `scale_rewards` off only r - mean (Dr. GRPO, Liu et al. 2025: the
   division favours groups that are almost all right or all wrong). A group whose rewards are all equal carries
   no signal and gets 0 (the share of such groups is logged as `zero_std_frac`). Every token of a reply gets
   the reply's advantage: no value head, no critic, no GAE.
4. Loss per token (`make_grpo_loss`): PPO's clipped surrogate max(-A r, -A clip(r, 1-eps, 1+eps)), r the ratio of
   the policy to the rollout's policy, plus `kl_coef` times the k3 estimate of the KL to the frozen reference
   (the SFT model), exp(ref - logp) - (ref - logp) - 1 (`k3_kl`, as in DeepSeekMath: unbiased, >= 0), inside the
   loss rather than in the reward. Aggregated (`aggregate`) by `token`: the sum over all reply tokens of the
   minibatch / their number (DAPO, Yu et al. 2025: long replies weigh by their length), or by `sequence`: the mean
   over each reply's tokens, then over replies (the original GRPO).
5. `grpo_epochs` passes over the rollout in shuffled minibatches of `batch_size` replies (PPO's `RolloutLoader`),
   each an optimizer step (or a micro-batch of one, with --grad-accum).

When a rollout is trained on in one optimizer step (one epoch, its minibatches a whole number of micro-batches of
one step: the baby preset's 4 x 8 = 32 replies, --batch-size 32), the policy is still the one that sampled it: the
ratio is 1 and the "old" log-probs are the current ones detached, so they are not computed at rollout time
(`on_policy`). Otherwise the rollout is scored by the policy too (`old_logp`).

Fitting it into the Trainer as PPO does: `GroupRollouts` is a callback that makes a rollout (steps 1-3) before the
trainer draws a batch from a used-up one, `GroupRollouts.loader` the "data loader" that serves its minibatches, and
`make_grpo_loss(cfg)` the loss. The prompt cursor lives in `trainer.extra_state`, so `--resume` continues with the
next items (a resumed run starts with a fresh rollout; with the on-policy defaults every step has its own).

Logged per step: the rollout's `reward` (mean), `pass_rate` (share of right replies), `response_len`,
`zero_std_frac`, `pass_rate_<skill>` (over all ranks); the minibatch's `pg_loss`, `kl` (k3 summed over a reply's
tokens, mean over replies) and `clipfrac`.

Tensor layout: PPO's (`babyllama.align.ppo`): a rollout is `[left-padded prompt | response]`, every response starts
at column P, per-token tensors are (B, R) over the response columns; per-reply tensors (rewards, advantages) (B,).
Rows are grouped consecutively: rows g*G .. g*G+G-1 are the replies to item g.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from babyllama.align.ppo import masked_mean, response_slice
from babyllama.align.ppo_rollout import Rollout, RolloutLoader, generate_rollout, in_chunks
from babyllama.data.chat_template import IM_END, special_id, stop_ids
from babyllama.model.generate import SamplingConfig
from babyllama.model.llama import Llama
from babyllama.model.scoring import token_logprobs, unwrap
from babyllama.train.distributed import all_reduce_mean
from babyllama.train.run_config import GRPOConfig  # noqa: F401 (GRPO's settings, used below and by its users)
from babyllama.train.trainer import Callback, LossFn, Trainer

# an item of the training set (a skill item: babyllama.eval.skills) and its reward, (item, decoded reply) -> reward;
# the stage passes the skill suite's `check_reply` (eval is a later chapter than align, so it is handed in)
SkillItem = dict[str, Any]
RewardFn = Callable[[SkillItem, str], "bool | float"]
STD_EPS = 1e-4  # added to a group's std (TRL's value): a group of near-equal rewards does not blow up


# ======================================================================= math
def group_advantages(rewards: Tensor, group_size: int, scale: bool = True,
                     eps: float = STD_EPS) -> tuple[Tensor, Tensor]:
    """(advantages (N,), constant (N / group_size,) bool) of rewards (N,) in consecutive groups: each reward minus
    its group's mean, divided by the group's std (+ eps) when `scale`; a group whose rewards are all equal
    (`constant`) gets 0."""
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    advantages = centred / (r.std(1, keepdim=True) + eps) if scale else centred
    constant = (r == r[:, :1]).all(1)
    return advantages.masked_fill(constant[:, None], 0.0).flatten(), constant


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || ref) on tokens sampled from the policy (Schulman 2020, DeepSeekMath):
    exp(ref - logp) - (ref - logp) - 1, >= 0 and 0 where the two agree."""
    d = ref_logp - logp
    return d.exp() - d - 1


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps: float) -> tuple[Tensor, Tensor]:
    """(per-token loss (B, R), clipped (B, R) bool): PPO's max(-A r, -A clip(r, 1-eps, 1+eps)) with the reply's
    advantage (B,) on each of its tokens (`babyllama.align.ppo.policy_loss` before its mean)."""
    ratio = (logp - old_logp).exp()
    adv = advantages[:, None]
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).detach()


def aggregate(per_token: Tensor, mask: Tensor, mode: str) -> Tensor:
    """A per-token loss (B, R) as one number: `token`, the sum over the masked tokens / their number (DAPO);
    `sequence`, the mean over each row's tokens, then over rows (GRPO)."""
    if mode == "token":
        return masked_mean(per_token, mask)
    if mode == "sequence":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    raise ValueError(f"loss aggregation must be token or sequence, got {mode!r}")


def response_logprobs(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """log p of the response tokens (B, R) under `model` (a Llama, possibly DDP/compile-wrapped); logits only at the
    response positions, so a forward costs (B, R, vocab) fp32 of them, not (B, P + R, vocab)."""
    P, ids = batch["prompt_len"], batch["input_ids"]
    hidden = model(ids, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                   return_logits=False, return_hidden=True).hidden
    return token_logprobs(unwrap(model).head(response_slice(hidden, P)), ids[:, P:])


# ======================================================================= loss
def make_grpo_loss(cfg: GRPOConfig) -> LossFn:
    """`loss(model, minibatch) -> (loss, metrics)` for Trainer.compile; the rollout statistics the minibatch carries
    under "stats" join the metrics so that they are logged with the step."""

    def grpo_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch["response_mask"]
        logp = response_logprobs(model, batch)
        old_logp = batch["old_logp"] if "old_logp" in batch else logp.detach()
        pg, clipped = clipped_surrogate(logp, old_logp, batch["advantages"], cfg.clip_eps)
        kl = k3_kl(logp, batch["ref_logp"]) * mask
        loss = aggregate(pg + cfg.kl_coef * kl if cfg.kl_coef else pg, mask, cfg.loss_agg)
        metrics = {"pg_loss": aggregate(pg, mask, cfg.loss_agg).detach(), "kl": kl.sum(1).mean().detach(),
                   "clipfrac": masked_mean(clipped.float(), mask)}
        return loss, {**metrics, **{k: torch.tensor(v) for k, v in batch.get("stats", {}).items()}}

    return grpo_loss


# ======================================================================= rollouts
def on_policy(cfg: GRPOConfig, batch_size: int, grad_accum: int) -> bool:
    """Is every rollout trained on in one optimizer step (so the sampling policy is the one being updated)?"""
    minibatches = cfg.grpo_epochs * math.ceil(cfg.prompts_per_rollout * cfg.group_size / batch_size)
    return grad_accum % minibatches == 0


class GroupRollouts(Callback):
    """Makes GRPO's experience during `Trainer.fit(rollouts.loader, callbacks=[rollouts, ...])`: before the trainer
    draws a batch from a used-up rollout, samples `group_size` replies to each of the next `prompts_per_rollout`
    items with the policy (`trainer.network`, a Llama, in eval mode), rewards and scores them (`collect`) and puts
    the result in `loader`.

    `items` and `prompts` (their rendered prompt ids) are this rank's share; `skills` names every skill of all ranks
    (the per-skill pass rates are summed over the ranks). `reward_fn(item, reply)`: the 0/1 (or real) reward,
    the stage's is the skill suite's check (`babyllama.eval.skills.check_reply`); `reward_model`: added times
    `cfg.reward_model_coef` when that is > 0."""

    def __init__(self, ref: Llama, items: Sequence[SkillItem], prompts: Sequence[Sequence[int]], cfg: GRPOConfig,
                 tokenizer: Any, batch_size: int, reward_fn: RewardFn,
                 reward_model: nn.Module | None = None, skills: Sequence[str] | None = None, seed: int = 0):
        if not items or len(items) != len(prompts):
            raise ValueError("GroupRollouts needs one prompt per item, at least one")
        if cfg.reward_model_coef and reward_model is None:
            raise ValueError("reward_model_coef > 0 needs a reward model")
        self.ref, self.items, self.prompts, self.cfg, self.tok = ref, list(items), list(prompts), cfg, tokenizer
        self.batch_size, self.reward_fn, self.reward_model, self.seed = batch_size, reward_fn, reward_model, seed
        self.skills = sorted(set(skills or (item["skill"] for item in self.items)))
        self.stop_ids, self.end_id = stop_ids(tokenizer), special_id(tokenizer, IM_END)
        self.loader = RolloutLoader(cfg.grpo_epochs, batch_size)
        self.sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=0,
                                       top_p=1.0)
        self.skill_pass_rates: dict[str, float] = {}  # of the latest rollout, logged with each step trained on it
        self._pass, self._shuffled = -1, []

    def on_batch_begin(self, trainer: Trainer) -> None:
        if not self.loader.left:
            self.loader.put(self.collect(trainer))

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        if "loss" in logs:  # a logged step
            logs.update({f"pass_rate_{skill}": rate for skill, rate in self.skill_pass_rates.items()})

    def indices_at(self, cursor: int) -> list[int]:
        """`prompts_per_rollout` item indices from position `cursor` of a seeded shuffle per pass over the items
        (`Rollouts.prompts_at` of PPO)."""
        n = len(self.items)
        return [self._order(i // n)[i % n] for i in range(cursor, cursor + self.cfg.prompts_per_rollout)]

    def _order(self, pass_index: int) -> list[int]:
        if self._pass != pass_index:
            self._pass, self._shuffled = pass_index, list(range(len(self.items)))
            random.Random(self.seed + pass_index).shuffle(self._shuffled)
        return self._shuffled

    def replies(self, roll: Rollout) -> list[str]:
        stops = set(self.stop_ids)
        return [self.tok.decode([t for t in ids if t not in stops]) for ids in roll.response_lists()]

    @torch.no_grad()
    def collect(self, trainer: Trainer) -> dict[str, Any]:
        """A new rollout as a batch dict (its statistics under "stats"); advances the prompt cursor."""
        state, policy, G = trainer.extra_state, trainer.network, self.cfg.group_size
        cursor = state.get("prompt_cursor", 0)
        state["prompt_cursor"] = cursor + self.cfg.prompts_per_rollout
        chosen = self.indices_at(cursor)
        old = not on_policy(self.cfg, self.batch_size, trainer.accum)

        def scored(r: Rollout) -> dict[str, Tensor]:
            rows = {"input_ids": r.input_ids, "attention_mask": r.attention_mask, "position_ids": r.position_ids,
                    "prompt_len": r.prompt_len}
            out = {"ref_logp": response_logprobs(self.ref, rows)}
            if old:
                out["old_logp"] = response_logprobs(policy, rows)
            if self.reward_model is not None and self.cfg.reward_model_coef:
                out["score"] = self.reward_model(*r.reward_inputs(self.end_id)).float()
            return out

        policy.eval()
        with trainer.autocast():  # the precision the loss runs in, so that old and new log-probs agree
            roll = generate_rollout(policy, [self.prompts[i] for i in chosen for _ in range(G)], self.sampling,
                                    self.stop_ids, self.tok.pad_id)
            s = in_chunks(scored, roll, self.batch_size)
        policy.train()
        items = [self.items[i] for i in chosen for _ in range(G)]
        right = torch.tensor([float(self.reward_fn(item, reply)) for item, reply in zip(items, self.replies(roll))],
                             device=roll.input_ids.device)
        rewards = right + self.cfg.reward_model_coef * s.pop("score") if "score" in s else right
        advantages, constant = group_advantages(rewards, G, self.cfg.scale_rewards)
        mask = roll.response_mask
        batch = {"input_ids": roll.input_ids, "attention_mask": roll.attention_mask,
                 "position_ids": roll.position_ids, "response_mask": mask, "advantages": advantages, **s,
                 "prompt_len": roll.prompt_len}
        stats = {"reward": rewards.mean().item(), "pass_rate": right.mean().item(),
                 "response_len": mask.sum(1).mean().item(), "zero_std_frac": constant.float().mean().item()}
        self.skill_pass_rates = self._pass_rates(items, right)
        return {**batch, "stats": stats}

    def _pass_rates(self, items: Sequence[SkillItem], right: Tensor) -> dict[str, float]:
        """Share of right replies per skill in this rollout over all ranks (skills none of them asked: left out)."""
        counts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for item, ok in zip(items, right.tolist()):
            counts[item["skill"]][0] += ok
            counts[item["skill"]][1] += 1
        sums = torch.tensor([counts[s] if s in counts else [0.0, 0.0] for s in self.skills], device=right.device)
        sums = all_reduce_mean(sums)  # every rank calls this once per rollout, with the same skills
        return {s: (ok / n) for s, (ok, n) in zip(self.skills, sums.tolist()) if n > 0}
