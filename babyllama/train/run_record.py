"""The record of a stage run, `run.json` beside its log.jsonl: what a published log needs to be reproduced
(the exact command, every flag and config value, the git commit, software versions, the CPU/GPU and thread count,
wall time) and the stage's final metrics, which `babyllama.eval.compare` checks against a published run.

    write_run_record(paths.stage("sft"), "sft", args, run, trainer, {"val_loss": val, **choice})  # main rank, last
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from babyllama.files import write_atomic
from babyllama.shipped import REPO_ROOT, portable
from babyllama.train.trainer import Trainer

RUN_RECORD = "run.json"
# Stage scripts import this module at their start (through babyllama.train.stage): a run's wall time counts from
# here, so it includes tokenizer and data preparation and the final evaluations, not only training.
PROCESS_STARTED = time.time()


def software() -> dict[str, str]:
    import numpy
    import sentencepiece

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "sentencepiece": sentencepiece.__version__}


def machine(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, torch's thread count and CPU kernel set (ATEN_CPU_CAPABILITY changes it), the GPU."""
    info = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "platform": platform.platform(),
            "device": str(device)}
    for var in ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY"):
        if var in os.environ:
            info[var] = os.environ[var]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def git_state() -> dict[str, Any] | None:
    """Commit of the code that ran and whether tracked files differed from it; None outside a git checkout. Read
    once per process: a stage asks when it starts (`stage.parse_stage_args`), so the record names the code that
    ran even if the checkout changes meanwhile."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def command_line(world_size: int) -> str:
    """This process's command as a user types it from the repository root (torchrun shown when it launched us)."""
    argv = [portable(a) for a in sys.argv]
    command = argv[0].startswith("babyllama ")  # the `babyllama` command (`cli.set_program`), not a script
    if command:
        argv = argv[0].split() + argv[1:]
    launcher = [] if command else ["python"]
    if world_size > 1:
        nodes = int(os.environ.get("WORLD_SIZE", world_size)) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        launcher = ["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', 1)}",
                    *(["-m"] if command else [])]
    return shlex.join(launcher + argv)


def write_run_record(directory: Path, stage: str, args: argparse.Namespace, run: Any, trainer: Trainer,
                     metrics: dict[str, float]) -> Path:
    """Write <directory>/run.json (main rank). `metrics`: the stage's final numbers, a flat name -> number map.
    A `--resume`d run adds its wall time to the record it finds and appends its command to the record's list."""
    path = Path(directory) / RUN_RECORD
    previous = (read_run_record(path) if getattr(args, "resume", False) else None) or {}
    config = dataclasses.asdict(run)
    flags = {k: v for k, v in vars(args).items() if k not in config}
    env = trainer.env
    record = {
        "stage": stage,
        "name": getattr(args, "name", None),
        "commands": [*previous.get("commands", []), command_line(env.world_size)],
        "config": portable(config),
        "flags": portable(flags),  # the stage's own flags (data files, PPO settings, ...)
        "world_size": env.world_size,
        "tokenizer": trainer.extra_state.get("tokenizer"),
        "steps": trainer.step,
        "wall_s": round(time.time() - PROCESS_STARTED + previous.get("wall_s", 0.0), 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_state(),
        "software": software(),
        "machine": machine(env.device),
        # what --mixed-precision / --torch-compile `auto` chose on this machine: the numbers depend on it
        "numerics": {"precision": trainer.precision, "compiled": trainer.compiled},
        "metrics": {k: float(v) for k, v in metrics.items()},
    }
    write_atomic(path, (json.dumps(record, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


def read_run_record(path: Path) -> dict | None:
    """The record at `path`; None when there is none or it is not a record (an old run, a damaged file)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def flatten(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """{"val_accuracy": x} -> {"<prefix>val_accuracy": x}: before/after numbers of a stage in one flat map."""
    return {prefix + k: v for k, v in metrics.items()}
