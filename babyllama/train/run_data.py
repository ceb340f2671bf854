"""A pretraining run's tokenizer and token bins, built on first use under out/<name>/ (rank 0 builds, the other
ranks wait) and checked on every later use: data kept from an earlier run must come from this run's corpus and
tokenizer, or the run stops saying what to delete.

    corpus = corpus_record(run.corpus, run.corpus_format, run.corpus_field)
    tok = ensure_tokenizer(run, paths, corpus)        # --tokenizer, or out/<name>/tokenizer (trained if missing)
    ensure_token_bins(run, paths, tok, corpus)        # out/<name>/data (tokenized if missing)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from babyllama.data.corpus import iter_corpus
from babyllama.data.token_bins import (
    check_corpus_matches,
    check_tokenizer_matches,
    corpus_differences,
    prepare_token_bins,
)
from babyllama.data.tokenizer import Tokenizer, train_tokenizer
from babyllama.errors import UserError
from babyllama.files import write_atomic
from babyllama.train.distributed import main_rank_first
from babyllama.train.run_config import PretrainConfig, RunPaths


def documents(run: PretrainConfig) -> Iterator[str]:
    return iter_corpus(run.corpus, run.corpus_format, run.corpus_field)


# beside out/<name>/tokenizer's files: {"tokenizer": fingerprint, "corpus": corpus_record} of its training run
TOKENIZER_CORPUS = "corpus.json"


def ensure_tokenizer(run: PretrainConfig, paths: RunPaths, corpus: dict) -> Tokenizer:
    if run.tokenizer:
        return Tokenizer.load(run.tokenizer)  # its own vocabulary: --vocab-size is for training one

    def train() -> None:
        if not (paths.tokenizer / "tokenizer.model").exists():
            print(f"training a {run.vocab_size}-token tokenizer on {run.corpus} -> {paths.tokenizer}")
            tok = train_tokenizer(documents(run), run.vocab_size, paths.tokenizer)
            record = {"tokenizer": tok.fingerprint, "corpus": corpus}
            write_atomic(paths.tokenizer / TOKENIZER_CORPUS, json.dumps(record, ensure_ascii=False).encode("utf-8"))
    main_rank_first(train)
    tok = Tokenizer.load(paths.tokenizer)
    if tok.vocab_size != run.vocab_size:  # kept from an earlier run with another --vocab-size
        raise UserError(f"{paths.tokenizer} holds a {tok.vocab_size:,}-token tokenizer but this run has --vocab-size "
                        f"{run.vocab_size:,}; {rebuild_hint(run, paths)}")
    keep = f"; or pass --tokenizer {paths.tokenizer} to use it anyway"
    check_tokenizer_corpus(tok, paths.tokenizer / TOKENIZER_CORPUS, corpus, rebuild_hint(run, paths) + keep)
    return tok


def check_tokenizer_corpus(tok: Tokenizer, record_path: Path, corpus: dict, redo: str) -> None:
    """Refuse a kept tokenizer trained on another corpus than this run's. No record (a tokenizer from before it
    was written, or placed there by hand) or a record of another tokenizer (retrained there since) is no check."""
    try:
        record = json.loads(record_path.read_text("utf-8")) if record_path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{record_path}: not the JSON this script writes; delete it (the tokenizer is then kept "
                        "without a corpus check)") from None
    differ = corpus_differences(record["corpus"], corpus) if record.get("tokenizer") == tok.fingerprint else []
    if differ:
        raise UserError(f"{record_path.parent}: the tokenizer was trained on another corpus ({'; '.join(differ)}); "
                        f"{redo}")


def ensure_token_bins(run: PretrainConfig, paths: RunPaths, tok: Tokenizer, corpus: dict) -> None:
    def prepare() -> None:
        if not (paths.data / "meta.json").exists():
            print(f"tokenizing {run.corpus} -> {paths.data}")
            prepare_token_bins(documents(run), tok, paths.data, val_fraction=run.val_fraction, seed=run.seed,
                               num_workers=run.workers, corpus=corpus)
    main_rank_first(prepare)
    # data kept from an earlier run may come from another corpus or tokenizer
    check_corpus_matches(paths.data, corpus, rebuild_hint(run, paths))
    check_tokenizer_matches(paths.data, tok)


def rebuild_hint(run: PretrainConfig, paths: RunPaths) -> str:
    """What to do when kept tokenizer/data do not fit this run: the tokenizer of out/<name> was trained on the same
    corpus as the data, so both go (a --tokenizer given by the user is not ours to delete)."""
    ours = f"{paths.tokenizer} and {paths.data}" if not run.tokenizer else str(paths.data)
    return f"use another --out, or delete {ours} to rebuild from this run's --corpus"
