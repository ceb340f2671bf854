"""Concurrent requests decoded together: one thread owns the models and runs `Generator.generate_batch` over every
row (a request's choice) in flight; each row is sampled with its own settings and its own seeded RNG, so its reply is
the one it gets when served alone.

Rows join and leave at step boundaries: the batch is restarted (its rows' prompts plus the tokens generated so far,
prefilled again) when a waiting request fits, or when at least half of its rows have ended (a finished or cancelled
row otherwise rides along as a stopped row until then). A row frees its place in `max_rows` the step it ends, so a
client that disconnects lets a waiting request in at once. Restarting costs one prefill of the surviving rows; it
keeps `Generator` as it is (one static cache per batch) instead of a paged cache.

Text is cut on the worker thread, where the decision is needed: a stop string may span tokens, so text that could
still become the start of a stop string is held back until the next token decides.
"""
from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from babyllama.model.generate import SamplingConfig, sample_next
from babyllama.model.grammar import Grammar
from babyllama.serve.metrics import ServerMetrics
from babyllama.serve.models import Served

# Events a job's client receives: ("prompt", scored prompt tokens) first when the job asked to score its prompt,
# ("text", choice, piece, scored tokens), ("end", choice, finish_reason, tokens generated, scored tokens, prompt
# tokens taken from the prefix cache), ("error", message). Scored tokens (`TokenLogprob`) come only when the job
# asked for log-probabilities: those sampled since the previous event of that choice.
Event = tuple


@dataclass
class TokenLogprob:
    """A token with its log-probability under the model (before temperature, top-k or top-p: the model's own
    distribution, as vLLM reports it) and the `top` most likely tokens at its position, most likely first."""

    token: int
    logprob: float | None  # None: a prompt's first token, which nothing predicts
    top: list[tuple[int, float]]


def scored(logprobs: Tensor, token: int, top: int) -> TokenLogprob:
    """`TokenLogprob` of `token` from a row of log-probabilities."""
    values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0])
    return TokenLogprob(token, float(logprobs[token]), list(zip(ids.tolist(), values.tolist())))


class Busy(Exception):
    """Every row is taken and `max_waiting` requests already wait for one."""


@dataclass
class Params:
    """What a request asks of its rows (checked by `protocol`)."""

    max_tokens: int  # already bounded by the context left after the prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Sequence[str] = ()
    seed: int = 0
    n: int = 1
    logprobs: int | None = None  # None: none; k: each token's log-probability and its k top alternatives
    score_prompt: bool = False  # first send the prompt's own tokens' log-probabilities (completions' echo)
    grammar: Grammar | None = None  # every reply follows it (structured output, a required tool call)


@dataclass(eq=False)
class Job:
    """One request: its model, prompt ids, sampling, and how its events reach the client."""

    served: Served
    prompt: list[int]
    params: Params
    stop_ids: Sequence[int]  # token ids that end a reply (chat: <|im_end|>, </s>; completion: </s>)
    emit: Callable[[Event], None]
    cancelled: bool = False  # set by the client's side (disconnect); read by the worker between steps
    created: float = field(default_factory=time.monotonic)
    cached: int | None = None  # prompt tokens its first prefill took from the prefix cache (None: not prefilled)

    def cancel(self) -> None:
        self.cancelled = True


