"""Constrained decoding engines on our tokenizers: llguidance vs xgrammar vs outlines-core, against the decode step.

    babyllama bench grammar_engines                          # the baby run's tokenizer, its tokenizer.json, Qwen3's
    babyllama bench grammar_engines --engines llguidance,ours --walks 40 --dest rows.jsonl
    babyllama bench grammar_engines --smoke                  # a small tokenizer, few walks (the test's mode)

Tokenizers: the baby run's (`--tokenizer`, default out/baby/tokenizer; without one, a 4,096-token tokenizer is
trained on the shipped corpus as the baby run's first stage does, < 1 s), the same through its HF tokenizer.json,
and Qwen3's 151,669-token byte-level BPE when it is cached (`--hf-tokenizer`; tests/test_own_tokenizer.py fetches
it to ~/.cache/babyllama). Each engine gets the same table of token bytes (the special tokens excluded).

Per engine and tokenizer: `setup_s` (the engine's token table, once per tokenizer; the first engine of a tokenizer
also pays for `Tokenizer.token_bytes`), `compile_ms` (the schema below into a grammar, mean of --compiles, caches
off), `first_mask_ms` (the first mask of a fresh grammar), and `token_us`: per token, compute the mask, apply it to
a (vocab,) float row, pick the token (greedy on random logits, so that each walk is a random word of the language)
and advance, averaged over --walks walks that run until the grammar ends; `valid`: walks whose text `json.loads`
(strict: no raw control characters in strings) and matches the schema. `ratio` is token_us over the unconstrained
decode step of the baby preset (`Generator`, batch 1, the dtype `babyllama chat` picks, that tokenizer's
vocabulary) in the same run, on --threads torch threads. `none` is the floor: copy the row and pick, no mask. `ours`
is llguidance through `babyllama.model.grammar` (the special-token rule, stop ids, the padded rows), `ours+budget`
the same keeping a reply budget of 256 tokens (it measures the completion as the end nears).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from jsonl import emit  # bench/ is on sys.path as the script's folder

from babyllama.cli import ArgumentParser
from babyllama.data.corpus import iter_records
from babyllama.data.tokenizer import IM_END, Tokenizer, train_tokenizer
from babyllama.model import grammar
from babyllama.model.config import preset
from babyllama.model.generate import Generator, SamplingConfig, decode_dtype
from babyllama.model.llama import Llama
from babyllama.shipped import REPO_ROOT

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
ENGINES = ("none", "llguidance", "ours", "ours+budget", "xgrammar", "outlines-core")
MAX_STEPS = 400  # a walk longer than this is cut (a long integer); its tokens still count


class Walker:
    """One engine bound to one tokenizer: `grammar()` compiles SCHEMA, then `mask(row)`, `advance(token)` and
    `ended()` walk it. `vocab` is the tokenizer's size, `stop` the id that ends a reply."""

    def __init__(self, tok: Tokenizer, stop: int):
        self.tok, self.stop, self.vocab = tok, stop, tok.vocab_size
        self.bits = torch.zeros((self.vocab + 31) // 32, dtype=torch.int32)

    def apply_bits(self, row: torch.Tensor) -> None:
        """A 32-bit-per-word bitmask (the format all three engines write) onto the row, as `grammar` does."""
        refused = np.unpackbits((~self.bits).numpy().view(np.uint8), bitorder="little")[: self.vocab]
        row.masked_fill_(torch.from_numpy(refused).view(torch.bool), float("-inf"))


class NoMask(Walker):
    def grammar(self) -> None:
        self.left = 64

    def mask(self, row: torch.Tensor) -> None:
        pass

    def advance(self, token: int) -> None:
        self.left -= 1

    def ended(self) -> bool:
        return self.left == 0


class LLGuidance(Walker):
    """llguidance's own API, with the token table `babyllama.model.grammar` builds."""

    def __init__(self, tok: Tokenizer, stop: int):
        super().__init__(tok, stop)
        import llguidance

        self.llg = llguidance
        self.engine = grammar._engine_tokenizer(tok)

    def grammar(self) -> None:
        text = self.llg.LLMatcher.grammar_from_json_schema(SCHEMA, overrides={"whitespace_flexible": False})
        self.m = self.llg.LLMatcher(self.engine, text, log_level=0)
        self.done = False

    def mask(self, row: torch.Tensor) -> None:
        self.m.unsafe_compute_mask_ptr(self.bits.data_ptr(), self.bits.numel() * 4)
        self.apply_bits(row)

    def advance(self, token: int) -> None:
        self.done = token == self.engine.eos_token  # its end token (</s>), not our stop id
        if not self.done:
            assert self.m.consume_token(token), self.m.get_error()

    def ended(self) -> bool:
        return self.done


class Ours(Walker):
    def __init__(self, tok: Tokenizer, stop: int, budget: int | None = None):
        super().__init__(tok, stop)
        self.compiler, self.budget = grammar.GrammarCompiler(tok), budget

    def grammar(self) -> None:
        self.c = self.compiler.json_schema(SCHEMA).constraint([self.stop], max_tokens=self.budget)

    def mask(self, row: torch.Tensor) -> None:
        self.c.mask(row)

    def advance(self, token: int) -> None:
        self.c.advance(token)

    def ended(self) -> bool:
        return self.c._finished


class XGrammar(Walker):
    def __init__(self, tok: Tokenizer, stop: int):
        super().__init__(tok, stop)
        import xgrammar

        self.xgr = xgrammar
        special = set(tok.special_tokens.values())  # an empty token is xgrammar's mark of a special one
        vocab = [b"" if i in special else piece for i, piece in enumerate(tok.token_bytes)]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=self.vocab, stop_token_ids=[stop])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def grammar(self) -> None:
        compiled = self.compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
        self.m = self.xgr.GrammarMatcher(compiled)

    def mask(self, row: torch.Tensor) -> None:
        self.m.fill_next_token_bitmask(self.bits[None])
        self.xgr.apply_token_bitmask_inplace(row[None], self.bits[None], backend="cpu")

    def advance(self, token: int) -> None:
        assert self.m.accept_token(token)

    def ended(self) -> bool:
        return self.m.is_terminated()


