"""PPO for RLHF (Ziegler et al. 2019, InstructGPT): the math, the policy with a value head, rollouts and the loss.

One PPO iteration
-----------------
1. Rollout: sample a response for each of `rollout_size` prompts with the policy (`Generator`, KV cache, left-padded
   prompts; plain sampling at `temperature`, no top-k/top-p, so the samples come from the distribution we score).
2. Score: log-probs of the response tokens under the policy (`old_logp`) and the frozen reference (the SFT
   model), values from the value head, and one reward-model score per sequence, read on prompt + reply +
   `<|im_end|>` as the reward model was trained (`Rollout.reward_inputs`). Rows are scored in chunks of the
   minibatch size (`in_chunks`), so only one chunk's (chunk, T, vocab) logits exist at a time.
3. Rewards per response token: `-kl_coef * (old_logp - ref_logp)`, plus the score on the last response token
   (`per_token_rewards`); advantages and returns by GAE over the response tokens (`gae`), advantages whitened
   over the rollout (`masked_whiten`).
4. `ppo_epochs` passes over the rollout in shuffled minibatches, each one optimizer step of
   `policy_loss + vf_coef * value_loss - ent_coef * entropy` (clipped ratio and clipped value).
5. The KL coefficient is updated from the rollout's KL: fixed, or adaptive towards `kl_target` (Ziegler's
   proportional controller, `AdaptiveKLController`).

Steps 1-2 (and the held-out evaluation) live in `babyllama.align.ppo_rollout`; 3-5 and the model here.

Fitting it into the Trainer: `Rollouts` is a callback that makes a new rollout (steps 1-3 and 5) before the trainer
draws a batch from a used-up one, `Rollouts.loader` the "data loader" that serves its minibatches (step 4's passes),
and `make_ppo_loss(cfg)` the loss, so `Trainer.fit` does the optimisation, logging and checkpoints like in every
other stage. The KL coefficient and the prompt cursor live in `trainer.extra_state`, so they are saved in checkpoints
and `--resume` continues with them (a resumed run starts with a fresh rollout).

Memory: resident are the policy (its backbone also carries the value head, so actor and critic share one copy),
the frozen reference and the frozen reward model: three backbones, plus AdamW state for the policy only. A separate
critic (`PolicyWithValue(policy, critic_from(reward_model))`) makes it four, with AdamW state for two. The
activation peak of a rollout is the scoring of one chunk (`experience(chunk_size=...)`, the minibatch size): its
fp32 (chunk, P + R, vocab) logits, first the policy's then the reference's, the same size as a training step's.

Tensor layout: a rollout is `[left-padded prompt | response]`, prompts padded to a common length P, so every
response starts at column P; per-token tensors (log-probs, values, rewards, masks) are (B, R) over the response
columns. The response mask is a prefix: the sampled tokens up to and including the first stop token.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from babyllama.model.llama import Llama
from babyllama.model.scoring import token_logprobs
from babyllama.train.run_config import PPOConfig  # noqa: F401 (PPO's settings, used below and by its users)
from babyllama.train.trainer import LossFn


# ======================================================================= math
def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Zero mean, unit variance over the masked entries (masked-out entries become 0)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def per_token_rewards(score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor,
                      kl_coef: float) -> tuple[Tensor, Tensor]:
    """(rewards (B, R), per-token KL estimate (B, R)): the KL penalty on every response token and the
    reward-model score (B,) added on the last one. `mask` must be a prefix mask with at least one token per row."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1
    rows = torch.arange(score.shape[0], device=score.device)
    rewards[rows, last] += score
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens: (advantages, returns), both (B, R), 0 where
    masked. The value after the last response token is 0 (the episode ends there)."""
    R = rewards.shape[1]
    next_value = torch.zeros_like(rewards[:, 0])
    running = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(R)):
        live = mask[:, t + 1] if t + 1 < R else torch.zeros_like(running)  # does the episode go on after t?
        delta = rewards[:, t] + gamma * next_value * live - values[:, t]
        running = delta + gamma * lam * running * live
        advantages[:, t] = running
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                clip_eps: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate: mean of max(-A r, -A clip(r, 1-eps, 1+eps)); metrics clip fraction and approx KL."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():  # k3 estimator of KL(old || new): non-negative, low variance
        approx_kl = masked_mean(ratio - 1 - log_ratio, mask)
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, {"approx_kl": approx_kl, "clipfrac": clipfrac}


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip: float) -> tuple[Tensor, Tensor]:
    """(0.5 * mean of max(unclipped, clipped) squared error, fraction clipped); values are clipped to
    old_values +- clip so the critic cannot jump far from the values the advantages were computed with."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def entropy(logits: Tensor) -> Tensor:
    """Entropy of each position's next-token distribution, (B, T, V) -> (B, T)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def kl_divergence(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Exact KL(p || q) of each position's next-token distributions, (B, T, V) x 2 -> (B, T)."""
    logp, logq = logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def response_slice(x: Tensor, prompt_len: int) -> Tensor:
    """The predictions for the response tokens: positions P-1 .. T-2 of (B, T, ...)."""
    return x[:, prompt_len - 1:-1]


