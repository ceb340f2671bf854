"""Export babyllama checkpoints to Hugging Face / bert4torch, or import those into a babyllama checkpoint.

    python docs/convert.py export-hf --name baby --stage sft --out hf_dir
    python docs/convert.py export-hf --checkpoint out/baby/sft/step_00000300.pt --tokenizer out/baby/tokenizer \
        --out hf_dir
    python docs/convert.py import-hf hf_dir --out imported/
    python docs/convert.py import-hf smollm2_dir --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --out imported/
    python docs/convert.py export-bert4torch --name baby --stage pretrain --out b4t_dir
    python docs/convert.py export-gguf --name baby --stage sft --out baby-sft.gguf --dtype q8_0
    python docs/convert.py import-bert4torch b4t_dir --out imported/

Exports take the newest checkpoint of out/<name>/<stage> (or --checkpoint) and the run's tokenizer
(out/<name>/tokenizer, or --tokenizer); --root changes "out". Imports write <out>/step_00000000.pt (model weights
and config, no optimizer state) and, when the source has one, the tokenizer to <out>/tokenizer. See docs/convert.md.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from babyllama.cli import add_flag, main_guard
from babyllama.convert.bert4torch import export_bert4torch, import_bert4torch
from babyllama.convert.hf import export_hf, import_hf
from babyllama.errors import UserError

GGUF_DTYPES = ("f32", "f16", "q8_0")  # babyllama.convert.gguf.DTYPES; that module needs the optional `gguf` package


def run_checkpoint(args: argparse.Namespace) -> Path:
    return Path(args.ckpt) if args.ckpt else Path(args.root) / args.name / args.stage


def run_tokenizer(args: argparse.Namespace) -> Path:
    return Path(args.tokenizer) if args.tokenizer else Path(args.root) / args.name / "tokenizer"


def add_source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="baby", help="run name: reads <root>/<name>/<stage>")
    p.add_argument("--stage", default="sft", help="pretrain, sft, reward, dpo, ppo")
    p.add_argument("--root", default="out", help="the runs' output root (the stages' --out)")
    add_flag(p, "--ckpt", "--checkpoint", help="a checkpoint file or stage directory instead of --name/--stage")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    hf_out = sub.add_parser("export-hf", help="checkpoint -> transformers LlamaForCausalLM directory")
    add_source_flags(hf_out)
    hf_out.add_argument("--tokenizer", help="tokenizer dir/file (default <root>/<name>/tokenizer)")
    b4t_out = sub.add_parser("export-bert4torch", help="checkpoint -> bert4torch_config.json + bert4torch_model.pt")
    add_source_flags(b4t_out)
    gguf_out = sub.add_parser("export-gguf", help="checkpoint -> one GGUF file for llama.cpp/ollama (+ Modelfile)")
    add_source_flags(gguf_out)
    gguf_out.add_argument("--tokenizer", help="tokenizer dir/file (default <root>/<name>/tokenizer)")
    gguf_out.add_argument("--dtype", choices=GGUF_DTYPES, default="f32",
                          help="weight type: f32 (exact), f16, q8_0 (8-bit, about 1/4 of f32)")
    gguf_out.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    gguf_out.add_argument("--out", required=True, help="the .gguf file to write (<stem>.Modelfile goes beside it)")
    hf_in = sub.add_parser("import-hf", help="HF LLaMA directory (or GGUF file in it) -> babyllama checkpoint")
    hf_in.add_argument("src", help="directory written by save_pretrained (or holding --gguf-file)")
    hf_in.add_argument("--gguf-file", help="GGUF file name inside src (needs pip install -r requirements-gguf.txt)")
    b4t_in = sub.add_parser("import-bert4torch", help="bert4torch LLaMA -> babyllama checkpoint")
    b4t_in.add_argument("src", help="directory with bert4torch_config.json, or that file")
    b4t_in.add_argument("--weights", help="weights file (default: bert4torch_model.pt next to the config)")
    for p in (hf_out, b4t_out, hf_in, b4t_in):
        p.add_argument("--out", required=True, help="output directory")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.command == "export-hf":
        done = export_hf(run_checkpoint(args), run_tokenizer(args), args.out)
    elif args.command == "export-gguf":
        if importlib.util.find_spec("gguf") is None:
            raise UserError("export-gguf needs the gguf package (llama.cpp's gguf-py): pip install -r "
                            "requirements-gguf.txt")
        from babyllama.convert.gguf import export_gguf

        done = export_gguf(run_checkpoint(args), run_tokenizer(args), args.out, args.dtype, args.overwrite,
                           name=f"{args.name}-{args.stage}" if not args.ckpt else None)
    elif args.command == "export-bert4torch":
        done = export_bert4torch(run_checkpoint(args), args.out)
    elif args.command == "import-hf":
        done = import_hf(args.src, args.out, args.gguf_file)
    else:
        done = import_bert4torch(args.src, args.out, args.weights)
    print(f"wrote {done}")


if __name__ == "__main__":
    main_guard(main)
