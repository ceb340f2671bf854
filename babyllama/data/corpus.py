"""Corpus readers: stream documents (strings) out of users' pretraining corpora and the shipped corpus.

`iter_documents(path, fmt="auto", field="text")` yields one string per document; `path` is a file, a directory
(every supported file under it, recursively, in sorted order; hidden files and other extensions are skipped) or
a glob. Files are streamed: memory stays at about one document (one row batch for parquet) whatever the size.

| fmt | file | one document is |
|---|---|---|
| `txt` | `.txt`, `.text` (+ `.gz`) | a block of lines between blank lines, or a line (see below) |
| `jsonl`, `json` | `.jsonl`, `.ndjson`, `.json` (+ `.gz`) | `record[field]` of each JSON line or JSON array element |
| `baidubaike` | 563w_baidubaike.json (JSON lines) | `{"title", "summary", "sections": [{"title", "content"}]}` joined |
| `wikipedia-cn` | wikipedia-cn-20230720-filtered.json (JSON array) | `record["completion"]` |
| `c4` | c4-train.*.json.gz (JSON lines) | `record["text"]` |
| `parquet` | `.parquet` | the `field` column, read in row batches |

A `txt` file without any blank line is read as one document per line. A `jsonl` or `json` file holds JSON lines
or one top-level JSON array (told apart by the first character). baidubaike's fields are joined with newlines.

`fmt="auto"` picks by extension, then for JSON by the keys of the first record: `sections` + `summary` is
baidubaike; with the default `field="text"`, a record without `text` but with `completion` (wikipedia-cn) or
`content` uses that key (also for parquet columns). Empty or null values are skipped.

`iter_records(path)` yields the dicts of JSON-lines files such as the shipped `data/corpus/*.jsonl`
(each has `text`).

Bad input raises `UserError` with `path:line` and what to do: a missing file, no documents at all, invalid JSON,
a missing field (naming the keys that exist), an unsupported extension, text that is not UTF-8.
"""
from __future__ import annotations

import argparse
import glob
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Iterator

from babyllama.cli import add_flag
from babyllama.data.jsonl import decoding, json_objects, open_text
from babyllama.errors import UserError
from babyllama.shipped import CORPUS

FORMATS = ("auto", "txt", "jsonl", "json", "baidubaike", "wikipedia-cn", "c4", "parquet")
_SUFFIX_FORMAT = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
                  ".parquet": "parquet"}
_FIELD_FALLBACKS = ("completion", "content")  # tried, in order, when the default `text` is absent


# ======================================================================= public API
def iter_documents(path: str | Path, fmt: str = "auto", field: str = "text") -> Iterator[str]:
    """Documents of a file, a directory or a glob, in order; see the module docstring for formats."""
    if fmt not in FORMATS:
        raise UserError(f"unknown corpus format {fmt!r}; choose one of {', '.join(FORMATS)}")
    found = False
    for file in resolve_files(path):
        for doc in _iter_file(file, fmt, field):
            found = True
            yield doc
    if not found:
        raise UserError(f"{path}: no documents (empty files or empty `{field}` values); "
                        "check the path and --corpus-field")


def add_corpus_flags(parser: argparse.ArgumentParser) -> None:
    """--corpus / --corpus-format / --corpus-field of `babyllama data` (pretraining has them in `PretrainConfig`);
    the earlier spellings --input / --format / --field still work."""
    add_flag(parser, "--corpus", "--input", nargs="+", default=[str(CORPUS / "*_train.jsonl")],
             help="corpus files, directories or globs (default: the shipped training files)")
    add_flag(parser, "--corpus-format", "--format", default="auto", choices=FORMATS,
             help="corpus format (default: by extension)")
    add_flag(parser, "--corpus-field", "--field", default="text",
             help="JSON/parquet field holding the text (default: text)")


def iter_corpus(paths: Iterable[str | Path], fmt: str = "auto", field: str = "text") -> Iterator[str]:
    """Documents of several files / directories / globs, in the order given."""
    for path in paths:
        yield from iter_documents(path, fmt, field)


def iter_records(path: str | Path) -> Iterator[dict]:
    """The JSON objects of JSON-lines (or JSON-array) files, e.g. the shipped corpus; each must have `text`."""
    found = False
    for file in resolve_files(path):
        if file_format(file) not in ("jsonl", "json"):
            raise UserError(f"{file}: expected a .jsonl file of records (the shipped corpus schema)")
        for loc, record in json_objects(file):
            if "text" not in record:
                raise UserError(f"{loc}: record has no 'text' (keys: {_keys(record)}); "
                                "expected the shipped corpus schema (see data/corpus/README.md)")
            found = True
            yield record
    if not found:
        raise UserError(f"{path}: no records (rebuild the shipped corpus: babyllama data build corpus --shipped)")


