"""Export checkpoints to Hugging Face, GGUF (llama.cpp, ollama) and bert4torch, or import those as a checkpoint.

    babyllama export hf --name baby --stage sft --dest hf_dir
    babyllama export hf --ckpt out/baby/sft/step_00000300.pt --tokenizer out/baby/tokenizer --dest hf_dir
    babyllama export gguf --name baby --stage sft --dest baby-sft.gguf --outtype q8_0
    babyllama export bert4torch --name baby --stage pretrain --dest b4t_dir
    babyllama import hf hf_dir --dest imported/
    babyllama import hf smollm2_dir --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --dest imported/
    babyllama import bert4torch b4t_dir --dest imported/

Exports take the newest checkpoint of <out>/<name>/<stage> (or --ckpt) and the run's tokenizer
(<out>/<name>/tokenizer, or --tokenizer). Imports write <dest>/step_00000000.pt (model weights and config, no
optimizer state) and, when the source has one, the tokenizer to <dest>/tokenizer. Every output is written beside
--dest and renamed there when complete; an existing non-empty --dest (an existing .gguf) is refused unless
--overwrite. See docs/convert.md.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from babyllama.cli import ArgumentParser, add_flag
from babyllama.convert.bert4torch import export_bert4torch, import_bert4torch
from babyllama.convert.hf import export_hf, import_hf
from babyllama.errors import UserError

GGUF_DTYPES = ("f32", "f16", "q8_0")  # babyllama.convert.gguf.DTYPES; that module needs the optional `gguf` package
OVERWRITE_DIR = "replace the export's files in an existing non-empty --dest (other files there stay)"
OVERWRITE_IMPORT = ("replace the checkpoints (step_*.pt) and tokenizer/ in an existing non-empty --dest (other files "
                    "there stay)")


def export_parser(with_tokenizer: bool) -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="baby", help="run name: reads <out>/<name>/<stage> (default: baby)")
    p.add_argument("--stage", default="sft", help="pretrain, sft, reward, dpo, ppo (default: sft)")
    add_flag(p, "--out", "--root", default="out", help="output root of the training runs (default: out)")
    add_flag(p, "--ckpt", "--checkpoint", help="a checkpoint file or stage directory instead of --name/--stage")
    if with_tokenizer:
        p.add_argument("--tokenizer", help="tokenizer dir/file (default: <out>/<name>/tokenizer)")
    return p


def checkpoint_of(args: argparse.Namespace) -> Path:
    return Path(args.ckpt) if args.ckpt else Path(args.out) / args.name / args.stage


def tokenizer_of(args: argparse.Namespace) -> Path:
    return Path(args.tokenizer) if args.tokenizer else Path(args.out) / args.name / "tokenizer"


def main_export_hf(argv: list[str] | None = None) -> None:
    p = export_parser(with_tokenizer=True)
    p.add_argument("--dest", required=True, help="the directory to write (save_pretrained layout)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_DIR)
    args = p.parse_args(argv)
    print(f"wrote {export_hf(checkpoint_of(args), tokenizer_of(args), args.dest, args.overwrite)}")


def main_export_gguf(argv: list[str] | None = None) -> None:
    p = export_parser(with_tokenizer=True)
    p.add_argument("--dest", required=True, help="the .gguf file to write (<stem>.Modelfile goes beside it)")
    # --outtype as in llama.cpp's convert_hf_to_gguf.py; --dtype is the runtime precision of chat/generate/serve
    add_flag(p, "--outtype", "--dtype", choices=GGUF_DTYPES, default="f32",
             help="weight type in the file: f32 (exact, the default), f16, q8_0 (8-bit, about 1/4 of f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    if importlib.util.find_spec("gguf") is None:
        raise UserError("export gguf needs the gguf package (llama.cpp's gguf-py): pip install -r "
                        "requirements-gguf.txt")
    from babyllama.convert.gguf import export_gguf

    done = export_gguf(checkpoint_of(args), tokenizer_of(args), args.dest, args.outtype, args.overwrite,
                       name=f"{args.name}-{args.stage}" if not args.ckpt else None)
    print(f"wrote {done}")


def main_export_bert4torch(argv: list[str] | None = None) -> None:
    p = export_parser(with_tokenizer=False)
    p.add_argument("--dest", required=True, help="the directory to write")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_DIR)
    args = p.parse_args(argv)
    print(f"wrote {export_bert4torch(checkpoint_of(args), args.dest, args.overwrite)}")


def import_parser(source: str) -> ArgumentParser:
    """The flags every import takes: the source (`source` says what it is), --dest, --overwrite."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help=source)
    p.add_argument("--dest", required=True, help="the directory to write")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_IMPORT)
    return p


def main_import_hf(argv: list[str] | None = None) -> None:
    p = import_parser("directory written by save_pretrained (or holding --gguf-file)")
    p.add_argument("--gguf-file", help="GGUF file name inside src (needs pip install -r requirements-gguf.txt)")
    args = p.parse_args(argv)
    print(f"wrote {import_hf(args.src, args.dest, args.gguf_file, args.overwrite)}")


def main_import_bert4torch(argv: list[str] | None = None) -> None:
    p = import_parser("directory with bert4torch_config.json, or that file")
    p.add_argument("--weights", help="weights file (default: bert4torch_model.pt next to the config)")
    args = p.parse_args(argv)
    print(f"wrote {import_bert4torch(args.src, args.dest, args.weights, args.overwrite)}")
