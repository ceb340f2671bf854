"""Reward model: SFT checkpoint -> Llama + scalar head -> preference pairs -> Bradley-Terry loss -> fit(callbacks).

    babyllama reward --name baby                    # shipped data/preference/, CPU minutes
    torchrun --nproc_per_node=2 -m babyllama reward --name baby
    babyllama reward --name baby --resume           # continue from the newest reward checkpoint
    babyllama reward --name baby --train-data hh_train.jsonl --valid-data hh_test.jsonl --pref-format hh
    babyllama reward --name baby --init out/baby/pretrain     # when there is no SFT checkpoint yet

Starts from the newest out/<name>/sft checkpoint (or --init) and the tokenizer pretraining wrote. The score is read
at the last real token of prompt + reply + <|im_end|> (babyllama/align/reward_model.py); the loss is
-log sigmoid(score(chosen) - score(rejected)). Logs loss, accuracy (chosen scored higher) and margin for training
and validation (val_*) to out/<name>/reward/log.jsonl and TensorBoard (runs/<name>/reward); prints held-out
preference accuracy and mean margin before and after training. PPO and DPO read the result with
`babyllama.align.reward_model.load_reward_model("out/<name>/reward")`.
"""
from __future__ import annotations

import torch

from babyllama.align.pairs import evaluate_pairs, preference_loaders
from babyllama.align.reward_model import RewardModel, mark_reward_checkpoint, pair_loss
from babyllama.train import callbacks as cb
from babyllama.train.distributed import shutdown
from babyllama.train.run_config import model_config_for
from babyllama.train.run_record import flatten
from babyllama.train.stage import (
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


def describe(m: dict[str, float]) -> str:
    return f"accuracy {m['val_accuracy']:.1%}, mean margin {m['val_margin']:+.3f}, loss {m['val_loss']:.4f}"


def main(argv: list[str] | None = None) -> None:
    args, run, paths, env = parse_stage_args(__doc__, "reward", argv)
    tok = load_stage_tokenizer(run, paths)
    cfg = model_config_for(run, tok.vocab_size)
    init = init_checkpoint(run.init, paths, "sft")
    train_loader, valid_loader = preference_loaders(run, tok, cfg.max_seq_len, run.batch_size, run.seed,
                                                    env.rank, env.world_size)
    valid = list(valid_loader)  # fixed batches; periodic evaluation uses the first eval_batches

    torch.manual_seed(run.seed)
    model = RewardModel.from_lm(load_init_model(init, cfg, tok))
    trainer = compile_from_run(Trainer(model, env), run, loss=pair_loss, tokenizer=tok)
    mark_reward_checkpoint(trainer.extra_state)
    before = evaluate_pairs(trainer, pair_loss, valid)
    resume_if_asked(trainer, args, paths.stage("reward"))
    mark_reward_checkpoint(trainer.extra_state)  # also after a resume replaced extra_state
    if env.is_main:
        print(f"init {init}; {len(train_loader.dataset)} train / {len(valid_loader.dataset)} valid pairs; "
              f"{run.max_steps} steps of {run.batch_size * run.grad_accum * env.world_size} pairs on "
              f"{env.world_size} x {env.device}")
    evaluator = cb.Evaluator(every=run.eval_every,
                             fn=lambda t: evaluate_pairs(t, pair_loss, valid[: run.eval_batches]))
    trainer.fit(train_loader, max_steps=run.max_steps,
                callbacks=standard_callbacks(run, paths, "reward", [evaluator]))
    after = evaluate_pairs(trainer, pair_loss, valid)
    record_stage(args, run, paths, "reward", trainer, {**flatten("before_", before), **after})
    if env.is_main:
        print(f"held-out preference pairs ({len(valid_loader.dataset)}): before training {describe(before)}; "
              f"after {describe(after)}")
    shutdown()

