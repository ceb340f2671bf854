"""RL with verifiable rewards: GRPO (DeepSeekMath's Group Relative Policy Optimization) on the skill suite. The SFT
model answers each training item several times; a program checks every reply (right = 1, wrong = 0), and replies
better than their group's mean are made likelier, with a KL leash to the SFT model. No reward model, no critic.

    babyllama grpo --name baby                           # out/baby/sft -> out/baby/grpo, CPU minutes
    babyllama grpo --name baby --resume                  # continue (prompt position included)
    babyllama grpo --name baby --group-size 16 --kl-coef 0.0         # bigger groups, no KL term
    babyllama grpo --name baby --loss-agg sequence       # the original GRPO's per-reply mean (default: token, DAPO)
    babyllama grpo --name baby --skills add count        # practise only these skills
    babyllama grpo --name baby --reward-model-coef 0.5   # plus 0.5 x the score of out/baby/reward
    babyllama grpo --name baby --lora-rank 8             # LoRA adapters; the reference is their frozen base
    babyllama chat --name baby --stage grpo              # chat with the result (checkpoint.load_model reads it)

Training items: --prompts (default data/skills/skills_train.jsonl, the items SFT learned from); held-out: --skill-data
(default data/skills/skills_heldout.jsonl, never trained on). Every step logs the rollout's `reward`, `pass_rate`
(share of right replies) and `pass_rate_<skill>`, `response_len`, `zero_std_frac` (groups with no signal), and the
update's `pg_loss`, `kl` (to the SFT model, nats/reply) and `clipfrac`; every --eval-every steps the greedy
`eval_skill_acc` (and per skill) on --eval-skill-items held-out items (out/<name>/grpo/log.jsonl and TensorBoard
runs/<name>/grpo). At the end it prints the greedy held-out accuracy per skill before (the SFT model) and after GRPO
on all held-out items, and the KL to the SFT model of replies sampled for the --eval-skill-items sample.
The algorithm and its flags: babyllama/align/grpo.py and docs/rlhf-grpo.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from babyllama.align.grpo import GroupRollouts, make_grpo_loss
from babyllama.align.ppo_rollout import evaluate_policy
from babyllama.align.reward_model import RewardModel, load_reward_model
from babyllama.data.chat_template import IM_END, special_id, stop_ids
from babyllama.errors import UserError
from babyllama.eval.heldout import check_reply_budget
from babyllama.eval.skills import (
    SkillItem,
    check_reply,
    load_skill_items,
    per_skill_sample,
    skill_metrics,
    skill_prompt_ids,
)
from babyllama.model.config import ModelConfig
from babyllama.model.generate import SamplingConfig
from babyllama.model.llama import Llama, frozen
from babyllama.train import callbacks as cb
from babyllama.train.distributed import shutdown
from babyllama.train.run_config import GRPOConfig, model_config_for
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


def training_items(run: GRPOConfig, tokenizer: Any) -> tuple[list[SkillItem], list[list[int]]]:
    """The --prompts items of --skills whose prompt fits --max-prompt-len, and their prompt ids."""
    items = [item for path in run.prompts for item in load_skill_items(path, run.skills)]
    encoded = [(item, skill_prompt_ids(item, tokenizer, run.system)) for item in items]
    kept = [(item, ids) for item, ids in encoded if len(ids) <= run.max_prompt_len]
    if not kept:
        raise UserError(f"{', '.join(run.prompts)}: no skill item of at most {run.max_prompt_len} prompt tokens; "
                        "raise --max-prompt-len")
    return [item for item, _ in kept], [ids for _, ids in kept]


def check_sizes(run: GRPOConfig, cfg: ModelConfig, reward: RewardModel | None) -> None:
    check_reply_budget(run.max_prompt_len, run.max_new_tokens, cfg.max_seq_len)
    if reward is not None and reward.config.vocab_size != cfg.vocab_size:
        raise UserError(f"the reward model's vocab_size {reward.config.vocab_size} differs from the policy's "
                        f"{cfg.vocab_size}; train the reward model from this run's SFT checkpoint")


class HeldOutSkills:
    """The held-out numbers: greedy skill accuracy (`skill_metrics`) on all items or on the --eval-skill-items
    sample, and the KL to the reference of replies sampled for the sample's items whose prompt fits
    (`evaluate_policy`: the exact per-token KL summed over a reply, a fixed seed)."""

    def __init__(self, run: GRPOConfig, tokenizer: Any, precision: Any):
        self.run, self.tok, self.precision = run, tokenizer, precision
        self.items = load_skill_items(run.skill_data)
        self.sample = per_skill_sample(self.items, run.eval_skill_items, run.seed)
        prompts = (skill_prompt_ids(item, tokenizer, run.system) for item in self.sample)
        self.prompts = [ids for ids in prompts if len(ids) <= run.max_prompt_len]
        self.sampling = SamplingConfig(max_new_tokens=run.max_new_tokens, temperature=run.temperature, top_k=0,
                                       top_p=1.0)

    def accuracy(self, model: Llama, items: Sequence[SkillItem] | None = None) -> dict[str, float]:
        return skill_metrics(model, self.tok, self.items if items is None else items, self.run.eval_batch_size,
                             self.run.max_new_tokens, self.run.system, self.precision)

    def periodic(self, model: Llama) -> dict[str, float]:
        return {f"eval_{k}": v for k, v in self.accuracy(model, self.sample).items() if not k.startswith("skill_items")}

    def kl(self, policy: Llama, ref: Llama) -> dict[str, float]:
        if not self.prompts:
            return {}
        with self.precision():
            out = evaluate_policy(policy, ref, None, self.prompts, self.sampling, stop_ids(self.tok), self.tok.pad_id,
                                  special_id(self.tok, IM_END), self.run.eval_batch_size, self.run.seed)
        return {"kl": out["kl"], "response_len": out["response_len"]}


def table(before: dict[str, float], after: dict[str, float]) -> str:
    """Greedy held-out accuracy per skill, before and after, one line each."""
    skills = ["skill_acc"] + sorted(k for k in before if k.startswith("skill_acc_"))
    lines = [f"  {'skill':<16} {'items':>6} {'SFT':>7} {'GRPO':>7} {'change':>7}"]
    for key in skills:
        name = "all" if key == "skill_acc" else key.removeprefix("skill_acc_")
        n = int(before[key.replace("skill_acc", "skill_items", 1)])
        lines.append(f"  {name:<16} {n:>6} {before[key]:>7.3f} {after[key]:>7.3f} {after[key] - before[key]:>+7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args, run, paths, env = parse_stage_args(__doc__, "grpo", argv)
    tok = load_stage_tokenizer(run, paths)
    cfg = model_config_for(run, tok.vocab_size)
    init = init_checkpoint(run.init, paths, "sft")
    reward, reward_path = None, None
    if run.reward_model_coef:
        if run.reward and not Path(run.reward).exists():
            raise UserError(f"--reward {run.reward}: no such file or directory")
        reward_path = init_checkpoint(run.reward, paths, "reward")
        reward = frozen(load_reward_model(reward_path, env.device, tokenizer=tok))
    check_sizes(run, cfg, reward)
    items, prompts = training_items(run, tok)
    skills = sorted({item["skill"] for item in items})

    torch.manual_seed(run.seed)
    start = StartPoint(init, cfg, tok, env.device, paths.stage("grpo"), run.lora, run.seed)
    policy, ref = start.policy, start.reference()
    trainer = compile_from_run(Trainer(policy, env), run, loss=make_grpo_loss(run), tokenizer=tok,
                               adapters=start.adapters)
    resume_if_asked(trainer, args, paths.stage("grpo"))
    rollouts = GroupRollouts(ref, items[env.rank::env.world_size], prompts[env.rank::env.world_size], run, tok,
                             run.batch_size, check_reply, reward_model=reward, skills=skills,
                             seed=run.seed)  # a callback
    heldout = HeldOutSkills(run, tok, trainer.autocast)
    before = heldout.accuracy(ref) if env.is_main else {}
    if env.is_main:
        print(f"init {init}{f', reward {reward_path}' if reward_path else ''}; {len(items)} training items of "
              f"{len(skills)} skills, {len(heldout.items)} held-out; {run.max_steps} steps, rollouts of "
              f"{run.prompts_per_rollout} prompts x {run.group_size} replies in minibatches of {run.batch_size} x "
              f"{run.grpo_epochs} epochs; {env.world_size} x {env.device}")
        print(f"held-out greedy skill accuracy before GRPO: {before['skill_acc']:.3f} ({len(heldout.items)} items)")
    periodic = cb.Evaluator(every=run.eval_every, fn=lambda t: heldout.periodic(policy))
    trainer.fit(rollouts.loader, max_steps=run.max_steps,
                callbacks=standard_callbacks(run, paths, "grpo", [rollouts, periodic]))
    if env.is_main:
        after, kl = heldout.accuracy(policy), heldout.kl(policy, ref)
        record_stage(args, run, paths, "grpo", trainer,
                     {**flatten("heldout_before_", before), **flatten("heldout_", after), **flatten("heldout_", kl)})
        print(f"held-out greedy skill accuracy, SFT model vs GRPO policy (step {trainer.step}):")
        print(table(before, after))
        if kl:
            print(f"KL to the SFT model of sampled replies (T={run.temperature}): {kl['kl']:.3f} nats/reply, "
                  f"{kl['response_len']:.1f} reply tokens ({len(heldout.prompts)} held-out prompts)")
    shutdown()
