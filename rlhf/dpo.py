"""DPO: SFT checkpoint -> policy + frozen reference -> preference pairs -> DPO loss -> fit(callbacks).

    python rlhf/dpo.py --name baby                          # shipped data/preference/, CPU minutes
    python rlhf/dpo.py --name baby --beta 0.2 --label-smoothing 0.1
    python rlhf/dpo.py --name baby --loss ipo --beta 0.5        # IPO: a fixed target margin 1 / (2 beta)
    python rlhf/dpo.py --name baby --precompute-ref         # score pairs with the reference once; 1 model resident
    torchrun --nproc_per_node=2 rlhf/dpo.py --name baby
    python rlhf/dpo.py --name baby --resume                 # continue from the newest DPO checkpoint
    python rlhf/dpo.py --name baby --train-data hh_train.jsonl --valid-data hh_test.jsonl --pref-format hh

Starts from the newest out/<name>/sft checkpoint (or --init); the reference is the same weights, frozen. Logs the
loss and the implicit rewards (reward_accuracy, chosen_reward, rejected_reward, reward_margin; val_* on
--valid-data) to out/<name>/dpo/log.jsonl and TensorBoard (runs/<name>/dpo). At the end, prints for the SFT model
and the DPO policy the held-out numbers rlhf/ppo.py prints (babyllama/eval/heldout.py): on replies sampled with a
fixed seed, the reward-model score (when out/<name>/reward or --reward-model has a checkpoint) and the KL to the
SFT model per reply; the score of greedy replies; held-out multiple-choice accuracy. Checkpoints in out/<name>/dpo
load with `babyllama.train.checkpoint.load_model` like any language model.
"""
from __future__ import annotations

import argparse
import gc
import math
from pathlib import Path

import torch

from babyllama.align.dpo import LOSS_TYPES, DPOLoss, precompute_reference_logps
from babyllama.align.pairs import PREFERENCE_RULES, add_preference_flags, evaluate_pairs, preference_loaders
from babyllama.align.ppo import PPOConfig
from babyllama.align.reward_model import load_reward_model
from babyllama.cli import add_flag, check_ranges, main_guard
from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.eval.heldout import HELDOUT_RULES, HeldOut, add_heldout_flags, check_reply_budget, describe
from babyllama.model.generate import SamplingConfig
from babyllama.model.llama import Llama, frozen, frozen_copy
from babyllama.train import callbacks as cb
from babyllama.train.checkpoint import latest_checkpoint
from babyllama.train.distributed import shutdown
from babyllama.train.run_config import RunPaths, model_config_for
from babyllama.train.run_record import flatten
from babyllama.train.stage import (compile_from_run, init_checkpoint, load_init_model, load_stage_tokenizer,
                                   parse_stage_args, record_stage, resume_if_asked, standard_callbacks)
from babyllama.train.trainer import Trainer


def add_flags(parser: argparse.ArgumentParser) -> None:
    add_preference_flags(parser)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO temperature: smaller lets the policy move further")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="assumed share of flipped labels (cDPO)")
    parser.add_argument("--loss", default="sigmoid", choices=LOSS_TYPES,
                        help="sigmoid: DPO; ipo: squared distance of the log-ratio margin to 1 / (2 beta)")
    parser.add_argument("--precompute-ref", action="store_true",
                        help="score all pairs with the reference before training, then free it (1 model copy)")
    add_heldout_flags(parser)
    # the held-out replies are sampled as rlhf/ppo.py samples them (temperature 1), with its default budgets
    parser.add_argument("--max-new-tokens", type=int, default=PPOConfig.max_new_tokens, help="held-out reply budget")
    parser.add_argument("--max-prompt-len", type=int, default=PPOConfig.max_prompt_len,
                        help="longer held-out prompts are skipped")
    add_flag(parser, "--reward", "--reward-model", default=None,
             help="reward checkpoint (default: out/<name>/reward if any)")


