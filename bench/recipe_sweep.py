"""Pretraining recipes for the `baby` preset, measured: held-out bits per byte against CPU minutes.

    babyllama bench recipe_sweep --work /tmp/sweep --dest bench/results/sweep.jsonl          # every recipe
    babyllama bench recipe_sweep --work /tmp/sweep --recipes 8x1200,8x2400                    # some of them
    babyllama bench recipe_sweep --smoke                                                      # CI keeps it working

Each recipe is `babyllama pretrain` with some flags (and, for another model shape, an HF config.json it writes
as --model), run one after another, all on one tokenizer and one set of token bins: the first recipe builds them,
the others copy them together with its cached compressor results (a recipe with its own --vocab-size trains its
own). Then `babyllama evaluate --stage pretrain` on the shipped held-out files. Prints one JSON object
per recipe: pretraining wall seconds (its run.json), passes over the training tokens, validation loss, held-out
bpb per language and the margin over PPMd, and a table at the end. Runs are kept in <work>/out/<recipe>; a
finished recipe is not run again. Time it alone on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from jsonl import emit  # bench/ is on sys.path as the script's folder

from babyllama.cli import ArgumentParser
from babyllama.model.config import preset
from babyllama.shipped import REPO_ROOT
from babyllama.train.run_config import PretrainConfig
from babyllama.train.run_record import RUN_RECORD

# name -> (`babyllama pretrain` flags, changes to the baby model's shape or None)
RECIPES: dict[str, tuple[list[str], dict | None]] = {
    "16x600": (["--batch-size", "16", "--max-steps", "600", "--warmup-steps", "30"], None),  # the recipe before
    "16x480-lr2e-3": (["--batch-size", "16", "--max-steps", "480", "--warmup-steps", "30", "--lr", "2e-3"], None),
    "16x480": (["--batch-size", "16", "--max-steps", "480", "--warmup-steps", "30"], None),
    "16x480-lr6e-4": (["--batch-size", "16", "--max-steps", "480", "--warmup-steps", "30", "--lr", "6e-4"], None),
    "8x960": (["--max-steps", "960"], None),
    "4x1920": (["--batch-size", "4", "--max-steps", "1920", "--warmup-steps", "120"], None),
    "8x1200": ([], None),  # the preset as it is
    "8x2400": (["--max-steps", "2400", "--warmup-steps", "120"], None),
    "8x1200-320x5": ([], dict(dim=320, n_layers=5, n_heads=10, n_kv_heads=5, ffn_dim=864)),  # a bigger model
    "8x1200-v2048": (["--vocab-size", "2048"], None),  # vocabulary: shorter tokens, more of them per byte
    "8x1200-v8192": (["--vocab-size", "8192"], None),
    "16x1200-s128": (["--batch-size", "16", "--seq-len", "128"], None),  # context, at the same tokens per step
    "32x1200-s64": (["--batch-size", "32", "--seq-len", "64"], None),
    "4x1200-s512": (["--batch-size", "4", "--seq-len", "512"], None),
    "8x1200-min0": (["--min-lr-ratio", "0"], None),  # schedule: cosine down to 0 instead of 10%
}


def run(cmd: list[str], log: Path) -> None:
    with log.open("w") as f:
        done = subprocess.run(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {done.returncode}); see {log}")


def measure(recipe: str, work: Path, smoke: bool) -> dict:
    flags, shape = RECIPES[recipe]
    out = work / "out"
    run_dir = out / recipe
    result = run_dir / "eval" / "pretrain.json"
    if not (run_dir / "pretrain" / RUN_RECORD).exists():  # a finished pretraining run is kept
        shutil.rmtree(run_dir / "pretrain", ignore_errors=True)
        prepared = next((d for d in sorted(out.glob("*")) if (d / "data" / "meta.json").exists()), None)
        if prepared is not None and prepared != run_dir and "--vocab-size" not in flags:  # one tokenizer for all
            # eval/baseline: the compressors' results, cached per corpus and split, which these runs share
            for part in ("tokenizer", "data", "eval/baseline"):
                if (prepared / part).exists() and not (run_dir / part).exists():
                    shutil.copytree(prepared / part, run_dir / part)
        cmd = [sys.executable, "-m", "babyllama", "pretrain", "--name", recipe, "--preset", "baby", "--out", str(out),
               "--runs", str(work / "runs"), *flags]
        if shape:
            config = work / f"{recipe}.json"
            # the recipes share the preset's tokenizer size (the sweep does not vary it)
            config.write_text(json.dumps(preset("baby", vocab_size=PretrainConfig().vocab_size, **shape).to_hf()))
            cmd += ["--model", str(config)]
        if smoke:
            cmd += ["--max-steps", "4", "--eval-every", "2", "--ckpt-every", "4", "--seq-len", "32",
                    "--vocab-size", "512"]
        run(cmd, work / f"{recipe}.log")
    if not result.exists():
        evaluate = [sys.executable, "-m", "babyllama", "evaluate", "--name", recipe, "--stage", "pretrain", "--out",
                    str(out)] + (["--max-docs", "4", "--max-items", "4"] if smoke else [])
        run(evaluate, work / f"{recipe}.eval.log")
    record = json.loads((run_dir / "pretrain" / RUN_RECORD).read_text())
    config = record["config"]
    seq_len = config["seq_len"] or preset("baby", vocab_size=config["vocab_size"]).max_seq_len
    train_tokens = json.loads((run_dir / "data" / "meta.json").read_text())["splits"]["train"]["tokens"]
    evaluation = json.loads(result.read_text())
    metrics = evaluation["metrics"]
    tokens = record["steps"] * config["batch_size"] * config["grad_accum"] * record["world_size"] * seq_len
    return {"recipe": recipe, "flags": " ".join(flags), "shape": shape, "params": evaluation["params"],
            "steps": record["steps"], "epochs": round(tokens / train_tokens, 2), "pretrain_s": record["wall_s"],
            "numerics": record.get("numerics"),
            "val_loss": round(record["metrics"]["val_loss"], 4),
            **{k: round(metrics[k], 4) for k in ("bpb", "zh_bpb", "en_bpb", "zh_margin_pct", "en_margin_pct")}}


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="out/_sweep", help="where the runs go")
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of: {', '.join(RECIPES)}")
    ap.add_argument("--dest", help="append results as JSON lines to this file")
    ap.add_argument("--smoke", action="store_true", help="4 steps of two recipes: checks the script runs")
    args = ap.parse_args()
    names = ["8x1200", "8x1200-320x5"] if args.smoke else args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"--recipes: unknown {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    rows = []
    for name in names:
        row = measure(name, Path(args.work), args.smoke)
        emit(row, args.dest)
        rows.append(row)
    print("\n| recipe | steps | epochs | pretrain s | val loss | bpb | zh bpb | en bpb | zh vs PPMd | en vs PPMd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['steps']} | {r['epochs']} | {r['pretrain_s']:.0f} | {r['val_loss']:.4f} | "
              f"{r['bpb']:.4f} | {r['zh_bpb']:.4f} | {r['en_bpb']:.4f} | {r['zh_margin_pct']:+.1f}% | "
              f"{r['en_margin_pct']:+.1f}% |")


if __name__ == "__main__":
    main()
