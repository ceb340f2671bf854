"""Output directories that scripts write into: a non-empty one is never overwritten by accident."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

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
