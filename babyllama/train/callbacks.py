"""Callbacks: progress bar, text log, TensorBoard, periodic validation, checkpoints."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Iterable

from babyllama.errors import UserError
from babyllama.files import write_atomic
from babyllama.train.checkpoint import last_good_hint, remove_partial_writes
from babyllama.train.trainer import Callback, Trainer


class Evaluator(Callback):
    """Every `every` steps compute a validation metric and add it to the step's logs (a stage that wants a final
    value after training calls `compute` or `trainer.evaluate` itself).

    Place it before the loggers so they see the value. `fn(trainer) -> dict` for custom metrics (e.g. accuracy).
    """

    def __init__(self, loader: Iterable | None = None, every: int = 100, max_batches: int | None = 50,
                 name: str = "val_loss", fn: Callable[[Trainer], dict[str, float]] | None = None):
        self.loader, self.every, self.max_batches, self.name, self.fn = loader, every, max_batches, name, fn
        self.last: dict[str, float] = {}

    def compute(self, trainer: Trainer) -> dict[str, float]:
        out = self.fn(trainer) if self.fn else {}
        if self.loader is not None:
            out[self.name] = trainer.evaluate(self.loader, max_batches=self.max_batches)
        self.last = out
        return out

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        if trainer.step % self.every == 0:
            logs.update(self.compute(trainer))


class DivergenceGuard(Callback):
    """Stop at the first logged step whose loss or gradient norm is NaN/inf, or whose loss is above `spike_factor`
    x the mean of the previous `window` logged losses (0 = no spike check), with one line naming the step and the
    last good checkpoint in `directory`. Place it first: the bad step is then neither logged nor saved. Steps the
    trainer skipped (`skip_nonfinite`) are not a reason to stop."""

    def __init__(self, directory: str | Path, spike_factor: float = 0.0, window: int = 50):
        self.directory, self.spike_factor, self.window = directory, spike_factor, window
        self.recent: list[float] = []

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        if "loss" not in logs:
            return
        checked = ["loss"] + (["grad_norm"] if "grad_norm" in logs and not trainer.scaler.is_enabled() else [])
        bad = [f"{k} {logs[k]}" for k in checked if not math.isfinite(logs[k])]
        if bad and trainer.skip_nonfinite:
            return  # not applied to the weights; counted in skipped_steps
        mean = sum(self.recent) / len(self.recent) if self.recent else None
        if not bad and self.spike_factor and mean is not None and mean > 0 and logs["loss"] > self.spike_factor * mean:
            bad = [f"loss {logs['loss']:.4g} > {self.spike_factor:g} x {mean:.4g} (the mean of the previous "
                   f"{len(self.recent)} logged losses; --loss-spike-factor)"]
        if bad:
            raise UserError(f"step {trainer.step}: {', '.join(bad)}: training diverged and stopped; "
                            f"{last_good_hint(self.directory)}")
        self.recent = (self.recent + [logs["loss"]])[-self.window:]


class StopAt(Callback):
    """End training after step `step` while the learning-rate schedule still runs to --max-steps: a long run done
    in parts (`--resume` continues it), or the first steps of a published run replayed exactly."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        if trainer.step >= self.step:
            trainer.stop_training = True


class ProgressBar(Callback):
    def __init__(self, total_steps: int | None = None):
        self.total, self.bar = total_steps, None

    def on_train_begin(self, trainer: Trainer) -> None:
        if trainer.env.is_main:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=trainer.step, unit="step", dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "val_loss", "lr", "tokens_per_s")}
            if shown:
                self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()


class TextLogger(Callback):
    """One JSON object per logged step, appended to `path` (survives restarts: a resumed run appends).

    At the start of training, rows with a step beyond the trainer's (logged by a run killed after its last
    checkpoint, or a torn last line) are dropped, so a resumed run's log has each step once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, trainer: Trainer) -> None:
        if trainer.env.is_main and self.path.exists():
            self._keep_up_to(trainer.step)

    def _keep_up_to(self, step: int) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _logged_step(line) <= step]
        if len(kept) < len(lines):
            text = "".join(line if line.endswith("\n") else line + "\n" for line in kept)
            write_atomic(self.path, text.encode("utf-8"))  # a kill leaves the old log or the new one

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        if trainer.env.is_main and len(logs) > 1:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                # strict JSON: NaN/inf (a skipped step's loss) written as null
                row = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in logs.items()}
                f.write(json.dumps({"time": round(time.time(), 3), "epoch": trainer.epoch, **row}) + "\n")


Series = dict[str, tuple[list[int], list[float]]]  # metric -> (steps, values), steps ascending


def read_text_log(path: Path) -> Series:
    """The numeric fields of a TextLogger file by metric; a step logged twice keeps its last value. A line that is
    not a logged step (a torn write, another file) is a UserError naming it."""
    by_metric: dict[str, dict[int, float]] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: invalid JSON ({e.msg}), e.g. the torn last line of a killed run; "
                            "`--resume` of that stage trims it, or delete the line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path}:{n}: no integer 'step' field; is this a babyllama log.jsonl (TextLogger)?")
        for k, v in record.items():
            if k not in ("step", "time", "epoch") and isinstance(v, (int, float)):
                by_metric.setdefault(k, {})[record["step"]] = float(v)
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in by_metric.items()}


def _logged_step(line: str) -> float:
    """The step of a TextLogger row; infinity for a line torn by a kill (never kept)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class TensorBoard(Callback):
    """Scalars under `train/` (loss, lr, grad_norm, tokens_per_s, mfu, ...) and `val/` for validation metrics.

    A resumed run purges the events from its first step on, so the curves of a killed run do not double."""

    def __init__(self, log_dir: str | Path):
        self.log_dir, self.writer = Path(log_dir), None

    def on_train_begin(self, trainer: Trainer) -> None:
        if trainer.env.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.log_dir), purge_step=trainer.step + 1 if trainer.step else None)

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in logs.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                group = "val" if k.startswith(("val", "eval")) else "train"
                self.writer.add_scalar(f"{group}/{k}", v, trainer.step)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()


class Checkpoint(Callback):
    """Full-state checkpoint every `every` steps and at the end of training; keeps the newest `keep`. At the start,
    temp files of writes a kill interrupted are removed."""

    def __init__(self, directory: str | Path, every: int = 1000, keep: int | None = 3):
        self.directory, self.every, self.keep = str(directory), every, keep
        self.last_saved = -1

    def on_train_begin(self, trainer: Trainer) -> None:
        if trainer.env.is_main:
            remove_partial_writes(self.directory)

    def _save(self, trainer: Trainer) -> None:
        if trainer.step != self.last_saved:
            trainer.save_checkpoint(self.directory, self.keep)
            self.last_saved = trainer.step

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        if trainer.step % self.every == 0:
            self._save(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        self._save(trainer)
