"""Sampling with a static KV cache: streaming for one prompt, left-padded batches for many.

The decode step has fixed shapes (one token per row, a cache of fixed length, a fixed padding mask), so
`Generator(model, compile=True)` compiles it once with CUDA graphs ("reduce-overhead"); greedy output is the
same token for token as the eager path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from babyllama.model import Llama


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages tokens already in prompt or output (CTRL paper)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Divide positive / multiply negative logits of tokens marked in `seen` (B, V bool)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """Pick the next token for each row of (B, V) logits."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > cfg.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Generator:
    """Generates continuations with `model`; reuses its cache buffers across calls of the same size."""

    def __init__(self, model: Llama, max_len: int | None = None, compile: bool = False):
        """max_len: fixed cache length (prompt + output); None sizes it per call. Fix it when compiling so that
        the decode step is captured once."""
        self.model = model
        self.max_len = max_len
        self._step: Callable[..., Tensor] = self._decode_step
        if compile:
            self._step = torch.compile(self._decode_step, mode="reduce-overhead", fullgraph=True)
        self._cache_shape: tuple[int, int] | None = None

    def _decode_step(self, tokens: Tensor, input_pos: Tensor, pad_mask: Tensor, pad_len: Tensor) -> Tensor:
        positions = (input_pos[None, :] - pad_len[:, None]).clamp(min=0)
        out = self.model(tokens, input_pos=input_pos, attention_mask=pad_mask, position_ids=positions)
        return out.logits[:, -1]

    def _prepare(self, prompts: Sequence[Sequence[int]], max_new: int) -> tuple[Tensor, Tensor, Tensor, int]:
        """Left-pad the prompts and (re)allocate the cache; returns ids, padding mask, pad lengths, cache length."""
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token (e.g. the bos token)")
        longest = max(len(p) for p in prompts)
        cache_len = self.max_len or longest + max_new
        if longest >= cache_len:
            raise ValueError(f"prompt of {longest} tokens leaves no room in a cache of {cache_len}")
        device = self.model.lm_head.weight.device
        if self._cache_shape != (len(prompts), cache_len):
            self.model.setup_cache(len(prompts), cache_len)
            self._cache_shape = (len(prompts), cache_len)
        pad_len = torch.tensor([longest - len(p) for p in prompts], device=device)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
        pad_mask = torch.ones(len(prompts), cache_len, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(list(p), device=device)
            pad_mask[i, : longest - len(p)] = 0
        return ids, pad_mask, pad_len, cache_len

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, stop_ids: Sequence[int] = (),
                       generator: torch.Generator | None = None) -> Iterator[Tensor]:
        """Yield the next token of every row, step by step, until all rows stopped or the budget is spent.

        Rows that already stopped keep yielding their stop token; callers cut at the first stop id.
        """
        ids, pad_mask, pad_len, cache_len = self._prepare(prompts, cfg.max_new_tokens)
        B, T = ids.shape
        device = ids.device
        seen = torch.zeros(B, self.model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, True)
        positions = (torch.arange(T, device=device)[None, :] - pad_len[:, None]).clamp(min=0)
        logits = self.model(ids, input_pos=torch.arange(T, device=device), attention_mask=pad_mask,
                            position_ids=positions).logits[:, -1]
        stops = torch.tensor(list(stop_ids) or [-1], device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for pos in range(T, min(T + cfg.max_new_tokens, cache_len + 1)):
            logits = apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
            nxt = sample_next(logits, cfg, generator)
            nxt = torch.where(done, stops[0].clamp(min=0), nxt)
            yield nxt
            done |= torch.isin(nxt, stops)
            if bool(done.all()) or pos == cache_len:
                return
            seen.scatter_(1, nxt[:, None], True)
            logits = self._step(nxt[:, None].clone(), torch.tensor([pos], device=device), pad_mask, pad_len)

    def stream(self, prompt: Sequence[int], cfg: SamplingConfig, stop_ids: Sequence[int] = (),
               generator: torch.Generator | None = None) -> Iterator[int]:
        """Yield generated token ids for one prompt; the stop token itself is not yielded."""
        for tok in self.generate_batch([prompt], cfg, stop_ids, generator):
            t = int(tok[0])
            if t in stop_ids:
                return
            yield t

    def generate(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, stop_ids: Sequence[int] = (),
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """Completions (without prompt and stop token) for a batch of prompts."""
        steps = list(self.generate_batch(prompts, cfg, stop_ids, generator))
        outs = torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]
        return [_cut_at_stop(row, stop_ids) for row in outs]


def _cut_at_stop(row: list[int], stop_ids: Sequence[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[:i]
    return row


def add_sampling_flags(parser) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p, --repetition-penalty for the inference scripts."""
    d = SamplingConfig()
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    parser.add_argument("--top-p", type=float, default=d.top_p, help="1.0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty, help="1.0 = off")


def sampling_from_args(args) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty)
