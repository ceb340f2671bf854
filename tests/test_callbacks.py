"""Callbacks on resume: the text log and TensorBoard drop what a killed run logged after its last checkpoint."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from babyllama import callbacks as cb
from babyllama.distributed import DistEnv


def at_step(step: int) -> SimpleNamespace:
    """What the loggers read of a trainer (main rank)."""
    return SimpleNamespace(env=DistEnv(), step=step, epoch=0)


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
