"""Sampling with a static KV cache: streaming for one prompt, left-padded batches for many.

The decode step has fixed shapes (one token per row, a cache of fixed length, a fixed padding mask), so
`Generator(model, compile=True)` compiles it once with CUDA graphs ("reduce-overhead"); greedy output is the
same token for token as the eager path. With a `PrefixCache`, the prefill copies the KV of prompt prefixes that
earlier calls computed instead of computing it again.
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence, TextIO

import torch
from torch import Tensor

from babyllama.cli import add_device_flag, check_ranges
from babyllama.errors import UserError
from babyllama.hardware import cpu_has_native_bf16
from babyllama.model.llama import KVCache, Llama
from babyllama.model.prefix_cache import PrefixCache

Sampler = Callable[[Tensor], Tensor]  # (B, V) logits -> (B,) next tokens


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages tokens already in prompt or output (CTRL paper)

    def check(self, context: int | None = None) -> None:
        """One line naming the first flag out of its range; with the model's `context`, --max-new-tokens is bounded
        by it too (a larger budget would only allocate a cache for positions the model never saw)."""
        most = f"between 1 and the model's context, {context}" if context else "at least 1"
        check_ranges(self, (
            ("max_new_tokens", lambda v: 1 <= v <= (context or v), most),
            ("temperature", lambda v: 0 <= v < math.inf, "0 (greedy) or a positive number"),
            ("top_k", lambda v: v >= 0, "0 (off) or more"),
            ("top_p", lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
            ("repetition_penalty", lambda v: 0 < v < math.inf, "a positive number (1 = off, above 1 discourages "
                                                                 "repeats)")))


def fit_context(prompt: Sequence[int], cfg: SamplingConfig, context: int,
                notes: TextIO | None = sys.stderr) -> tuple[list[int], SamplingConfig]:
    """The prompt and reply budget that fit the model's context: a prompt longer than `prompt_budget` keeps its
    first token (<s>) and its newest tokens (said on `notes`), as a chat keeps its newest turns; the reply then
    stops at the end of the context (later positions were never trained)."""
    budget = prompt_budget(context, cfg.max_new_tokens)
    if len(prompt) > budget:
        if notes is not None:
            print(f"note: the prompt has {len(prompt):,} tokens; continuing from its last {budget - 1:,} (the model's "
                  f"context is {context:,}, --max-new-tokens {cfg.max_new_tokens:,})", file=notes)
        prompt = [prompt[0], *prompt[len(prompt) - budget + 1:]]
    return list(prompt), within_context(cfg, len(prompt), context)


def within_context(cfg: SamplingConfig, prompt_len: int, context: int) -> SamplingConfig:
    """`cfg` with the reply budget cut to the context left after the prompt."""
    return replace(cfg, max_new_tokens=min(cfg.max_new_tokens, context - prompt_len))


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """Tokens a prompt may take: the context minus the reply budget, but at least half the context (a long reply
    is then cut at the end of the context instead)."""
    return max(context - max_new_tokens, context // 2)


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
    if cfg.top_k > 0 or cfg.top_p < 1.0:
        # a stable sort ranks tied logits by token id, so top_k keeps exactly k tokens (top_k=1 is greedy's choice)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        if cfg.top_k > 0:
            sorted_logits[:, cfg.top_k:] = float("-inf")
        if cfg.top_p < 1.0:
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest prefix reaching top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Generator:
    """Generates continuations with `model`; reuses its cache buffers across calls of the same size."""

    def __init__(self, model: Llama, max_len: int | None = None, compile: bool = False,
                 fuse_projections: bool | None = None, prefix_cache: PrefixCache | None = None):
        """max_len: fixed cache length (prompt + output); None sizes it per call, or, when compiling, is the
        model's context, so that the decode step is compiled and captured once for every call.
        fuse_projections: decode with concatenated q|k|v and gate|up copies of the weights (`Llama.fuse_projections`,
        refreshed every call; costs their memory once more), or with the separate weights; default: when compiling.
        prefix_cache: KV of the sequences earlier calls decoded, for this model's weights only (clear it after they
        change): each row's prompt copies its longest cached prefix, and each call stores its rows when it ends
        (exhausted or closed)."""
        self.model = model
        self.prefix_cache = prefix_cache
        # per row of the latest call, set before its first token: the prompt tokens whose KV came from prefix_cache
        self.reused: list[int] = []
        self.max_len = max_len or (model.config.max_seq_len if compile else None)
        self.fuse = compile if fuse_projections is None else fuse_projections
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
            raise UserError(f"the prompt has {longest:,} tokens, leaving no room in a cache of {cache_len:,} (the "
                            "model's context when compiled); shorten the prompt")
        device = self.model.lm_head.weight.device
        if self._cache_shape != (len(prompts), cache_len):
            self.model.setup_cache(len(prompts), cache_len)
            self._cache_shape = (len(prompts), cache_len)
        if self.fuse:  # refreshed: the weights may have been trained since the last call
            self.model.fuse_projections()
        else:  # copies left by another Generator would be used (and may be stale)
            self.model.unfuse_projections()
        pad_len = torch.tensor([longest - len(p) for p in prompts], device=device)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
        pad_mask = torch.ones(len(prompts), cache_len, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(list(p), device=device)
            pad_mask[i, : longest - len(p)] = 0
        return ids, pad_mask, pad_len, cache_len

    def _decode(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, stop_ids: Sequence[int],
                generator: torch.Generator | None,
                sample: Sampler | None = None) -> Iterator[tuple[Tensor, "_HostCopy"]]:
        """Yield (next tokens on the device, their host copy) step by step; see `generate_batch`.

        The decode step for token t+1 is queued before the host waits for token t (through a host copy queued
        ahead of it), so Python's work on one token overlaps the device's work on the next; the only step wasted
        is the one queued after the last token."""
        ids, pad_mask, pad_len, cache_len = self._prepare(prompts, cfg.max_new_tokens)
        B, T = ids.shape
        device = ids.device
        seen = torch.zeros(B, self.model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, True)
        start = self._reuse_prefixes(prompts, T)
        slots = torch.arange(start, T, device=device)
        positions = (slots[None, :] - pad_len[:, None]).clamp(min=0)
        logits = self.model(ids[:, start:], input_pos=slots, attention_mask=pad_mask,
                            position_ids=positions).logits[:, -1]
        stops = torch.tensor(list(stop_ids) or [-1], device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        input_pos = torch.tensor([T], device=device)  # advanced on the device: no host-to-device copy per token
        end = min(T + cfg.max_new_tokens, cache_len + 1)  # token t is written to cache slot t, if it is fed back
        fed: list[_HostCopy] = []  # the tokens written to the cache after the prompt, one step each
        try:
            for pos in range(T, end):
                logits = apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
                picked = sample(logits) if sample is not None else sample_next(logits, cfg, generator)
                nxt = torch.where(done, stops[0].clamp(min=0), picked)
                done |= torch.isin(nxt, stops)
                seen.scatter_(1, nxt[:, None], True)
                host = _HostCopy(torch.cat([nxt, done.all()[None].long()]))
                if pos + 1 < end:
                    logits = self._step(nxt[:, None].clone(), input_pos, pad_mask, pad_len)
                    input_pos += 1
                    fed.append(host)
                yield nxt, host
                if host.get()[-1]:  # every row stopped
                    return
        finally:  # also when the caller closes the generator early (the server restarting a batch)
            self._store_rows(prompts, T, fed, stop_ids)

    def _reuse_prefixes(self, prompts: Sequence[Sequence[int]], T: int) -> int:
        """Copy each row's longest cached prefix into its cache slots (never its last prompt token: its logits are
        needed) and set `reused`; returns the first slot the prefill computes, the earliest uncached one over all
        rows (a row with a longer cached prefix computes the rest of it again)."""
        if self.prefix_cache is None:
            self.reused = [0] * len(prompts)
            return 0
        found = [self.prefix_cache.match(p[:-1]) for p in prompts]
        start = min(T - len(p) + c for p, (c, _) in zip(prompts, found))
        self.reused = [max(start - (T - len(p)), 0) for p in prompts]
        caches = self._caches()
        for row, (n, (_, entry)) in enumerate(zip(self.reused, found)):
            if n:
                for layer, cache in enumerate(caches):
                    cache.k[row, :, start - n:start] = entry.k[layer, :, :n]
                    cache.v[row, :, start - n:start] = entry.v[layer, :, :n]
        return start

    def _store_rows(self, prompts: Sequence[Sequence[int]], T: int, fed: list[_HostCopy],
                    stop_ids: Sequence[int]) -> None:
        """Store the KV each row computed in the prefix cache: its prompt and the tokens fed back after it, through
        its first stop token (a stopped row is fed fillers). Rows already held whole are skipped before copying."""
        if self.prefix_cache is None:
            return
        generated = torch.stack([h.get()[:-1] for h in fed], 1).tolist() if fed else [[] for _ in prompts]
        caches = self._caches()
        for row, (prompt, new) in enumerate(zip(prompts, generated)):
            tokens = [*prompt, *_through_stop(new, stop_ids)]
            if self.prefix_cache.holds(tokens):
                continue
            slots = slice(T - len(prompt), T - len(prompt) + len(tokens))
            k = torch.stack([c.k[row, :, slots] for c in caches])
            v = torch.stack([c.v[row, :, slots] for c in caches])
            self.prefix_cache.store(tokens, k, v)

    def _caches(self) -> list[KVCache]:
        return [layer.self_attn.cache for layer in self.model.model.layers]

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, stop_ids: Sequence[int] = (),
                       generator: torch.Generator | None = None, sample: Sampler | None = None) -> Iterator[Tensor]:
        """Yield the next token of every row (a device tensor), step by step, until all rows stopped or the budget
        is spent. Rows that already stopped keep yielding their stop token; callers cut at the first stop id.
        `sample` replaces `sample_next(logits, cfg, generator)` (e.g. per-row settings and seeds, as the server's
        batches need); a row it gives a stop id is done."""
        with contextlib.closing(self._decode(prompts, cfg, stop_ids, generator, sample)) as steps:
            for nxt, _ in steps:
                yield nxt

    @torch.inference_mode()
    def stream(self, prompt: Sequence[int], cfg: SamplingConfig, stop_ids: Sequence[int] = (),
               generator: torch.Generator | None = None) -> Iterator[int]:
        """Yield generated token ids for one prompt; the stop token itself is not yielded."""
        with contextlib.closing(self._decode([prompt], cfg, stop_ids, generator)) as steps:
            for _, host in steps:
                t = int(host.get()[0])
                if t in stop_ids:
                    return
                yield t

    def generate(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, stop_ids: Sequence[int] = (),
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """Completions (without prompt and stop token) for a batch of prompts."""
        steps = list(self.generate_batch(prompts, cfg, stop_ids, generator))
        outs = torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]
        return [_cut_at_stop(row, stop_ids) for row in outs]


class _HostCopy:
    """A copy of a small device tensor on the host, queued without waiting: `get()` waits only for the device
    work queued before it, not for work queued after (pinned memory + an event on CUDA)."""

    def __init__(self, t: Tensor):
        if t.device.type == "cuda":
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:  # a copy, not a view: the device tensor is updated in place afterwards
            self._host, self._ready = t.cpu().clone(), None

    def get(self) -> Tensor:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host


def _cut_at_stop(row: list[int], stop_ids: Sequence[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[:i]
    return row


def _through_stop(row: list[int], stop_ids: Sequence[int]) -> list[int]:
    """`row` up to and including its first stop id."""
    kept = _cut_at_stop(row, stop_ids)
    return row[:len(kept) + 1]


def add_sampling_flags(parser) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p, --repetition-penalty for the inference scripts."""
    d = SamplingConfig()
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"reply budget, at most the model's context (default: {d.max_new_tokens} or the context)")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    parser.add_argument("--top-p", type=float, default=d.top_p, help="1.0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty, help="1.0 = off")


def add_runtime_flags(parser) -> None:
    """--device, --dtype, --compile, --seed for the inference scripts."""
    add_device_flag(parser)
    add_dtype_flag(parser)
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step with CUDA graphs: the first reply waits for the compile, "
                             "later tokens come several times faster (GPU; replies stop at the model's context)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")