def resolve_files(path: str | Path) -> list[Path]:
    """The supported files that `path` names: the file itself, those under a directory, or a glob's matches."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _is_data_file(f, p))
        if not files:
            raise UserError(f"{p}: directory has no corpus files ({', '.join(_SUFFIX_FORMAT)}, optionally .gz)")
        return files
    if p.exists():
        return [p]
    if any(c in str(path) for c in "*?["):
        files = [Path(f) for f in sorted(glob.glob(str(path), recursive=True)) if Path(f).is_file()]
        if not files:
            raise UserError(f"{path}: no file matches this pattern")
        return files
    raise UserError(f"{path}: no such file or directory; check the corpus path")


def file_format(path: Path) -> str:
    """The format an extension stands for (`.gz` is looked through); UserError if unsupported."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    fmt = _SUFFIX_FORMAT.get(suffixes[-1]) if suffixes else None
    if fmt is None or (fmt == "parquet" and path.suffix.lower() == ".gz"):
        raise UserError(f"{path}: unsupported extension; use {', '.join(_SUFFIX_FORMAT)} (text and JSON may be .gz)")
    return fmt


# ======================================================================= dispatch
def _is_data_file(f: Path, root: Path) -> bool:
    if any(part.startswith(".") for part in f.relative_to(root).parts):
        return False
    try:
        file_format(f)
    except UserError:
        return False
    return True


def _iter_file(path: Path, fmt: str, field: str) -> Iterator[str]:
    kind = file_format(path) if fmt == "auto" else fmt
    if kind == "txt":
        return _txt_documents(path)
    if kind == "parquet":
        return _parquet_documents(path, field, auto=fmt == "auto")
    if kind == "wikipedia-cn":
        kind, field = "json", "completion"
    elif kind == "c4":
        kind = "json"
    return _json_documents(path, kind, field, auto=fmt == "auto")


# ======================================================================= txt
def _txt_documents(path: Path) -> Iterator[str]:
    if not _has_blank_line(path):
        with open_text(path) as f:
            yield from (line.strip() for line in decoding(path, f) if line.strip())
        return
    block: list[str] = []
    with open_text(path) as f:
        for line in decoding(path, f):
            if line.strip():
                block.append(line.rstrip())
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)


def _has_blank_line(path: Path) -> bool:
    """A blank line separates documents; without one, each line is a document (one-document-per-line dumps).
    Stops at the first blank line, so blank-separated files cost nothing extra."""
    with open_text(path) as f:
        return any(not line.strip() for line in decoding(path, f))


# ======================================================================= JSON
def _json_documents(path: Path, kind: str, field: str, auto: bool) -> Iterator[str]:
    values = json_objects(path)
    first = next(values, None)
    if first is None:
        return
    loc, record = first
    if auto and field == "text" and {"sections", "summary"} <= record.keys():
        kind = "baidubaike"
    elif auto:
        field = _pick_field(record.keys(), field)
    for loc, record in chain([first], values):
        text = _baidubaike_text(record, loc) if kind == "baidubaike" else _field_text(record, field, loc)
        if text:
            yield text


def _pick_field(keys: Iterable[str], field: str) -> str:
    keys = set(keys)
    if field in keys or field != "text":
        return field
    return next((k for k in _FIELD_FALLBACKS if k in keys), field)


def _field_text(record: dict, field: str, loc: str) -> str:
    if field not in record:
        raise UserError(f"{loc}: record has no field '{field}' (keys: {_keys(record)}); "
                        "pass the right one with --corpus-field")
    return _as_text(record[field], field, loc)


def _baidubaike_text(record: dict, loc: str) -> str:
    if "sections" not in record and "summary" not in record:
        raise UserError(f"{loc}: not a baidubaike record (keys: {_keys(record)}); "
                        "expected title, summary, sections")
    parts = [_as_text(record.get("title"), "title", loc), _as_text(record.get("summary"), "summary", loc)]
    for section in record.get("sections") or []:
        if not isinstance(section, dict):
            raise UserError(f"{loc}: 'sections' must hold objects with title and content")
        parts += [_as_text(section.get("title"), "sections.title", loc),
                  _as_text(section.get("content"), "sections.content", loc)]
    return "\n".join(p for p in parts if p)


def _as_text(value: Any, field: str, loc: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{loc}: field '{field}' is a {type(value).__name__}, expected a string")
    return value.strip()


def _keys(record: dict) -> str:
    return ", ".join(map(str, list(record)[:20])) or "none"


# ======================================================================= parquet
def _parquet_documents(path: Path, field: str, auto: bool) -> Iterator[str]:
    import pyarrow.parquet as pq  # optional at import time; only parquet users need it

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserError(f"{path}: not a readable parquet file ({e})") from e
    columns = pf.schema_arrow.names
    column = _pick_field(columns, field) if auto else field
    if column not in columns:
        raise UserError(f"{path}: no column '{field}' (columns: {', '.join(columns[:20])}); "
                        "pass the right one with --corpus-field")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):
        for value in batch.column(0).to_pylist():
            row += 1
            text = _as_text(value, column, f"{path} row {row}")
            if text:
                yield text
