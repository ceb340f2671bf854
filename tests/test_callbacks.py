"""Callbacks on resume: the text log and TensorBoard drop what a killed run logged after its last checkpoint, the
checkpoint callback removes the temp file of a killed write; checkpoint renames are synced to disk."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from babyllama.train import callbacks as cb
from babyllama.train.checkpoint import atomic_save, save_checkpoint
from babyllama.train.distributed import DistEnv

ROOT = Path(__file__).resolve().parents[1]


def at_step(step: int, rank: int = 0) -> SimpleNamespace:
    """What the loggers read of a trainer (main rank unless told)."""
    return SimpleNamespace(env=DistEnv(rank=rank, world_size=rank + 1), step=step, epoch=0)


def logged_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_text_logger_drops_rows_past_the_resumed_step(tmp_path):
    path = tmp_path / "log.jsonl"
    logger = cb.TextLogger(path)
    for step in range(1, 6):
        logger.on_step_end(at_step(step), {"loss": 1.0 / step, "step": step})
    with path.open("a") as f:
        f.write('{"time": 1, "loss": 0.1')  # torn by a kill in the middle of a write
    resumed = at_step(3)
    logger.on_train_begin(resumed)
    assert logged_steps(path) == [1, 2, 3]
    assert not [p for p in tmp_path.iterdir() if p != path]  # the temp file of the rewrite is gone
    resumed.step = 4
    logger.on_step_end(resumed, {"loss": 0.2, "step": 4})
    assert logged_steps(path) == [1, 2, 3, 4]


def test_text_logger_keeps_a_log_that_ends_at_the_checkpoint(tmp_path):
    path = tmp_path / "log.jsonl"
    rows = "".join(json.dumps({"loss": 1.0, "step": s}) + "\n" for s in (1, 2))
    path.write_text(rows)
    cb.TextLogger(path).on_train_begin(at_step(2))
    assert path.read_text() == rows
    cb.TextLogger(path).on_train_begin(at_step(0))  # a fresh run in the same place starts a fresh log
    assert path.read_text() == ""


def test_tensorboard_resume_purges_events_after_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def log(trainer: SimpleNamespace, steps: range, loss: float) -> None:
        board = cb.TensorBoard(tmp_path)
        board.on_train_begin(trainer)
        for trainer.step in steps:
            board.on_step_end(trainer, {"loss": loss, "step": trainer.step})
        board.on_train_end(trainer)

    log(at_step(0), range(1, 6), loss=1.0)  # killed after step 5, last checkpoint at step 3
    log(at_step(3), range(4, 7), loss=2.0)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0),
                                                                         (5, 2.0), (6, 2.0)]


# the process dies inside torch.save, as under SIGKILL: no cleanup runs, the temp file stays
KILLED_WRITE = """
import os, sys
from babyllama.train.checkpoint import save_checkpoint

class Kill:
    def __reduce__(self):
        os._exit(9)

save_checkpoint(sys.argv[1], 3, {"model": Kill()})
"""


def test_checkpoint_callback_removes_the_temp_file_of_a_killed_write(tmp_path):
    save_checkpoint(tmp_path, 2, {"step": 2})
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(tmp_path)], cwd=ROOT, timeout=120)
    assert killed.returncode == 9
    (leftover,) = tmp_path.glob(".step_00000003.pt.*.tmp")
    callback = cb.Checkpoint(tmp_path)
    callback.on_train_begin(at_step(2, rank=1))  # only the main rank writes, and cleans up
    assert leftover.exists()
    callback.on_train_begin(at_step(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002.pt"]


def test_atomic_save_syncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    path, real_fsync, synced = tmp_path / "step_00000001.pt", os.fsync, []

    def fsync(fd: int) -> None:
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), path.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_save({"step": 1}, path)
    assert synced == [(False, False), (True, True)]  # the temp file's data, then the directory holding the rename


def test_atomic_save_where_directories_cannot_be_opened(tmp_path, monkeypatch):
    real_open = os.open

    def windows_open(name, flags, *args):
        if Path(name).is_dir():
            raise PermissionError(13, "Permission denied", str(name))
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", windows_open)
    atomic_save({"step": 1}, tmp_path / "step_00000001.pt")
    assert torch.load(tmp_path / "step_00000001.pt") == {"step": 1}
