"""Log-probabilities of given tokens: the one scorer behind evaluation (held-out loss and bits per byte, cloze and
chat multiple choice), DPO and PPO.

- `token_logprobs(logits, tokens)`: the primitive, log p(token) at each position (fp32).
- `row_logprobs(model, rows)`: rows of ids of any lengths -> per-token log-probabilities of each row after its
  first id (right-padded batches bounded by a logits budget). `continuation_logprobs` sums the last n of them:
  the score of a reply, a cloze choice, a next line.
- `sequence_logprobs(model, input_ids, attention_mask, response_mask)`: a padded training batch -> the summed
  log-probability of each row's response tokens, with gradients (DPO). Logits are computed at the response
  positions only, so memory is (response tokens x vocab), not (rows x length x vocab).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

LOGIT_BUDGET = 2 ** 26  # fp32 logits per forward of `row_logprobs` (256 MB): bounds memory for large vocabularies


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(tokens) under logits, in fp32: (..., V), (...) -> (...)."""
    return logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def row_logprobs(model: nn.Module, rows: Sequence[Sequence[int]], max_batch: int | None = None) -> list[Tensor]:
    """For each row of ids, log p(row[t] | row[:t]) for t >= 1 (fp32, on CPU, length len(row) - 1).

    Rows of similar length share a batch (sorted by length), right-padded: causal attention never lets a real
    token see the pads after it. A batch holds at most `LOGIT_BUDGET` logits (and `max_batch` rows)."""
    device = next(model.parameters()).device
    vocab = unwrap(model).config.vocab_size
    out: list[Tensor | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    per_batch = max(1, LOGIT_BUDGET // (max(map(len, rows), default=1) * vocab))
    per_batch = min(per_batch, max_batch or per_batch)
    for start in range(0, len(order), per_batch):
        batch = order[start:start + per_batch]
        width = max(len(rows[i]) for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        for b, i in enumerate(batch):
            ids[b, :len(rows[i])] = torch.tensor(rows[i])
        ids = ids.to(device)
        logp = token_logprobs(model(ids[:, :-1], return_logits=True).logits, ids[:, 1:]).cpu()
        for b, i in enumerate(batch):
            out[i] = logp[b, :len(rows[i]) - 1]
    return out


def continuation_logprobs(model: nn.Module, rows: Sequence[tuple[Sequence[int], int]],
                          max_batch: int | None = None) -> list[float]:
    """Summed log-probability of the last `n` ids of each `(ids, n)` row given the ids before them."""
    logps = row_logprobs(model, [ids for ids, _ in rows], max_batch)
    return [float(lp[len(lp) - n:].sum()) for lp, (_, n) in zip(logps, rows)]


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids counted over real tokens (pads get 0): left padding then matches the unpadded sequence."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def padded_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final hidden states (B, T, dim) of a padded batch through `model` (a Llama, possibly DDP/compile-wrapped)."""
    out = model(input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask),
                return_logits=False, return_hidden=True)
    return out.hidden


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside torch.compile / DDP wrappers."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def sequence_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> Tensor:
    """Summed log-probability of the response tokens of each row, (N,) fp32, differentiable."""
    hidden = padded_hidden(model, input_ids, attention_mask)
    scored = response_mask[:, 1:]  # the token at t+1 is predicted at t
    logps = token_logprobs(unwrap(model).head(hidden[:, :-1][scored]), input_ids[:, 1:][scored])
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(scored)[scored]
    return torch.zeros(input_ids.shape[0], device=input_ids.device).index_add(0, rows, logps)
