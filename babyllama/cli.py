"""Command-line plumbing shared by the stage scripts: flags generated from a run-config dataclass, and a guard
that turns `UserError` into one line on stderr instead of a traceback."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import re
import sys
from typing import Any, Callable, Iterator, Sequence, TextIO, TypeVar

from babyllama.errors import UserError

T = TypeVar("T")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--field-name` flag per dataclass field; unset flags stay None so the preset's value wins."""
    for f in dataclasses.fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), str(f.type)
        if kind.startswith("list"):
            parser.add_argument(flag, nargs="+", default=None, help="(default: from the preset)")
        else:
            # a plain `str` field keeps "none" as a value (--mixed-precision none); `str | None` fields read it as None
            conv = str if kind == "str" else {"int": int, "float": float, "bool": _parse_bool}.get(
                kind.split(" ")[0], _str_or_none)
            parser.add_argument(flag, type=conv, default=None, help="(default: from the preset)")


DEVICES = ("auto", "cpu", "cuda", "mps")


def add_device_flag(parser: argparse.ArgumentParser, purpose: str = "") -> None:
    """--device, resolved by `train.distributed.pick_device`; `purpose` prefixes the help ("for --evaluate: ")."""
    parser.add_argument("--device", default="auto", help=f"{purpose}auto (MPS, else CUDA, else CPU), cpu, cuda, mps")


def add_flag(parser: argparse.ArgumentParser, flag: str, *old_spellings: str, **kwargs: Any) -> argparse.Action:
    """`parser.add_argument(flag, **kwargs)` that also accepts earlier names of the same flag (`old_spellings`),
    so commands written for them keep working; --help shows only `flag`."""
    action = parser.add_argument(flag, **kwargs)
    same = {k: v for k, v in kwargs.items() if k not in ("help", "default", "required", "dest")}
    for old in old_spellings:
        parser.add_argument(old, **same, dest=action.dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS)
    return action


def apply_overrides(cfg: T, args: argparse.Namespace) -> T:
    """Replace the preset's fields by the flags the user gave."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cfg) if getattr(args, f.name, None) is not None}
    return dataclasses.replace(cfg, **given)


Rule = tuple[str, Callable[[Any], bool], str]  # (field, test, what the value must be)


def check_ranges(values: Any, rules: Sequence[Rule]) -> None:
    """One line naming the first flag (`--field-name`) out of its range; NaN fails every comparison."""
    for name, ok, rule in rules:
        value = getattr(values, name)
        if not ok(value):
            shown = " ".join(map(str, value)) if isinstance(value, list) else value  # as typed (nargs="+")
            raise UserError(f"--{name.replace('_', '-')} {shown}: must be {rule}")


_UNDECODABLE = re.compile("[\ud800-\udfff]")  # how Python holds bytes that are not UTF-8 (surrogateescape)
_noted: set[str] = set()


def valid_text(text: str, source: str) -> str:
    """`text` (from argv or stdin) with each byte that is not UTF-8 replaced by U+FFFD, said once per source on
    stderr: a tokenizer cannot encode such bytes, and dropping the input would lose the rest of it."""
    fixed, n = _UNDECODABLE.subn("\ufffd", text)
    if n and source not in _noted:
        _noted.add(source)
        print(f"note: {source} is not valid UTF-8; undecodable bytes were replaced by U+FFFD", file=sys.stderr)
    return fixed


def read_lines(stream: TextIO, prompt: str) -> Iterator[str]:
    """Lines (newline stripped, `valid_text`) from a terminal, after `prompt`, or from a pipe, until end of input."""
    if hasattr(stream, "reconfigure"):  # undecodable bytes reach `valid_text` whatever the locale's error handler
        stream.reconfigure(errors="surrogateescape")
    tty = stream.isatty()
    while True:
        try:
            line = input(prompt) if tty else stream.readline()
        except EOFError:
            print()
            return
        if not tty and not line:
            return
        yield valid_text(line.rstrip("\n"), "the input")


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _str_or_none(s: str) -> str | None:
    return None if s.lower() == "none" else s


def _close_progress_bars() -> None:
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(tqdm._instances):  # noqa: SLF001 (tqdm keeps its open bars here; no public accessor)
            bar.close()


def main_guard(main: Callable[[], Any]) -> None:
    """Run `main`; a UserError prints `error: ...` and exits 2 (no traceback for bad input)."""
    try:
        main()
    except UserError as e:
        _close_progress_bars()  # a run stopped mid-training: the error gets a line of its own
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        _close_progress_bars()
        print(f"error: no space left on the device of {e.filename or 'the output'}; free some space or pass "
              "another --out, then run again (a stage continues with --resume)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        sys.exit(130)
