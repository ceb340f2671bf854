"""Pretraining data: documents -> token shards on disk -> fixed-length windows -> resumable, DDP-aware batches.

On disk (`out_dir/`)
--------------------
- `train_00000.bin`, `train_00001.bin`, ..., `val_00000.bin`, ...: raw little-endian token ids, no header. Each
  document contributes `tokenizer.encode(doc) + [eos_id]`; the documents of a split are concatenated in corpus
  order and cut into shards of `shard_tokens` tokens (a document may straddle two shards).
- `meta.json` (written last, so its presence marks a complete directory)::

    {"format": "babyllama-tokens", "version": 1, "dtype": "uint16" | "uint32", "vocab_size", "eos_id",
     "tokenizer": {"class", "path", "sha256"}, "seed", "val_fraction",
     "corpus": {"files", "format", "field"} | null, "input": {"documents", "bytes"},
     "splits": {"train": {"documents", "tokens", "shards": [{"file", "tokens", "bytes"}, ...]}, "val": {...}}}

  `dtype` is uint16 when `vocab_size <= 65535`, else uint32. `corpus` (`corpus_record`: each corpus file's name,
  size and a hash of its ends, the format and field) is what `check_corpus_matches` compares a later run with, so a
  moved corpus (or repository) still matches and an edited file does not; null when not given, absent in data
  prepared before it was recorded, and a list of paths before identities were kept (all accepted as any corpus).

`prepare_token_bins` writes such a directory (see its docstring); `babyllama data prepare` is its command line.

Reading
-------
`TokenWindowDataset(dir, split, seq_len=L)`: sample `i` is a non-overlapping window of `L + 1` tokens inside one
shard, returned as `(x, y) = (w[:-1], w[1:])` int64 tensors. The tail of each shard shorter than a window is not
used. Reading a window checks its ids against meta.json's `vocab_size` (a corrupt shard is a `UserError`, not a
crash in the embedding). Shards are memory-mapped lazily in each process (the dataset pickles to a few paths and
integers for DataLoader workers), and sample -> (shard, offset) is arithmetic over cumulative per-shard counts:
memory is O(shards), not O(samples).

`build_pretrain_loader(...)` returns a `DataLoader` whose `.sampler` is a `babyllama.data.sampler.ResumableSampler`,
`.dataset` the `TokenWindowDataset`, and `.tokens_per_batch` = `batch_size * seq_len` (per rank, per micro-batch).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import re
import time
from collections import deque
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from babyllama.data.corpus import resolve_files
from babyllama.data.sampler import ResumableSampler
from babyllama.errors import UserError
from babyllama.files import atomic_file, claim_out_dir, is_partial_write, locked

FORMAT, VERSION = "babyllama-tokens", 1
SPLITS = ("train", "val")
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_OUR_FILES = re.compile(r"(?:train|val)_\d{5}\.bin(?:\.tmp)?|meta\.json")  # meta.json's killed write: _is_ours
_CHUNK_DOCS, _CHUNK_CHARS = 512, 1 << 20  # one worker task: bounded both ways (many tiny or few huge documents)
_PREPARE_HINT = ("rerun `babyllama data prepare` (with --overwrite), or delete the directory and `babyllama pretrain` "
                 "rebuilds it")


# ======================================================================= preparation
def val_draws(seed: int, val_fraction: float) -> Callable[[int], np.ndarray]:
    """The train/val split rule: one uniform draw per document, in corpus order, from a generator seeded with
    `seed`; a document is val when its draw is below `val_fraction`. Returns: n -> the next n documents' flags."""
    rng = np.random.default_rng(seed)
    return lambda n: rng.random(n) < val_fraction


def token_dtype(vocab_size: int) -> str:
    """The on-disk dtype name for a vocabulary: uint16 up to 65,535 tokens, else uint32."""
    return "uint16" if vocab_size <= 65_535 else "uint32"


