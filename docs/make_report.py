"""Training report of a run: plots per stage and the evaluation table, in docs/report/ (refreshed by one command).

    python docs/make_report.py --name baby
    python docs/make_report.py --name baby --root /tmp/x/out --runs /tmp/x/runs --dest /tmp/x/report

For every stage found under <runs>/<name>/ (TensorBoard event files) or <root>/<name>/<stage>/log.jsonl, writes
<dest>/<stage>.png with four panels: loss and validation loss, learning rate, tokens/s, gradient norm.
TensorBoard is read when present (it drops the steps a resumed run redid), else log.jsonl (the last value logged
for a step wins). Then <dest>/README.md: a summary per stage, the plots, and the table of
<root>/<name>/eval/<stage>.json (written by `python -m babyllama.evaluate`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from babyllama.cli import main_guard  # noqa: E402
from babyllama.errors import UserError  # noqa: E402

STAGE_ORDER = ("pretrain", "sft", "reward", "dpo", "ppo")
Series = dict[str, tuple[list[int], list[float]]]  # metric -> (steps, values)
# (panel title, metrics drawn in it); metric names as the trainer logs them
PANELS = (("loss", ("loss", "val_loss")), ("learning rate", ("lr",)), ("tokens/s", ("tokens_per_s",)),
          ("gradient norm", ("grad_norm",)))


def read_tensorboard(log_dir: Path) -> Series:
    """Scalars of the event files in `log_dir`, named without their `train/` or `val/` group."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    return {tag.split("/", 1)[-1]: ([e.step for e in acc.Scalars(tag)], [e.value for e in acc.Scalars(tag)])
            for tag in acc.Tags()["scalars"]}


def read_log_jsonl(path: Path) -> Series:
    """Numeric fields of a TextLogger file; a step logged twice (a resumed run) keeps its last value."""
    by_metric: dict[str, dict[int, float]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: invalid JSON ({e.msg}); fix or delete the line") from None
        if not isinstance(record, dict) or "step" not in record:
            raise UserError(f"{path}:{n}: no 'step' field; is this a babyllama log.jsonl (TextLogger)?")
        for k, v in record.items():
            if k not in ("step", "time", "epoch") and isinstance(v, (int, float)):
                by_metric.setdefault(k, {})[int(record["step"])] = float(v)
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in by_metric.items()}


def stage_series(runs: Path, out: Path, stage: str) -> Series:
    tb = runs / stage
    if tb.is_dir() and any(tb.glob("events.out.tfevents.*")):
        return read_tensorboard(tb)
    log = out / stage / "log.jsonl"
    return read_log_jsonl(log) if log.is_file() else {}


def find_stages(runs: Path, out: Path) -> list[str]:
    found = {p.name for p in runs.iterdir() if p.is_dir()} if runs.is_dir() else set()
    found |= {p.parent.name for p in out.glob("*/log.jsonl")}
    return sorted(found, key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s))


def plot_stage(stage: str, series: Series, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for ax, (title, names) in zip(axes.flat, PANELS):
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
    last = {k: series[k][1][-1] for k in ("loss", "val_loss", "tokens_per_s") if k in series and series[k][1]}
    cells = [f"{last[k]:.4g}" if k in last else "—" for k in ("loss", "val_loss", "tokens_per_s")]
    return f"| {stage} | {steps} | " + " | ".join(cells) + " |"


def eval_table(eval_dir: Path, stages: list[str]) -> list[str]:
    """Metrics as rows, stages as columns, from <eval_dir>/<stage>.json."""
    results = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(eval_dir.glob("*.json"))}
    if not results:
        return [f"No evaluation results in `{eval_dir}`; run `python -m babyllama.evaluate --stage <stage>`."]
    order = [s for s in stages if s in results] + sorted(set(results) - set(stages))
    metrics = list(dict.fromkeys(k for s in order for k in results[s]["metrics"]))
    lines = ["| metric | " + " | ".join(f"{s} (step {results[s].get('step')})" for s in order) + " |",
             "|---|" + "---|" * len(order)]
    for m in metrics:
        cells = [results[s]["metrics"].get(m) for s in order]
        lines.append(f"| {m} | " + " | ".join("—" if v is None else _fmt(v) for v in cells) + " |")
    return lines


def _fmt(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:.4f}"


def make_report(name: str, root: Path, runs: Path, dest: Path) -> Path:
    """Write the plots and README.md to `dest`; returns the README path."""
    out, tb = root / name, runs / name
    stages = find_stages(tb, out)
    if not stages:
        raise UserError(f"no training logs for run '{name}' under {tb} or {out}; train a stage first "
                        "(or pass --root/--runs where the run wrote them)")
    dest.mkdir(parents=True, exist_ok=True)
    command = f"python docs/make_report.py --name {name} --root {root} --runs {runs}"
    lines = [f"# Training report: `{name}`", "", f"Generated by `{command}`; do not edit by hand.", "",
             "| stage | steps | last loss | last val_loss | tokens/s |", "|---|---|---|---|---|"]
    plots = []
    for stage in stages:
        series = stage_series(tb, out, stage)
        plot_stage(stage, series, dest / f"{stage}.png")
        lines.append(summary_row(stage, series))
        plots += [f"## {stage}", "", f"![{stage}]({stage}.png)", ""]
    lines += ["", *plots, "## Evaluation", "", *eval_table(out / "eval", stages), ""]
    readme = dest / "README.md"
    readme.write_text("\n".join(lines), encoding="utf-8")
    return readme


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="baby", help="run name")
    ap.add_argument("--root", default="out", help="the runs' output root (the stages' --out)")
    ap.add_argument("--runs", default="runs", help="TensorBoard root (the stages' --runs)")
    ap.add_argument("--dest", default=str(Path(__file__).resolve().parent / "report"), help="report directory")
    args = ap.parse_args(argv)
    print(f"wrote {make_report(args.name, Path(args.root), Path(args.runs), Path(args.dest))}")


if __name__ == "__main__":
    main_guard(main)
