"""Logit distillation: the student learns the next token and, beside it, the teacher's whole distribution over the
next token (Hinton et al. 2015: KL to the teacher's temperature-softened distribution, scaled by T^2 so that its
gradients keep their size as T changes). The teacher reads the same ids, so it must share the student's tokenizer
(checked by fingerprint): e.g. a larger model pretrained longer on the same corpus.

    loss = (1 - alpha) x cross-entropy(student, next token) + alpha x T^2 x KL(teacher_T || student_T)

over the positions that have a target (SFT: the assistant's tokens). The student's logits are materialised in full
for this ((rows x length x vocabulary), unlike the plain loss's chunked cross-entropy), and the teacher costs a
forward pass per batch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from babyllama.errors import UserError
from babyllama.model.llama import IGNORE_INDEX, Llama, frozen
from babyllama.train.checkpoint import load_model
from babyllama.train.trainer import LossFn


def load_teacher(path: str | Path, tokenizer: Any, student: Llama, device: torch.device) -> Llama:
    """The teacher checkpoint, frozen, checked against the student's tokenizer and context."""
    try:
        teacher = load_model(path, device, tokenizer=tokenizer)
    except UserError as e:  # say which checkpoint of the run it is
        raise UserError(f"--teacher: {e}") from None
    if teacher.config.vocab_size != student.config.vocab_size:
        raise UserError(f"--teacher {path}: its vocabulary has {teacher.config.vocab_size:,} rows, the student's "
                        f"{student.config.vocab_size:,}; a teacher must share the student's tokenizer")
    if teacher.config.max_seq_len < student.config.max_seq_len:
        raise UserError(f"--teacher {path}: its context ({teacher.config.max_seq_len}) is shorter than the "
                        f"student's ({student.config.max_seq_len})")
    return frozen(teacher)


def distillation_loss(teacher: nn.Module, alpha: float, temperature: float) -> LossFn:
    """A trainer loss for `(input_ids, targets)` batches (targets shifted, -100 = none); logs `ce` and `kd`."""
    def loss(model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        inputs, targets = batch[0], batch[1]
        scored = targets != IGNORE_INDEX
        student = model(inputs, return_logits=True).logits[scored].float()
        with torch.no_grad():
            taught = teacher(inputs, return_logits=True).logits[scored].float()
        ce = F.cross_entropy(student, targets[scored])
        kd = F.kl_div((student / temperature).log_softmax(-1), (taught / temperature).log_softmax(-1),
                      log_target=True, reduction="batchmean") * temperature ** 2
        return (1 - alpha) * ce + alpha * kd, {"ce": ce.detach(), "kd": kd.detach()}
    return loss


def stage_loss(run: Any, tokenizer: Any, student: Llama, device: torch.device, plain: LossFn) -> LossFn:
    """The stage's loss: `plain`, or with --teacher the distillation loss around it."""
    if not run.teacher:
        return plain
    return distillation_loss(load_teacher(run.teacher, tokenizer, student, device), run.distill_alpha,
                             run.distill_temperature)
