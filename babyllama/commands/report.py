"""Training report of a run: plots per stage and the evaluation table, in docs/report/ (refreshed by one command).

    babyllama report --name baby --evaluate       # evaluate every trained stage, then draw
    babyllama report --name baby                  # draw from the evaluations already in out/baby/eval
    babyllama report --name baby --out /tmp/x/out --runs /tmp/x/runs --dest /tmp/x/report

With --evaluate, first runs `babyllama evaluate` on the newest checkpoint of every stage (pretrain, sft, reward,
dpo, ppo) under <out>/<name>/, writing <out>/<name>/eval/<stage>.json (--max-docs/--max-items as there).
For every stage found under <runs>/<name>/ (TensorBoard event files) or <out>/<name>/<stage>/log.jsonl, writes
<dest>/<stage>.png: loss and validation loss, learning rate, tokens/s, gradient norm, and for the reward model,
DPO and PPO two more panels of what they log (pair accuracy and margin; implicit-reward accuracy and margin;
reward-model score and KL to the reference; for a pretraining run that logs `val_bpb`, validation bits per byte
with PPMd's and xz's on the same held-out split as flat lines: `babyllama/eval/compressors.py`). TensorBoard
is read when present (it drops the steps a resumed run redid), else log.jsonl (the last value logged for a step
wins). Then <dest>/README.md: a summary per stage, the plots, and the table of <out>/<name>/eval/<stage>.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from babyllama.cli import ArgumentParser, add_device_flag, add_flag
from babyllama.errors import UserError
from babyllama.eval import evaluate as ev
from babyllama.eval.compressors import describe
from babyllama.files import write_atomic
from babyllama.shipped import REPO_ROOT
from babyllama.train.callbacks import Series, read_text_log
from babyllama.train.checkpoint import latest_checkpoint
from babyllama.train.distributed import pick_device

STAGE_ORDER = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")
# (panel title, metrics drawn in it); metric names as the trainer logs them
PANELS = (("loss", ("loss", "val_loss")), ("learning rate", ("lr",)), ("tokens/s", ("tokens_per_s",)),
          ("gradient norm", ("grad_norm",)))
# what the later stages log besides the loss (training and val_/eval_ values), one more row of panels
STAGE_PANELS = {
    "sft": (("held-out skill accuracy", ("skill_acc",)), ("held-out choice accuracy", ("choice_acc",))),
    "reward": (("pair accuracy", ("accuracy", "val_accuracy")), ("score margin", ("margin", "val_margin"))),
    "dpo": (("implicit reward accuracy", ("reward_accuracy", "val_reward_accuracy")),
            ("implicit reward margin", ("reward_margin", "val_reward_margin"))),
    "ppo": (("reward-model score", ("score", "eval_score")), ("KL to reference", ("kl", "eval_kl"))),
    "grpo": (("skill pass rate", ("pass_rate", "eval_skill_acc")), ("KL to reference", ("kl",))),
}
# drawn when logged (pretraining since the compressor baseline): PPMd's and xz's are flat reference lines
BPB_PANEL = ("validation bits per byte", ("val_bpb", "val_bpb_ppmd", "val_bpb_xz"))


def read_tensorboard(log_dir: Path) -> Series:
    """Scalars of the event files in `log_dir`, named without their `train/` or `val/` group."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    return {tag.split("/", 1)[-1]: ([e.step for e in acc.Scalars(tag)], [e.value for e in acc.Scalars(tag)])
            for tag in acc.Tags()["scalars"]}


def stage_series(runs: Path, out: Path, stage: str) -> Series:
    tb = runs / stage
    if tb.is_dir() and any(tb.glob("events.out.tfevents.*")):
        return read_tensorboard(tb)
    log = out / stage / "log.jsonl"
    return read_text_log(log) if log.is_file() else {}


def find_stages(runs: Path, out: Path) -> list[str]:
    found = {p.name for p in runs.iterdir() if p.is_dir()} if runs.is_dir() else set()
    found |= {p.parent.name for p in out.glob("*/log.jsonl")}
    return sorted(found, key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s))


