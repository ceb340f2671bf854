"""Shared by the server tests: a tiny run on disk (tokenizer + stage checkpoints) and `serve/server.py` started on it
as a real process on 127.0.0.1."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import httpx
import torch

from babyllama.checkpoint import atomic_save
from babyllama.config import preset
from babyllama.model import Llama
from test_chat import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def tiny_run(out: Path, context: int = 512, ending: bool = True) -> Path:
    """out/baby/{tokenizer,pretrain,sft[,dpo]}: random tiny models (seeded, untied head) on a trained 512-token
    tokenizer.

    With `ending`, the dpo stage is a model that always answers `<|im_end|>` at once (every token's hidden state
    gets a large constant component that only that row of the head reads), for the model-ended replies."""
    run = out / "baby"
    with warnings.catch_warnings():  # "little text for the vocabulary": enough for these tests
        warnings.simplefilter("ignore")
        tok = make_tokenizer(run / "tokenizer")
    for seed, stage in enumerate(("pretrain", "sft", "dpo") if ending else ("pretrain", "sft")):
        torch.manual_seed(seed)
        # untied: a tied random model's greedy reply repeats its last prompt token ("\n" of the header) forever
        model = Llama(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=context, tie_embeddings=False))
        if stage == "dpo":
            with torch.no_grad():
                model.model.embed_tokens.weight[:, 0] = 100.0
                model.lm_head.weight[tok.token_to_id("<|im_end|>"), 0] = 10.0
        atomic_save({"model": model.state_dict(), "model_config": model.config.to_dict(),
                     "extra": {"tokenizer": tok.fingerprint}}, run / stage / "step_00000001.pt")
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(out: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`python serve/server.py --out OUT ...` on a free loopback port; yields its base URL once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve" / "server.py"), "--out", str(out), "--port",
                             str(port), "--device", "cpu", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stderr.read()}")
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
