"""Train the byte-fallback BPE tokenizer (SentencePiece) on a corpus; writes tokenizer.model, tokenizer.json and
tokenizer_config.json (see babyllama/data/tokenizer.py for the design and the fixed special-token ids).

    babyllama data tokenizer          # shipped training files, 4096 tokens -> out/baby/tokenizer
    babyllama data tokenizer --corpus data/corpus/*_train.jsonl --vocab-size 8000 --dest out/tok8k
    babyllama data tokenizer --corpus my_corpus/ --corpus-format jsonl --corpus-field content \\
        --vocab-size 64793 --dest out/tok64k

--corpus takes files, directories (every corpus file under them: mind held-out files) and globs; the formats are
those of babyllama.data.corpus.iter_documents. A 64,793-token vocabulary wants ~20M characters of text (about 25 s and
1.6 GB of RAM on 2 cores); larger corpora are sampled down to --max-train-chars. A non-empty --dest (data and
checkpoints may have been built with the tokenizer there) is replaced only with --overwrite.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator

from babyllama.cli import ArgumentParser
from babyllama.data.corpus import add_corpus_flags, iter_corpus
from babyllama.data.tokenizer import DEFAULT_VOCAB_SIZE, Tokenizer, train_tokenizer

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


class LanguageSample:
    """Keeps the first `per_language` zh and en documents that pass through `tap`, to measure compression."""

    def __init__(self, per_language: int = 2000):
        self.per_language = per_language
        self.docs: dict[str, list[str]] = {"zh": [], "en": []}

    def tap(self, docs: Iterable[str]) -> Iterator[str]:
        for doc in docs:
            if min(map(len, self.docs.values())) < self.per_language:
                lang = language(doc)
                if lang and len(self.docs[lang]) < self.per_language:
                    self.docs[lang].append(doc)
            yield doc


def language(doc: str) -> str | None:
    """"zh" or "en" by which script has more letters (None for neither)."""
    han, latin = len(_HAN.findall(doc)), len(_LATIN.findall(doc))
    return "zh" if han and han >= latin else "en" if latin else None


def chars_per_token(tok: Tokenizer, docs: list[str]) -> float:
    return sum(map(len, docs)) / max(1, sum(map(len, tok.encode_batch(docs))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_flags(p)
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help=f"total tokens incl. 6 special and 256 byte tokens (default: {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--dest", type=Path, default=Path("out") / "baby" / "tokenizer",
                   help="output directory (default: out/baby/tokenizer, where the baby pretraining run looks)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters kept as single pieces, lowered automatically for small vocabularies")
    p.add_argument("--max-train-chars", type=int, default=20_000_000,
                   help="sample at most this many characters of text (memory: ~80 bytes each)")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000, help="and at most this many pieces of text")
    p.add_argument("--max-sentence-chars", type=int, default=1024, help="longer lines are cut into pieces this long")
    p.add_argument("--threads", type=int, default=None, help="SentencePiece threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's log")
    p.add_argument("--overwrite", action="store_true", help="replace the tokenizer already in --dest")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)  # one line, no source
    sample = LanguageSample()
    start = time.perf_counter()
    documents = iter_corpus(args.corpus, args.corpus_format, args.corpus_field)
    tok = train_tokenizer(sample.tap(documents), args.vocab_size, args.dest,
                          character_coverage=args.character_coverage, max_train_chars=args.max_train_chars,
                          input_sentence_size=args.input_sentence_size, max_sentence_chars=args.max_sentence_chars,
                          num_threads=args.threads, seed=args.seed, verbose=args.verbose, overwrite=args.overwrite)
    print(f"trained a {tok.vocab_size:,}-token tokenizer in {time.perf_counter() - start:.1f} s -> {args.dest}")
    for lang, docs in sample.docs.items():
        if docs:
            print(f"{lang}: {chars_per_token(tok, docs):.2f} characters/token (on {len(docs):,} training documents)")