def prepare_token_bins(documents: Iterable[str], tokenizer: Any, out_dir: str | Path, *, val_fraction: float = 0.01,
                       seed: int = 0, num_workers: int | None = None, shard_tokens: int = 1 << 27,
                       desc: str = "tokenizing", overwrite: bool = False, corpus: dict | None = None) -> dict:
    """Tokenize `documents` into train/val shards + meta.json in `out_dir`; returns the meta dict.

    Each document goes to val with probability `val_fraction`, decided by a `seed`ed generator in document order
    (so the split is deterministic and independent of `num_workers`). If that leaves val empty while
    `val_fraction > 0` (tiny corpora), the last training document is moved to val.

    `tokenizer` is duck-typed: `encode(str) -> list[int]`, `eos_id`, `vocab_size`. With `num_workers > 1`,
    documents are encoded in a process pool in chunks, results kept in corpus order. Workers get the tokenizer
    by path (`type(tok).load(tok.path or tok.source)`, e.g. `babyllama.data.tokenizer.Tokenizer`) when it has
    one, else the pickled object. Memory stays bounded: documents are streamed, at most `2 * num_workers`
    chunks are in flight, and shards are written incrementally (`*.tmp`, renamed once all are complete;
    meta.json last).

    An existing `out_dir` holding anything but the leftovers of an interrupted preparation (shards without
    meta.json) is refused unless `overwrite=True`, which deletes this format's files there (and only those)
    once the new ones are complete: a failed preparation leaves the old data whole.
    `corpus` (a `corpus_record` of where `documents` come from) is stored in meta.json as is.
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction}: must be in [0, 1)")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens={shard_tokens}: must be at least 1")
    out = Path(out_dir)
    with locked(out, "token data build"):  # another build (or a run reading it) must not meet half-written shards
        return _prepare_token_bins(documents, tokenizer, out, val_fraction, seed, num_workers, shard_tokens, desc,
                                   overwrite, corpus)


def _prepare_token_bins(documents: Iterable[str], tokenizer: Any, out: Path, val_fraction: float, seed: int,
                        num_workers: int | None, shard_tokens: int, desc: str, overwrite: bool,
                        corpus: dict | None) -> dict:
    old = _claim_out_dir(out, overwrite)
    vocab_size, eos_id = int(tokenizer.vocab_size), int(tokenizer.eos_id)
    dtype = token_dtype(vocab_size)
    workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
    splits = _Splits(out, _DTYPES[dtype], shard_tokens, rescue_val=val_fraction > 0)
    is_val = val_draws(seed, val_fraction)
    start, n_docs, n_bytes = time.perf_counter(), 0, 0
    try:
        with tqdm(desc=desc, unit="doc", unit_scale=True, disable=None) as bar:
            for tokens, lengths, chunk_bytes in _encode_all(documents, tokenizer, dtype, workers):
                splits.add(tokens, lengths, is_val(len(lengths)))
                n_docs, n_bytes = n_docs + len(lengths), n_bytes + chunk_bytes
                bar.update(len(lengths))
        splits.close()
        if n_docs == 0:
            raise UserError(f"no documents to tokenize for {out}; check --corpus and --corpus-field")
        meta = {"format": FORMAT, "version": VERSION, "dtype": dtype, "vocab_size": vocab_size, "eos_id": eos_id,
                "tokenizer": _tokenizer_identity(tokenizer), "seed": seed, "val_fraction": val_fraction,
                "corpus": corpus, "input": {"documents": n_docs, "bytes": n_bytes}, "splits": splits.summary()}
        with atomic_file(out / "meta.json") as f:
            f.write((json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
            f.flush()  # a full disk refuses it here, before the old data goes
            for p in sorted(old, key=lambda p: p.name != "meta.json"):  # meta.json first: marked incomplete at once
                p.unlink()
            splits.commit()
    except BaseException:
        splits.discard()  # leave no half-written dataset behind
        raise
    _report(meta, time.perf_counter() - start, out)
    return meta


def _claim_out_dir(out: Path, overwrite: bool) -> list[Path]:
    """Our files in `out` that the new data replaces. Complete data (meta.json) stays whole until the new data is
    (a failed preparation loses nothing); an interrupted preparation's leftovers go now, and so does any temp file."""
    entries = claim_out_dir(out, overwrite, "token data", leftovers=_interrupted)
    out.mkdir(parents=True, exist_ok=True)
    ours = [p for p in entries if _is_ours(p)]
    complete = out / "meta.json" in ours
    for p in ours:
        if not complete or p.name.endswith(".tmp"):
            p.unlink()
    return [p for p in ours if p.exists()]


