"""The whole shipped chain, one stage after another, each narrated, then `compare` against the published run.

    babyllama chain --name baby                       # raw text -> tokenizer -> ... -> GRPO, then compare (CPU minutes)
    babyllama chain --name baby --stages pretrain sft # the first two stages only
    babyllama chain --name baby --nproc-per-node 4    # each stage under torchrun with 4 processes

Each stage is the same command a user types (`babyllama pretrain --name baby`, ...), run as its own process with
the stage's default settings (`babyllama <stage> --print-config` shows them). A stage that finished (its run.json is
there) is skipped, one with checkpoints but no run.json is resumed: an interrupted chain continues where it
stopped when run again.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time

from babyllama.cli import ArgumentParser, HelpFormatter, add_device_flag
from babyllama.errors import UserError
from babyllama.eval import compare
from babyllama.train.checkpoint import list_checkpoints
from babyllama.train.run_config import PRESETS, RunPaths
from babyllama.train.run_record import RUN_RECORD, read_run_record

# what each stage does, in the order the chain runs them, and the final numbers worth a line
STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "pretrain": ("Pretraining: train a tokenizer on the shipped zh + en corpus, tokenize it, and teach a 4M-parameter "
                 "LLaMA to predict the next token.", ("val_loss",)),
    "sft": ("Supervised fine-tuning: learn to answer in the ChatML template from 10.8k conversations and 4.8k "
            "skill items (count characters, the next line of a poem, answer in N characters or words); only the "
            "assistant's tokens are learned, and a quarter of each batch is pretraining text, to forget less.",
            ("val_loss", "before_skill_acc", "skill_acc", "choice_acc")),
    "reward": ("Reward model: a scalar head on the SFT model learns to score the preferred reply of each pair above "
               "the other.",
               ("before_val_accuracy", "val_accuracy")),
    "dpo": ("DPO: move the SFT model towards the preferred replies directly, against a frozen copy of itself.",
            ("val_reward_accuracy", "heldout_before_score", "heldout_score", "heldout_kl")),
    "ppo": ("PPO: sample replies, score them with the reward model, and update the policy with a KL leash to the "
            "SFT model.", ("heldout_before_score", "heldout_score", "heldout_kl")),
    "grpo": ("GRPO: sample a group of replies per skill question, reward the ones a program checks as right, and "
             "move the SFT model towards the better-than-average replies of each group, with a KL leash.",
             ("heldout_before_skill_acc", "heldout_skill_acc", "heldout_kl")),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--name", default="baby", help="run name: every stage writes <out>/<name>/<stage>")
    p.add_argument("--preset", choices=PRESETS, help="run preset (default: the --name when it is one, else baby)")
    p.add_argument("--out", default="out", help="output root of the stages")
    p.add_argument("--runs", default="runs", help="TensorBoard root of the stages")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES), help="the stages to run")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per stage (torchrun when more than 1)")
    p.add_argument("--no-compare", action="store_true", help="skip the comparison with the published run")
    add_device_flag(p)
    return p.parse_args(argv)


def stage_command(stage: str, args: argparse.Namespace, resume: bool) -> tuple[list[str], str]:
    """(the stage's process, the same as a user types it)."""
    flags = ["--name", args.name, "--out", args.out, "--runs", args.runs, "--device", args.device,
             *(["--preset", args.preset] if args.preset else []), *(["--resume"] if resume else [])]
    if args.nproc_per_node > 1:
        torchrun = [f"--nproc_per_node={args.nproc_per_node}", "-m", "babyllama", stage, *flags]
        return [sys.executable, "-m", "torch.distributed.run", *torchrun], shlex.join(["torchrun", *torchrun])
    return [sys.executable, "-m", "babyllama", stage, *flags], shlex.join(["babyllama", stage, *flags])


def summary(record: dict, keys: tuple[str, ...]) -> str:
    metrics = record.get("metrics", {})
    shown = [f"{k} {metrics[k]:.4g}" for k in keys if k in metrics]
    return f"{record.get('steps', '?')} steps in {record.get('wall_s', 0) / 60:.1f} min" + (
        f"; {', '.join(shown)}" if shown else "")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.nproc_per_node < 1:
        raise UserError(f"--nproc-per-node {args.nproc_per_node}: must be at least 1")
    paths = RunPaths.of(args.name, args.out, args.runs)
    order = [s for s in STAGES if s in args.stages]
    start = time.time()
    for i, stage in enumerate(order, 1):
        story, keys = STAGES[stage]
        directory = paths.stage(stage)
        print(f"\n== [{i}/{len(order)}] {stage} -> {directory}\n{story}", flush=True)
        record = read_run_record(directory / RUN_RECORD)
        if record is not None:
            print(f"already done ({summary(record, keys)}); delete {directory} to run it again", flush=True)
            continue
        cmd, typed = stage_command(stage, args, resume=bool(list_checkpoints(directory)))
        print(f"$ {typed}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"the {stage} stage failed (its error is above); fix it and run the chain again: "
                            "finished stages are skipped, an interrupted one resumes")
        record = read_run_record(directory / RUN_RECORD) or {}
        print(f"{stage} done: {summary(record, keys)}", flush=True)
    print(f"\nchain done in {(time.time() - start) / 60:.1f} min; TensorBoard: tensorboard --logdir {args.runs}",
          flush=True)
    if args.no_compare:
        return
    print("\n== compare with the published run (docs/reproducibility.md says what the verdicts mean)", flush=True)
    code = compare.main(["--name", args.name, "--out", args.out, "--stages", *order,
                         *(["--preset", args.preset] if args.preset else [])])
    if code:
        raise SystemExit(code)

