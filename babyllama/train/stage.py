"""What every training stage script (pretrain, sft, reward, dpo, ppo, grpo) shares, so the scripts stay
config -> data -> model -> compile -> fit(callbacks) and no stage copies another's plumbing.

    args, run, paths, env = parse_stage_args(__doc__, "sft", argv)
    start = StartPoint(init, cfg, tokenizer, env.device, paths.stage("sft"), run.lora, run.seed)  # --lora-rank
    trainer = Trainer(start.policy, env)
    compile_from_run(trainer, run, loss=my_loss, adapters=start.adapters)
    resume_if_asked(trainer, args, paths.stage("sft"))
    trainer.fit(loader, max_steps=run.max_steps, callbacks=standard_callbacks(run, paths, "sft", [evaluator]))
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from babyllama.cli import ArgumentParser, HelpFormatter, add_dataclass_flags, add_device_flag, apply_overrides, as_typed
from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.files import hold_lock
from babyllama.model.config import ModelConfig
from babyllama.model.llama import Llama, frozen, frozen_copy
from babyllama.model.lora import LoRASpec, add_lora, sharing_copy, weights_fingerprint
from babyllama.train import callbacks as cb
from babyllama.train.checkpoint import (
    adapter_record,
    check_model_config,
    latest_checkpoint,
    list_checkpoints,
    load_model,
)
from babyllama.train.distributed import DistEnv, check_device_name, init_distributed
from babyllama.train.optim import build_adamw, warmup_cosine
from babyllama.train.run_config import (
    PRESETS,
    STAGE_CONFIGS,
    RunPaths,
    TrainConfig,
    preset_for,
    resolve_compile,
    resolve_precision,
)
from babyllama.train.run_record import git_state, write_run_record
from babyllama.train.trainer import Callback, LossFn, Trainer, causal_lm_loss


def parse_stage_args(description: str, stage: str, argv: list[str] | None = None,
                     ) -> tuple[argparse.Namespace, TrainConfig, RunPaths, DistEnv]:
    """The run's settings (`run_config.STAGE_CONFIGS[stage]`: the stage's defaults, its preset's changes, the flags
    given), checked before any work, and --name, --preset, --resume, --device, --print-config.

    --print-config prints the settings with where each came from and exits. Refuses to start over a stage directory
    that already has checkpoints unless --resume is given, so a finished run is never overwritten by accident."""
    config = STAGE_CONFIGS[stage]
    early = ArgumentParser(add_help=False)  # the preset decides the defaults --help shows
    early.add_argument("--name", default="baby")
    early.add_argument("--preset")
    known = early.parse_known_args(argv)[0]
    chosen = preset_for(known.name, known.preset)
    defaults = config.for_preset(chosen if chosen in PRESETS else "baby")  # a wrong --preset: argparse says so below
    parser = ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--name", default="baby", help="run name: outputs go to <out>/<name> and <runs>/<name>")
    parser.add_argument("--preset", choices=PRESETS, help="run preset (default: the --name when it is one of these, "
                                                          "else baby)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this stage")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings and where each came from, then exit")
    add_device_flag(parser)
    add_dataclass_flags(parser, defaults)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UserError(foreign_flag_message(unknown, stage, parser.prog))
    run = apply_overrides(defaults, args)
    run.check()
    check_device_name(args.device)
    if args.print_config:
        print(describe_config(run, args, stage, chosen))
        raise SystemExit(0)
    git_state()  # the commit the run record names: the code as the run starts
    paths, env = RunPaths.of(args.name, run.out, run.runs), init_distributed(args.device)
    ckpt_dir = paths.stage(stage)
    if env.is_main:  # a second run on this stage's directory would interleave logs and replace checkpoints
        hold_lock(ckpt_dir, f"{stage} run")
    # before any data is read: a mistyped --resume, or a forgotten one, costs nothing
    has_checkpoints = bool(list_checkpoints(ckpt_dir))
    if has_checkpoints and not args.resume:
        raise UserError(f"{ckpt_dir} already has checkpoints; pass --resume to continue, or --out to start elsewhere")
    if args.resume and not has_checkpoints:
        raise UserError(f"--resume: no checkpoint in {ckpt_dir}; run without --resume to start")
    return args, run, paths, env


def foreign_flag_message(unknown: list[str], stage: str, prog: str) -> str:
    """One line for the first argument the stage does not take: a flag of other stages is named as theirs (it
    would change nothing here), anything else as unknown."""
    flag = next((a.split("=", 1)[0] for a in unknown if a.startswith("--")), unknown[0])
    users = [s for s, cls in STAGE_CONFIGS.items()
             if flag.startswith("--") and flag[2:].replace("-", "_") in {f.name for f in dataclasses.fields(cls)}]
    if users:
        return (f"{flag} is a setting of {' and '.join(users)}; {stage} does not use it (its settings: {prog} "
                "--help)")
    return f"unrecognized argument {flag}; {prog} --help lists the flags"


def describe_config(run: TrainConfig, args: argparse.Namespace, stage: str, preset: str) -> str:
    """The settings of the run, one per line, with where each value came from: the stage's default, the preset,
    or a flag."""
    changed = type(run).PRESETS.get(preset, {})
    lines = [f"# {stage} settings ({type(run).__name__} in babyllama/train/run_config.py): run {args.name}, "
             f"preset {preset}, device {args.device}{', resuming' if args.resume else ''}"]
    width = max(len(f.name) for f in dataclasses.fields(run)) + 2
    for f in dataclasses.fields(run):
        value = getattr(run, f.name)
        source = ("--" + f.name.replace("_", "-") if getattr(args, f.name, None) is not None
                  else f"preset {preset}" if f.name in changed else "default")
        lines.append(f"{'--' + f.name.replace('_', '-'):<{width + 2}} {as_typed(value):<24} {source}")
    return "\n".join(lines)


def compile_from_run(trainer: Trainer, run: TrainConfig, loss: LossFn = causal_lm_loss,
                     flops_per_token: float | None = None, tokenizer: Tokenizer | None = None,
                     fixed_shapes: bool = False, adapters: dict[str, Any] | None = None,
                     eval_loss: LossFn | None = None) -> Trainer:
    """AdamW (decay groups, fused where available) + warmup/cosine + clipping + precision/compile from the run;
    with --fsdp under torchrun the model is sharded first (the optimizer must see the sharded parameters).
    `tokenizer`: recorded in every checkpoint (its fingerprint), so later stages and inference can refuse another.
    `fixed_shapes`: every batch has the same shape (pretraining's windows): on a CPU `auto` then picks bf16 and
    compile where they pay (padded batches of varying length recompile for minutes, and are too small for bf16).
    `adapters`: the model trains LoRA adapters (`StartPoint.adapters`): checkpoints hold the weights that train and
    this record of them, which `checkpoint.load_model` merges onto their base."""
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
                    log_every=run.log_every, flops_per_token=flops_per_token, skip_nonfinite=run.on_nonfinite == "skip",
                    save_frozen=adapters is None, eval_loss=eval_loss)
    if adapters is not None:
        trainer.extra_state["lora"] = adapters
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
    that would change the data order (`parse_stage_args` refused --resume where there is no checkpoint)."""
    if not args.resume:
        return
    found = latest_checkpoint(ckpt_dir)
    now, tokenizer = trainer.extra_state["data_order"], trainer.extra_state.get("tokenizer")
    schedule = trainer.extra_state["schedule"]
    base_lrs = list(trainer.scheduler.base_lrs)
    weight_decays = [g["weight_decay"] for g in trainer.optimizer.param_groups]
    adapters = trainer.extra_state.get("lora")
    # replaces extra_state, optimizer and scheduler state with the checkpoint's
    trainer.resume(str(found), check=lambda state: _check_adapters(adapter_record(state), adapters, found))
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


def _check_adapters(saved: dict[str, Any] | None, now: dict[str, Any] | None, source: Path) -> None:
    """--resume continues the weights a checkpoint trains: the same adapters on the same base, or every weight."""
    if saved is None and now is not None:
        raise UserError(f"checkpoint {source} fine-tuned every weight; resume it without --lora-rank")
    if saved is not None and now is None:
        raise UserError(f"checkpoint {source} holds LoRA adapters (--lora-rank {saved['rank']}); resume it with the "
                        "--lora-* settings it was trained with")
    if saved is None:
        return
    changed = [f"--lora-{k} {saved[k]} at save, {now[k]} now" for k in ("rank", "alpha", "dropout", "targets")
               if saved[k] != now[k]]
    if changed:
        raise UserError(f"checkpoint {source}: {' and '.join(changed)}; resume with the same values or start a new "
                        "run with --out")
    if saved["base_fingerprint"] != now["base_fingerprint"]:
        raise UserError(f"checkpoint {source}: its adapters were trained on other weights than --init's now; resume "
                        "from the checkpoint it started from (--init)")


def standard_callbacks(run: TrainConfig, paths: RunPaths, stage: str,
                       evaluators: list[Callback] = ()) -> list[Callback]:
    """The divergence guard, evaluators (their metrics join the step's logs), then progress, text log, TensorBoard,
    checkpoints (and --stop-at's stop, after the step is logged and saved)."""
    ckpt_dir = paths.stage(stage)
    stop = [cb.StopAt(run.stop_at)] if run.stop_at else []
    guard = cb.DivergenceGuard(ckpt_dir, run.loss_spike_factor)  # first: a diverged step is neither logged nor saved
    return [guard, *evaluators, cb.ProgressBar(run.max_steps), cb.TextLogger(ckpt_dir / "log.jsonl"),
            cb.TensorBoard(paths.tensorboard(stage)), cb.Checkpoint(ckpt_dir, run.ckpt_every, run.keep_checkpoints),
            *stop]


def record_stage(args: argparse.Namespace, run: TrainConfig, paths: RunPaths, stage: str, trainer: Trainer,
                 metrics: dict[str, float]) -> None:
    """Write the stage's run.json (command, config, versions, machine, wall time, final metrics) on the main rank:
    what `babyllama compare` checks against a published run."""
    if trainer.env.is_main:
        write_run_record(paths.stage(stage), stage, args, run, trainer, metrics)


def init_checkpoint(explicit: str | None, paths: RunPaths, previous_stage: str) -> Path:
    """The checkpoint a stage starts from: --init if given, else the newest of the previous stage."""
    directory = Path(explicit) if explicit else paths.stage(previous_stage)
    found = directory if directory.is_file() else latest_checkpoint(directory)
    if found is None:
        raise UserError(f"no checkpoint in {directory}; run the {previous_stage} stage first "
                        f"(babyllama {previous_stage} --name {paths.name}) or pass --init")
    return found


def load_stage_tokenizer(run: TrainConfig, paths: RunPaths) -> Tokenizer:
    """--tokenizer if given, else the one pretraining wrote to out/<name>/tokenizer."""
    path = Path(run.tokenizer) if run.tokenizer else paths.tokenizer
    if not path.exists():
        raise UserError(f"no tokenizer at {path}; run the pretrain stage first "
                        f"(babyllama pretrain --name {paths.name}) or pass --tokenizer")
    return Tokenizer.load(path)


class StartPoint:
    """What a fine-tuning stage (sft, dpo, ppo, grpo) trains, from the checkpoint it starts from (`init`), on
    `device`: every weight of the loaded model (`policy`), or with `lora` adapters (their random start: `seed`'s)
    on another module tree over the same frozen weight tensors (`lora.sharing_copy`), so that the loaded model
    itself (`base`) is the frozen reference at no memory cost. `adapters` is what the stage's checkpoints then
    record (None without LoRA): the adapters' settings and the checkpoint they sit on, relative to `stage_dir`,
    with its weights' fingerprint."""

    def __init__(self, init: Path, cfg: ModelConfig, tokenizer: Tokenizer, device: torch.device, stage_dir: Path,
                 lora: LoRASpec | None = None, seed: int = 0):
        model = load_init_model(init, cfg, tokenizer).to(device)
        self.base: Llama | None = None
        self.adapters: dict[str, Any] | None = None
        if lora is None:
            self.policy = model.train()
            return
        self.adapters = {**lora.to_dict(), "base": os.path.relpath(init.resolve(), stage_dir.resolve()),
                         "base_fingerprint": weights_fingerprint(model)}
        self.base = frozen(model)
        self.policy = add_lora(sharing_copy(model), lora, seed).train()

    def reference(self) -> Llama:
        """The frozen start weights (the reference of DPO, PPO and GRPO): the adapters' base itself, or for full
        fine-tuning a frozen copy of the policy (so: taken before training)."""
        return self.base if self.base is not None else frozen_copy(self.policy)


def load_init_model(path: Path, expected: ModelConfig, tokenizer: Tokenizer | None = None) -> Llama:
    """The weights a stage starts from, loaded strictly (no missing or extra weights); a checkpoint trained for
    another config than this run's (preset, --seq-len, tokenizer size) is refused with one line naming the fields,
    and one trained with another tokenizer than `tokenizer` too."""
    model = load_model(path, strict=True, tokenizer=tokenizer)
    check_model_config({"model_config": model.config.to_dict()}, expected, path)
    return model
