"""Reward model: the `Llama` backbone plus a scalar head `score` read at the last real token of each row.

    rm = RewardModel.from_lm(load_model("out/baby/sft"))       # start from the SFT policy
    scores = rm(input_ids, attention_mask)                      # (B,) float32, one score per sequence
    loss, metrics = bradley_terry_loss(scores_chosen, scores_rejected)
    rm = load_reward_model("out/baby/reward", device)           # a trained one, for PPO / DPO evaluation

Padding: `attention_mask` (1 = real token) says where each row's tokens are, left- or right-padded; position ids
are counted over real tokens only, so a padded row scores exactly like the same tokens unpadded.

Checkpoints: `RewardModel` subclasses `Llama`, so its state dict is Llama's keys plus `score.weight` and
`checkpoint.load_model` can read the backbone out of a reward checkpoint. Trainers of reward models set
`trainer.extra_state["kind"] = KIND` (`mark_reward_checkpoint`) so loaders can tell a reward checkpoint apart.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from babyllama.data.tokenizer import Tokenizer, check_tokenizer
from babyllama.errors import UserError
from babyllama.model.config import ModelConfig
from babyllama.model.llama import Llama
from babyllama.model.scoring import padded_hidden
from babyllama.train.checkpoint import load_checkpoint, trained_tokenizer

KIND = "reward"


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real token of each row, for left, right (or no) padding."""
    T = attention_mask.shape[-1]
    return T - 1 - attention_mask.long().flip(-1).argmax(-1)


class RewardModel(Llama):
    """`Llama` whose `forward(input_ids, attention_mask)` returns one scalar score per row.

    The language-model head stays (tied to the embeddings in the small presets) so that the checkpoint keeps
    Llama's keys; when untied it is frozen, being unused (DDP would otherwise wait for its gradient)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.score = nn.Linear(cfg.dim, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1 / math.sqrt(cfg.dim + 1))  # unit-scale scores at the start
        if not cfg.tie_embeddings:
            self.lm_head.weight.requires_grad_(False)

    @classmethod
    def from_lm(cls, lm: Llama) -> "RewardModel":
        """A reward model whose backbone is a copy of `lm`'s weights (the head is freshly initialised)."""
        rm = cls(lm.config)
        rm.load_state_dict(lm.state_dict(), strict=False)
        p = lm.lm_head.weight
        return rm.to(device=p.device, dtype=p.dtype)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Scores (B,) in float32; `attention_mask` (B, T), 1 = real token, default all real."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = padded_hidden(super().forward, input_ids, attention_mask)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.score(hidden[rows, last_token_index(attention_mask)]).squeeze(-1).float()


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """-log sigmoid(chosen - rejected), averaged; metrics: accuracy (chosen scored higher) and mean margin."""
    diff = chosen_scores.float() - rejected_scores.float()
    metrics = {"accuracy": (diff > 0).float().mean().detach(), "margin": diff.mean().detach()}
    return -F.logsigmoid(diff).mean(), metrics


def pair_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Tensor]]:
    """Trainer loss on `babyllama.data.preference` batches: score chosen and rejected in one forward, Bradley-Terry."""
    ids, mask = batch[0], batch[1]
    scores = model(ids.flatten(0, 1), mask.flatten(0, 1)).view(-1, 2)
    return bradley_terry_loss(scores[:, 0], scores[:, 1])


def mark_reward_checkpoint(extra_state: dict[str, Any]) -> None:
    """Tag a trainer's `extra_state` so that its checkpoints load with `load_reward_model`."""
    extra_state["kind"] = KIND


def is_reward_checkpoint(state: dict[str, Any]) -> bool:
    return (state.get("extra") or {}).get("kind") == KIND and "score.weight" in state.get("model", {})


def load_reward_model(path: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None, tokenizer: Tokenizer | None = None) -> RewardModel:
    """A trained `RewardModel` (eval mode) from a checkpoint file, or the newest one in a directory;
    `tokenizer`: refused unless it is the one the reward model was trained with."""
    state = load_checkpoint(path)
    if not is_reward_checkpoint(state):
        raise UserError(f"{path}: not a reward-model checkpoint (no kind='{KIND}' / score head); "
                        "train one with: babyllama reward --name <name>, or pass its out/<name>/reward")
    model = RewardModel(ModelConfig.from_dict(state["model_config"], str(path)))
    if tokenizer is not None:
        check_tokenizer(tokenizer, model.config.vocab_size, trained_tokenizer(state), path)
    model.load_state_dict(state["model"])
    return model.to(device=device, dtype=dtype).eval()
