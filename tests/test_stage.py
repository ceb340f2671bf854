"""Stage plumbing through pretrain/pretrain.py: --resume refuses what would change the data order (seed, batch
size, accumulation, world size) or another tokenizer, and allows extending the run (--max-steps, --lr)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_pretrain_cli import BATCH, Run, assert_user_error, digests, new_run

from babyllama.data.tokenizer import Tokenizer

CHECKPOINT = "step_00000002.pt"


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Run:
    run = new_run(tmp_path_factory.mktemp("two_steps"))
    proc = run.pretrain("--max-steps", "2")
    assert proc.returncode == 0, proc.stderr
    return run


def copy_of(run: Run, root: Path) -> Run:
    """`run`'s directory copied to `root`, reading the same corpus file (the token data names what it came from)."""
    shutil.copytree(run.root, root, dirs_exist_ok=True)
    return Run(root, run.corpus)


@pytest.mark.parametrize("flags,expected", [
    (["--batch-size", "2"], [f"--batch-size {BATCH} at save, 2 now; resume with the same value"]),
    (["--seed", "1", "--grad-accum", "2"], ["--seed 1337 at save, 1 now and --grad-accum 1 at save, 2 now"]),
], ids=["batch-size", "seed-and-grad-accum"])
def test_resume_refuses_another_data_order(two_steps, flags, expected):
    before = digests(two_steps.root)
    checkpoint = two_steps.out / "pretrain" / CHECKPOINT
    assert_user_error(two_steps.pretrain("--resume", *flags), f"checkpoint {checkpoint}: ", *expected,
                      "start a new run with --out")
    assert digests(two_steps.root) == before


def test_resume_may_extend_the_run(two_steps, tmp_path):
    run = copy_of(two_steps, tmp_path)
    proc = run.pretrain("--resume", "--max-steps", "4", "--lr", "1e-4")
    assert proc.returncode == 0, proc.stderr
    assert [step for step, _ in run.losses()] == [1, 2, 3, 4]
    saved = torch.load(run.out / "pretrain" / "step_00000004.pt", weights_only=False)["extra"]
    assert saved["data_order"] == {"seed": 1337, "batch_size": BATCH, "grad_accum": 1, "world_size": 1}
    assert saved["tokenizer"] == Tokenizer.load(run.out / "tokenizer").fingerprint


def test_resume_refuses_another_tokenizer(two_steps, tmp_path, other_tokenizer):
    run = copy_of(two_steps, tmp_path)
    for part in ("tokenizer", "data"):  # a retrained tokenizer (and the token data made with it)
        shutil.rmtree(run.out / part)
    shutil.copytree(other_tokenizer, run.out / "tokenizer")
    assert_user_error(run.pretrain("--resume"), f"checkpoint {run.out / 'pretrain' / CHECKPOINT} was trained with "
                      "another tokenizer", "start a new run with --out")


def test_checkpoint_without_a_data_order_resumes_as_before(two_steps, tmp_path):
    run = copy_of(two_steps, tmp_path)
    path = run.out / "pretrain" / CHECKPOINT
    state = torch.load(path, weights_only=False)
    del state["extra"]["data_order"]  # as written before the record was kept
    torch.save(state, path)
    proc = run.pretrain("--resume", "--batch-size", "2", "--max-steps", "3")
    assert proc.returncode == 0, proc.stderr
    assert [step for step, _ in run.losses()] == [1, 2, 3]
