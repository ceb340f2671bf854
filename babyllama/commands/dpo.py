"""DPO: SFT checkpoint -> policy + frozen reference -> preference pairs -> DPO loss -> fit(callbacks).

    babyllama dpo --name baby                          # shipped data/preference/, CPU minutes
    babyllama dpo --name baby --beta 0.2 --label-smoothing 0.1
    babyllama dpo --name baby --loss ipo --beta 0.5        # IPO: a fixed target margin 1 / (2 beta)
    babyllama dpo --name baby --precompute-ref         # score pairs with the reference once; 1 model resident
    babyllama dpo --name baby --lora-rank 8            # LoRA adapters; the reference is their frozen base
    torchrun --nproc_per_node=2 -m babyllama dpo --name baby
    babyllama dpo --name baby --resume                 # continue from the newest DPO checkpoint
    babyllama dpo --name baby --train-data hh_train.jsonl --valid-data hh_test.jsonl --pref-format hh

Starts from the newest out/<name>/sft checkpoint (or --init); the reference is the same weights, frozen. Logs the
loss and the implicit rewards (reward_accuracy, chosen_reward, rejected_reward, reward_margin; val_* on
--valid-data) to out/<name>/dpo/log.jsonl and TensorBoard (runs/<name>/dpo). At the end, prints for the SFT model
and the DPO policy the held-out numbers `babyllama ppo` prints (babyllama/eval/heldout.py): on replies sampled with a
fixed seed, the reward-model score (when out/<name>/reward or --reward has a checkpoint) and the KL to the
SFT model per reply; the score of greedy replies; held-out multiple-choice accuracy. Checkpoints in out/<name>/dpo
load with `babyllama.train.checkpoint.load_model` like any language model.
"""
from __future__ import annotations

import gc
from pathlib import Path

import torch

from babyllama.align.dpo import DPOLoss, precompute_reference_logps
from babyllama.align.pairs import evaluate_pairs, preference_loaders
from babyllama.align.reward_model import load_reward_model
from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.eval.heldout import HeldOut, check_reply_budget, describe
from babyllama.model.generate import SamplingConfig
from babyllama.model.llama import Llama, frozen
from babyllama.train import callbacks as cb
from babyllama.train.checkpoint import latest_checkpoint
from babyllama.train.distributed import shutdown
from babyllama.train.run_config import DPOConfig, RunPaths, model_config_for
from babyllama.train.run_record import flatten
from babyllama.train.stage import (
    StartPoint,
    compile_from_run,
    init_checkpoint,
    load_init_model,
    load_stage_tokenizer,
    parse_stage_args,
    record_stage,
    resume_if_asked,
    standard_callbacks,
)
from babyllama.train.trainer import Trainer


class Report:
    """Before/after numbers (`babyllama.eval.heldout.HeldOut`); the reward model is loaded only while measuring."""

    def __init__(self, run: DPOConfig, paths: RunPaths, tok: Tokenizer, max_seq_len: int, seed: int,
                 chunk_size: int, device: torch.device):
        check_reply_budget(run.max_prompt_len, run.max_new_tokens, max_seq_len)
        sampling = SamplingConfig(max_new_tokens=run.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0)
        self.heldout = HeldOut(run, tok, sampling, run.max_prompt_len, seed, chunk_size)
        rm = run.reward or paths.stage("reward")
        self.reward_path = rm if latest_checkpoint(rm) or Path(rm).is_file() else None
        if run.reward and self.reward_path is None:
            raise UserError(f"--reward {rm}: no checkpoint there; train one with babyllama reward")
        self.device = device

    def measure(self, model: Llama, reference: Llama) -> dict[str, float]:
        rm = load_reward_model(self.reward_path, self.device, tokenizer=self.heldout.tok) if self.reward_path else None
        return self.heldout.measure(model, reference, rm)


def main(argv: list[str] | None = None) -> None:
    args, run, paths, env = parse_stage_args(__doc__, "dpo", argv)
    tok = load_stage_tokenizer(run, paths)
    cfg = model_config_for(run, tok.vocab_size)
    init = init_checkpoint(run.init, paths, "sft")
    train_loader, valid_loader = preference_loaders(run, tok, cfg.max_seq_len, run.batch_size, run.seed,
                                                    env.rank, env.world_size)
    report = Report(run, paths, tok, cfg.max_seq_len, run.seed, run.batch_size, env.device)

    torch.manual_seed(run.seed)
    start = StartPoint(init, cfg, tok, env.device, paths.stage("dpo"), run.lora, run.seed)
    policy, reference = start.policy, start.reference()
    before = report.measure(reference, reference) if env.is_main else {}
    if run.precompute_ref:
        for loader in (train_loader, valid_loader):
            precompute_reference_logps(reference, loader.dataset, run.batch_size, env.device)
        reference = None
        gc.collect()
    loss = DPOLoss(reference, run.beta, run.label_smoothing, run.loss)
    trainer = compile_from_run(Trainer(policy, env), run, loss=loss, tokenizer=tok, adapters=start.adapters)
    resume_if_asked(trainer, args, paths.stage("dpo"))
    if env.is_main:
        print(f"init {init}; {len(train_loader.dataset)} train / {len(valid_loader.dataset)} valid pairs; "
              f"{run.loss} loss, beta "
              f"{run.beta}, label smoothing {run.label_smoothing}; reference "
              f"{'precomputed' if reference is None else 'resident'}; {run.max_steps} steps of "
              f"{run.batch_size * run.grad_accum * env.world_size} pairs on {env.world_size} x {env.device}")
    valid = list(valid_loader)  # fixed batches (with the reference log-probs if precomputed)
    evaluator = cb.Evaluator(every=run.eval_every,
                             fn=lambda t: evaluate_pairs(t, loss, valid[: run.eval_batches]))
    trainer.fit(train_loader, max_steps=run.max_steps,
                callbacks=standard_callbacks(run, paths, "dpo", [evaluator]))
    final = evaluate_pairs(trainer, loss, valid)
    if env.is_main:
        if reference is None:  # freed by --precompute-ref; reloaded for the KL (with LoRA still resident: the base)
            reference = start.base if start.base is not None else frozen(load_init_model(init, cfg).to(env.device))
        after = report.measure(policy, reference)
        record_stage(args, run, paths, "dpo", trainer,
                     {**final, **flatten("heldout_before_", before), **flatten("heldout_", after)})
        print(f"held-out pairs ({len(valid_loader.dataset)}): {describe(final)}")
        print(f"SFT model: {describe(before)}")
        print(f"DPO policy: {describe(after)}")
    shutdown()

