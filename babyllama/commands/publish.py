"""Publish a reference run of the whole chain, and measure the tolerance `babyllama compare` judges runs with.

    babyllama publish run --name baby          # the chain from scratch, evaluated -> docs/published/baby/
                                                    #   and docs/report/ (~25 min on 2 CPU cores)
    babyllama publish variants --name baby     # the same commands on "other machines" and with other seeds
    babyllama publish tolerance --name baby    # their differences -> docs/published/baby/tolerance.json

`run` works in <work>/reference (default work: out/_publish; it must not hold checkpoints yet) and runs exactly
the commands a user runs (`babyllama pretrain --name baby`, then sft, reward, dpo, ppo), each with --out
and --runs pointing into the work directory; then `babyllama evaluate` on every stage and `babyllama report`,
and copies, per stage, log.jsonl, run.json (command, config, commit, versions, machine, wall time, final metrics),
the TensorBoard event files and the evaluation JSON to docs/published/<name>/<stage>/. tolerance.json is kept
(remeasure it with `variants` and `tolerance` when a change could move the curves differently, e.g. a new preset).

`variants` runs the reference's commands again in <work>/<variant> (a stage whose run.json exists is kept, so a
killed session continues): the same machine again, one thread, the AVX2 kernels instead of AVX-512 (another CPU's
arithmetic), 2 processes with half the batch each, 2 nodes of one process (torchrun --nnodes 2, rendezvous on
127.0.0.1, gloo), and other seeds (token data copied from the reference, so only initialisation, data order and
sampling change). docs/reproducibility.md has the measured numbers.

Multi-GPU or multi-node runs are published the same way: run the chain with your launcher into a run directory,
then `babyllama publish collect --name <name> --from <out>/<name> --from-runs <runs>/<name>`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from babyllama.cli import ArgumentParser
from babyllama.commands import report
from babyllama.errors import UserError
from babyllama.eval.compare import (
    DATA_RECORD,
    DIVERGED,
    DRIFTED,
    FAMILIES,
    REPRODUCED,
    STAGES,
    TOLERANCE,
    compare_runs,
    derive_tolerance,
    family_dir,
)
from babyllama.eval.stats import clopper_pearson_upper, mean_interval
from babyllama.shipped import PUBLISHED, REPO_ROOT, TRAIN_CORPUS, portable
from babyllama.train.checkpoint import list_checkpoints
from babyllama.train.run_config import PretrainConfig
from babyllama.train.run_record import RUN_RECORD, read_run_record

DOCS = REPO_ROOT / "docs"
EVENTS = "events.out.tfevents.*"


@dataclass
class Variant:
    """One way of running the reference's commands differently: environment, launcher, extra flags."""

    env: dict[str, str] = field(default_factory=dict)
    processes: int = 1  # torchrun processes per node
    nodes: int = 1
    flags: tuple[str, ...] = ()
    pretrain_flags: tuple[str, ...] = ()  # flags for the pretraining command only
    stages: tuple[str, ...] = STAGES
    seed_of_data: bool = False  # copy the reference's tokenizer and token data (a --seed also splits the data)
    # "machine": the same run elsewhere; "seed": the same recipe with other randomness; "changed": another recipe
    # (what compare must call diverged)
    kind: str = "machine"
    family: str = "bf16"  # the numerics family whose reference it is compared with (FAMILIES)
    corpus_fraction: float = 1.0  # < 1: train on the shipped corpus less every 1/(1 - fraction)-th document
    planted_bug: str | None = None  # python run before the stage script (a deliberate model bug)
    # a run made on a machine this one cannot stand in for: its logs are taken from this commit's published run
    from_commit: str | None = None


