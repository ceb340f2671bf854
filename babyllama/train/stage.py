"""What every training stage script (pretrain, sft, reward, dpo, ppo) shares, so the scripts stay
config -> data -> model -> compile -> fit(callbacks) and no stage copies another's plumbing.

    args, run, paths, env = parse_stage_args(__doc__, "sft", add_flags)
    trainer = Trainer(model, env)
    compile_from_run(trainer, run, loss=my_loss)
    resume_if_asked(trainer, args, paths.stage("sft"))
    trainer.fit(loader, max_steps=run.max_steps, callbacks=standard_callbacks(run, paths, "sft", [evaluator]))
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from babyllama.cli import add_dataclass_flags, add_device_flag, apply_overrides
from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.files import hold_lock
from babyllama.model.config import ModelConfig
from babyllama.model.llama import Llama
from babyllama.shipped import STAGE_SCRIPTS
from babyllama.train import callbacks as cb
from babyllama.train.checkpoint import check_model_config, latest_checkpoint, list_checkpoints, load_model
from babyllama.train.distributed import DistEnv, init_distributed
from babyllama.train.optim import build_adamw, warmup_cosine
from babyllama.train.run_config import (RUN_PRESETS, RunConfig, RunPaths, check_run, preset_for, resolve_compile,
                                        resolve_precision, run_preset)
from babyllama.train.run_record import git_state, write_run_record
from babyllama.train.trainer import Callback, LossFn, Trainer, causal_lm_loss


def parse_stage_args(description: str, stage: str,
                     add_flags: Callable[[argparse.ArgumentParser], None] | None = None,
                     argv: list[str] | None = None, check: Callable[[argparse.Namespace], None] | None = None,
                     ) -> tuple[argparse.Namespace, RunConfig, RunPaths, DistEnv]:
    """Flags common to all stages (--name, --resume, --device, every RunConfig field) plus the stage's own
    (`add_flags`), all checked (the stage's by `check`) before any work.

    Refuses to start over a stage directory that already has checkpoints unless --resume is given,
    so a finished run is never overwritten by accident."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="baby", help="run name: outputs go to <out>/<name> and <runs>/<name>")
    parser.add_argument("--preset", choices=sorted(RUN_PRESETS),
                        help="run preset (default: the --name when it is one of these, else baby)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this stage")
    add_device_flag(parser)
    if add_flags is not None:
        add_flags(parser)
    add_dataclass_flags(parser, RunConfig)
    args = parser.parse_args(argv)
    git_state()  # the commit the run record names: the code as the run starts
    run = apply_overrides(run_preset(preset_for(args.name, args.preset), stage), args)
    check_run(run)
    if check is not None:
        check(args)
    paths, env = RunPaths.of(args.name, run.out, run.runs), init_distributed(args.device)
    ckpt_dir = paths.stage(stage)
    if env.is_main:  # a second run on this stage's directory would interleave logs and replace checkpoints
        hold_lock(ckpt_dir, f"{stage} run")
    if list_checkpoints(ckpt_dir) and not args.resume:
        raise UserError(f"{ckpt_dir} already has checkpoints; pass --resume to continue, or --out to start elsewhere")
    return args, run, paths, env


def compile_from_run(trainer: Trainer, run: RunConfig, loss: LossFn = causal_lm_loss,
                     flops_per_token: float | None = None, tokenizer: Tokenizer | None = None,
                     fixed_shapes: bool = False) -> Trainer:
    """AdamW (decay groups, fused where available) + warmup/cosine + clipping + precision/compile from the run;
    with --fsdp under torchrun the model is sharded first (the optimizer must see the sharded parameters).
    `tokenizer`: recorded in every checkpoint (its fingerprint), so later stages and inference can refuse another.
    `fixed_shapes`: every batch has the same shape (pretraining's windows): on a CPU `auto` then picks bf16 and
    compile where they pay (padded batches of varying length recompile for minutes, and are too small for bf16)."""
    device = trainer.env.device
    if run.fsdp:
        trainer.shard()
    optimizer = build_adamw(trainer.network, run.lr, run.weight_decay)
    trainer.compile(loss=loss, optimizer=optimizer,
                    scheduler=warmup_cosine(optimizer, run.warmup_steps, run.max_steps, run.min_lr_ratio),
                    clip_grad_norm=run.clip_grad_norm,
                    mixed_precision=resolve_precision(run.mixed_precision, device, fixed_shapes),
                    grad_accumulation_steps=run.grad_accum,
                    torch_compile=resolve_compile(run.torch_compile, device, run.max_steps, fixed_shapes),
                    log_every=run.log_every, flops_per_token=flops_per_token, skip_nonfinite=run.on_nonfinite == "skip")
    trainer.extra_state["schedule"] = {k: getattr(run, k) for k in _SCHEDULE_FLAGS}
    trainer.extra_state["data_order"] = {"seed": run.seed, "batch_size": run.batch_size, "grad_accum": run.grad_accum,
                                         "world_size": trainer.env.world_size}
    if tokenizer is not None:
        trainer.extra_state["tokenizer"] = tokenizer.fingerprint
    return trainer


# what may change on --resume (a diverging run continued with a lower --lr, a run extended with --max-steps): the
# new values apply from the resumed step on, and the change is printed
_SCHEDULE_FLAGS = ("lr", "min_lr_ratio", "warmup_steps", "max_steps", "weight_decay", "clip_grad_norm")
# what fixes the order in which samples are drawn, so an exact resume needs them unchanged
_DATA_ORDER_FLAGS = {"seed": "--seed", "batch_size": "--batch-size", "grad_accum": "--grad-accum",
                     "world_size": "world size"}


def resume_if_asked(trainer: Trainer, args: argparse.Namespace, ckpt_dir: Path) -> None:
    """--resume: restore the newest checkpoint into a trainer set up by `compile_from_run`, refusing settings
    that would change the data order."""
    if not args.resume:
        return
    found = latest_checkpoint(ckpt_dir)
    if found is None:
        raise UserError(f"--resume: no checkpoint in {ckpt_dir}; run without --resume to start")
    now, tokenizer = trainer.extra_state["data_order"], trainer.extra_state.get("tokenizer")
    schedule = trainer.extra_state["schedule"]
    base_lrs = list(trainer.scheduler.base_lrs)
    weight_decays = [g["weight_decay"] for g in trainer.optimizer.param_groups]
    trainer.resume(str(found))  # replaces extra_state, optimizer and scheduler state with the checkpoint's
    _check_data_order(trainer.extra_state.get("data_order"), now, found)
    saved_tokenizer = trainer.extra_state.get("tokenizer")
    if tokenizer is not None and saved_tokenizer not in (None, tokenizer):
        raise UserError(f"checkpoint {found} was trained with another tokenizer (fingerprint {saved_tokenizer}, "
                        f"now {tokenizer}); resume with the tokenizer of that run or start a new run with --out")
    trainer.extra_state["data_order"] = now
    if tokenizer is not None:
        trainer.extra_state["tokenizer"] = tokenizer
    _apply_schedule(trainer, base_lrs, weight_decays)
    saved_schedule, trainer.extra_state["schedule"] = trainer.extra_state.get("schedule"), schedule
    changed = [f"{k} {saved_schedule[k]} -> {schedule[k]}" for k in _SCHEDULE_FLAGS
               if saved_schedule is not None and saved_schedule.get(k, schedule[k]) != schedule[k]]
    if changed and trainer.env.is_main:
        print(f"resumed at step {trainer.step} with changed settings, applied from here on: {', '.join(changed)}")


def _apply_schedule(trainer: Trainer, base_lrs: list[float], weight_decays: list[float]) -> None:
    """The checkpoint's optimizer and scheduler state bring back the old peak lr and weight decay; this run's
    flags win (the schedule's shape — warmup, min lr, max steps — is this run's already: it is not saved)."""
    scheduler = trainer.scheduler
    scheduler.base_lrs = list(base_lrs)
    for group, base, lr_lambda, decay in zip(trainer.optimizer.param_groups, base_lrs, scheduler.lr_lambdas,
                                             weight_decays):
        group["initial_lr"], group["weight_decay"] = base, decay
        group["lr"] = base * lr_lambda(scheduler.last_epoch)  # what the next step uses


def _check_data_order(saved: dict | None, now: dict, source: Path) -> None:
    """Name every changed field; checkpoints from before the record was kept resume unchecked."""
    changed = [f"{flag} {saved[k]} at save, {now[k]} now" for k, flag in _DATA_ORDER_FLAGS.items()
               if saved is not None and saved[k] != now[k]]
    if changed:
        raise UserError(f"checkpoint {source}: {' and '.join(changed)}; resume with the same "
                        f"value{'s' if len(changed) > 1 else ''} or start a new run with --out")


def standard_callbacks(run: RunConfig, paths: RunPaths, stage: str,
                       evaluators: list[Callback] = ()) -> list[Callback]:
    """The divergence guard, evaluators (their metrics join the step's logs), then progress, text log, TensorBoard,
    checkpoints (and --stop-at's stop, after the step is logged and saved)."""
    ckpt_dir = paths.stage(stage)
    stop = [cb.StopAt(run.stop_at)] if run.stop_at else []
    guard = cb.DivergenceGuard(ckpt_dir, run.loss_spike_factor)  # first: a diverged step is neither logged nor saved
    return [guard, *evaluators, cb.ProgressBar(run.max_steps), cb.TextLogger(ckpt_dir / "log.jsonl"),
            cb.TensorBoard(paths.tensorboard(stage)), cb.Checkpoint(ckpt_dir, run.ckpt_every, run.keep_checkpoints),
            *stop]


def record_stage(args: argparse.Namespace, run: RunConfig, paths: RunPaths, stage: str, trainer: Trainer,
                 metrics: dict[str, float]) -> None:
    """Write the stage's run.json (command, config, versions, machine, wall time, final metrics) on the main rank:
    what `python -m babyllama.compare` checks against a published run."""
    if trainer.env.is_main:
        write_run_record(paths.stage(stage), stage, args, run, trainer, metrics)


def init_checkpoint(explicit: str | None, paths: RunPaths, previous_stage: str) -> Path:
    """The checkpoint a stage starts from: --init if given, else the newest of the previous stage."""
    directory = Path(explicit) if explicit else paths.stage(previous_stage)
    found = directory if directory.is_file() else latest_checkpoint(directory)
    if found is None:
        raise UserError(f"no checkpoint in {directory}; run the {previous_stage} stage first "
                        f"(e.g. python {STAGE_SCRIPTS[previous_stage]} --name {paths.name}) or pass --init")
    return found


def load_stage_tokenizer(run: RunConfig, paths: RunPaths) -> Tokenizer:
    """--tokenizer if given, else the one pretraining wrote to out/<name>/tokenizer."""
    path = Path(run.tokenizer) if run.tokenizer else paths.tokenizer
    if not path.exists():
        raise UserError(f"no tokenizer at {path}; run the pretrain stage first "
                        f"(python pretrain/pretrain.py --name {paths.name}) or pass --tokenizer")
    return Tokenizer.load(path)


def load_init_model(path: Path, expected: ModelConfig, tokenizer: Tokenizer | None = None) -> Llama:
    """The weights a stage starts from, loaded strictly (no missing or extra weights); a checkpoint trained for
    another config than this run's (preset, --seq-len, tokenizer size) is refused with one line naming the fields,
    and one trained with another tokenizer than `tokenizer` too."""
    model = load_model(path, strict=True, tokenizer=tokenizer)
    check_model_config({"model_config": model.config.to_dict()}, expected, path)
    return model
