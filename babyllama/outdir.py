"""Output directories that scripts write into: a non-empty one is never overwritten by accident, and a rename
into one is made durable (`fsync_dir`, `write_atomic`)."""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from babyllama.errors import UserError


def claim_out_dir(out: Path, overwrite: bool, what: str,
                  leftovers: Callable[[list[Path]], bool] = lambda entries: False) -> list[Path]:
    """The entries of `out` (none if it does not exist yet), after refusing a non-empty directory unless
    `overwrite` or `leftovers(entries)` (they are only what an interrupted write of ours left behind).

    Nothing is created or deleted here: a refused run leaves no trace, and which files to replace is the caller's."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another output directory")
    entries = list(out.iterdir()) if out.exists() else []
    if entries and not (overwrite or leftovers(entries)):
        raise UserError(f"{out} is not empty ({len(entries)} entries); pass --overwrite (overwrite=True) to replace "
                        f"its {what}, or choose another output directory")
    return entries


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX); skipped where that is unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows cannot open a directory
        return
    try:
        with contextlib.suppress(OSError):  # nor can every filesystem sync one
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file whose contents replace `path` whole or not at all, durably: it is a temp file
    `.<name>.<random>.tmp` beside `path`, fsynced and renamed over it when the block ends (then the rename is made
    durable), removed if the block raises. A kill can leave the temp file; `is_partial_write` recognises it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def is_partial_write(entry: Path, name_pattern: str) -> bool:
    """Whether `entry` is the temp file `atomic_file` left when killed while writing a file named like the
    regular expression `name_pattern`."""
    return re.fullmatch(rf"\.(?:{name_pattern})\..+\.tmp", entry.name) is not None