def _interrupted(entries: list[Path]) -> bool:
    """Only shards of ours and no meta.json: what an interrupted preparation leaves."""
    return all(_is_ours(p) for p in entries) and not any(p.name == "meta.json" for p in entries)


def _is_ours(entry: Path) -> bool:
    return _OUR_FILES.fullmatch(entry.name) is not None or is_partial_write(entry, r"meta\.json")


def _tokenizer_identity(tok: Any) -> dict:
    path = _tokenizer_path(tok)
    digest = None
    if path is not None and Path(path).is_file():
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return {"class": f"{type(tok).__module__}.{type(tok).__qualname__}", "path": path and str(path),
            "sha256": digest}


def _tokenizer_path(tok: Any) -> str | None:
    path = getattr(tok, "path", None) or getattr(tok, "source", None)
    return str(path) if path is not None else None


def _report(meta: dict, seconds: float, out: Path) -> None:
    docs, mb = meta["input"]["documents"], meta["input"]["bytes"] / 1e6
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    parts = ", ".join(f"{name} {s['tokens']:,} tokens / {s['documents']:,} docs in {len(s['shards'])} shard(s)"
                      for name, s in meta["splits"].items())
    seconds = max(seconds, 1e-9)
    print(f"wrote {out}: {parts} ({meta['dtype']})\n"
          f"{docs:,} documents, {mb:.1f} MB of text in {seconds:.1f} s: {docs / seconds:,.0f} docs/s, "
          f"{tokens / seconds:,.0f} tokens/s, {mb / seconds:.2f} MB/s")


# ---- encoding (in-process or in a pool)
class _Encoder:
    """Encodes a chunk of documents into one flat array of the on-disk dtype (+ per-document lengths)."""

    def __init__(self, tokenizer: Any, dtype: str):
        self.tok, self.dtype = tokenizer, _DTYPES[dtype]
        self.vocab_size, self.eos = int(tokenizer.vocab_size), int(tokenizer.eos_id)

    def __call__(self, task: tuple[int, list[str]]) -> tuple[np.ndarray, np.ndarray, int]:
        first, docs = task
        seqs = [self.tok.encode(d) for d in docs]  # per document: parallelism comes from the worker processes
        lengths = np.fromiter((len(s) + 1 for s in seqs), np.int64, len(seqs))
        flat = np.fromiter(chain.from_iterable(chain(s, (self.eos,)) for s in seqs), np.int64, int(lengths.sum()))
        self._check_ids(flat, lengths, first)
        return flat.astype(self.dtype), lengths, sum(len(d.encode("utf-8")) for d in docs)

    def _check_ids(self, flat: np.ndarray, lengths: np.ndarray, first: int) -> None:
        """Out-of-range ids would wrap silently in uint16 (or crash the embedding later): refuse them."""
        bad = np.flatnonzero((flat < 0) | (flat >= self.vocab_size))
        if bad.size:
            doc = first + int(np.searchsorted(np.cumsum(lengths), bad[0], side="right"))
            raise UserError(f"document {doc}: the tokenizer produced id {int(flat[bad[0]])}, outside its vocabulary "
                            f"of {self.vocab_size} (dtype {self.dtype.name}); its vocab_size is wrong")


_WORKER_ENCODER: _Encoder | None = None


def _init_worker(load: Callable[[str], Any] | None, tok_or_path: Any, dtype: str) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = _Encoder(load(tok_or_path) if load else tok_or_path, dtype)


