"""`babyllama lora merge`: the LoRA adapters of a --lora-rank stage folded into their base, as one checkpoint of
every weight (the adapters' step; their tokenizer record kept).

    babyllama lora merge --name baby --stage sft --dest merged/sft     # the newest out/baby/sft checkpoint
    babyllama lora merge --ckpt out/baby/dpo/step_00000040.pt --dest merged/dpo
    babyllama lora merge --ckpt adapters.pt --base copy_of_sft/ --dest merged/   # the base moved or was rotated away

Every consumer reads an adapter checkpoint as it is (`train.checkpoint.load_model` merges it on load, from its base
checkpoint); merging once gives a file that no longer needs its base (it can be moved, the base deleted), loads
without the merge, and can start another stage with --init. The base must hold the very weights the adapters were
trained on: another one (its weights' fingerprint) is refused, as is a missing one.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from babyllama.cli import ArgumentParser, add_flag
from babyllama.errors import UserError
from babyllama.files import claim_out_dir, staged_dir
from babyllama.train.checkpoint import (
    adapter_record,
    atomic_save,
    checkpoint_path,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
)


def merge_adapters(ckpt: str | Path, dest: str | Path, base: str | Path | None = None,
                   overwrite: bool = False) -> Path:
    """Write the adapters of checkpoint `ckpt` (a file, or the newest in a stage directory) merged onto their base
    (`base`, else the checkpoint they record) as `dest/step_XXXXXXXX.pt`; returns that file. A non-empty `dest` is
    refused unless `overwrite`, which replaces the checkpoints there."""
    found = resolve_checkpoint(ckpt)
    state = load_checkpoint(found)
    if adapter_record(state) is None:
        raise UserError(f"{found}: holds every weight already (it has no LoRA adapters); use it as it is")
    dest = Path(dest)
    claim_out_dir(dest, overwrite, "checkpoints (step_*.pt)")
    model = load_model(found, base=base)
    extra = {"merged_from": str(found), **{k: v for k, v in state["extra"].items() if k == "tokenizer"}}
    merged = {"model": model.state_dict(), "model_config": model.config.to_dict(), "step": state["step"],
              "extra": extra}
    # the checkpoints already there go: a newer one would be loaded instead of the merged one
    with staged_dir(dest, replaces=lambda entry: re.fullmatch(r"step_\d+\.pt", entry.name) is not None) as tmp:
        atomic_save(merged, checkpoint_path(tmp, state["step"]))
    return checkpoint_path(dest, state["step"])


def main_merge(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="baby", help="run name: reads <out>/<name>/<stage> (default: baby)")
    p.add_argument("--stage", default="sft", help="the --lora-rank stage: sft, dpo, ppo, grpo (default: sft)")
    add_flag(p, "--out", "--root", default="out", help="output root of the training runs (default: out)")
    add_flag(p, "--ckpt", "--checkpoint", help="an adapter checkpoint file or stage directory instead of "
                                               "--name/--stage")
    p.add_argument("--base", help="the checkpoint the adapters were trained on (file or directory), where it is not "
                                  "at the place they record")
    p.add_argument("--dest", required=True, help="the directory to write the merged checkpoint to")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoints (step_*.pt) in an existing "
                                                            "non-empty --dest")
    args = p.parse_args(argv)
    ckpt = Path(args.ckpt) if args.ckpt else Path(args.out) / args.name / args.stage
    print(f"wrote {merge_adapters(ckpt, args.dest, args.base, args.overwrite)}")
