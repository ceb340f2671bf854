"""Data-preparation throughput on CPU: babyllama's prepare_token_bins vs the seed's way, in the same run.

    babyllama bench data_prep                          # shipped corpus x --repeat, vocab 4096 tokenizer trained here
    babyllama bench data_prep --tokenizer out/baby/tokenizer --input my_corpus.jsonl --workers 1,4,8
    babyllama bench data_prep --smoke                  # small slice (CI keeps this working)

Ours runs with 1 and N workers (--workers); the seed's way is baby-llama2-chinese data_process.py: one process, a
Python list of all ids, one np.array at the end. Prints one JSON object per system: documents/s, tokens/s, MB/s of
text, peak extra memory of the baseline's list.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from jsonl import emit  # bench/ is on sys.path as the script's folder

from babyllama.cli import ArgumentParser
from babyllama.data.corpus import iter_documents
from babyllama.data.token_bins import prepare_token_bins
from babyllama.data.tokenizer import Tokenizer, train_tokenizer
from babyllama.shipped import TRAIN_CORPUS

ROOT = Path(__file__).resolve().parents[1]


def seed_style(docs: list[str], tok: Tokenizer, out: Path) -> int:
    """One process; every id appended to a Python list, converted once (what the seed project does)."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tok.encode(doc))
        ids.append(tok.eos_id)
    np.array(ids, dtype=np.uint16).tofile(out / "seed.bin")
    return len(ids)


def ours(docs: list[str], tok: Tokenizer, out: Path, workers: int) -> int:
    meta = prepare_token_bins(iter(docs), tok, out / f"ours_{workers}", num_workers=workers, desc=f"{workers} workers")
    return sum(split["tokens"] for split in meta["splits"].values())


def timed(fn) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", default=[str(p) for p in TRAIN_CORPUS])
    ap.add_argument("--tokenizer", help="tokenizer path (default: train a 4096-token one on the input)")
    ap.add_argument("--repeat", type=int, default=3, help="read the input this many times (a bigger job)")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--dest", help="append results as JSON lines to this file")
    args = ap.parse_args()
    docs = [d for path in args.input for d in iter_documents(path)]
    if args.smoke:
        docs, args.repeat, args.workers = docs[:300], 1, "1,2"
    docs = docs * args.repeat
    text_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = Tokenizer.load(args.tokenizer) if args.tokenizer else train_tokenizer(docs[:20000], 4096 if not args.smoke
                                                                                     else 512, work / "tok")
        tracemalloc.start()
        n, sec = timed(lambda: seed_style(docs, tok, work))
        baseline_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        results = [_row("seed-style (1 process, list)", len(docs), n, sec, text_mb, baseline_peak)]
        for w in map(int, args.workers.split(",")):
            n, sec = timed(lambda w=w: ours(docs, tok, work, w))
            results.append(_row(f"babyllama, {w} worker(s)", len(docs), n, sec, text_mb, None))
    base = results[0]["tokens_per_s"]
    for r in results:
        r["speedup_vs_seed"] = round(r["tokens_per_s"] / base, 2)
        emit(r, args.dest)


def _row(system: str, n_docs: int, tokens: int, seconds: float, text_mb: float, peak: int | None) -> dict:
    return {"system": system, "docs": n_docs, "tokens": tokens, "seconds": round(seconds, 2),
            "docs_per_s": round(n_docs / seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
            "mb_per_s": round(text_mb / seconds, 2),
            "python_peak_mib": round(peak / 2**20, 1) if peak is not None else None}


if __name__ == "__main__":
    main()