def _encode_in_worker(task: tuple[int, list[str]]) -> tuple[np.ndarray, np.ndarray, int]:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(task)


def _worker_tokenizer(tok: Any) -> tuple[Callable[[str], Any] | None, Any]:
    """(loader, path) when the tokenizer can be reloaded from a file (cheap to send), else (None, tok)."""
    path, load = _tokenizer_path(tok), getattr(type(tok), "load", None)
    return (load, path) if path is not None and callable(load) else (None, tok)


def _chunks(documents: Iterable[str]) -> Iterator[tuple[int, list[str]]]:
    """(index of the first document, documents) pieces of the stream."""
    first, docs, chars = 0, [], 0
    for doc in documents:
        docs.append(doc)
        chars += len(doc)
        if len(docs) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield first, docs
            first, docs, chars = first + len(docs), [], 0
    if docs:
        yield first, docs


def _encode_all(documents: Iterable[str], tokenizer: Any, dtype: str,
                workers: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Encoded chunks in corpus order. `Pool.imap` would read the whole corpus ahead into its task queue, so
    tasks are submitted with `apply_async` and at most `2 * workers` are in flight."""
    if workers <= 1:
        yield from map(_Encoder(tokenizer, dtype), _chunks(documents))
        return
    with mp.get_context().Pool(workers, _init_worker, (*_worker_tokenizer(tokenizer), dtype)) as pool:
        pending: deque = deque()
        for task in _chunks(documents):
            pending.append(pool.apply_async(_encode_in_worker, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---- writing
class _ShardWriter:
    """Streams one split into `{split}_NNNNN.bin` shards of `shard_tokens` tokens; a shard is written as `*.tmp`
    and fsynced when full (or at `close`), and `commit` renames them all once every shard of the data is complete."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.documents = 0
        self._file: Any = None
        self._tokens = 0  # in the open shard

    def write(self, tokens: np.ndarray, documents: int) -> None:
        self.documents += documents
        with self._naming_errors():
            while len(tokens):
                if self._file is None:
                    self._file = open(_tmp(self._path()), "wb")
                take = min(len(tokens), self.shard_tokens - self._tokens)
                self._file.write(memoryview(np.ascontiguousarray(tokens[:take])))
                self._tokens += take
                tokens = tokens[take:]
                if self._tokens == self.shard_tokens:
                    self._finish_shard()

    def close(self) -> None:
        if self._file is not None:
            with self._naming_errors():
                self._finish_shard()

    def commit(self) -> None:
        for shard in self.shards:
            os.replace(_tmp(self.out / shard["file"]), self.out / shard["file"])

    def discard(self) -> None:
        """Remove the temp files (the renamed ones, if any, are what an interrupted preparation leaves)."""
        if self._file is not None:
            with contextlib.suppress(OSError):  # closing flushes the buffer: refused again on a full disk
                self._file.close()
            _tmp(self._path()).unlink(missing_ok=True)
        for shard in self.shards:
            _tmp(self.out / shard["file"]).unlink(missing_ok=True)

    def summary(self) -> dict:
        return {"documents": self.documents, "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}

    def _path(self) -> Path:
        return self.out / f"{self.split}_{len(self.shards):05d}.bin"

    def _finish_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards.append({"file": self._path().name, "tokens": self._tokens,
                            "bytes": self._tokens * self.dtype.itemsize})
        self._file, self._tokens = None, 0

    @contextlib.contextmanager
    def _naming_errors(self) -> Iterator[None]:
        """file.write and fsync name no file, but a refused write's one line (cli.main_guard) should."""
        try:
            yield
        except OSError as e:
            e.filename = e.filename or str(self._path())
            raise


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


class _Splits:
    """Routes encoded documents to the train/val writers. The last training document is held back until the
    next one arrives so that, at the end, it can become val if the random split gave val nothing."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int, rescue_val: bool):
        self.writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
        self.rescue_val = rescue_val
        self._held: np.ndarray | None = None

    def add(self, tokens: np.ndarray, lengths: np.ndarray, is_val: np.ndarray) -> None:
        token_is_val = np.repeat(is_val, lengths)
        if is_val.any():
            self.writers["val"].write(tokens[token_is_val], int(is_val.sum()))
        n_train = int((~is_val).sum())
        if n_train:
            train = tokens[~token_is_val]
            last = len(train) - int(lengths[~is_val][-1])
            self._release()
            self.writers["train"].write(train[:last], n_train - 1)
            self._held = train[last:].copy()

    def close(self) -> None:
        train, val = self.writers["train"], self.writers["val"]
        if self._held is not None and self.rescue_val and val.documents == 0 and train.documents > 0:
            val.write(self._held, 1)
            self._held = None
        self._release()
        for w in self.writers.values():
            w.close()

    def commit(self) -> None:
        for w in self.writers.values():
            w.commit()

    def discard(self) -> None:
        for w in self.writers.values():
            w.discard()

    def summary(self) -> dict:
        return {s: w.summary() for s, w in self.writers.items()}

    def _release(self) -> None:
        if self._held is not None:
            self.writers["train"].write(self._held, 1)
            self._held = None


# ======================================================================= reading
def read_meta(bin_dir: str | Path) -> dict:
    """meta.json of a prepared directory, checked for format, version, dtype and vocabulary consistency."""
    path = Path(bin_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"{path} not found: {bin_dir} holds no (complete) prepared token data; "
                        f"run `babyllama data prepare --dest {bin_dir}`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        fmt, version, dtype, vocab = meta["format"], meta["version"], meta["dtype"], int(meta["vocab_size"])
        for split in SPLITS:  # normalized here so that a hand-edited file fails now, with this message
            meta["splits"][split]["shards"] = [{"file": str(x["file"]), "tokens": int(x["tokens"]),
                                                "bytes": int(x["bytes"])} for x in meta["splits"][split]["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: unreadable or incomplete ({type(e).__name__}: {e}); {_PREPARE_HINT}") from None
    if fmt != FORMAT or version != VERSION:
        raise UserError(f"{path}: format {fmt!r} version {version!r}, expected {FORMAT!r} version {VERSION}; "
                        f"{_PREPARE_HINT}")
    if dtype not in _DTYPES:
        raise UserError(f"{path}: dtype {dtype!r} is not one of {sorted(_DTYPES)}; {_PREPARE_HINT}")
    if vocab - 1 > np.iinfo(_DTYPES[dtype]).max:
        raise UserError(f"{path}: dtype {dtype} cannot hold the ids of a {vocab:,}-token vocabulary; {_PREPARE_HINT}")
    return meta


def check_tokenizer_matches(bin_dir: str | Path, tokenizer: Any) -> dict:
    """meta.json of `bin_dir`, after checking that the data was tokenized by `tokenizer` (same vocabulary size and,
    where both are known, the same file): ids from another tokenizer would train silently on wrong tokens."""
    meta, path = read_meta(bin_dir), Path(bin_dir) / "meta.json"
    vocab, dtype = int(tokenizer.vocab_size), meta["dtype"]
    redo = f"delete {bin_dir} to re-tokenize the corpus with this tokenizer, or use another --out"
    if vocab - 1 > np.iinfo(_DTYPES[dtype]).max:
        raise UserError(f"{path}: the token data is {dtype}, which cannot hold the ids of the {vocab:,}-token "
                        f"tokenizer {_tokenizer_path(tokenizer)}; {redo}")
    saved, now = meta.get("tokenizer", {}).get("sha256"), _tokenizer_identity(tokenizer)["sha256"]
    if vocab != int(meta["vocab_size"]) or (saved and now and saved != now):
        raise UserError(f"{path}: the token data was made by another tokenizer ({int(meta['vocab_size']):,} tokens, "
                        f"{meta.get('tokenizer', {}).get('path')}) than {_tokenizer_path(tokenizer)} "
                        f"({vocab:,} tokens); {redo}")
    return meta


def corpus_record(paths: Iterable[str | Path], fmt: str, field: str) -> dict:
    """What meta.json keeps of a corpus: the identity of each file the paths name (globs and directories
    expanded, so `dir/*.jsonl` equals its files), the format and the field."""
    files = [file_identity(f) for path in paths for f in resolve_files(path)]
    return {"files": files, "format": fmt, "field": field}


_ENDS = 1 << 14  # bytes hashed at each end of a corpus file: cheap for thousands of files (a size change is
# always caught; this catches same-size edits near either end)


def file_identity(path: Path) -> dict:
    """Name, size and a hash of the first and last 16 KiB: equal for a moved or copied file, different for an
    edited one (almost always: an edit of the same size deep inside a big file goes unseen)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_ENDS))
        f.seek(max(_ENDS, size - _ENDS))
        digest.update(f.read())
    return {"name": path.name, "bytes": size, "ends_sha256": digest.hexdigest()[:16]}


