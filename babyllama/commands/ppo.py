"""RLHF with PPO: SFT policy + value head -> rollouts scored by the reward model, KL-penalised to the SFT model ->
clipped PPO updates, in the Trainer's compile/fit.

    babyllama ppo --name baby                        # out/baby/sft + out/baby/reward -> out/baby/ppo, CPU minutes
    babyllama ppo --name baby --resume               # continue (KL coefficient and prompt position included)
    babyllama ppo --name baby --prompts my_prompts.jsonl --kl-coef 0.1 --kl-target 0    # own prompts, fixed KL
    babyllama ppo --name baby --init out/baby/sft/step_00000400.pt --reward out/baby/reward/step_00000150.pt
    babyllama ppo --name baby --separate-value      # critic with its own backbone (one more model copy)
    babyllama ppo --name baby --lora-rank 8          # LoRA adapters (+ the value head); reference: their base
    babyllama chat --name baby --stage ppo           # chat with the result (checkpoint.load_model reads it)

Training prompts: --prompts (JSON lines with `messages` or `prompt`; trailing assistant replies are dropped;
default the prompts of data/preference/pref_train.jsonl, the reward model's training questions). Held-out
evaluation: --eval-prompts (default data/preference/prompts_heldout.jsonl, never trained on) and the multiple-choice
items of data/sft/choice_eval.jsonl. Every step logs the rollout's mean reward-model `score`, its `kl` to the SFT
model and `kl_coef`, and the update's `pg_loss`, `vf_loss`, `entropy`, `clipfrac`, `approx_kl`; every --eval-every
steps `eval_score`/`eval_kl` on the held-out prompts (out/<name>/ppo/log.jsonl and TensorBoard runs/<name>/ppo).
At the end it prints the held-out numbers before vs after PPO (babyllama/eval/heldout.py, the same as `babyllama dpo`):
reward-model score and KL to the SFT model of sampled replies, score of greedy replies, choice accuracy.
The algorithm and its flags are described in babyllama/align/ppo.py and docs/rlhf-ppo.md.
"""
from __future__ import annotations

from pathlib import Path

import torch

from babyllama.align.ppo import PolicyWithValue, PPOConfig, critic_from, make_ppo_loss
from babyllama.align.ppo_rollout import Rollouts
from babyllama.align.reward_model import RewardModel, load_reward_model
from babyllama.data.chat_template import IM_END, special_id, stop_ids
from babyllama.errors import UserError
from babyllama.eval.heldout import HeldOut, check_reply_budget, describe, fitting_prompts
from babyllama.model.config import ModelConfig
from babyllama.model.generate import SamplingConfig
from babyllama.model.llama import frozen
from babyllama.train import callbacks as cb
from babyllama.train.checkpoint import latest_checkpoint
from babyllama.train.distributed import shutdown
from babyllama.train.run_config import model_config_for
from babyllama.train.run_record import flatten
from babyllama.train.stage import (
    StartPoint,
    compile_from_run,
    init_checkpoint,
    load_stage_tokenizer,
    parse_stage_args,
    record_stage,
    resume_if_asked,
    standard_callbacks,
)
from babyllama.train.trainer import Trainer


def check_value_layout(run: PPOConfig, resume: bool, ckpt_dir: Path) -> None:
    """--resume needs the --separate-value of the run it continues: their checkpoints hold different weights."""
    latest = latest_checkpoint(ckpt_dir) if resume else None
    if latest is None:
        return
    weights = torch.load(latest, map_location="cpu", mmap=True, weights_only=False)["model"]  # mmap: keys only
    has_critic = any(k.startswith("critic.") for k in weights)
    if has_critic != run.separate_value:
        raise UserError(f"{latest} was trained {'with' if has_critic else 'without'} --separate-value; "
                        "resume it with the same setting")


def check_sizes(ppo: PPOConfig, cfg: ModelConfig, reward: RewardModel) -> None:
    check_reply_budget(ppo.max_prompt_len, ppo.max_new_tokens, cfg.max_seq_len)
    if reward.config.vocab_size != cfg.vocab_size:
        raise UserError(f"the reward model's vocab_size {reward.config.vocab_size} differs from the policy's "
                        f"{cfg.vocab_size}; train the reward model from this run's SFT checkpoint")


def main(argv: list[str] | None = None) -> None:
    args, run, paths, env = parse_stage_args(__doc__, "ppo", argv)
    tok = load_stage_tokenizer(run, paths)
    cfg = model_config_for(run, tok.vocab_size)
    init = init_checkpoint(run.init, paths, "sft")
    if run.reward and not Path(run.reward).exists():
        raise UserError(f"--reward {run.reward}: no such file or directory")
    reward_path = init_checkpoint(run.reward, paths, "reward")
    reward = frozen(load_reward_model(reward_path, env.device, tokenizer=tok))
    check_sizes(run, cfg, reward)
    prompts = fitting_prompts(run.prompts, tok, run.max_prompt_len, run.system)

    torch.manual_seed(run.seed)
    start = StartPoint(init, cfg, tok, env.device, paths.stage("ppo"), run.lora, run.seed)
    policy, ref = start.policy, start.reference()
    critic = critic_from(reward) if run.separate_value else None  # trains every weight, also with --lora-rank
    trainer = compile_from_run(Trainer(PolicyWithValue(policy, critic), env), run, loss=make_ppo_loss(run),
                               tokenizer=tok, adapters=start.adapters)
    check_value_layout(run, args.resume, paths.stage("ppo"))
    resume_if_asked(trainer, args, paths.stage("ppo"))
    rollouts = Rollouts(ref, reward, prompts[env.rank::env.world_size], run, run.batch_size, stop_ids(tok),
                        tok.pad_id, special_id(tok, IM_END), seed=run.seed)  # a callback; serves `rollouts.loader`
    sampling = SamplingConfig(max_new_tokens=run.max_new_tokens, temperature=run.temperature, top_k=0, top_p=1.0)
    heldout = HeldOut(run, tok, sampling, run.max_prompt_len, run.seed, run.batch_size, trainer.autocast)
    before = heldout.measure(ref, ref, reward) if env.is_main else {}
    if env.is_main:
        print(f"init {init}, reward {reward_path}; {len(prompts)} training prompts, {len(heldout.prompts)} held-out; "
              f"{run.max_steps} steps of {run.batch_size} replies, rollouts of {run.rollout_size} x "
              f"{run.ppo_epochs} epochs; {env.world_size} x {env.device}")
        print(f"held-out before PPO (T={run.temperature}): {describe(before)}")
    periodic = cb.Evaluator(every=run.eval_every,
                            fn=lambda t: {f"eval_{k}": v for k, v in heldout.sampled(policy, ref, reward).items()})
    trainer.fit(rollouts.loader, max_steps=run.max_steps,
                callbacks=standard_callbacks(run, paths, "ppo", [rollouts, periodic]))
    if env.is_main:
        after, kl_coef = heldout.measure(policy, ref, reward), trainer.extra_state.get("kl_coef", run.kl_coef)
        record_stage(args, run, paths, "ppo", trainer,
                     {**flatten("heldout_before_", before), **flatten("heldout_", after), "kl_coef": kl_coef})
        print(f"held-out, {len(heldout.prompts)} prompts; KL coefficient now {kl_coef:.4f}")
        print(f"  SFT model:  {describe(before)}\n  PPO policy: {describe(after)}")
    shutdown()

