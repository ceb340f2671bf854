"""Pretraining: config -> tokenizer -> token bins -> Llama -> compile -> fit(callbacks).

    python pretrain/pretrain.py --name baby                 # shipped corpus, CPU minutes
    torchrun --nproc_per_node=4 pretrain/pretrain.py --name baby
    python pretrain/pretrain.py --name baby --resume        # continue exactly where the last checkpoint left off
    python pretrain/pretrain.py --name 0.2b --corpus my/*.jsonl --tokenizer my_tokenizer/

The tokenizer and the token bins are built on first use (rank 0; the others wait) and reused afterwards.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from babyllama import callbacks as cb  # noqa: E402
from babyllama.checkpoint import list_checkpoints  # noqa: E402
from babyllama.cli import add_dataclass_flags, apply_overrides, main_guard  # noqa: E402
from babyllama.corpus import iter_documents  # noqa: E402
from babyllama.data import build_pretrain_loader, prepare_token_bins  # noqa: E402
from babyllama.distributed import barrier, init_distributed, shutdown  # noqa: E402
from babyllama.errors import UserError  # noqa: E402
from babyllama.generation import Generator, SamplingConfig  # noqa: E402
from babyllama.model import Llama  # noqa: E402
from babyllama.optim import build_adamw, warmup_cosine  # noqa: E402
from babyllama.runs import (RunConfig, RunPaths, expand_inputs, model_config_for, resolve_compile,  # noqa: E402
                            resolve_precision, run_preset)
from babyllama.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from babyllama.trainer import Trainer  # noqa: E402


def documents(run: RunConfig):
    for path in expand_inputs(run.corpus):
        yield from iter_documents(path, fmt=run.corpus_format, field=run.corpus_field)


def ensure_tokenizer(run: RunConfig, paths: RunPaths, is_main: bool) -> Tokenizer:
    if run.tokenizer:
        return Tokenizer.load(run.tokenizer)
    if is_main and not (paths.tokenizer / "tokenizer.model").exists():
        print(f"training a {run.vocab_size}-token tokenizer on {run.corpus} -> {paths.tokenizer}")
        train_tokenizer(documents(run), run.vocab_size, paths.tokenizer)
    barrier()
    return Tokenizer.load(paths.tokenizer)


def ensure_token_bins(run: RunConfig, paths: RunPaths, tok: Tokenizer, is_main: bool) -> None:
    if is_main and not (paths.data / "meta.json").exists():
        print(f"tokenizing {run.corpus} -> {paths.data}")
        prepare_token_bins(documents(run), tok, paths.data, val_fraction=run.val_fraction, seed=run.seed,
                           num_workers=run.workers)
    barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="baby", help="run preset: baby, 0.2b, 1.1b")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    add_dataclass_flags(parser, RunConfig)
    args = parser.parse_args()
    run = apply_overrides(run_preset(args.name), args)
    paths, env = RunPaths.of(args.name, run), init_distributed(args.device)
    ckpt_dir = paths.stage("pretrain")
    if list_checkpoints(ckpt_dir) and not args.resume:
        raise UserError(f"{ckpt_dir} already has checkpoints; pass --resume to continue, or --out to start elsewhere")

    tok = ensure_tokenizer(run, paths, env.is_main)
    ensure_token_bins(run, paths, tok, env.is_main)
    cfg = model_config_for(run, tok.vocab_size)
    loader_args = dict(seq_len=cfg.max_seq_len, batch_size=run.batch_size, seed=run.seed, rank=env.rank,
                       world_size=env.world_size)
    train_loader = build_pretrain_loader(paths.data, "train", **loader_args)
    val_loader = build_pretrain_loader(paths.data, "val", shuffle=False, **loader_args)

    torch.manual_seed(run.seed)
    trainer = Trainer(Llama(cfg), env)
    optimizer = build_adamw(trainer.module, run.lr, run.weight_decay)
    trainer.compile(optimizer=optimizer, scheduler=warmup_cosine(optimizer, run.warmup_steps, run.max_steps,
                                                                 run.min_lr_ratio),
                    clip_grad_norm=run.clip_grad_norm, mixed_precision=resolve_precision(run.mixed_precision, env.device),
                    grad_accumulation_steps=run.grad_accum, torch_compile=resolve_compile(run.torch_compile, env.device),
                    log_every=run.log_every, flops_per_token=cfg.flops_per_token(cfg.max_seq_len))
    if args.resume:
        trainer.resume(str(ckpt_dir))
    if env.is_main:
        print(f"model {run.model}: {trainer.module.num_params() / 1e6:.1f}M params, {env.world_size} process(es) "
              f"on {env.device}, {run.max_steps} steps of {run.batch_size * run.grad_accum * env.world_size} "
              f"x {cfg.max_seq_len} tokens")
    trainer.fit(train_loader, epochs=10**9, max_steps=run.max_steps, callbacks=[
        cb.Evaluator(val_loader, every=run.eval_every, max_batches=run.eval_batches),
        cb.ProgressBar(run.max_steps), cb.TextLogger(ckpt_dir / "log.jsonl"),
        cb.TensorBoard(paths.tensorboard("pretrain")), cb.Checkpoint(ckpt_dir, run.ckpt_every, run.keep_checkpoints)])
    if env.is_main:
        val = trainer.evaluate(val_loader, max_batches=run.eval_batches)
        print(f"final validation loss {val:.4f}")
        sample(trainer.module, tok)
    shutdown()


def sample(model: Llama, tok: Tokenizer) -> None:
    model.eval()
    gen = Generator(model)
    for prompt in ("床前明月光，", "To be, or not to be"):
        out = gen.generate([tok.encode(prompt, bos=True)], SamplingConfig(max_new_tokens=48, temperature=0.7),
                           stop_ids=[tok.eos_id], generator=torch.Generator().manual_seed(0))
        print(f"sample: {prompt}{tok.decode(out[0])}")


if __name__ == "__main__":
    main_guard(main)