def corpus_differences(saved: dict, now: dict) -> list[str]:
    """What differs between two `corpus_record`s, for an error message (empty if they match)."""
    differ = []
    if saved.get("files") != now["files"]:
        old, new = saved.get("files") or [], now["files"]
        if len(old) != len(new):
            differ.append(f"{len(old)} files ({_file_list(old)}) vs now {len(new)} ({_file_list(new)})")
        else:
            i = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
            differ.append(f"file {i + 1} of {len(new)}: {_describe_file(old[i])} vs now {_describe_file(new[i])}")
    differ += [f"{key} {saved.get(key)!r} vs now {now[key]!r}" for key in ("format", "field")
               if saved.get(key) != now[key]]
    return differ


def _paths_only(record: dict) -> bool:
    """A record from before file identities were kept (absolute paths): accepted as any corpus, like no record."""
    return any(isinstance(f, str) for f in record.get("files") or [])


def _describe_file(identity: dict) -> str:
    return f"{identity['name']} ({identity['bytes']:,} bytes, ends {identity['ends_sha256']})"


def _file_list(files: list[dict], n: int = 3) -> str:
    names = [f["name"] for f in files]
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n} more)" if len(names) > n else "")


def check_corpus_matches(bin_dir: str | Path, corpus: dict, redo: str) -> None:
    """Refuse token data prepared from another corpus than `corpus` (a `corpus_record`), naming what differs;
    data with no record of its corpus (prepared before it was recorded) is accepted."""
    saved = read_meta(bin_dir).get("corpus")
    differ = corpus_differences(saved, corpus) if saved and not _paths_only(saved) else []
    if differ:
        raise UserError(f"{Path(bin_dir) / 'meta.json'}: the token data was prepared from another corpus "
                        f"({'; '.join(differ)}); {redo}")


