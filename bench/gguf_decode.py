"""Decode speed at batch 1 on this CPU: llama.cpp running our GGUF export vs babyllama, in the same run.

    babyllama bench gguf_decode --out out --name baby --stage sft --dest bench/results/<date>_cpu_gguf_decode.jsonl

llama.cpp runs the export in f32, f16 and q8_0, babyllama eager and compiled: same checkpoint, same prompt, same
number of greedy tokens, same thread count. Each call generates --new-tokens greedy tokens after the prompt (prompt
processing included, end tokens not honoured, so every system does the same work). After one untimed call each
(compilation, llama.cpp's first allocation: `first_call_s`), the systems take turns for --repeats rounds, so that
load from other processes falls on all of them alike; tokens/s = new tokens / the median seconds of a call. Both
torch and llama.cpp use OpenMP, and a decode step is hundreds of tiny parallel regions, so how idle OpenMP threads
wait decides the numbers more than anything else: the script sets OMP_WAIT_POLICY=ACTIVE (spin, unless set
otherwise), the fastest and the steadiest setting for both sides on the 2-core dev machine (PASSIVE: threads sleep
between regions, llama.cpp 3-14x slower and noisy; unset: one runtime's spinning threads starved the other's, ours
10x slower). `same_tokens_as_eager`: share of the generated tokens equal to our eager path's. llama.cpp runs
through llama-cpp-python (`pip install -r requirements-gguf.txt`) with its default context settings (f16 KV cache),
as a user of the file gets it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # read when an OpenMP runtime loads: before torch and llama_cpp

import torch
from jsonl import emit  # bench/ is on sys.path as the script's folder

from babyllama.cli import ArgumentParser, add_flag
from babyllama.convert.gguf import DTYPES, export_gguf, open_in_llama_cpp
from babyllama.data.tokenizer import Tokenizer
from babyllama.model.generate import Generator, SamplingConfig
from babyllama.model.llama import Llama
from babyllama.train.checkpoint import load_model

PROMPT = "床前明月光，疑是地上霜。举头望明月，低头思故乡。To be, or not to be, that is the question: whether 'tis"


def source_flags(ap: argparse.ArgumentParser) -> None:
    add_flag(ap, "--out", "--root", default="out", help="the runs' output root")
    ap.add_argument("--name", default="baby")
    ap.add_argument("--stage", default="sft")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="for torch and llama.cpp alike")
    ap.add_argument("--dest", help="append results as JSON lines to this file")


def load_run(root: str, name: str, stage: str) -> tuple[Llama, Tokenizer, Path]:
    tok_dir = Path(root) / name / "tokenizer"
    tok = Tokenizer.load(tok_dir)
    return load_model(Path(root) / name / stage, tokenizer=tok), tok, tok_dir


def export_all(root: str, name: str, stage: str, tok_dir: Path, tmp: Path) -> dict[str, Path]:
    """The stage exported in every dtype into `tmp`."""
    return {d: export_gguf(Path(root) / name / stage, tok_dir, tmp / f"{stage}-{d}.gguf", d) for d in DTYPES}


def llama_cpp_model(path: Path, context: int, threads: int, **kw):
    return open_in_llama_cpp(path, n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False, **kw)


def llama_cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """n tokens from llama.cpp's greedy sampler, end tokens not honoured."""
    out: list[int] = []
    for token in llm.generate(prompt, temp=0.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def our_greedy(model: Llama, prompt: list[int], n: int, compile: bool = False) -> Callable[[], list[int]]:
    gen = Generator(model, max_len=len(prompt) + n, compile=compile)
    greedy = SamplingConfig(max_new_tokens=n, temperature=0)
    return lambda: gen.generate([prompt], greedy)[0]


def seconds(fn: Callable[[], list[int]]) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source_flags(ap)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, tok_dir = load_run(args.out, args.name, args.stage)
    prompt = tok.encode(PROMPT, bos=True)[: args.prompt_len]
    context = model.config.max_seq_len
    with tempfile.TemporaryDirectory() as tmp:
        files = export_all(args.out, args.name, args.stage, tok_dir, Path(tmp))
        systems: dict[str, Callable[[], list[int]]] = {
            "babyllama-eager": our_greedy(model, prompt, args.new_tokens),
            "babyllama-compiled": our_greedy(model, prompt, args.new_tokens, compile=True),
        }
        for dtype, path in files.items():
            llm = llama_cpp_model(path, context, args.threads)
            systems[f"llama.cpp-{dtype}"] = lambda llm=llm: llama_cpp_greedy(llm, prompt, args.new_tokens)
        first = {system: seconds(fn)[1] for system, fn in systems.items()}
        runs: dict[str, list[float]] = {system: [] for system in systems}
        tokens: dict[str, list[int]] = {}
        for _ in range(args.repeats):
            for system, fn in systems.items():
                tokens[system], took = seconds(fn)
                runs[system].append(took)
    reference = tokens["babyllama-eager"]
    for system, took in runs.items():
        same = sum(a == b for a, b in zip(tokens[system], reference)) / args.new_tokens
        emit({"system": system, "stage": args.stage, "batch": 1, "threads": args.threads,
              "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
              "tokens_per_s": round(args.new_tokens / statistics.median(took), 1),
              "same_tokens_as_eager": round(same, 4), "first_call_s": round(first[system], 2),
              "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}, args.dest)


if __name__ == "__main__":
    main()