def add_dtype_flag(parser) -> None:
    """--dtype, read by `decode_dtype` (the inference scripts and `babyllama serve`)."""
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="auto",
                        help="weights and KV cache (default: bf16 on a GPU or CPU with native bf16, else fp32)")


_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def decode_dtype(name: str, device: torch.device) -> torch.dtype:
    """The --dtype to load weights in: `auto` is bf16 on a GPU with bf16 support (half the memory traffic of
    fp32 per token) and on a CPU with native bf16 (1.3x fp32 at batch 1 for the baby model, docs/performance.md),
    fp32 elsewhere."""
    if name == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else (
            device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else torch.float32
    return _DTYPES[name]


def sampling_from_args(args, context: int | None = None) -> SamplingConfig:
    """The `add_sampling_flags` values, checked: without the model's `context` (before loading it) all but the bound
    of --max-new-tokens, which with it defaults to at most the context."""
    given, default = args.max_new_tokens, SamplingConfig.max_new_tokens
    cfg = SamplingConfig(max_new_tokens=min(default, context or default) if given is None else given,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         repetition_penalty=args.repetition_penalty)
    cfg.check(context)
    return cfg


@torch.no_grad()
def reference_generate(model: Llama, prompt: Sequence[int], cfg: SamplingConfig, stop_ids: Sequence[int] = (),
                       generator: torch.Generator | None = None) -> list[int]:
    """The plain decoding loop that `Generator` must agree with, token for token: the whole sequence goes through
    the model for every new token (no KV cache, no padding, no pipelining). Quadratic in the length; for reading
    and for tests."""
    ids = list(prompt)
    for _ in range(cfg.max_new_tokens):
        logits = model(torch.tensor([ids], device=model.lm_head.weight.device)).logits[:, -1].float()
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[0, ids] = True
        token = int(sample_next(apply_repetition_penalty(logits, seen, cfg.repetition_penalty), cfg, generator))
        if token in stop_ids:
            break
        ids.append(token)
    return ids[len(prompt):]