class OutlinesCore(Walker):
    def __init__(self, tok: Tokenizer, stop: int):
        super().__init__(tok, stop)
        import outlines_core

        self.oc = outlines_core
        special = set(tok.special_tokens.values())
        table: dict[bytes, list[int]] = {}
        for i, piece in enumerate(tok.token_bytes):
            if i not in special and piece:
                table.setdefault(piece, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(stop, table)

    def grammar(self) -> None:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="")
        self.guide = self.oc.Guide(self.oc.Index(regex, self.vocabulary))
        self.done = False

    def mask(self, row: torch.Tensor) -> None:
        self.guide.write_mask_into(self.bits.data_ptr(), self.bits.numel(), 4)
        self.apply_bits(row)

    def advance(self, token: int) -> None:
        self.done = token == self.stop
        if not self.done:
            self.guide.advance(token, return_tokens=False)

    def ended(self) -> bool:
        return self.done


def make_walker(engine: str, tok: Tokenizer, stop: int) -> Walker:
    return {"none": NoMask, "llguidance": LLGuidance, "ours": Ours, "xgrammar": XGrammar,
            "outlines-core": OutlinesCore, "ours+budget": lambda t, s: Ours(t, s, budget=256)}[engine](tok, stop)


def measure_engine(engine: str, tok: Tokenizer, walks: int, compiles: int, pool: torch.Tensor) -> dict:
    stop = tok.token_to_id(IM_END)
    start = time.perf_counter()
    walker = make_walker(engine, tok, stop)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(compiles):
        walker.grammar()
    compile_ms = (time.perf_counter() - start) / compiles * 1e3
    tokens, seconds, first_mask_ms, texts = 0, 0.0, 0.0, []
    for w in range(walks):
        walker.grammar()
        ids = []
        for step in range(MAX_STEPS):
            row = pool[(w * 7919 + step) % len(pool)].clone()  # random logits, another row each step and walk
            t0 = time.perf_counter()
            walker.mask(row)
            token = int(row.argmax())
            walker.advance(token)
            dt = time.perf_counter() - t0
            if w == 0 and step == 0:
                first_mask_ms = dt * 1e3  # lazy set-up inside the engine: not in the average
            else:
                tokens, seconds = tokens + 1, seconds + dt
            ids.append(token)
            if walker.ended():
                break
        texts.append(tok.decode([i for i in ids if i not in (stop, tok.eos_id)]))
    valid = sum(_valid(t) for t in texts) if engine != "none" else None
    return {"setup_s": round(setup, 3), "compile_ms": round(compile_ms, 2), "first_mask_ms": round(first_mask_ms, 2),
            "token_us": round(seconds / max(tokens, 1) * 1e6, 1), "tokens_per_walk": round(tokens / walks, 1),
            "valid": f"{valid}/{walks}" if valid is not None else ""}


