"""Serving throughput: N concurrent streaming clients against `babyllama serve`, batched vs one at a time.

    babyllama bench serve_throughput --out out --name baby                  # 1, 4, 16 clients, the run's sft stage
    babyllama bench serve_throughput --out out --name baby --clients 1,4 --max-tokens 32 --dest rows.jsonl

For each N, the same N requests (different questions, fixed seeds, streamed) arrive together at two servers over the
same run: one decoding up to 16 rows together (the default), one with --max-batch 1 (each client served after the
previous one finished). Reported: aggregate tokens/s (completion tokens of all clients / wall time from the first
request to the last [DONE]), and p50 / p95 time to first token (request sent -> first content chunk).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import httpx
from jsonl import emit  # bench/ is on sys.path as the script's folder

from babyllama.cli import ArgumentParser, add_flag
from babyllama.serve.process import serve_in_background as server

ROOT = Path(__file__).resolve().parents[1]

QUESTIONS = ["床前明月光，疑是地上霜。下一句是什么？", "写一首关于秋天的诗", "Who are you?", "你好",
             "白日依山尽的下一句？", "What does Hamlet say?", "写一首题为《春晓》的诗", "Tell me about the moon."]


async def one_client(http: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first content chunk, completion tokens) of one streamed reply."""
    body = {"model": "sft", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": max_tokens, "temperature": 0.8, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if first is None and '"content": "' in line and '"content": ""' not in line:
                first = time.perf_counter() - start
            if '"usage": {' in line:
                tokens = int(line.split('"completion_tokens": ')[1].split(",")[0])
    return (first if first is not None else time.perf_counter() - start), tokens


async def measure(url: str, clients: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(http, url, i, max_tokens) for i in range(clients)))
        wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p95_s": round(ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))], 3)}


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out", help="output root of the run")
    parser.add_argument("--name", default="baby")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    add_flag(parser, "--dest", "--results", help="append the rows to this .jsonl file")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    for mode, batch in (("batched", max(counts)), ("one_at_a_time", 1)):
        with server(Path(args.out), "--name", args.name, "--max-batch", str(batch), "--max-waiting", "64") as url:
            asyncio.run(measure(url, 1, 4))  # warm-up: first-call allocations
            for n in counts:
                emit({"mode": mode, "max_batch": batch, "max_tokens": args.max_tokens,
                      **asyncio.run(measure(url, n, args.max_tokens))}, args.dest)


if __name__ == "__main__":
    main()
