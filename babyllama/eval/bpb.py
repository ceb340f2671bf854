"""A model's loss, perplexity and bits per byte on held-out texts: what `eval.evaluate` reports per language and
`eval.compressors` puts beside PPMd's and xz's.

Each document is `</s>` + its tokens (pretraining sees every document after the previous one's `</s>`); every text
token is predicted once, in windows of `max_seq_len` (context restarts at a window boundary). `bpb` = total nats /
ln 2 / total UTF-8 bytes of the texts, which does not depend on the tokenizer (comparable across vocabularies).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

from torch import nn

from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.model.scoring import row_logprobs


def document_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """`</s>` + the text's ids: a document as it starts in the pretraining stream (after the previous one's end)."""
    return [tokenizer.eos_id] + tokenizer.encode(text)


def windows(ids: Sequence[int], max_len: int) -> list[list[int]]:
    """Rows of at most max_len + 1 ids overlapping by one, so every id after the first is predicted once."""
    return [list(ids[s:s + max_len + 1]) for s in range(0, max(1, len(ids) - 1), max_len)]


def text_metrics(model: nn.Module, tokenizer: Tokenizer, texts: Iterable[str]) -> dict[str, float]:
    """`loss`, `ppl`, `bpb` of `texts` plus the `tokens` and `bytes` they were computed over."""
    rows, n_bytes = [], 0
    for text in texts:
        rows += windows(document_ids(tokenizer, text), model.config.max_seq_len)
        n_bytes += len(text.encode("utf-8"))
    if not n_bytes:
        raise UserError("no held-out text to evaluate on")
    logps = row_logprobs(model, rows)
    nats, tokens = -sum(float(lp.double().sum()) for lp in logps), sum(len(lp) for lp in logps)
    loss = nats / tokens
    return {"loss": loss, "ppl": math.exp(loss), "bpb": nats / math.log(2) / n_bytes, "tokens": tokens,
            "bytes": n_bytes}