# ======================================================================= KL controllers
class FixedKLController:
    def __init__(self, value: float):
        self.value = value

    def update(self, kl: float, n_samples: int) -> None:
        """A fixed coefficient ignores the measured KL."""


class AdaptiveKLController:
    """Ziegler et al. 2019: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_samples / horizon."""

    def __init__(self, value: float, target: float, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_samples / self.horizon


def kl_controller(cfg: PPOConfig) -> FixedKLController | AdaptiveKLController:
    if cfg.kl_target > 0:
        return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


# ======================================================================= model
class PolicyWithValue(nn.Module):
    """The policy (`policy`, a Llama) and a scalar value head (`value`) on final hidden states.

    By default the head reads the policy's own hidden states: actor and critic share one backbone, which saves a
    model copy, and the value loss then also shapes the policy's backbone (weighted by vf_coef). With a `critic`
    backbone (`--separate-value`, InstructGPT-style, one more model copy) the head reads the critic's hidden states
    and the value loss never touches the policy. State-dict keys are `policy.*`, `value.*` (and `critic.*`), so
    `checkpoint.load_model` reads the policy out of a PPO checkpoint (it strips `policy.`, ignores the rest)."""

    def __init__(self, policy: Llama, critic: Llama | None = None):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.config = policy.config
        self.value = nn.Linear((critic or policy).config.dim, 1)
        nn.init.zeros_(self.value.weight)  # values start at 0: the first advantages are the plain returns
        nn.init.zeros_(self.value.bias)
        p = policy.lm_head.weight
        self.value.to(device=p.device, dtype=p.dtype)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(logits (B, T, V) fp32, values (B, T) fp32)."""
        shared = self.critic is None
        out = self.policy(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          return_logits=True, return_hidden=shared)
        hidden = out.hidden if shared else self.critic(input_ids, attention_mask=attention_mask,
                                                       position_ids=position_ids, return_logits=False,
                                                       return_hidden=True).hidden
        return out.logits, self.value(hidden).squeeze(-1).float()


def critic_from(model: Llama) -> Llama:
    """A trainable critic backbone with `model`'s weights (e.g. the reward model's, as InstructGPT does; a reward
    model's score head is left out). Its language-model head is unused, so it is frozen unless tied."""
    critic = Llama(model.config)
    missing, _ = critic.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise ValueError(f"critic_from: the model lacks backbone weights such as {missing[0]}")
    if not model.config.tie_embeddings:
        critic.lm_head.weight.requires_grad_(False)
    p = model.lm_head.weight
    return critic.to(device=p.device, dtype=p.dtype).train()


# ======================================================================= loss
def make_ppo_loss(cfg: PPOConfig) -> LossFn:
    """`loss(model, minibatch) -> (loss, metrics)` for Trainer.compile; the rollout statistics the minibatch
    carries under "stats" join the metrics so that they are logged with the step."""

    def ppo_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        P, mask = batch["prompt_len"], batch["response_mask"]
        logits, values = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"])
        logits, values = response_slice(logits, P), response_slice(values, P)
        logp = token_logprobs(logits, batch["input_ids"][:, P:])
        pg, pg_metrics = policy_loss(logp, batch["old_logp"], batch["advantages"], mask, cfg.clip_eps)
        vf, vf_clipfrac = value_loss(values, batch["old_values"], batch["returns"], mask, cfg.value_clip)
        ent = masked_mean(entropy(logits), mask)
        loss = pg + cfg.vf_coef * vf - cfg.ent_coef * ent
        metrics = {"pg_loss": pg.detach(), "vf_loss": vf.detach(), "entropy": ent.detach(),
                   "vf_clipfrac": vf_clipfrac, **pg_metrics}
        return loss, {**metrics, **{k: torch.tensor(v) for k, v in batch.get("stats", {}).items()}}

    return ppo_loss
