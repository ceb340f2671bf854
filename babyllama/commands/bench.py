"""Run a benchmark script of the repository's bench/ folder: `babyllama bench NAME [its flags]`.

    babyllama bench                                # lists them
    babyllama bench train_throughput --help

The scripts stay files under bench/ (each measures against a baseline in the same run; results and commands in
docs/performance.md), so they need a checkout of the repository, not only the installed package.
"""
from __future__ import annotations

import runpy
import sys

from babyllama.errors import UserError
from babyllama.shipped import REPO_ROOT

BENCH = REPO_ROOT / "bench"


def scripts() -> dict[str, str]:
    """name -> the first line of its docstring, for every runnable script in bench/."""
    found = {}
    for path in sorted(BENCH.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if '__name__ == "__main__"' in text:
            doc = text.split('"""')[1].strip().splitlines()[0] if text.startswith('"""') else ""
            found[path.stem] = doc
    return found


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    available = scripts()
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, available), default=0)
        print("usage: babyllama bench NAME [flags]   (NAME --help for its flags)\n\nbenchmarks:")
        print("\n".join(f"  {name:<{width}}  {doc}" for name, doc in available.items()))
        return
    name = argv[0].removesuffix(".py")
    if name not in available:
        raise UserError(f"no benchmark {name!r} in {BENCH}; choose one of {', '.join(available)}")
    sys.argv = [f"babyllama bench {name}", *argv[1:]]
    sys.path.insert(0, str(BENCH))  # as `python bench/NAME.py` has it: the scripts import their shared modules (jsonl)
    runpy.run_path(str(BENCH / f"{name}.py"), run_name="__main__")
