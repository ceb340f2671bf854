"""Pretraining: config -> tokenizer -> token bins -> Llama -> compile -> fit(callbacks).

    babyllama pretrain --name baby                 # shipped corpus, CPU minutes
    torchrun --nproc_per_node=4 -m babyllama pretrain --name baby
    babyllama pretrain --name baby --resume        # continue exactly where the last checkpoint left off
    babyllama pretrain --name 0.2b --corpus my/*.jsonl --tokenizer my_tokenizer/
    babyllama pretrain --name 0.2b --model out/smol/import --init out/smol/import \\
        --tokenizer out/smol/import/tokenizer --corpus my/*.jsonl     # continue a model from `babyllama import hf`

The tokenizer and the token bins are built on first use (rank 0; the others wait) and reused afterwards.
"""
from __future__ import annotations

import torch

from babyllama.data.token_bins import TokenWindowDataset, build_pretrain_loader, corpus_record
from babyllama.data.tokenizer import Tokenizer
from babyllama.eval.compressors import CompressorReference, RunCorpus
from babyllama.files import hold_lock
from babyllama.model.generate import Generator, SamplingConfig
from babyllama.model.llama import Llama
from babyllama.train import callbacks as cb
from babyllama.train.checkpoint import load_model
from babyllama.train.distill import stage_loss
from babyllama.train.distributed import shutdown
from babyllama.train.run_config import model_config_for
from babyllama.train.run_data import ensure_token_bins, ensure_tokenizer
from babyllama.train.stage import (
    compile_from_run,
    init_checkpoint,
    load_init_model,
    parse_stage_args,
    record_stage,
    resume_if_asked,
    standard_callbacks,
)
from babyllama.train.trainer import Trainer, causal_lm_loss


def main(argv: list[str] | None = None) -> None:
    args, run, paths, env = parse_stage_args(__doc__, "pretrain", argv)
    # what this run reads stays as it is while it runs (a `babyllama data prepare` --overwrite is refused)
    if env.is_main:
        for directory in [paths.data] + ([] if run.tokenizer else [paths.tokenizer]):
            hold_lock(directory, "pretraining run")
    corpus = corpus_record(run.corpus, run.corpus_format, run.corpus_field)
    tok = ensure_tokenizer(run, paths, corpus)
    cfg = model_config_for(run, tok.vocab_size)  # before tokenizing: a tokenizer too large for the preset fails now
    ensure_token_bins(run, paths, tok, corpus)
    # pinned batches: the trainer's non_blocking copy then does not wait for the GPU to finish the previous step
    loader_args = dict(seq_len=cfg.max_seq_len, batch_size=run.batch_size, seed=run.seed, rank=env.rank,
                       world_size=env.world_size, pin_memory=env.device.type == "cuda")
    # Full global batches only: N ranks then train on exactly the batches of one process with N times the batch.
    train_loader = build_pretrain_loader(paths.data, "train", drop_last=True, **loader_args)
    val_loader = build_pretrain_loader(paths.data, "val", shuffle=False, **loader_args)

    torch.manual_seed(run.seed)
    # --init continues pretraining from given weights (e.g. an imported HF model, with --model set to it)
    model = load_init_model(init_checkpoint(run.init, paths, "pretrain"), cfg, tok) if run.init else Llama(cfg)
    trainer = compile_from_run(Trainer(model, env), run, flops_per_token=cfg.flops_per_token(cfg.max_seq_len),
                               tokenizer=tok, fixed_shapes=True,
                               loss=stage_loss(run, tok, model, env.device, causal_lm_loss), eval_loss=causal_lm_loss)
    resume_if_asked(trainer, args, paths.stage("pretrain"))
    if env.is_main:
        print(f"model {run.model}: {trainer.network.num_params() / 1e6:.1f}M params, {env.world_size} process(es) "
              f"on {env.device}, {run.max_steps} steps of {run.batch_size * run.grad_accum * env.world_size} "
              f"x {cfg.max_seq_len} tokens, {trainer.precision}{', torch.compile' if trainer.compiled else ''}")
    evaluator = cb.Evaluator(val_loader, every=run.eval_every, max_batches=run.eval_batches)
    # val_bpb beside val_loss, and PPMd / xz on the same held-out split as flat lines once the run is done
    reference = CompressorReference(RunCorpus.of_config(run, paths.data), paths.out, paths.tensorboard("pretrain"),
                                    run.eval_every, run.max_steps)
    trainer.fit(train_loader, max_steps=run.max_steps,
                callbacks=standard_callbacks(run, paths, "pretrain", [evaluator, reference]))
    reference.write_lines(trainer)
    val = trainer.evaluate(val_loader, max_batches=run.eval_batches)  # on every rank: it all-reduces
    record_stage(args, run, paths, "pretrain", trainer, {"val_loss": val})
    if env.is_main:
        print(f"final validation loss {val:.4f}")
        # from the final checkpoint: also right under FSDP
        sample(load_model(paths.stage("pretrain"), tokenizer=tok), tok,
               validation_prompts(val_loader.dataset, tok.eos_id))
    shutdown()


def sample(model: Llama, tok: Tokenizer, prompts: list[list[int]]) -> None:
    model.eval()
    gen = Generator(model)
    for prompt in prompts:
        out = gen.generate([prompt], SamplingConfig(max_new_tokens=48, temperature=0.7), stop_ids=[tok.eos_id],
                           generator=torch.Generator().manual_seed(0))
        print(f"sample: {tok.decode(prompt, skip_special=True)}{tok.decode(out[0])}")


def validation_prompts(val: TokenWindowDataset, eos_id: int, n: int = 2, length: int = 10) -> list[list[int]]:
    """Prompts from the run's own held-out text, whatever the corpus: the first `length` ids of a document in each
    of `n` windows spread over the validation split, after its `</s>` (as documents start in the pretraining
    stream); a window inside one long document gives its first ids."""
    prompts = []
    for i in sorted({k * (len(val) - 1) // max(1, n - 1) for k in range(n)}):
        ids = val.window(i).tolist()
        if eos_id in ids:
            ids = ids[ids.index(eos_id):]
            ids = ids[:ids.index(eos_id, 1)] if eos_id in ids[1:] else ids
        prompts.append(ids[:length])
    return prompts

