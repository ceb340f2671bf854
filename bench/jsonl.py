"""Result rows of the benchmarks: printed as JSON and appended to the --dest file as each one is measured.

The rows measured before a time limit stops a run are thus kept."""
from __future__ import annotations

import json


def emit(row: dict, out: str | None) -> None:
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