def check_flags(args: argparse.Namespace) -> None:
    """DPO's, the preference data's and the held-out flags, before any work (`stage.parse_stage_args`)."""
    check_ranges(args, (
        ("beta", lambda v: 0 < v < math.inf, "a positive number"),
        ("label_smoothing", lambda v: 0 <= v < 0.5, "in [0, 0.5) (the share of pairs assumed flipped)"),
        ("max_new_tokens", lambda v: v >= 1, "at least 1"), ("max_prompt_len", lambda v: v >= 1, "at least 1"),
        *PREFERENCE_RULES, *HELDOUT_RULES))
    if args.loss == "ipo" and args.label_smoothing:
        raise UserError(f"--label-smoothing {args.label_smoothing}: applies to --loss sigmoid only; drop it for ipo")


class Report:
    """Before/after numbers (`babyllama.eval.heldout.HeldOut`); the reward model is loaded only while measuring."""

    def __init__(self, args: argparse.Namespace, paths: RunPaths, tok: Tokenizer, max_seq_len: int, seed: int,
                 chunk_size: int, device: torch.device):
        check_reply_budget(args.max_prompt_len, args.max_new_tokens, max_seq_len)
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0)
        self.heldout = HeldOut(args, tok, sampling, args.max_prompt_len, seed, chunk_size)
        rm = args.reward or paths.stage("reward")
        self.reward_path = rm if latest_checkpoint(rm) or Path(rm).is_file() else None
        if args.reward and self.reward_path is None:
            raise UserError(f"--reward-model {rm}: no checkpoint there; train one with reward/reward.py")
        self.device = device

    def measure(self, model: Llama, reference: Llama) -> dict[str, float]:
        rm = load_reward_model(self.reward_path, self.device, tokenizer=self.heldout.tok) if self.reward_path else None
        return self.heldout.measure(model, reference, rm)


def main() -> None:
    args, run, paths, env = parse_stage_args(__doc__, "dpo", add_flags, check=check_flags)
    tok = load_stage_tokenizer(run, paths)
    cfg = model_config_for(run, tok.vocab_size)
    init = init_checkpoint(run.init, paths, "sft")
    train_loader, valid_loader = preference_loaders(args, tok, cfg.max_seq_len, run.batch_size, run.seed,
                                                    env.rank, env.world_size)
    report = Report(args, paths, tok, cfg.max_seq_len, run.seed, run.batch_size, env.device)

    torch.manual_seed(run.seed)
    policy = load_init_model(init, cfg, tok).to(env.device).train()
    reference = frozen_copy(policy)
    before = report.measure(reference, reference) if env.is_main else {}
    if args.precompute_ref:
        for loader in (train_loader, valid_loader):
            precompute_reference_logps(reference, loader.dataset, run.batch_size, env.device)
        reference = None
        gc.collect()
    loss = DPOLoss(reference, args.beta, args.label_smoothing, args.loss)
    trainer = compile_from_run(Trainer(policy, env), run, loss=loss, tokenizer=tok)
    resume_if_asked(trainer, args, paths.stage("dpo"))
    if env.is_main:
        print(f"init {init}; {len(train_loader.dataset)} train / {len(valid_loader.dataset)} valid pairs; "
              f"{args.loss} loss, beta "
              f"{args.beta}, label smoothing {args.label_smoothing}; reference "
              f"{'precomputed' if reference is None else 'resident'}; {run.max_steps} steps of "
              f"{run.batch_size * run.grad_accum * env.world_size} pairs on {env.world_size} x {env.device}")
    valid = list(valid_loader)  # fixed batches (with the reference log-probs if precomputed)
    evaluator = cb.Evaluator(every=run.eval_every,
                             fn=lambda t: evaluate_pairs(t, loss, valid[: run.eval_batches]))
    trainer.fit(train_loader, epochs=10**9, max_steps=run.max_steps,
                callbacks=standard_callbacks(run, paths, "dpo", [evaluator]))
    final = evaluate_pairs(trainer, loss, valid)
    if env.is_main:
        if reference is None:  # freed by --precompute-ref; reloaded for the KL
            reference = frozen(load_init_model(init, cfg).to(env.device))
        after = report.measure(policy, reference)
        record_stage(args, run, paths, "dpo", trainer,
                     {**final, **flatten("heldout_before_", before), **flatten("heldout_", after)})
        print(f"held-out pairs ({len(valid_loader.dataset)}): {describe(final)}")
        print(f"SFT model: {describe(before)}")
        print(f"DPO policy: {describe(after)}")
    shutdown()


if __name__ == "__main__":
    main_guard(main)
