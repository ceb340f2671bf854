"""Output directories that scripts write into: a non-empty one is never overwritten by accident, and a rename
into one is made durable (`fsync_dir`, `write_atomic`); a file (`atomic_file`) or a directory (`staged_dir`) is
written beside its place and renamed there only when complete."""
from __future__ import annotations

import atexit
import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from babyllama.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: there is no way to read it without setting it
LOCK_FILE = ".lock"
_held_locks: dict[Path, int] = {}  # directory -> open descriptor holding its lock, for the life of the process


def hold_lock(directory: Path, what: str = "run", flag: str = "--out") -> None:
    """Lock `directory` for this process until it exits (flock on <directory>/.lock, which names `what` holds it and
    its PID): a second run on the same directory stops with one line naming the holder and `flag`, the option that
    chose `directory` (the stages' --out). The kernel drops the lock when its process dies, so a killed run's lock
    never needs cleaning up. At exit the lock file goes, and so do the directories made for it if nothing else was
    written there (a refused run leaves no trace). Local filesystems only (flock is unreliable on NFS)."""
    taken = _acquire(Path(directory).resolve(), what, flag)
    if taken is not None:
        atexit.register(_release, *taken)


@contextlib.contextmanager
def locked(directory: Path, what: str, flag: str = "--dest") -> Iterator[None]:
    """`hold_lock` for the duration of a block (a library call that builds `directory`: a tokenizer or token data,
    chosen by `babyllama data`'s --dest), unless this process holds it already."""
    taken = _acquire(Path(directory).resolve(), what, flag)
    try:
        yield
    finally:
        if taken is not None:
            _release(*taken)


def _acquire(directory: Path, what: str, flag: str) -> tuple[Path, int, list[Path]] | None:
    if fcntl is None or directory in _held_locks:
        return None
    made = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "run (PID unknown)"
            os.close(fd)
            raise UserError(f"{directory} is in use by another {holder}; wait for it to finish, "
                            f"or pass another {flag}") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # else its holder removed the file as we opened it: lock the new one
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{what} (PID {os.getpid()} on {socket.gethostname()})".encode())
    _held_locks[directory] = fd
    return path, fd, made


def _release(path: Path, fd: int, made: list[Path]) -> None:
    _held_locks.pop(path.parent, None)
    path.unlink(missing_ok=True)
    os.close(fd)
    for directory in made:  # innermost first; stops at the first that holds anything
        try:
            directory.rmdir()
        except OSError:
            break


# a write the filesystem refused: what happened (where: the directory written to), and what makes room
_REFUSED_WRITES = {errno.ENOSPC: ("no space left on the device of", "free some space (older runs, checkpoints)"),
                   errno.EFBIG: ("file size limit (ulimit -f) exceeded in", "raise the limit (ulimit -f unlimited)")}
if hasattr(errno, "EDQUOT"):  # not on Windows
    _REFUSED_WRITES[errno.EDQUOT] = ("disk quota exceeded on the device of",
                                     "free some of your quota (or have it raised)")