def asyncio_emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[Event], None]:
    """An `emit` that hands events from the worker thread to a queue read on the event loop."""
    def emit(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass
    return emit


def row_seed(seed: int, choice: int) -> int:
    """Choice 0 uses the request's seed as is (so n=1 replies do not depend on n); others a seed derived from it."""
    return seed if choice == 0 else hash((seed, choice)) & (2**63 - 1)


class _Row:
    """One choice of a job: its tokens so far, its RNG, its text and how much of it was sent."""

    def __init__(self, job: Job, choice: int):
        self.job, self.choice = job, choice
        p = job.params
        self.cfg = SamplingConfig(max_new_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k,
                                  top_p=p.top_p)
        self.rng = torch.Generator(device=job.served.device).manual_seed(row_seed(p.seed, choice))
        self.constraint = p.grammar.constraint(job.stop_ids, p.max_tokens) if p.grammar else None
        self.generated: list[int] = []
        self.scored: list[TokenLogprob] = []  # log-probabilities not yet sent (when the job asked for them)
        self.decoder = job.served.tokenizer.stream_decoder(skip_special=True)
        self.text, self.sent = "", 0
        self.finish: str | None = None
        self.retired = False  # its place in max_rows was given back

    @property
    def live(self) -> bool:
        return self.finish is None and not self.job.cancelled

    def ids(self) -> list[int]:
        return self.job.prompt + self.generated

    def push(self, token: int, logprobs: Tensor | None = None) -> None:
        """Take the next token (and the log-probabilities it was sampled from, when the job asked for them): send
        what text became final, end the row on a stop id, stop string or budget."""
        self.generated.append(token)
        if self.constraint is not None:
            self.constraint.advance(token)
        if token in self.job.stop_ids:  # under a grammar, a reply the budget cut before it was whole: "length"
            whole = self.constraint is None or self.constraint.accepting
            return self._end("stop" if whole else "length", self.text + self.decoder.flush())
        if logprobs is not None:
            self.scored.append(scored(logprobs, token, self.job.params.logprobs))
        self.text += self.decoder.push(token)
        if len(self.generated) >= self.job.params.max_tokens:
            return self._end("length", self.text + self.decoder.flush())
        self._release()

    def _release(self) -> None:
        stops = self.job.params.stop
        hits = [i for i in (self.text.find(s, self.sent) for s in stops) if i >= 0]
        if hits:  # the reply ends before the earliest stop string, which is not sent
            return self._end("stop", self.text[: min(hits)])
        hold = max((k for s in stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        self._send(len(self.text) - hold)

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.job.emit(("text", self.choice, self.text[self.sent:upto], self.scored))
            self.sent, self.scored = upto, []

    def _end(self, reason: str, text: str) -> None:
        """Finish with `text` as the whole reply: the held-back tail of a stop string check, cut at a stop string."""
        if self.job.params.stop:  # the decoder's flush may complete a stop string
            hits = [i for i in (text.find(s, self.sent) for s in self.job.params.stop) if i >= 0]
            text, reason = (text[: min(hits)], "stop") if hits else (text, reason)
        self.text = text
        self._send(len(text))
        self.finish = reason
        self.job.emit(("end", self.choice, reason, len(self.generated), self.scored, self.job.cached or 0))
        self.scored = []


class Batcher:
    """Accepts jobs from any thread (`submit`) and decodes them on its own thread; see the module docstring."""

    def __init__(self, max_rows: int = 16, max_waiting: int = 64, gather_s: float = 0.005):
        self.max_rows, self.max_waiting, self.gather_s = max_rows, max_waiting, gather_s
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._live_rows = 0
        self._closed = False
        # counters for /health and the tests: decode steps run, rows summed over those steps, batches started
        self.stats = {"steps": 0, "row_steps": 0, "batches": 0}
        self.metrics: ServerMetrics | None = None  # set by the app: rows per step go to /metrics
        self._thread = threading.Thread(target=self._run, name="babyllama-batcher", daemon=True)
        self._thread.start()

    # ---- client side
    def submit(self, job: Job) -> None:
        """Queue a job; `Busy` when the waiting line is full."""
        with self._cond:
            if self._closed:
                raise Busy("the server is shutting down")
            queued = self._live_rows + sum(j.params.n for j in self._waiting)
            if queued + job.params.n > self.max_rows and self._beyond_rows() >= self.max_waiting:
                raise Busy(f"{self._live_rows} rows are being decoded and {len(self._waiting)} requests wait (the "
                           f"server's limits: --max-batch {self.max_rows}, --max-waiting {self.max_waiting})")
            self._waiting.append(job)
            self._cond.notify()

    def _beyond_rows(self) -> int:
        """Waiting jobs that will not get a row when the worker next admits: those count against max_waiting (a
        burst that fits in free rows is not refused just because the worker has not taken it yet)."""
        used, beyond = self._live_rows, 0
        for job in self._waiting:
            used += job.params.n
            beyond += used > self.max_rows
        return beyond

    def load(self) -> dict[str, int]:
        """Rows being decoded and requests waiting, with the counters."""
        with self._cond:
            return {"decoding": self._live_rows, "waiting": len(self._waiting), **self.stats}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._waiting:
                job.emit(("error", "the server is shutting down"))
            self._waiting.clear()
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---- worker side
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            time.sleep(self.gather_s)  # requests sent together start in the same first step
            served = self._waiting[0].served
            rows: list[_Row] = []
            self._admit(rows, served)
            with self._cond:
                self.stats["batches"] += 1
            while rows:
                try:
                    rows = self._decode(served, rows)
                except Exception as e:  # noqa: BLE001 (a failing batch must not stop the server)
                    traceback.print_exc()  # the operator's log; the clients get one line
                    for job in {r.job for r in rows}:
                        job.emit(("error", f"decoding failed: {type(e).__name__}: {e}"))
                    self._retire(rows)
                    rows = []
                self._admit(rows, served)

    def _admit(self, rows: list[_Row], served: Served) -> None:
        """Move waiting jobs of `served` into `rows` while they fit; an older job for another stage is not
        overtaken (it runs when this batch ends)."""
        with self._cond:
            while self._waiting:
                job = self._waiting[0]
                if job.cancelled:
                    self._waiting.popleft()
                    continue
                if job.served is not served or self._live_rows + job.params.n > self.max_rows:
                    return
                self._waiting.popleft()
                if job.params.score_prompt:
                    job.emit(("prompt", prompt_logprobs(served, job.prompt, job.params.logprobs or 0)))
                if job.params.max_tokens == 0:  # the prompt was all it asked for
                    for choice in range(job.params.n):
                        job.emit(("end", choice, "length", 0, [], 0))
                    continue
                rows.extend(_Row(job, c) for c in range(job.params.n))
                self._live_rows += job.params.n

    def _should_restart(self, rows: list[_Row], live: int, served: Served) -> bool:
        with self._cond:
            head = next((j for j in self._waiting if not j.cancelled), None)
            joins = head is not None and head.served is served and live + head.params.n <= self.max_rows
        return joins or live <= len(rows) // 2

    def _retire(self, rows: Sequence[_Row]) -> None:
        """Give back the places of rows that ended (finished, cancelled or failed), each once."""
        with self._cond:
            for row in rows:
                self._live_rows -= not row.retired
                row.retired = True

    def _decode(self, served: Served, rows: list[_Row]) -> list[_Row]:
        """Decode `rows` together until they all end or a restart is due; returns the rows still live."""
        end_id = served.tokenizer.eos_id  # fed to rows that ended; every job treats it as a stop id
        budget = max(r.job.params.max_tokens - len(r.generated) for r in rows)
        batch_cfg = SamplingConfig(max_new_tokens=budget, repetition_penalty=1.0)  # rows sample with their own

        vocab = served.tokenizer.vocab_size  # the model's may be padded beyond it
        logprobs: list[Tensor | None] = [None] * len(rows)

        def sample(logits: Tensor) -> Tensor:
            picked = torch.full((len(rows),), end_id, dtype=torch.long, device=logits.device)
            for i, row in enumerate(rows):
                if row.live:
                    if row.job.params.logprobs is not None:  # the model's, before the grammar's mask
                        logprobs[i] = logits[i, :vocab].float().log_softmax(-1).cpu()
                    if row.constraint is not None:
                        row.constraint.mask(logits[i])
                    picked[i] = sample_next(logits[i:i + 1], row.cfg, row.rng)[0]
            return picked

        steps = served.generator.generate_batch([r.ids() for r in rows], batch_cfg, stop_ids=[end_id], sample=sample)
        try:
            for step, nxt in enumerate(steps):
                if step == 0:  # prefilled: a job's first prefill says how much of its prompt was cached
                    for row, reused in zip(rows, served.generator.reused):
                        if row.job.cached is None:
                            row.job.cached = reused
                sampled = 0
                for row, token, lp in zip(rows, nxt.tolist(), logprobs):
                    if not row.retired and row.live:
                        row.push(token, lp)
                        sampled += 1
                self._retire([r for r in rows if not r.live])
                live = sum(r.live for r in rows)
                with self._cond:
                    self.stats["steps"] += 1
                    self.stats["row_steps"] += sampled
                if self.metrics is not None:
                    self.metrics.batch_size.observe(sampled)
                if live == 0 or self._should_restart(rows, live, served):
                    break
        finally:
            steps.close()
        return [r for r in rows if r.live]


@torch.inference_mode()
def prompt_logprobs(served: Served, prompt: Sequence[int], top: int) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the tokens before it (the first: None), with its top alternatives:
    one forward pass without the decoding cache."""
    first = TokenLogprob(prompt[0], None, [])
    if len(prompt) == 1:
        return [first]
    ids = torch.tensor([list(prompt)], device=served.device)
    logits = served.model(ids[:, :-1], return_logits=True).logits[0, :, :served.tokenizer.vocab_size]
    logprobs = logits.float().log_softmax(-1).cpu()
    return [first] + [scored(lp, t, top) for lp, t in zip(logprobs, prompt[1:])]
