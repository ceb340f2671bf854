"""Prefix reuse in `babyllama serve`: time to first token of the last turn of a multi-turn chat, with the prefix cache
(--prefix-cache-mb 256, the default) and without it (--prefix-cache-mb 0).

    babyllama bench serve_prefix_cache                          # a random 0.2b model (context 1024) built here
    babyllama bench serve_prefix_cache --out out --name baby    # a trained run's sft stage (baby: context 256)
    babyllama bench serve_prefix_cache --smoke                  # tiny model, 3 turns, 2 repetitions

Both servers run side by side over the same run. Each repetition is a new conversation: turns 1 .. N-1 are played
on the cached server (greedy, streamed, --max-tokens each), then turn N, the whole conversation sent again as every
chat client does, goes to both servers, which of them first alternating (a server without the cache computes the
prompt whatever came before). Time to first token: request sent -> first chunk with content or a finish, with the
official `openai` client. Reported per server: the median over the repetitions and its distribution-free 95%
interval (order statistics), and the median ratio without / with (paired by repetition).
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from jsonl import emit  # bench/ is on sys.path as the script's folder
from openai import OpenAI

from babyllama.cli import ArgumentParser
from babyllama.data.corpus import iter_documents
from babyllama.data.tokenizer import train_tokenizer
from babyllama.model.config import preset
from babyllama.model.llama import Llama
from babyllama.serve.process import serve_in_background as server
from babyllama.shipped import TRAIN_CORPUS
from babyllama.train.checkpoint import atomic_save

QUESTIONS = ["床前明月光，疑是地上霜。下一句是什么？", "写一首关于秋天的诗", "Who are you?", "你好",
             "白日依山尽的下一句？", "What does Hamlet say?", "写一首题为《春晓》的诗", "Tell me about the moon.",
             "再写一首，要五言绝句。", "Say it again, but shorter.", "谁写的《静夜思》？", "Why?"]


def random_run(out: Path, name: str, preset_name: str, vocab: int, context: int | None) -> None:
    """out/<name>/{tokenizer,sft}: a tokenizer trained on the shipped corpus and a randomly initialised model (the
    cost of a prefill does not depend on what the weights learnt)."""
    docs = [d for path in TRAIN_CORPUS for d in iter_documents(path)][:20000]
    with warnings.catch_warnings():  # a small vocabulary for the smoke run: "little text" warnings
        warnings.simplefilter("ignore")
        tok = train_tokenizer(docs, vocab, out / name / "tokenizer")
    torch.manual_seed(0)
    overrides = {"max_seq_len": context} if context else {}
    # untied: a tied random model's greedy reply repeats the last prompt token; these replies vary more
    model = Llama(preset(preset_name, vocab_size=tok.vocab_size, tie_embeddings=False, **overrides))
    atomic_save({"model": model.state_dict(), "model_config": model.config.to_dict(),
                 "extra": {"tokenizer": tok.fingerprint}}, out / name / "sft" / "step_00000001.pt")


def ask(client: OpenAI, messages: list[dict], max_tokens: int) -> tuple[float, str, int, int | None]:
    """(seconds to the first content or finish, reply, prompt tokens, cached tokens if the server reports them)."""
    start, first, pieces, usage = time.perf_counter(), None, [], None
    stream = client.chat.completions.create(model="sft", messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if first is None and (choice.delta.content or choice.finish_reason):
                first = time.perf_counter() - start
            pieces.append(choice.delta.content or "")
    cached = getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", None)
    return first, "".join(pieces), usage.prompt_tokens, cached


def median_interval(values: list[float]) -> tuple[float, float, float]:
    """(median, low, high): low and high are the order statistics x(j) and x(n+1-j) with the largest j for which
    they bracket the median with at least 95% probability (Binomial(n, 1/2) tails); the whole range below 6 values,
    which covers it with only 1 - 2^(1-n)."""
    xs, n = sorted(values), len(values)
    below = [sum(math.comb(n, i) for i in range(j)) / 2 ** n for j in range(1, n // 2 + 1)]  # P(Binomial < j)
    j = max([j for j, p in enumerate(below, start=1) if p <= 0.025], default=1)
    return statistics.median(xs), xs[j - 1], xs[n - j]


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output root of a trained run to serve (default: a random model built here)")
    ap.add_argument("--name", default="baby", help="run name under --out")
    ap.add_argument("--preset", default="0.2b", help="the random model's preset (without --out)")
    ap.add_argument("--turns", type=int, default=10, help="user turns per conversation; the last one is timed")
    ap.add_argument("--reps", type=int, default=9, help="conversations, each timed once on each server")
    ap.add_argument("--max-tokens", type=int, default=48, help="reply budget of every turn (all turns must fit the "
                                                               "context)")
    ap.add_argument("--dtype", default="auto", help="the servers' --dtype")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 3 turns, 2 repetitions (CI keeps this working)")
    ap.add_argument("--dest", help="append the rows to this .jsonl file")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.turns, args.reps, args.max_tokens = "tiny", 3, 2, 8
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "out"
        if not args.out:
            random_run(out, args.name, args.preset, 512 if args.smoke else 4096, 512 if args.smoke else None)
        flags = ("--name", args.name, "--stage", "sft", "--dtype", args.dtype)
        with server(out, *flags, "--prefix-cache-mb", "0") as off_url, server(out, *flags) as on_url:
            clients = {mode: OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
                       for mode, url in (("off", off_url), ("on", on_url))}
            for client in clients.values():  # warm-up: first-call allocations
                ask(client, [{"role": "user", "content": "你好"}], 2)
            timed = {"off": [], "on": []}
            for rep in range(args.reps):
                messages = []
                for turn in range(args.turns):
                    question = QUESTIONS[(rep + turn) % len(QUESTIONS)]
                    messages.append({"role": "user", "content": f"({rep}) {question}" if turn == 0 else question})
                    if turn < args.turns - 1:
                        messages.append({"role": "assistant", "content": ask(clients["on"], messages,
                                                                             args.max_tokens)[1]})
                for mode in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                    timed[mode].append(ask(clients[mode], messages, args.max_tokens))
    rows = []
    for mode, results in timed.items():
        median, low, high = median_interval([r[0] for r in results])
        cached = [r[3] for r in results if r[3] is not None]
        rows.append({"prefix_cache": mode, "preset": None if args.out else args.preset, "turn": args.turns,
                     "reps": args.reps, "max_tokens": args.max_tokens,
                     "prompt_tokens": round(statistics.median(r[2] for r in results)),
                     "cached_tokens": round(statistics.median(cached)) if cached else None,
                     "ttft_median_s": round(median, 3), "ttft_low_s": round(low, 3), "ttft_high_s": round(high, 3)})
    ratio = median_interval([off[0] / on[0] for off, on in zip(timed["off"], timed["on"])])
    same = sum(off[1] == on[1] for off, on in zip(timed["off"], timed["on"]))
    rows.append({"ratio_off_over_on": round(ratio[0], 2), "ratio_low": round(ratio[1], 2),
                 "ratio_high": round(ratio[2], 2), "same_replies": f"{same}/{args.reps}"})
    for row in rows:
        emit(row, args.dest)
    print(f"\n| prefix cache | turn-{args.turns} prompt tokens | cached (reported) | TTFT median | 95% interval |")
    print("|---|---|---|---|---|")
    for r in rows[:2]:
        print(f"| {'--prefix-cache-mb 0' if r['prefix_cache'] == 'off' else 'default (256 MiB)'} | "
              f"{r['prompt_tokens']} | {r['cached_tokens'] if r['cached_tokens'] is not None else '-'} | "
              f"{r['ttft_median_s']:.3f} s | {r['ttft_low_s']:.3f}-{r['ttft_high_s']:.3f} s |")
    print(f"\nwithout / with, paired by conversation: {ratio[0]:.2f}x (95% interval {ratio[1]:.2f}-{ratio[2]:.2f}); "
          f"turn-{args.turns} replies equal on both servers: {same} of {args.reps}")


if __name__ == "__main__":
    main()