def _checked_shards(bin_dir: Path, meta: dict, split: str) -> list[tuple[Path, int]]:
    """(path, tokens) of each shard of `split`, after checking every file's size against meta.json."""
    itemsize = _DTYPES[meta["dtype"]].itemsize
    shards = []
    for shard in meta["splits"][split]["shards"]:
        path, tokens = bin_dir / shard["file"], int(shard["tokens"])
        try:
            size = path.stat().st_size
        except OSError:
            raise UserError(f"{path}: missing (listed in meta.json); {_PREPARE_HINT}") from None
        if size % itemsize or size != tokens * itemsize:
            raise UserError(f"{path}: {size:,} bytes, expected {tokens * itemsize:,} ({tokens:,} tokens x {itemsize} "
                            f"bytes); the file is truncated or corrupt: {_PREPARE_HINT}")
        shards.append((path, tokens))
    return shards


class TokenWindowDataset(Dataset):
    """Non-overlapping `seq_len + 1`-token windows of a prepared split, as `(x, y)` int64 tensors (see module doc)."""

    def __init__(self, bin_dir: str | Path, split: str = "train", *, seq_len: int):
        if split not in SPLITS:
            raise UserError(f"split {split!r}: choose one of {SPLITS}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.bin_dir, self.split, self.seq_len = Path(bin_dir), split, seq_len
        self.meta = read_meta(self.bin_dir)
        self.vocab_size, self.eos_id = int(self.meta["vocab_size"]), int(self.meta["eos_id"])
        self.dtype = _DTYPES[self.meta["dtype"]]
        shards = _checked_shards(self.bin_dir, self.meta, split)
        self._paths = [p for p, _ in shards]
        self._ends = np.cumsum([n // (seq_len + 1) for _, n in shards], dtype=np.int64)  # samples before shard i+1
        self._maps: list[np.memmap | None] = [None] * len(shards)
        if len(self) == 0:
            tokens, largest = sum(n for _, n in shards), max((n for _, n in shards), default=0)
            fraction = "larger" if split == "val" else "smaller"
            raise UserError(f"{self.bin_dir}: split '{split}' has {tokens:,} tokens (largest shard {largest:,}) but "
                            f"one sample needs {seq_len + 1:,} in one shard; use a shorter seq_len, more data, or "
                            f"a {fraction} val_fraction (`babyllama data prepare --val-fraction`)")

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(self.window(index).astype(np.int64))
        return w[:-1], w[1:]

    def window(self, index: int) -> np.ndarray:
        """The `seq_len + 1` tokens of sample `index` (a view of the memory map)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        shard = int(np.searchsorted(self._ends, index, side="right"))
        local = index - (int(self._ends[shard - 1]) if shard else 0)
        start = local * (self.seq_len + 1)
        window = self._map(shard)[start:start + self.seq_len + 1]
        self._check_ids(window, shard, start)
        return window

    def _check_ids(self, window: np.ndarray, shard: int, start: int) -> None:
        """Shard sizes are checked when opening, contents only here (O(window) per sample, no corpus scan): an id
        beyond the vocabulary would otherwise fail deep inside the embedding (a device assert on CUDA)."""
        if window.max() >= self.vocab_size:
            bad = int(np.argmax(window >= self.vocab_size))
            raise UserError(f"{self._paths[shard]}: token {start + bad:,} is id {int(window[bad])}, beyond the "
                            f"vocabulary of {self.vocab_size:,} in meta.json; the file is corrupt: {_PREPARE_HINT}")

    def _map(self, shard: int) -> np.memmap:
        mm = self._maps[shard]
        if mm is None:
            mm = self._maps[shard] = np.memmap(self._paths[shard], dtype=self.dtype, mode="r")
        return mm

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = [None] * len(self._paths)  # each DataLoader worker maps the files itself
        return state


def build_pretrain_loader(bin_dir: str | Path, split: str, seq_len: int, batch_size: int, *, seed: int = 0,
                          rank: int = 0, world_size: int = 1, shuffle: bool = True, drop_last: bool = False,
                          num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader of `(x, y)` batches `[batch_size, seq_len]` for this rank (see the module docstring).

    `loader.sampler` is the `ResumableSampler` (get/set its state), `loader.dataset` the `TokenWindowDataset`,
    `loader.tokens_per_batch` = `batch_size * seq_len`. The last batch of a pass may be smaller, unless
    `drop_last`: then every pass is `num_samples // (world_size * batch_size)` full batches per rank, and rank `r`'s
    batch `k` holds the `r::world_size` slice of what one process with batch `world_size * batch_size` gets as
    its batch `k` (without it, the padding that evens out the ranks changes the last global batch).
    """
    dataset = TokenWindowDataset(bin_dir, split, seq_len=seq_len)
    if drop_last and len(dataset) < world_size * batch_size:  # else every pass would be empty: no step, ever
        raise UserError(f"{bin_dir}: split '{split}' has {len(dataset):,} windows of {seq_len + 1} tokens, fewer than "
                        f"one global batch ({world_size} x {batch_size}); use a smaller --batch-size or --seq-len, "
                        "or more data")
    sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                               drop_last=drop_last)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=pin_memory, persistent_workers=num_workers > 0, drop_last=drop_last)
    loader.tokens_per_batch = batch_size * seq_len
    return loader
