"""Direct Preference Optimization (Rafailov et al. 2023): train the policy on preference pairs, no reward model.

With log-ratios  rho(y) = log pi(y | x) - log pi_ref(y | x)  summed over the reply tokens (+ `<|im_end|>`):

    loss = -(1 - eps) * log sigmoid(beta * (rho(chosen) - rho(rejected)))
           - eps * log sigmoid(-beta * (rho(chosen) - rho(rejected)))

`beta` sets how far the policy may move from the reference (smaller = further); `eps` (label smoothing, cDPO)
assumes a share `eps` of the labels are flipped.

`loss_type="ipo"` (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences") instead regresses the log-ratio margin onto a fixed target:

    loss = (rho(chosen) - rho(rejected) - 1 / (2 * beta)) ** 2

The sigmoid loss keeps pushing the margin up until every pair is far past 0 (its gradient only fades), so the
policy can drift far from the reference on pairs it already ranks right; IPO stops at the margin 1 / (2 beta) and
pulls back pairs that overshoot, a fixed KL budget per pair. The margins are summed log-probabilities as above
(TRL averages them per token instead), so `beta` keeps the same meaning for both losses. The implicit rewards are
`beta * rho(chosen)` and `beta * rho(rejected)`; `reward_accuracy` is the share of pairs where the chosen one is
higher.

The reference is a frozen copy of the starting (SFT) model: two copies of the weights are resident while training,
or one with `precompute_reference_logps`, which scores every pair once before training and stores the numbers in
the dataset (batches then carry them as a 4th tensor).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from babyllama.data.preference import PreferenceDataset, collate_pairs
from babyllama.model.scoring import sequence_logprobs
from babyllama.train.run_config import DPO_LOSSES


def pair_logps(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """(B, 2) log-probabilities of the chosen and rejected replies of a `babyllama.data.preference` batch."""
    ids, mask, response = (t.flatten(0, 1) for t in batch[:3])
    return sequence_logprobs(model, ids, mask, response).view(-1, 2)




def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[Tensor, dict[str, Tensor]]:
    """Sigmoid DPO or IPO loss (mean over pairs) and the implicit-reward metrics (see the module docstring)."""
    chosen_rewards = beta * (policy_chosen - ref_chosen).float()
    rejected_rewards = beta * (policy_rejected - ref_rejected).float()
    margin = chosen_rewards - rejected_rewards
    if loss_type == "ipo":  # margin / beta is the log-ratio margin rho(chosen) - rho(rejected)
        losses = (margin / beta - 1 / (2 * beta)) ** 2
    elif loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSSES}, got {loss_type!r}")
    metrics = {"reward_accuracy": (margin > 0).float().mean(), "chosen_reward": chosen_rewards.mean(),
               "rejected_reward": rejected_rewards.mean(), "reward_margin": margin.mean()}
    return losses.mean(), {k: v.detach() for k, v in metrics.items()}


class DPOLoss:
    """Trainer loss `(model, batch) -> (loss, metrics)`; reference log-probs from the batch when precomputed,
    else from `reference` (frozen, no grad)."""

    def __init__(self, reference: nn.Module | None, beta: float = 0.1, label_smoothing: float = 0.0,
                 loss_type: str = "sigmoid"):
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if loss_type not in DPO_LOSSES:
            raise ValueError(f"loss_type must be one of {DPO_LOSSES}, got {loss_type!r}")
        if loss_type == "ipo" and label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only, not to IPO")
        self.reference, self.beta, self.label_smoothing, self.loss_type = reference, beta, label_smoothing, loss_type

    def __call__(self, model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        policy = pair_logps(model, batch)
        if len(batch) > 3:
            ref = batch[3]
        else:
            if self.reference is None:
                raise ValueError("DPOLoss has no reference model and the batch carries no reference log-probs")
            with torch.no_grad():
                ref = pair_logps(self.reference, batch)
        return dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.beta, self.label_smoothing,
                        self.loss_type)


def _batches(dataset: PreferenceDataset, batch_size: int) -> Iterator[tuple[int, tuple[Tensor, ...]]]:
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i][:4] for i in range(start, min(start + batch_size, len(dataset)))]
        yield start, collate_pairs(items, dataset.pad_id)


@torch.no_grad()
def precompute_reference_logps(reference: nn.Module, dataset: PreferenceDataset, batch_size: int = 16,
                               device: torch.device | str = "cpu") -> None:
    """Score every pair of `dataset` once with `reference` and store them as `dataset.ref_logps` (N, 2)."""
    out = np.zeros((len(dataset), 2), dtype=np.float32)
    for start, batch in _batches(dataset, batch_size):
        logps = pair_logps(reference, tuple(t.to(device) for t in batch))
        out[start: start + len(logps)] = logps.float().cpu().numpy()
    dataset.ref_logps = out
