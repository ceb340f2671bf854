"""Constrained decoding: replies that parse as JSON, match a JSON schema, or follow a grammar, token by token.

    compiler = GrammarCompiler.of(tokenizer)                  # once per tokenizer (cached): the token table
    grammar = compiler.json_schema(schema, source="response_format")   # or .json_object(), .lark(text), .tool_call(...)
    constraint = grammar.constraint(stop_ids=[im_end], max_tokens=256)  # one per reply
    ...each step: constraint.mask(logits_row); token = sample(logits_row); constraint.advance(token)

The engine is llguidance (what llama.cpp uses), picked by `bench/grammar_engines.py`: with the baby run's 4,096
tokens its token table takes under 10 ms, a schema compiles in half a millisecond (so per request) and a token's
mask, applied, costs about 50 us (2% of the baby model's decode step on one CPU thread, 3% keeping a reply budget;
Qwen3's 151,669 tokens: 0.4 s, 0.7 ms, 4%); every walk it made was valid JSON. xgrammar let raw control characters
into strings (invalid JSON, 6 of 20 walks); outlines-core takes 1.7 s to compile a schema for Qwen3's vocabulary
and is regular expressions only (no recursive `json_object`). Nothing outside this module knows the engine.

What the mask allows: tokens whose bytes continue a valid prefix of the grammar's language (any tokenization of it,
not only the tokenizer's own), never a special token (`<|im_start|>` and the like) inside the text, ids past the
tokenizer's vocabulary (a model's padded rows) never, and the caller's stop ids exactly when the grammar may end;
once it must end (`done`), only the stop ids. JSON is written compact (no whitespace between tokens): a small
model under a grammar that allows whitespace tends to spend its budget on it.

A reply budget (`max_tokens`) is kept too: once the tokens left come within a slack of the length of a completion
found from the current state (greedy over single bytes: what the grammar forces, else close the string, the array,
the object, write the smallest value), that completion is forced, so that even a model writing nonsense into an
unbounded string ends with valid text and its stop token within the budget. The slack (16 tokens, or twice the
largest growth of the completion over one token seen) covers the tokens that make the completion longer: a decimal
point, an escape, a comma opening an array item. A budget shorter than the shortest valid text cannot be kept: the
reply then ends at the budget with `accepting` false (finish_reason "length").
"""
from __future__ import annotations

import functools
import json
import string
import threading
from typing import Any, Mapping, Sequence

import llguidance
import numpy as np
import torch
from torch import Tensor

from babyllama.errors import UserError

# compact JSON: whitespace between tokens would let a small model loop on spaces and newlines
_COMPACT = {"whitespace_flexible": False}
# bytes tried, in order, when completing a reply: close what is open, then the shortest values; the rest after
_CLOSING = b'"}],:0123456789tfn-.' + string.ascii_lowercase.encode() + string.ascii_uppercase.encode()
_COMPLETION_LIMIT = 512  # bytes: a grammar whose greedy completion is longer gets no budget forcing
# tokens: forcing starts this many tokens (at least; more after a larger jump was seen) before the budget would be too
# short for the completion, which one token can make longer: an escape, a decimal point, an array item
_SLACK = 16
_ZONE = 64  # tokens: within this many of forcing, the completion is measured every step, and what opens more probed