def plot_stage(stage: str, series: Series, path: Path) -> None:
    panels = PANELS + STAGE_PANELS.get(stage, ()) + ((BPB_PANEL,) if "val_bpb" in series else ())
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(10, 3.25 * rows))
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, names) in zip(axes.flat, panels):
        drawn = [n for n in names if n in series]
        for n in drawn:
            steps, values = series[n]
            ax.plot(steps, values, label=n, marker="o" if len(steps) < 30 else None, markersize=3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        elif len(drawn) > 1:
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(stage)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def summary_row(stage: str, series: Series) -> str:
    steps = max((s[-1] for s, _ in series.values() if s), default=0)
    last = {k: v[-1] for k, (_, v) in series.items() if v}
    cells = [f"{last[k]:.4g}" if k in last else "—" for k in ("loss", "val_loss", "tokens_per_s")]
    own = [f"{n} {last[n]:.4g}" for _, names in STAGE_PANELS.get(stage, ()) for n in names if n in last]
    return f"| {stage} | {steps} | " + " | ".join(cells) + f" | {', '.join(own) or '—'} |"


def eval_table(eval_dir: Path, stages: list[str]) -> list[str]:
    """Metrics as rows, stages as columns, from <eval_dir>/<stage>.json."""
    results = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(eval_dir.glob("*.json"))}
    if not results:
        return [f"No evaluation results in `{eval_dir}`; run `babyllama evaluate --stage <stage>`."]
    order = [s for s in stages if s in results] + sorted(set(results) - set(stages))
    metrics = list(dict.fromkeys(k for s in order for k in results[s]["metrics"]))
    lines = ["| metric | " + " | ".join(f"{s} (step {results[s].get('step')})" for s in order) + " |",
             "|---|" + "---|" * len(order)]
    for m in metrics:
        cells = ["—" if m not in results[s]["metrics"] else ev.metric_cell(m, results[s]["metrics"]) for s in order]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    baseline = next((results[s]["baseline"] for s in order if "sets" in results[s].get("baseline", {})), None)
    if baseline:  # what the *_bpb_ppmd / *_bpb_xz / *_margin_* rows are
        lines += ["", "`*_bpb_ppmd`, `*_bpb_xz`: " + describe(baseline)]
    return lines


def evaluate_stages(out: Path, device: str, max_docs: int | None, max_items: int | None) -> None:
    """`babyllama.eval.evaluate` of the newest checkpoint of every stage in `out` (a run directory), results in
    out/eval/<stage>.json."""
    stages = [s for s in STAGE_ORDER if latest_checkpoint(out / s) is not None]
    if not stages:
        raise UserError(f"--evaluate: no stage checkpoints under {out}; train a stage first (or pass --out)")
    for stage in stages:
        result = ev.evaluate(out / stage, out / "tokenizer", stage, device, max_docs, max_items, run_dir=out)
        print(f"evaluated {stage}: wrote {ev.write_results(result, out / 'eval')[0]}")


def make_report(name: str, root: Path, runs: Path, dest: Path, evaluated: bool = False,
                command: str | None = None) -> Path:
    """Write the plots and README.md to `dest`; returns the README path. `evaluated`: the evaluations were just
    refreshed (`evaluate_stages`), which the recorded command says; `command`: the command to name instead (a
    script that calls this one)."""
    out, tb = root / name, runs / name
    stages = find_stages(tb, out)
    if not stages:
        raise UserError(f"no training logs for run '{name}' under {tb} or {out}; train a stage first "
                        "(or pass --out/--runs where the run wrote them)")
    dest.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = f"babyllama report --name {name} --out {root} --runs {runs}"
        command += " --evaluate" if evaluated else ""
    lines = [f"# Training report: `{name}`", "", f"Generated by `{command}`; do not edit by hand.", "",
             "| stage | steps | last loss | last val_loss | tokens/s | stage metrics |", "|---|---|---|---|---|---|"]
    plots = []
    for stage in stages:
        series = stage_series(tb, out, stage)
        plot_stage(stage, series, dest / f"{stage}.png")
        lines.append(summary_row(stage, series))
        plots += [f"## {stage}", "", f"![{stage}]({stage}.png)", ""]
    lines += ["", *plots, "## Evaluation", "", *eval_table(out / "eval", stages), ""]
    readme = dest / "README.md"
    write_atomic(readme, "\n".join(lines).encode("utf-8"))
    return readme


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="baby", help="run name")
    add_flag(ap, "--out", "--root", default="out", help="the runs' output root (the stages' --out)")
    ap.add_argument("--runs", default="runs", help="TensorBoard root (the stages' --runs)")
    ap.add_argument("--dest", default=str(REPO_ROOT / "docs" / "report"),
                    help="report directory (default: docs/report)")
    ap.add_argument("--evaluate", action="store_true", help="first evaluate every stage that has a checkpoint")
    add_device_flag(ap, "for --evaluate: ")
    ap.add_argument("--max-docs", type=int, help="for --evaluate: held-out documents per language (default all)")
    ap.add_argument("--max-items", type=int, help="for --evaluate: items per multiple-choice task (default all)")
    args = ap.parse_args(argv)
    root = Path(args.out)
    if args.evaluate:
        evaluate_stages(root / args.name, pick_device(args.device), args.max_docs, args.max_items)
    print(f"wrote {make_report(args.name, root, Path(args.runs), Path(args.dest), args.evaluate)}")

