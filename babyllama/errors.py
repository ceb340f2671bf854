"""User-facing errors: one line that names the file/line/field and says what to do.

Stage scripts catch `UserError` at the top level and print it without a traceback (see `cli.main_guard`).
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a file, a flag, a checkpoint); the message is shown as-is."""


def where(path: object, line: int | None = None) -> str:
    """Format a location as `path:line` (or just `path`) for error messages."""
    return f"{path}:{line}" if line is not None else f"{path}"