class GrammarCompiler:
    """Grammars for one tokenizer. Building the engine's token table is the expensive part, so `of(tokenizer)`
    keeps one compiler per tokenizer; a compiler and its grammars may be shared by threads."""

    _cache: dict[str, GrammarCompiler] = {}
    _lock = threading.Lock()

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.special_ids = sorted(set(tokenizer.special_tokens.values()))
        self._special = torch.tensor(self.special_ids, dtype=torch.long)
        self._engine = _engine_tokenizer(tokenizer)
        self._end = self._engine.eos_token  # the engine's "may end here" bit; constraints map it to their stop ids

    @classmethod
    def of(cls, tokenizer: Any) -> GrammarCompiler:
        """The compiler of `tokenizer`, built on first use (by fingerprint: the same tokenizer loaded twice shares
        it)."""
        key = f"{tokenizer.fingerprint}:{sorted(tokenizer.special_tokens.values())}"
        with cls._lock:
            if key not in cls._cache:
                cls._cache[key] = cls(tokenizer)
            return cls._cache[key]

    # ---- grammars
    def json_schema(self, schema: Any, source: str = "JSON schema") -> Grammar:
        """Replies that are one JSON value valid under `schema` (a dict). A bad schema raises `UserError` naming
        `source` (e.g. the request field or the file it came from) and what is wrong."""
        if not isinstance(schema, dict):
            raise UserError(f"{source}: a JSON schema must be a JSON object, got {_json_type(schema)}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_COMPACT)
        except (ValueError, TypeError) as e:  # not serializable as JSON
            raise UserError(f"{source}: not a valid JSON schema ({e})") from None
        return self._compile(grammar, source)

    def json_object(self) -> Grammar:
        """Replies that are any one JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return self.json_schema({"type": "object"}, "json_object")

    def lark(self, text: str, source: str = "grammar") -> Grammar:
        """Replies in the language of a Lark grammar, llguidance's dialect: literal text, regular expressions,
        `%json{...}` for a JSON value valid under a schema (https://github.com/guidance-ai/llguidance,
        docs/syntax.md); its start rule is `start`."""
        return self._compile(llguidance.LLMatcher.grammar_from_lark(text), source)

    def tool_call(self, functions: Mapping[str, Any], begin: str = "<tool_call>\n", end: str = "\n</tool_call>",
                  source: str = "tools") -> Grammar:
        """Replies that are one call of one of `functions` (name -> JSON schema of its arguments, None for any
        object): `begin`, then `{"name":NAME,"arguments":{...}}`, then `end` (Qwen's and Hermes' format)."""
        if not functions:
            raise UserError(f"{source}: no function to call")
        calls = []
        for name, parameters in functions.items():
            parameters = {"type": "object"} if parameters is None else parameters
            self.json_schema(parameters, f"{source}: the parameters of {name!r}")  # its own error, not the grammar's
            calls.append({"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
                          "required": ["name", "arguments"], "additionalProperties": False})
        schema = {"anyOf": calls} if len(calls) > 1 else calls[0]
        body = json.dumps({**schema, "x-guidance": _COMPACT}, ensure_ascii=False)
        return self.lark(f"start: {json.dumps(begin)} call {json.dumps(end)}\ncall: %json{body}\n", source)

    def _compile(self, grammar: str, source: str) -> Grammar:
        matcher = llguidance.LLMatcher(self._engine, grammar, log_level=0)
        if matcher.is_error():
            raise UserError(f"{source}: {_one_line(matcher.get_error())}")
        return Grammar(self, matcher)

    # ---- what constraints share
    @functools.cached_property
    def _closing_tokens(self) -> tuple[list[int], set[int]]:
        """The single-byte tokens in the order completions try them (`_CLOSING`, then every other byte), and those
        of `}` and `]` (byte-fallback and byte-level tokenizers have a token for each of the 256 bytes)."""
        def token(b: int) -> int | None:
            ids = self._engine.tokenize_bytes(bytes([b]))
            return ids[0] if len(ids) == 1 and ids[0] not in self.special_ids else None

        order = [t for t in dict.fromkeys(map(token, (*_CLOSING, *range(256)))) if t is not None]
        return order, {t for t in map(token, b"}]") if t is not None}

    @functools.cached_property
    def _openers(self) -> list[tuple[int, Tensor]]:
        """For `,`, `{` and `[` (what opens an array item, a property, an object): its single-byte token and which
        tokens hold that byte."""
        order, _ = self._closing_tokens
        found = []
        for b in b",{[":
            ids = self._engine.tokenize_bytes(bytes([b]))
            if len(ids) == 1 and ids[0] in order:
                holds = torch.tensor([b in piece for piece in self.tokenizer.token_bytes], dtype=torch.bool)
                found.append((ids[0], holds))
        return found


class Grammar:
    """A compiled grammar; `constraint()` starts a reply under it (cheap: a copy of the compiled start state)."""

    def __init__(self, compiler: GrammarCompiler, matcher: llguidance.LLMatcher):
        self.compiler, self._start = compiler, matcher

    def constraint(self, stop_ids: Sequence[int], max_tokens: int | None = None) -> Constraint:
        return Constraint(self, stop_ids, max_tokens)


class Constraint:
    """One reply under a grammar: `mask(logits)` before sampling each token, `advance(token)` after.

    stop_ids: the ids that end the reply for this caller (chat: `<|im_end|>`; plain completion: `</s>`); the mask
    allows them exactly when the grammar may end. max_tokens: the reply budget the caller enforces, stop token
    included; the text is completed within it (see the module docstring). None: no budget is kept."""

    def __init__(self, grammar: Grammar, stop_ids: Sequence[int], max_tokens: int | None = None):
        if not stop_ids:
            raise ValueError("a constraint needs at least one stop id to end the reply with")
        self.compiler = grammar.compiler
        self._matcher = grammar._start.deep_copy()
        self.stop_ids = [int(t) for t in stop_ids]
        self._stops = torch.tensor(self.stop_ids, dtype=torch.long)
        self.max_tokens = max_tokens
        self.generated = 0  # tokens advanced, the stop token included
        self._finished = False  # a stop id was advanced
        self._closing = False  # the budget forced a completion: the reply ends with it
        self._forced: list[int] = []  # what is left of that completion, next token first
        self._plan_at = 0  # the step at which to measure the completion again
        self._measured: tuple[int, int] | None = None  # (step, its completion's length) of the last measure
        self._slack = _SLACK
        self._near_end: list[int] | None = None  # within `_ZONE` of forcing: the completion measured this step
        self._bits = torch.zeros((self.compiler.vocab_size + 31) // 32, dtype=torch.int32)
        self._step_refused: tuple[int, Tensor] | None = None

    # ---- state
    @property
    def done(self) -> bool:
        """Nothing but a stop id may come next (the grammar is complete and takes nothing more, or the forced
        completion or the budget ended it), or a stop id was advanced: the caller must stop."""
        return self._finished or self._matcher.is_stopped() or self._matcher.is_error() or (
            self._budget_left() == 0) or (self._closing and not self._forced)

    @property
    def accepting(self) -> bool:
        """The text so far is a whole reply in the grammar: a stop id is allowed now. After the stop id: whether the
        reply it ended is whole (false only when the budget was shorter than the shortest valid text)."""
        return self._matcher.is_accepting()

    def allowed(self) -> Tensor:
        """(tokenizer vocabulary,) bool: the ids the next token may be."""
        return ~self._refused()

    # ---- per step
    def mask(self, logits: Tensor) -> None:
        """Set the logits of the ids the next token may not be to -inf, in place: a (V,) or (1, V) float row, V the
        model's vocabulary (may be larger than the tokenizer's: the padded rows are masked too)."""
        vocab = self.compiler.vocab_size
        refused = self._refused().to(logits.device, non_blocking=True)
        if logits.shape[-1] == vocab:
            logits.masked_fill_(refused, float("-inf"))
        else:
            logits[..., :vocab].masked_fill_(refused, float("-inf"))
            logits[..., vocab:] = float("-inf")

    def _refused(self) -> Tensor:
        """(tokenizer vocabulary,) bool: the ids the next token may not be (computed once a step)."""
        if self._step_refused is None or self._step_refused[0] != self.generated:
            self._step_refused = (self.generated, self._compute_refused())
        return self._step_refused[1]

    def _compute_refused(self) -> Tensor:
        self._plan()
        if self.done:
            return self._all_but(self.stop_ids)
        if self._forced:
            return self._all_but([self._forced[0]])
        self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        refused = np.unpackbits((~self._bits).numpy().view(np.uint8), bitorder="little")[: self.compiler.vocab_size]
        refused = torch.from_numpy(refused).view(torch.bool)  # 0/1 bytes: a bool view, not a copy
        may_end = not refused[self.compiler._end]
        refused[self.compiler._special] = True  # never inside the text, whatever the grammar says
        refused[self._stops] = not may_end
        if self._near_end is not None:
            self._refuse_openers_past_budget(refused)
        return refused

    def _refuse_openers_past_budget(self, refused: Tensor) -> None:
        """Near the end of the budget, refuse the tokens holding a `,`, `{` or `[` when that byte would open more
        than the budget has room for (an array item of a large object): a growth the slack may be too small for
        the first time it is seen. The completion's own next token stays allowed."""
        left, completion = self._budget_left(), self._near_end
        for token, holds in self.compiler._openers:
            if refused[token]:
                continue
            m = self._matcher.deep_copy()
            m.consume_token(token)
            after = self._completion(m)
            if after is None or 1 + len(after) + self._slack > left:
                refused |= holds
        if completion:
            refused[completion[0]] = False

    def advance(self, token_id: int) -> None:
        """Take the token that was sampled (one the mask allowed; anything else raises ValueError)."""
        token_id = int(token_id)
        if token_id in self.stop_ids:
            self._finished = True
        elif self._forced:
            if token_id != self._forced[0]:
                raise ValueError(f"token {token_id} advanced while the completion forces {self._forced[0]}")
            self._forced.pop(0)
            self._matcher.consume_token(token_id)
        elif self.done or not self._matcher.consume_token(token_id):
            error = self._matcher.get_error()
            raise ValueError(f"token {token_id} is not allowed here{': ' + _one_line(error) if error else ''}")
        self.generated += 1

    # ---- the reply budget
    def _budget_left(self) -> int | None:
        """Tokens the text may still take (the budget less the stop token); None: no budget."""
        return None if self.max_tokens is None else max(self.max_tokens - 1 - self.generated, 0)

    def _plan(self) -> None:
        """Start forcing a completion once the tokens left are within the slack of what it needs. The slack is
        `_SLACK`, or twice the largest growth of the completion over one token seen so far (a comma that opens an
        array item of a large object); far from the end of the budget the completion is measured only every few
        steps (it grows by a few tokens a step, rarely more), within `_ZONE` of forcing every step."""
        self._near_end = None
        left = self._budget_left()
        if left is None or self._closing or self._finished or self.generated < self._plan_at:
            return
        completion = self._completion()
        if completion is None:  # no greedy completion from here (rare): look again later
            self._plan_at = self.generated + _SLACK
            return
        if self._measured is not None and self._measured[0] == self.generated - 1:
            self._slack = max(self._slack, 2 * (len(completion) - self._measured[1] + 1))
        self._measured = (self.generated, len(completion))
        gap = left - len(completion) - self._slack
        if gap <= 0:  # (an empty completion: the text may end here, and ends)
            self._closing, self._forced = True, completion
        else:
            self._plan_at = self.generated + (1 if gap <= _ZONE else (gap - _ZONE) // _SLACK + 1)
            self._near_end = completion if gap <= _ZONE else None

    def _completion(self, start: llguidance.LLMatcher | None = None) -> list[int] | None:
        """Tokens that take the grammar from here to a state where it may end: greedy over single bytes (what the
        grammar forces, else the first byte of `_CLOSING` it allows, else any byte; a byte other than `}` or `]`
        chosen twice in a row is passed over for another one where there is one, so that `a*b` ends), re-encoded by
        the tokenizer when that is shorter and still allowed; None when none is found within `_COMPLETION_LIMIT`."""
        start = start or self._matcher
        order, closers = self.compiler._closing_tokens
        m = start.deep_copy()
        tokens: list[int] = []
        while not m.is_accepting():
            if len(tokens) > _COMPLETION_LIMIT or m.is_error():
                return None
            forced = m.compute_ff_tokens()  # llguidance's tokenization of the bytes the grammar forces
            taken = m.try_consume_tokens(forced) if forced else 0  # (it may list a token its grammar refuses)
            if taken:
                tokens += forced[:taken]
                continue
            last = tokens[-1] if len(tokens) >= 2 and tokens[-1] == tokens[-2] and tokens[-1] not in closers else None
            pick = next((t for t in order if t != last and m.validate_tokens([t]) == 1), None)
            if pick is None and last is not None and m.validate_tokens([last]) == 1:
                pick = last
            if pick is None:
                return None
            m.consume_token(pick)
            tokens.append(pick)
        text = self.compiler.tokenizer.decode(tokens)
        shorter = self.compiler.tokenizer.encode(text) if "\ufffd" not in text else tokens
        if len(shorter) < len(tokens):
            check = start.deep_copy()
            if check.try_consume_tokens(shorter) == len(shorter) and check.is_accepting():
                return shorter
        return tokens

    def _all_but(self, ids: Sequence[int]) -> Tensor:
        refused = torch.ones(self.compiler.vocab_size, dtype=torch.bool)
        refused[list(ids)] = False
        return refused


def _engine_tokenizer(tokenizer: Any) -> llguidance.LLTokenizer:
    """llguidance's table of the bytes of every token (`Tokenizer.token_bytes`), exactly the tokenizer's special
    tokens marked special: llguidance's mark is a leading 0xFF byte, which no UTF-8 text has, so that text never
    matches them. (Given a tokenizer.json itself, llguidance takes every added token for a special one, also those
    that HF and `Tokenizer.encode` match in text, such as Qwen's `<tool_call>`: its mask then allows that token for
    forced text and its parser refuses it.)"""
    special = set(tokenizer.special_tokens.values())
    pieces = [b"\xff" + piece if i in special else piece for i, piece in enumerate(tokenizer.token_bytes)]
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab(tokenizer, pieces, special)),
                                  n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_id)


class _Vocab:
    """What llguidance's `TokenizerWrapper` reads: the tokens' bytes, the special ids, and the encoder (for the
    text a grammar forces)."""

    def __init__(self, tokenizer: Any, pieces: list[bytes], special: set[int]):
        self._tok, self.tokens, self.special_token_ids = tokenizer, pieces, sorted(special)
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text)


def _one_line(message: str, limit: int = 300) -> str:
    """An engine's message as one line of at most `limit` characters (some quote the whole grammar)."""
    line = " ".join(message.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)
