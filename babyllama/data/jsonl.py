"""The one JSON-lines reader: every data file the library reads (corpus records, SFT conversations, preference
pairs, evaluation items) goes through `json_values` or `json_objects`.

A file is JSON lines (one value per line; blank lines skipped) or one top-level JSON array, told apart by its
first character; `.gz` is read through; a BOM is tolerated. It is streamed: memory stays at about one element
whatever the file's size. Each value comes with its `path:line`, and bad input raises `UserError` naming it.
"""
from __future__ import annotations

import gzip
import json
from itertools import chain
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from babyllama.errors import UserError, where

_CHUNK = 1 << 20
_MAX_JSON_ELEMENT = 256 << 20  # a JSON-array element larger than this is treated as malformed input


def open_text(path: Path) -> IO[str]:
    try:
        if path.suffix.lower() == ".gz":
            return gzip.open(path, "rt", encoding="utf-8-sig")
        return open(path, encoding="utf-8-sig")  # tolerate a BOM
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from e


def decoding(path: Path, lines: Iterable[str]) -> Iterator[str]:
    """Turn decoding failures in the middle of a stream into a UserError."""
    try:
        yield from lines
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason}); convert it to UTF-8") from e
    except (OSError, EOFError) as e:  # truncated or corrupt .gz
        raise UserError(f"{path}: cannot read ({e}); is the file complete?") from e


def json_values(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(`path:line`, value) for each JSON line, or each element of a top-level JSON array."""
    path = Path(path)
    with open_text(path) as f:
        lines = decoding(path, f)
        head = next(lines, None)
        lineno = 1
        while head is not None and not head.strip():  # leading blank lines
            head, lineno = next(lines, None), lineno + 1
        if head is None:
            return
        head = head.lstrip()  # only spaces: it is the first line with text
        if head.startswith("["):
            values = _json_array(path, chain([head[1:]], lines), lineno)
        else:
            values = _json_lines(path, chain([head], lines), lineno)
        yield from values


def json_objects(path: str | Path) -> Iterator[tuple[str, dict]]:
    """`json_values` where every value must be a JSON object."""
    for loc, value in json_values(path):
        if not isinstance(value, dict):
            raise UserError(f"{loc}: expected a JSON object, got {type(value).__name__}")
        yield loc, value


def _json_lines(path: Path, lines: Iterable[str], first_lineno: int) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(lines, first_lineno):
        if line.strip():
            try:
                yield where(path, lineno), json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where(path, lineno)}: invalid JSON ({e.msg} at column {e.colno}); "
                                "expected JSON lines (one object per line) or a JSON array") from e


def _json_array(path: Path, lines: Iterable[str], line: int) -> Iterator[tuple[str, Any]]:
    """Elements of a top-level JSON array (its `[` already consumed), decoded one by one from a sliding buffer,
    never the whole file. `line` is the line number of buf[pos]."""
    decoder, reader = json.JSONDecoder(), _chunks(lines)
    buf, pos = "", 0
    while True:
        pos, line = _skip_separators(buf, pos, line)
        if pos == len(buf):
            buf, pos = next(reader, None), 0
            if buf is None:
                raise UserError(f"{where(path, line)}: JSON array is not closed with ']'; is the file complete?")
            continue
        if buf[pos] == "]":
            return
        try:
            value, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as e:  # an element cut by the buffer end, or malformed: read on to tell
            more = next(reader, None)
            if more is None or len(buf) - pos > _MAX_JSON_ELEMENT:
                raise UserError(f"{where(path, line + buf.count(chr(10), pos, e.pos))}: invalid JSON ({e.msg}) "
                                "in the JSON array") from e
            buf, pos = buf[pos:] + more, 0
            continue
        yield where(path, line), value
        line += buf.count("\n", pos, end)
        pos = end


def _chunks(lines: Iterable[str]) -> Iterator[str]:
    buf: list[str] = []
    size = 0
    for line in lines:
        buf.append(line)
        size += len(line)
        if size >= _CHUNK:
            yield "".join(buf)
            buf, size = [], 0
    if buf:
        yield "".join(buf)


def _skip_separators(buf: str, pos: int, line: int) -> tuple[int, int]:
    while pos < len(buf) and (buf[pos].isspace() or buf[pos] == ","):
        line += buf[pos] == "\n"
        pos += 1
    return pos, line