# The numerics a user's CPU gets from `--mixed-precision auto` (docs/reproducibility.md): bf16 + compile where the
# CPU has native bf16 (AVX-512 BF16 / AMX), fp32 + compile elsewhere (AVX2-only x86, ARM). Each has a published
# reference; the fp32 one is made here with AVX2 kernels and pretraining forced to fp32, as such a CPU runs it.
FP32 = ("--mixed-precision", "fp32")
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2"}
FAMILY_RUNS = {"bf16": Variant(), "fp32": Variant(env=AVX2, pretrain_flags=FP32)}
BABY = PretrainConfig()
HALF_BATCH = ("--batch-size", str(BABY.batch_size // 2))  # 2 processes, the same global batch
NO_ROPE = "import babyllama.model.llama as m; m.apply_rope = lambda x, cos, sin: x"
VARIANTS = {
    "rerun": Variant(stages=("pretrain",)),
    # one thread per process (how two runs share a machine); the reference runs the default threads, as a user does
    "threads1": Variant(env={"OMP_NUM_THREADS": "1"}),
    # eager: with ATEN_CPU_CAPABILITY=avx2, inductor's bf16 code for the baby model crashes (SIGSEGV at the first
    # step, torch 2.13.0+cpu)
    "avx2": Variant(env=AVX2, flags=("--torch-compile", "off")),
    "2proc": Variant(processes=2, flags=HALF_BATCH, stages=("pretrain",)),
    # one thread per process, as torchrun sets it for several processes per node (with one per node it does not)
    "2node": Variant(nodes=2, env={"OMP_NUM_THREADS": "1"}, flags=HALF_BATCH, stages=("pretrain",)),
    # the published bf16 pretraining of 2026-12-02, made on an AMD EPYC (AVX-512 BF16, no AMX); the reference since
    # 2026-12-06 ran on an Intel Xeon whose oneDNN uses AMX for bf16 matrix products: differs from step 1
    "epyc": Variant(stages=("pretrain",), from_commit="e1610e1"),
    # the fp32 family on a machine without a C++ compiler for inductor: `auto` then pretrains eager
    "fp32-eager": Variant(env=AVX2, pretrain_flags=(*FP32, "--torch-compile", "off"),
                          stages=("pretrain",), family="fp32"),
    # the fp32 family's command on this machine's AVX-512 kernels (its reference ran AVX2 kernels)
    "fp32-avx512": Variant(pretrain_flags=FP32, family="fp32"),
    **{f"seed{seed}": Variant(flags=("--seed", str(seed)), seed_of_data=True, kind="seed")
       for seed in (1338, 1339, 1340, 1341)},
    # another seed in the fp32 family, held back from the bands: a false-alarm check of that family
    "fp32-seed1342": Variant(env=AVX2, pretrain_flags=FP32, flags=("--seed", "1342"),
                             seed_of_data=True, kind="heldout", family="fp32"),
    # recipes compare must tell apart from the published one
    "lr2x": Variant(pretrain_flags=("--lr", str(2 * BABY.lr)), stages=("pretrain",), kind="changed"),
    "half-steps": Variant(pretrain_flags=("--max-steps", str(BABY.max_steps // 2)), stages=("pretrain",),
                          kind="changed"),
    "corpus80": Variant(corpus_fraction=0.8, stages=("pretrain",), kind="changed"),
    "no-rope": Variant(planted_bug=NO_ROPE, stages=("pretrain",), kind="changed"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(stage: str, name: str, root: Path, variant: Variant) -> float:
    """One stage's command in root/{out,runs}; its output goes to root/<stage>.txt. Returns the wall seconds."""
    script = ["-m", "babyllama", stage, "--name", name, "--out", str(root / "out"), "--runs", str(root / "runs"),
              *variant.flags, *(variant.pretrain_flags if stage == "pretrain" else ())]
    if stage == "pretrain" and variant.corpus_fraction < 1:
        # the shipped tokenizer (the reference's), so that only the training text differs
        script += ["--tokenizer", str(root.parent / "reference" / "out" / name / "tokenizer"),
                   "--corpus", *map(str, thinned_corpus(root, variant.corpus_fraction))]
    if variant.planted_bug:
        script = ["-c", f"{variant.planted_bug}; import runpy, sys; sys.argv = sys.argv[2:]; "
                  "runpy.run_module('babyllama', run_name='__main__', alter_sys=True)", *script]
    if variant.processes * variant.nodes == 1:
        commands = [[sys.executable, *script]]
    else:
        port = free_port()
        commands = [[sys.executable, "-m", "torch.distributed.run", f"--nnodes={variant.nodes}",
                     f"--node-rank={node}", f"--nproc-per-node={variant.processes}", "--master-addr=127.0.0.1",
                     f"--master-port={port}", *script] for node in range(variant.nodes)]
    log = root / f"{stage}.txt"
    print(f"{root.name}/{stage}: {' '.join(commands[0][1:])}  (output in {log})", flush=True)
    start = time.time()
    with log.open("w", encoding="utf-8") as out:
        procs = [subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, **variant.env}, stdout=out,
                                  stderr=subprocess.STDOUT) for cmd in commands]
        codes = [p.wait() for p in procs]
    if any(codes):
        raise UserError(f"{root.name}/{stage} failed (exit {max(codes)}); its output is in {log}")
    return time.time() - start


def thinned_corpus(root: Path, keep: float) -> list[Path]:
    """The shipped training files without every n-th document (n = 1 / (1 - keep)), written under root."""
    every = round(1 / (1 - keep))
    out = []
    for source in TRAIN_CORPUS:
        lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
        target = root / "corpus" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(line for i, line in enumerate(lines) if (i + 1) % every), encoding="utf-8")
        out.append(target)
    return out


def run_chain(name: str, root: Path, variant: Variant, stages: tuple[str, ...]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        if variant.from_commit:  # another machine's run: its published log and record, from git
            target = root / "out" / name / stage
            target.mkdir(parents=True, exist_ok=True)
            for part in ("log.jsonl", RUN_RECORD):
                source = f"{variant.from_commit}:{(PUBLISHED / name / stage / part).relative_to(REPO_ROOT)}"
                (target / part).write_bytes(subprocess.run(["git", "show", source], cwd=REPO_ROOT, check=True,
                                                           capture_output=True).stdout)
            print(f"{root.name}/{stage}: taken from {variant.from_commit}")
            continue
        if read_run_record(root / "out" / name / stage / RUN_RECORD) is not None:
            print(f"{root.name}/{stage}: done before, kept")
            continue
        if list_checkpoints(root / "out" / name / stage):
            raise UserError(f"{root / 'out' / name / stage} holds checkpoints of an unfinished run; delete it")
        print(f"{root.name}/{stage}: {run_stage(stage, name, root, variant):.0f} s", flush=True)


def collect(name: str, out: Path, runs: Path, dest: Path, family: str = "bf16") -> None:
    """Copy every stage's log, record, event files and evaluation from a run into `dest` (replacing them)."""
    stages = [s for s in STAGES if (out / s / RUN_RECORD).is_file()]
    if not stages:
        raise UserError(f"{out}: no finished stage (no <stage>/{RUN_RECORD}); run the chain first")
    # a run made outside the repository (--work elsewhere) names its directory <run> in what is published: paths
    # inside the repository are already written relative to it (`portable`)
    root = str(out.resolve().parents[1])
    outside = not out.resolve().is_relative_to(REPO_ROOT)

    def published(value: object) -> object:
        value = portable(value)
        return json.loads(json.dumps(value).replace(root, "<run>")) if outside else value

    for stage in stages:
        target = dest / stage
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        shutil.copy2(out / stage / "log.jsonl", target / "log.jsonl")
        record = published(json.loads((out / stage / RUN_RECORD).read_text(encoding="utf-8")))
        (target / RUN_RECORD).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", "utf-8")
        meta = out / "data" / "meta.json"
        if stage == "pretrain" and meta.is_file():  # what the token data was made from, for compare's data check
            record = json.loads(meta.read_text(encoding="utf-8"))
            record = {k: record[k] for k in ("seed", "val_fraction", "corpus", "input", "splits")}
            (target / DATA_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        for events in sorted((runs / stage).glob(EVENTS)):
            shutil.copy2(events, target / events.name)
        evaluation = out / "eval" / f"{stage}.json"
        if evaluation.is_file():  # its checkpoint path written like the run record's
            result = published(json.loads(evaluation.read_text(encoding="utf-8")))
            (target / "eval.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", "utf-8")
    write_manifest(name, dest, stages, family)
    print(f"published {', '.join(stages)} -> {dest}")


def write_manifest(name: str, dest: Path, stages: list[str], family: str = "bf16") -> None:
    """dest/README.md: per stage the command, steps, wall time and final metrics, and where the run was made."""
    records = {s: read_run_record(dest / s / RUN_RECORD) for s in stages}
    first = records[stages[0]]
    git, machine, software = first.get("git") or {}, first["machine"], first["software"]
    lines = [f"# Published run: `{name}`", "",
             f"Made by `babyllama publish run --name {name}"
             f"{'' if family == 'bf16' else f' --family {family}'}`: the {family} numerics family's reference; do not "
             f"edit by hand. Compare yours with "
             f"`babyllama compare --name {name}`; see docs/reproducibility.md.", "",
             f"Commit `{git.get('commit', 'unknown')}`{' (with local changes)' if git.get('dirty') else ''}; "
             f"{machine['cpu']}, {machine['cpu_count']} cores, {machine['torch_threads']} torch threads, "
             f"{machine['cpu_capability']} kernels, device {machine['device']}; " +
             ", ".join(f"{k} {v}" for k, v in software.items()) + ".", "",
             "| stage | command | steps | wall time | final metrics |", "|---|---|---|---|---|"]
    for stage, record in records.items():
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in record["metrics"].items())
        lines.append(f"| {stage} | `{record['commands'][-1]}` | {record['steps']} | {record['wall_s'] / 60:.1f} min "
                     f"| {metrics} |")
    lines += ["", "Each stage directory holds `log.jsonl` (one line per step), `run.json` (every flag and config "
              "value, versions, machine, final metrics), the TensorBoard event files "
              f"(`tensorboard --logdir_spec yours:runs/{name},published:docs/published/{name}`) and `eval.json` "
              f"(`babyllama evaluate --name {name} --stage <stage>`).", ""]
    (dest / "README.md").write_text("\n".join(lines), encoding="utf-8")


# the final metric each stage's table shows beside the loss curve
HEADLINE = {"pretrain": "val_loss", "sft": "choice_acc", "reward": "val_accuracy", "dpo": "val_reward_accuracy",
            "ppo": "heldout_score_gain", "grpo": "heldout_skill_acc"}


def measured_tables(tolerance: dict) -> list[str]:
    """Markdown, one table per stage: each variant's difference from the reference, and the bands derived."""
    lines = []
    for stage, bands in tolerance["stages"].items():
        metric = HEADLINE[stage]
        lines += ["", f"**{stage}** (moving average over {bands['window']} steps)", "",
                  "| run | steps | max \\|Δloss\\| (step) | max smoothed \\|Δloss\\| | Δ last loss "
                  f"| \\|Δ {metric}\\| |",
                  "|---|---|---|---|---|---|"]
        for label, stages in tolerance["measured"].items():
            m = stages.get(stage)
            if m is None:
                continue
            delta = m["metrics"].get(metric)
            lines.append(f"| {label} | {m['steps']} | {m['max_abs_delta_loss']:.2g} ({m['at_step']}) | "
                         f"{m['max_smoothed_delta_loss']:.2g} | {m['final_loss_delta']:+.2g} | "
                         f"{'—' if delta is None else f'{delta:.3g}'} |")
        drift = [band for _, band in bands["drifted"]["smoothed_loss"]]
        lines.append(f"| **band** | | reproduced: up to {bands['reproduced']['loss'][-1][1]:.2g} | drifted: "
                     f"{min(drift):.2g}–{max(drift):.2g} | | "
                     f"reproduced {bands['reproduced']['metrics'][metric]:.2g}, "
                     f"drifted {bands['drifted']['metrics'][metric]:.2g} |")
    return lines


def bands_from(found: dict[str, Path], leave_out: str | None = None
               ) -> tuple[dict[str, tuple[str, Path]], dict[str, Path]]:
    """(machines, seeds) arguments of derive_tolerance from the variant runs found, without `leave_out`."""
    machines = {k: (VARIANTS[k].family, v) for k, v in found.items()
                if VARIANTS[k].kind == "machine" and k != leave_out}
    seeds = {k: v for k, v in found.items() if VARIANTS[k].kind == "seed" and k != leave_out}
    return machines, seeds


def checks(references: dict[str, Path], found: dict[str, Path]) -> dict:
    """Every variant judged by compare against its family's reference, as a user's run would be: a machine or seed
    run with bands derived WITHOUT it (leave one out, so that no run judges itself), the held-out and changed
    recipes with the full bands."""
    out = {}
    for label, run in found.items():
        variant = VARIANTS[label]
        in_bands = variant.kind in ("machine", "seed")
        tolerance = derive_tolerance(references, *bands_from(found, label if in_bands else None))["stages"]
        reference = references.get(variant.family)
        if reference is None:
            continue
        stages = [s for s in STAGES if (run / s / "log.jsonl").is_file() and (reference / s).is_dir()]
        if not stages:  # not run yet
            continue
        results, _ = compare_runs(run, reference, tolerance, stages, plots=None)
        out[label] = {"kind": variant.kind, "family": variant.family,
                      "stages": {r.stage: {"verdict": r.judgement.verdict, "first_step": r.judgement.first_step,
                                           "reasons": r.judgement.reasons} for r in results}}
    return out


def check_table(checks: dict) -> list[str]:
    """Markdown: each variant's verdict per stage, then the false-alarm count over the faithful runs."""
    lines = ["| run | kind | family | " + " | ".join(STAGES) + " |", "|---" * (3 + len(STAGES)) + "|"]
    counts = {REPRODUCED: 0, DRIFTED: 0, DIVERGED: 0}
    for label, check in checks.items():
        cells = []
        for stage in STAGES:
            c = check["stages"].get(stage)
            if c is None:
                cells.append("—")
                continue
            if check["kind"] != "changed":
                counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
            cells.append(f"**diverged** (step {c['first_step']})" if c["verdict"] == DIVERGED and c["first_step"]
                         else c["verdict"])
        lines.append(f"| {label} | {check['kind']} | {check['family']} | " + " | ".join(cells) + " |")
    n = sum(counts.values())
    if n:
        lines += ["", f"Faithful runs, {n} stage verdicts: {counts[REPRODUCED]} reproduced, {counts[DRIFTED]} "
                  f"drifted, {counts[DIVERGED]} diverged (false-alarm rate per stage {counts[DIVERGED] / n:.1%}, "
                  f"95% upper bound {clopper_pearson_upper(counts[DIVERGED], n):.1%})."]
    return lines


def seed_table(reference: Path, seeds: dict[str, Path]) -> list[str]:
    """Markdown: every stage's final metrics and their gains over the stage's starting model, as the mean over the
    reference and the seed runs with a 95% interval (t over runs): what the recipe does, beyond one run's luck."""
    runs = [reference, *seeds.values()]
    lines = ["| stage | metric | runs | mean | 95% interval | published run |", "|---|---|---|---|---|---|"]
    for stage in STAGES:
        records = [read_run_record(r / stage / RUN_RECORD) for r in runs]
        records = [r["metrics"] for r in records if r]
        if not records:
            continue
        gains = [(k, k.replace("before_", "", 1)) for k in records[0] if "before_" in k]
        rows = [(k, [m[k] for m in records if k in m]) for k in records[0] if "before_" not in k]
        rows += [(f"{after} − {before}", [m[after] - m[before] for m in records if after in m and before in m])
                 for before, after in gains if after in records[0] and not before.endswith("_kl")]
        for name, values in rows:
            mean, low, high = (0.0 if abs(v) < 1e-12 else v for v in mean_interval(values))  # float noise
            lines.append(f"| {stage} | {name} | {len(values)} | {mean:.4g} | [{low:.4g}, {high:.4g}] "
                         f"| {values[0]:.4g} |")
    return lines


def copy_token_data(reference: Path, root: Path, name: str) -> None:
    for part in ("tokenizer", "data"):
        source, target = reference / "out" / name / part, root / "out" / name / part
        if not source.is_dir():
            raise UserError(f"{source}: run `babyllama publish run --name {name}` first (a seed variant "
                            "reuses its token data)")
        if not target.exists():
            shutil.copytree(source, target)


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("run", "variants", "tolerance", "collect"))
    ap.add_argument("--name", default="baby", help="run preset")
    ap.add_argument("--work", default=str(REPO_ROOT / "out" / "_publish"), help="where the runs are made")
    ap.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="variants: only these")
    ap.add_argument("--stages", nargs="+", choices=STAGES, help="run / variants: only these stages")
    ap.add_argument("--from", dest="source", help="collect: the run directory (<out>/<name>)")
    ap.add_argument("--from-runs", help="collect: its TensorBoard directory (<runs>/<name>)")
    ap.add_argument("--device", default="cpu", help="run: device for the evaluation")
    ap.add_argument("--family", default="bf16", choices=FAMILIES,
                    help="run / collect: which numerics family's reference (bf16 is docs/published/<name> itself)")
    args = ap.parse_args(argv)
    work, dest = Path(args.work).resolve(), PUBLISHED / args.name
    stages = tuple(args.stages or STAGES)
    if args.command == "run":
        family = FAMILY_RUNS[args.family]
        root = work / ("reference" if args.family == "bf16" else f"reference-{args.family}")
        if args.family != "bf16":  # the same seed splits the same data: reuse the bf16 reference's
            copy_token_data(work / "reference", root, args.name)
        run_chain(args.name, root, family, stages)
        out, runs = root / "out", root / "runs"
        report.evaluate_stages(out / args.name, args.device, None, None)
        if args.family == "bf16":
            written = report.make_report(args.name, out, runs, DOCS / "report", evaluated=True,
                                             command=f"babyllama publish run --name {args.name}")
            print(f"wrote {written}")
        collect(args.name, out / args.name, runs / args.name, family_dir(dest, args.family), args.family)
    elif args.command == "collect":
        if not args.source:
            raise UserError("collect: pass --from <out>/<name> (and --from-runs <runs>/<name> for the event files)")
        collect(args.name, Path(args.source), Path(args.from_runs or "/nonexistent"), family_dir(dest, args.family),
                args.family)
    elif args.command == "variants":
        for label in args.only or VARIANTS:
            variant = VARIANTS[label]
            if variant.seed_of_data:
                copy_token_data(work / "reference", work / label, args.name)
            run_chain(args.name, work / label, variant, tuple(s for s in stages if s in variant.stages))
    else:
        found = {label: work / label / "out" / args.name for label in VARIANTS if (work / label / "out").is_dir()}
        if not found:
            raise UserError(f"{work}: no variant runs; run `babyllama publish variants --name {args.name}` first")
        references = {f: family_dir(dest, f) for f in FAMILIES if (family_dir(dest, f) / "pretrain").is_dir()}
        tolerance = derive_tolerance(references, *bands_from(found))
        tolerance["checks"] = checks(references, found)
        (dest / TOLERANCE).write_text(json.dumps(tolerance, indent=1) + "\n", encoding="utf-8")
        seeds = bands_from(found)[1]
        print("\n".join(measured_tables(tolerance) + [""] + check_table(tolerance["checks"]) + [""] +
                        seed_table(references[FAMILIES[0]], seeds)))
        print(f"wrote {dest / TOLERANCE}")
