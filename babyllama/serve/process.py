"""`babyllama serve` as a background process on a free loopback port: for the tests, the serving benchmark and the
docs' screenshot, which all talk to a real server."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

from babyllama.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_background(out: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`babyllama serve --out OUT ...` on a free loopback port; yields its base URL once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "babyllama", "serve", "--out", str(out), "--port",
                             str(port), "--device", "cpu", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise _exited(proc.returncode, proc.stderr.read())
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{url}/health", timeout=1)  # any answer (401 with a key) means it listens
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not answer /health within 60 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _exited(returncode: int, stderr: str) -> Exception:
    """The server's own `error: ...` line as a UserError (a bad --out, --name, --stage); anything else (a crash with
    a traceback) as a RuntimeError with all of stderr."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if lines and lines[-1].startswith("error: "):
        return UserError(lines[-1].removeprefix("error: "))
    return RuntimeError(f"the server exited ({returncode}): {stderr}")
