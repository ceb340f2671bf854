"""Bar chart of tokens/s per system or lever from benchmark result files (JSON lines written with --dest).

    babyllama bench plot bench/results/*_train.jsonl --dest docs/performance_train.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt

from babyllama.cli import ArgumentParser


def read_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def plot(rows: list[dict], out: Path, title: str) -> None:
    labels = [f"{r['system']} (batch {r['batch']})" if "batch" in r else r["system"] for r in rows]
    values = [r["tokens_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    bars = ax.barh(labels, values, color="#4C72B0")
    for bar, r in zip(bars, rows):
        mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") else ""
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['tokens_per_s']:,.0f}{mfu}",
                va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s")
    ax.set_title(title)
    ax.set_xlim(0, max(values) * 1.35)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--dest", type=Path, required=True, help="the .png file to write")
    ap.add_argument("--title", default="training throughput")
    args = ap.parse_args()
    plot(read_rows(args.results), args.dest, args.title)
    print(f"wrote {args.dest}")


if __name__ == "__main__":
    main()
