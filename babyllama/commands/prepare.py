"""Tokenize a corpus into pretraining shards (`train_*.bin`, `val_*.bin`, `meta.json`; see
babyllama/data/token_bins.py).

    babyllama data prepare                                   # shipped training files -> out/baby/data
    babyllama data prepare --corpus data/corpus/*_train.jsonl my_texts/ --tokenizer out/tok8k --dest out/tok8k_data
    babyllama data prepare --corpus c4/ --corpus-format c4 --tokenizer qwen3/tokenizer.json --dest out/c4 --workers 8

--corpus takes files, directories (every corpus file under them: mind held-out files) and globs, read in the
order given; the formats are those of babyllama.data.corpus.iter_documents. Each document is followed by the
tokenizer's end-of-sequence token; a `--val-fraction` share of documents (chosen with --seed) goes to val.
An existing output directory is replaced only with --overwrite.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from babyllama.cli import ArgumentParser
from babyllama.data.corpus import add_corpus_flags, iter_corpus
from babyllama.data.token_bins import corpus_record, prepare_token_bins
from babyllama.data.tokenizer import Tokenizer
from babyllama.train.run_config import PretrainConfig

PRETRAIN = PretrainConfig()  # the same split as a pretraining run that prepares its own data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_flags(p)
    p.add_argument("--tokenizer", type=Path, default=Path("out") / "baby" / "tokenizer",
                   help="tokenizer.model, tokenizer.json or their directory (default: out/baby/tokenizer)")
    p.add_argument("--dest", type=Path, default=Path("out") / "baby" / "data",
                   help="output directory (default: out/baby/data, where the baby pretraining run looks)")
    p.add_argument("--val-fraction", type=float, default=PRETRAIN.val_fraction,
                   help=f"share of documents for validation (default: {PRETRAIN.val_fraction}, as pretraining)")
    p.add_argument("--seed", type=int, default=PRETRAIN.seed,
                   help=f"seed of the train/val split (default: {PRETRAIN.seed}, as pretraining)")
    p.add_argument("--workers", type=int, default=PRETRAIN.workers, help="tokenizing processes (1 = in this process)")
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per .bin shard (default: 2^27)")
    p.add_argument("--overwrite", action="store_true", help="replace the token data already in --dest")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tok = Tokenizer.load(args.tokenizer)
    corpus = (args.corpus, args.corpus_format, args.corpus_field)
    prepare_token_bins(iter_corpus(*corpus), tok, args.dest, val_fraction=args.val_fraction, seed=args.seed,
                       num_workers=args.workers, shard_tokens=args.shard_tokens, overwrite=args.overwrite,
                       corpus=corpus_record(*corpus))

