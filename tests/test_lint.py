"""The repository passes `ruff check` (pyproject.toml [tool.ruff]: 120 columns, pyflakes, import order, likely bugs),
so the README's test command and .ci/run lint every file."""
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff")
    assert ruff, "ruff is a test dependency: pip install -r requirements.txt"
    proc = subprocess.run([ruff, "check", "--output-format", "concise", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