def refused_write(error: BaseException | None) -> OSError | None:
    """The OSError of a write refused for space, quota or file size (ENOSPC, EDQUOT, EFBIG): `error` itself or one
    it was raised from or while handling (torch.save raises a RuntimeError while handling it); else None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in _REFUSED_WRITES:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def refused_write_line(error: OSError, path: Path | None = None) -> str:
    """`refused_write`'s error as one line: what happened, to which file (the error's, else `path`; in a
    `staged_dir`, the file it becomes), what to do."""
    what, fix = _REFUSED_WRITES[error.errno]
    file = Path(os.fsdecode(error.filename)) if error.filename else path
    file = _meant(file) if file else None
    where = f"{file.parent} while writing {file.name}" if file else "the output"
    return (f"{what} {where}; {fix} or write elsewhere (another --out or --dest), then run again (a training stage "
            "continues with --resume)")


def io_error_of(error: BaseException, path: Path) -> OSError | None:
    """The OSError behind an I/O error that a Rust library (safetensors, tokenizers) raises as a bare Exception
    "... (os error N)", for the file it was writing (`path`); None for any other error."""
    code = re.search(r"\(os error (\d+)\)", str(error))
    return OSError(int(code[1]), os.strerror(int(code[1])), str(path)) if code else None


def _short_write_refusal(fd: int, error: BaseException) -> OSError | None:
    """Why a write into the file `fd` came up short, where the writer said so without the errno (numpy's `tofile`,
    which GGUF writers use: "N requested and M written"): one more byte written past the end of the file (a temp
    file that is removed next) asks the kernel again, and a refusal for space, quota or size is the answer. None for
    other errors, or when the kernel takes the byte now."""
    if not _is_short_write(error) or not hasattr(os, "pwrite"):  # no pwrite on Windows
        return None
    try:
        os.pwrite(fd, b"\0", os.fstat(fd).st_size)
    except OSError as e:
        return e if e.errno in _REFUSED_WRITES else None
    return None


def _is_short_write(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno is None and " written" in str(error)


def raise_if_disk_full(path: Path, error: BaseException) -> None:
    """A write to `path` refused for space, quota or file size as one line (a UserError). torch.save keeps the
    OSError only as the context of its "file write failed"; without one (or for a short write that
    `_short_write_refusal` could not explain), under 1 MiB free decides. A UserError is one line already (that of
    a nested write, which names its own file): left as it is."""
    if isinstance(error, UserError):
        return
    refused = refused_write(error)
    if refused is None and (isinstance(error, RuntimeError) and "write" in str(error) or _is_short_write(error)):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(path.parent).free < 1 << 20:
                refused = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if refused is not None:
        raise UserError(refused_write_line(refused, path)) from None


def claim_out_dir(out: Path, overwrite: bool, what: str,
                  leftovers: Callable[[list[Path]], bool] = lambda entries: False) -> list[Path]:
    """The entries of `out` (none if it does not exist yet), after refusing a non-empty directory unless
    `overwrite` or `leftovers(entries)` (they are only what an interrupted write of ours left behind).

    Nothing is created or deleted here: a refused run leaves no trace, and which files to replace is the caller's."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another output directory")
    entries = [p for p in out.iterdir() if p.name != LOCK_FILE] if out.exists() else []  # our own lock is no content
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
    durable), removed if the block raises. A kill can leave the temp file; `is_partial_write` recognises it.
    A short write reported without its errno (numpy's) is asked about again (`_short_write_refusal`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    mode_like_open(tmp)  # mkstemp's 0600 would make checkpoints private
    try:
        with open(tmp, "wb") as f:  # f.name: the temp file, for a writer that opens files by name (gguf's)
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
            except Exception as e:
                refused = _short_write_refusal(f.fileno(), e)
                if refused is None:
                    raise
                raise refused from e
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        raise_if_disk_full(path, e)
        raise
    fsync_dir(path.parent)


def mode_like_open(path: Path) -> None:
    """Give a file written as 0600 (mkstemp's, safetensors') the mode `open()` gives: 0666 less the umask."""
    os.chmod(path, 0o666 & ~_UMASK)


def write_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def is_partial_write(entry: Path, name_pattern: str) -> bool:
    """Whether `entry` is the temp file `atomic_file` left when killed while writing a file named like the
    regular expression `name_pattern`."""
    return re.fullmatch(rf"\.(?:{name_pattern})\..+\.tmp", entry.name) is not None


_staged: dict[Path, Path] = {}  # temp directory of a `staged_dir` being written -> the directory it becomes


@contextlib.contextmanager
def staged_dir(out: Path, replaces: Callable[[Path], bool] = lambda entry: False) -> Iterator[Path]:
    """A directory whose new contents arrive whole or not at all: the block writes them into a temp directory
    `.<name>.<random>.tmp` beside `out`. When the block ends they are made durable and put in place: the temp
    directory is renamed to `out` if there is none yet, else each entry is renamed over its namesake in `out`
    (a directory is set aside first), then the entries of `out` for which `replaces(entry)` holds and that the new
    contents lack are removed; others are left alone. If the block raises, the temp directory goes and `out` is as
    it was; a write refused for space, quota or file size is one line naming the file in `out` (a UserError).
    Which existing directory may be written over is the caller's (`claim_out_dir`)."""
    out, where = Path(out), Path(os.path.abspath(out))  # `where` has a name and a parent even for "."
    made = [p for p in where.parents if not p.exists()]
    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=where.parent, prefix=f".{where.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_UMASK)
    _staged[Path(os.path.abspath(tmp))] = out
    try:
        yield tmp
        _sync_tree(tmp)
        if not out.exists():
            os.rename(tmp, out)
            fsync_dir(where.parent)
            return
        new = {entry.name for entry in tmp.iterdir()}
        for entry in tmp.iterdir():
            _put(entry, out / entry.name)
        for entry in out.iterdir():
            if entry.name not in new and replaces(entry):
                _remove(entry)
        tmp.rmdir()
        fsync_dir(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in made:  # innermost first: a refused write leaves no trace
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise_if_disk_full(out, e)
        raise
    finally:
        del _staged[Path(os.path.abspath(tmp))]


def _meant(path: Path) -> Path:
    """`path`, or for a file inside a `staged_dir` being written, the file it becomes (what an error names)."""
    absolute = Path(os.path.abspath(path))
    for tmp, out in _staged.items():
        if absolute.is_relative_to(tmp):
            return out / absolute.relative_to(tmp)
    return path


def _sync_tree(directory: Path) -> None:
    """fsync every file and directory under `directory` (before it is renamed into place)."""
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            _sync_tree(entry)
        elif entry.is_file():
            fd = os.open(entry, os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(directory)


def _put(new: Path, dest: Path) -> None:
    """Rename `new` to `dest`; an existing `dest` that a rename cannot replace (a directory, or a file where `new`
    is a directory) is renamed aside first and removed after."""
    aside = None
    if dest.exists() and (new.is_dir() or (dest.is_dir() and not dest.is_symlink())):
        aside = dest.with_name(f".{dest.name}.{os.urandom(4).hex()}.old")
        os.rename(dest, aside)
    os.replace(new, dest)
    if aside is not None:
        _remove(aside)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()