def _valid(text: str) -> bool:
    try:
        value = json.loads(text)  # strict: no raw control characters in strings (RFC 8259)
    except json.JSONDecodeError:
        return False
    return (set(value) == set(SCHEMA["required"]) and isinstance(value["name"], str) and len(value["name"]) <= 20
            and isinstance(value["age"], int) and value["color"] in ("red", "green", "blue")
            and isinstance(value["tags"], list) and len(value["tags"]) <= 3)


def decode_step_us(vocab_size: int, device: torch.device, repeats: int) -> float:
    """The baby preset's unconstrained decode step (greedy, batch 1) with this vocabulary, microseconds a token."""
    torch.manual_seed(0)
    dtype = decode_dtype("auto", device)
    model = Llama(preset("baby", vocab_size=vocab_size)).to(device=device, dtype=dtype).eval()
    gen, new = Generator(model), 64
    cfg = SamplingConfig(max_new_tokens=new, temperature=0)
    prompt = [[1, *range(10, 42)]]
    gen.generate(prompt, cfg)  # warm-up: cache allocation
    start = time.perf_counter()
    for _ in range(repeats):
        gen.generate(prompt, cfg)
    return (time.perf_counter() - start) / (repeats * new) * 1e6


def tokenizers_to_measure(args: argparse.Namespace, work: Path) -> list[tuple[str, Tokenizer]]:
    if args.smoke:
        texts = [r["text"] for r in iter_records(REPO_ROOT / "data" / "corpus" / "shakespeare_en_heldout.jsonl")]
        tok = train_tokenizer(texts[:200], 400, work / "smoke")
        return [("smoke-sp400", tok)]
    path = Path(args.tokenizer)
    if not (path / "tokenizer.model").is_file():
        print(f"no tokenizer in {path}: training the baby run's (4,096 tokens on the shipped corpus)")
        texts = [r["text"] for name in ("poetry_zh_train.jsonl", "shakespeare_en_train.jsonl")
                 for r in iter_records(REPO_ROOT / "data" / "corpus" / name)]
        path = work / "baby"
        train_tokenizer(texts, 4096, path)
    found = [("baby-sp4096", Tokenizer.load(path / "tokenizer.model")),
             ("baby-hf4096", Tokenizer.load(path / "tokenizer.json"))]
    hf = Path(args.hf_tokenizer)
    if (hf / "tokenizer.json").is_file():
        found.append(("qwen3-hf151669", Tokenizer.load(hf / "tokenizer.json")))
    else:
        print(f"no {hf / 'tokenizer.json'}: Qwen3's tokenizer is left out (tests/test_own_tokenizer.py fetches it)")
    return found


def print_table(rows: list[dict]) -> None:
    cols = ["tokenizer", "engine", "setup_s", "compile_ms", "first_mask_ms", "token_us", "ratio", "valid", "error"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = Path(os.environ.get("BABYLLAMA_CACHE", Path.home() / ".cache" / "babyllama"))
    ap.add_argument("--tokenizer", default="out/baby/tokenizer", help="the baby run's tokenizer directory")
    ap.add_argument("--hf-tokenizer", default=str(cache / "tokenizer-qwen3-3.7.2"),
                    help="a directory with a large HF tokenizer.json (default: Qwen3's, where the tests cache it)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--walks", type=int, default=20, help="walks through the grammar per engine and tokenizer")
    ap.add_argument("--compiles", type=int, default=5)
    ap.add_argument("--decode-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the engines mask on one; a decode step on two threads of a "
                         "busy 2-core machine waits on the other core)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--dest", help="append results as JSON lines to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.walks, args.compiles, args.decode_repeats = 3, 1, 1
    engines = args.engines.split(",")
    unknown = set(engines) - set(ENGINES)
    if unknown:
        ap.error(f"unknown engines {sorted(unknown)}; choose from {','.join(ENGINES)}")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, tok in tokenizers_to_measure(args, Path(work)):
            step_us = decode_step_us(tok.vocab_size, torch.device("cpu"), args.decode_repeats)
            row = {"tokenizer": name, "engine": "baby decode step", "token_us": round(step_us, 1), "ratio": 1.0}
            emit(row, args.dest)
            rows.append(row)
            pool = torch.randn(257, tok.vocab_size, generator=torch.Generator().manual_seed(0))
            for engine in engines:
                row = {"tokenizer": name, "engine": engine}
                try:
                    row |= measure_engine(engine, tok, args.walks, args.compiles, pool)
                    row["ratio"] = round(row["token_us"] / step_us, 3)
                except ImportError as e:
                    row["error"] = f"not installed ({e.name})"
                emit(row, args.dest)
                rows.append(row)
    print_table(rows)


if __name__ == "__main__":
    main()
