"""Continue text with a pretrained checkpoint, streaming tokens as they are sampled (static KV cache).

    babyllama generate --prompt "床前明月光，"          # one continuation
    babyllama generate                                   # interactive: one prompt per line
    babyllama generate --ckpt out/baby/pretrain/step_00001000.pt --temperature 0 --max-new-tokens 100

A prompt longer than the model's context allows (minus --max-new-tokens, at least half of it) is continued from its
newest tokens (said on stderr); the continuation stops at the end of the context.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from babyllama.cli import ArgumentParser, add_flag, read_lines, valid_text
from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.model.generate import (
    Generator,
    add_runtime_flags,
    add_sampling_flags,
    decode_dtype,
    fit_context,
    sampling_from_args,
)
from babyllama.train.checkpoint import latest_checkpoint, load_model
from babyllama.train.distributed import pick_device
from babyllama.train.run_config import RunPaths


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="baby", help="run name whose <out>/<name>/ holds tokenizer and checkpoints")
    parser.add_argument("--out", default="out", help="output root the run was trained with")
    add_flag(parser, "--ckpt", "--checkpoint", help="checkpoint file or directory (default: out/<name>/pretrain)")
    parser.add_argument("--tokenizer", help="tokenizer path (default: out/<name>/tokenizer)")
    parser.add_argument("--prompt", help="continue this text and exit; without it, read prompts from stdin")
    add_runtime_flags(parser)
    add_sampling_flags(parser)
    args = parser.parse_args(argv)
    sampling_from_args(args)  # bad values are refused before the model is loaded
    paths = RunPaths.of(args.name, args.out)
    device = pick_device(args.device)
    checkpoint = args.ckpt or default_checkpoint(paths)
    tok = Tokenizer.load(args.tokenizer or paths.tokenizer)
    model = load_model(checkpoint, device, decode_dtype(args.dtype, device), tokenizer=tok)
    context = model.config.max_seq_len
    cfg = sampling_from_args(args, context)
    gen = Generator(model, compile=args.compile)
    rng = torch.Generator(device=device).manual_seed(args.seed)
    lines = (line for line in read_lines(sys.stdin, ">>> ") if line.strip())
    for prompt in [valid_text(args.prompt, "--prompt")] if args.prompt is not None else lines:
        print(prompt, end="", flush=True)
        stream = tok.stream_decoder()
        ids, fitted = fit_context(tok.encode(prompt, bos=True), cfg, context)
        for token in gen.stream(ids, fitted, stop_ids=[tok.eos_id], generator=rng):
            print(stream.push(token), end="", flush=True)
        print(stream.flush(), flush=True)


def default_checkpoint(paths: RunPaths) -> Path:
    """The newest pretraining checkpoint of the run; a clear error (not a missing-file one) before training."""
    found = latest_checkpoint(paths.stage("pretrain"))
    if found is None:
        raise UserError(f"no checkpoint in {paths.stage('pretrain')}; train first (babyllama pretrain "
                        f"--name {paths.name} --out {paths.out.parent}) or pass --ckpt")
    return found

