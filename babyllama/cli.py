"""Command-line plumbing shared by the stage scripts: flags generated from a run-config dataclass, and a guard
that turns `UserError` into one line on stderr instead of a traceback."""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Any, Callable, Iterator, NoReturn, Sequence, TextIO, TypeVar

from babyllama.errors import UserError
from babyllama.shipped import portable

T = TypeVar("T")


def set_program(words: list[str], argv: list[str]) -> None:
    """Name the running job as typed (`["babyllama", "sft"]`) with its own arguments `argv`: argparse's usage lines
    take the name from sys.argv[0], and the run record writes sys.argv as the command
    (`train.run_record.command_line`)."""
    sys.argv[:] = [" ".join(words), *argv]


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose own errors (a missing value, a bad type or choice, an unknown flag) are one line on
    stderr, exit 2, as every other bad input is, instead of the usage block and the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} ({self.prog} --help lists the flags)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each flag's default after its help (when it has one worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {_shown(action.default)})"


def as_typed(value: Any) -> str:
    """A setting's value as a user types it: a list space-separated, a path inside the repository relative to it
    (as the docs and the run record write it)."""
    value = portable(value)
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _shown(value: Any) -> str:
    """`value` in a --help text (argparse formats help with %)."""
    return as_typed(value).replace("%", "%%")


def add_dataclass_flags(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """One `--field-name` flag per field of the dataclass instance `defaults`, in an argument group per class that
    declares fields (titled by its docstring's first line), each help ending with the value the run will take.
    Unset flags stay None, so `apply_overrides` knows what was given; a bool flag alone means true."""
    owners: dict[str, type] = {}
    for cls in type(defaults).__mro__[::-1]:  # the most basic class that declares a field owns it
        for name in vars(cls).get("__annotations__", {}):
            owners.setdefault(name, cls)
    groups: dict[type, Any] = {}
    for f in dataclasses.fields(defaults):
        owner = owners.get(f.name, type(defaults))
        if owner not in groups:
            title = " ".join((owner.__doc__ or owner.__name__).split()).split(". ")[0].rstrip(".")
            groups[owner] = parser.add_argument_group(title)
        # the help is declared once, by the owner; a stage's config only changes the default
        declared = getattr(owner, "__dataclass_fields__", {}).get(f.name, f)
        flag, kind, value = "--" + f.name.replace("_", "-"), str(f.type), getattr(defaults, f.name)
        shown = f" (default: {_shown(value)})" if value is not None else ""
        spec: dict[str, Any] = dict(default=None, help=declared.metadata.get("help", "") + shown)
        if kind.startswith("list"):
            spec["nargs"] = "+"
        elif kind == "bool":
            spec.update(type=_parse_bool, nargs="?", const=True)
        else:
            # a plain `str` field keeps "none" as a value (--mixed-precision none); `str | None` fields read it as None
            spec["type"] = str if kind == "str" else {"int": int, "float": float}.get(kind.split(" ")[0], _str_or_none)
        add_flag(groups[owner], flag, *declared.metadata.get("aliases", ()), **spec)


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


def _refused_write_line(e: Exception) -> str | None:
    """One line for a write refused for space, quota or file size (ENOSPC, EDQUOT, EFBIG), the OSError raised as
    is or kept as the context of another (torch.save's RuntimeError); None for any other error."""
    from babyllama.files import refused_write, refused_write_line

    refused = refused_write(e)
    return refused_write_line(refused) if refused is not None else None


def main_guard(main: Callable[[], Any]) -> None:
    """Run `main`; a UserError, or a write refused for space, quota or file size, prints `error: ...` and exits 2
    (no traceback for bad input or a full disk)."""
    try:
        main()
    except UserError as e:
        _close_progress_bars()  # a run stopped mid-training: the error gets a line of its own
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (a training stage continues with --resume, a chain when run again)", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        line = _refused_write_line(e)
        if line is None:
            raise
        _close_progress_bars()
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
