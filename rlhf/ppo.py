"""RLHF with PPO: SFT policy + value head -> rollouts scored by the reward model, KL-penalised to the SFT model ->
clipped PPO updates, in the Trainer's compile/fit.

    python rlhf/ppo.py --name baby                        # out/baby/sft + out/baby/reward -> out/baby/ppo, CPU minutes
    python rlhf/ppo.py --name baby --resume               # continue (KL coefficient and prompt position included)
    python rlhf/ppo.py --name baby --prompts my_prompts.jsonl --kl-coef 0.1 --kl-target 0    # own prompts, fixed KL
    python rlhf/ppo.py --name baby --init out/baby/sft/step_00000300.pt --reward out/baby/reward/step_00000150.pt
    python rlhf/ppo.py --name baby --separate-value      # critic with its own backbone (one more model copy)
    python rlhf/infer.py --name baby --stage ppo          # chat with the result (checkpoint.load_model reads it)

Training prompts: --prompts (JSON lines with `messages` or `prompt`; trailing assistant replies are dropped;
default the prompts of data/preference/pref_train.jsonl, the reward model's training questions). Held-out
evaluation: --eval-prompts (default data/preference/prompts_heldout.jsonl, never trained on) and the multiple-choice
items of data/sft/choice_eval.jsonl. Every step logs the rollout's mean reward-model `score`, its `kl` to the SFT
model and `kl_coef`, and the update's `pg_loss`, `vf_loss`, `entropy`, `clipfrac`, `approx_kl`; every --eval-every
steps `eval_score`/`eval_kl` on the held-out prompts (out/<name>/ppo/log.jsonl and TensorBoard runs/<name>/ppo).
At the end it prints the held-out score and KL before vs after PPO and choice accuracy before vs after.
The algorithm and its flags are described in babyllama/ppo.py and docs/rlhf-ppo.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from babyllama import callbacks as cb  # noqa: E402
from babyllama.chat import Message, render_prompt, stop_ids  # noqa: E402
from babyllama.choice_eval import choice_accuracy, load_choice_items  # noqa: E402
from babyllama.checkpoint import latest_checkpoint  # noqa: E402
from babyllama.cli import add_dataclass_flags, apply_overrides, main_guard  # noqa: E402
from babyllama.config import ModelConfig  # noqa: E402
from babyllama.distributed import shutdown  # noqa: E402
from babyllama.errors import UserError  # noqa: E402
from babyllama.generation import SamplingConfig  # noqa: E402
from babyllama.model import Llama  # noqa: E402
from babyllama.ppo import (PolicyWithValue, PPOConfig, RolloutLoader, critic_from, evaluate_policy,  # noqa: E402
                           frozen_copy, make_ppo_loss)
from babyllama.preference import read_prompts  # noqa: E402
from babyllama.rlhf_eval import generate_replies, kl_to_reference, reward_scores  # noqa: E402
from babyllama.reward_model import RewardModel, load_reward_model  # noqa: E402
from babyllama.runs import REPO_ROOT, model_config_for  # noqa: E402
from babyllama.stage import (compile_from_run, init_checkpoint, load_init_model, load_stage_tokenizer,  # noqa: E402
                             parse_stage_args, resume_if_asked, standard_callbacks)
from babyllama.tokenizer import Tokenizer  # noqa: E402
from babyllama.trainer import Trainer  # noqa: E402


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward", default=None, help="reward checkpoint (file or dir); default out/<name>/reward")
    parser.add_argument("--prompts", nargs="+", default=[str(REPO_ROOT / "data" / "preference" / "pref_train.jsonl")],
                        help="training prompts: JSON lines with 'messages' or 'prompt'")
    parser.add_argument("--eval-prompts", default=str(REPO_ROOT / "data" / "preference" / "prompts_heldout.jsonl"),
                        help="held-out prompts for the before/after score and KL")
    parser.add_argument("--choice-data", default=str(REPO_ROOT / "data" / "sft" / "choice_eval.jsonl"),
                        help="multiple-choice items for accuracy before/after (babyllama/choice_eval.py); 'none' = skip")
    parser.add_argument("--system", default=None, help="system prompt for prompts that have none (as in SFT)")
    parser.add_argument("--separate-value", action="store_true",
                        help="a separate critic backbone (initialised from the reward model) instead of a value head "
                             "on the policy's backbone: one more model copy")
    parser.add_argument("--eval-batch-size", type=int, default=32, help="prompts per batch when evaluating")
    add_dataclass_flags(parser, PPOConfig)


def read_fitting_prompts(paths: list[str], tok: Tokenizer, max_len: int, system: str | None) -> list[list[Message]]:
    """Distinct prompts (replies dropped) whose rendered form has at most `max_len` tokens, in file order."""
    seen: dict[tuple[int, ...], list[Message]] = {}
    for path in paths:
        for messages in read_prompts(path):
            messages = without_replies(messages, path)
            ids = tuple(render_prompt(messages, tok, system))
            if len(ids) <= max_len:
                seen.setdefault(ids, messages)
    if not seen:
        raise UserError(f"{', '.join(paths)}: no prompt of at most {max_len} tokens; raise --max-prompt-len")
    return list(seen.values())


def without_replies(messages: list[Message], where: str) -> list[Message]:
    """The conversation up to the last non-assistant message: what the policy is asked to answer."""
    end = max((i + 1 for i, m in enumerate(messages) if m["role"] != "assistant"), default=0)
    if not any(m["role"] == "user" for m in messages[:end]):
        raise UserError(f"{where}: a prompt has no user message")
    return messages[:end]


def check_value_layout(args: argparse.Namespace, ckpt_dir: Path) -> None:
    """--resume needs the --separate-value of the run it continues: their checkpoints hold different weights."""
    latest = latest_checkpoint(ckpt_dir) if args.resume else None
    if latest is None:
        return
    weights = torch.load(latest, map_location="cpu", mmap=True, weights_only=False)["model"]  # mmap: keys only
    has_critic = any(k.startswith("critic.") for k in weights)
    if has_critic != args.separate_value:
        raise UserError(f"{latest} was trained {'with' if has_critic else 'without'} --separate-value; "
                        "resume it with the same setting")


def check_sizes(ppo: PPOConfig, cfg: ModelConfig, reward: RewardModel) -> None:
    if ppo.max_prompt_len + ppo.max_new_tokens > cfg.max_seq_len:
        raise UserError(f"--max-prompt-len {ppo.max_prompt_len} + --max-new-tokens {ppo.max_new_tokens} exceeds the "
                        f"model's max_seq_len {cfg.max_seq_len}; lower one of them")
    if reward.config.vocab_size != cfg.vocab_size:
        raise UserError(f"the reward model's vocab_size {reward.config.vocab_size} differs from the policy's "
                        f"{cfg.vocab_size}; train the reward model from this run's SFT checkpoint")


class Report:
    """Held-out numbers for a policy: reward-model score and KL to the SFT model of sampled replies (what PPO
    optimises), the same for greedy replies measured as rlhf/dpo.py does (babyllama.rlhf_eval), and choice accuracy."""

    def __init__(self, args: argparse.Namespace, ppo: PPOConfig, tok: Tokenizer, ref: Llama, reward: RewardModel,
                 trainer: Trainer, seed: int):
        self.args, self.ppo, self.tok, self.ref, self.reward, self.trainer = args, ppo, tok, ref, reward, trainer
        self.batch_size, self.seed = args.eval_batch_size, seed
        self.messages = read_fitting_prompts([args.eval_prompts], tok, ppo.max_prompt_len, args.system)
        self.prompts = [render_prompt(m, tok, args.system) for m in self.messages]
        self.items = None if args.choice_data.lower() == "none" else load_choice_items(args.choice_data)
        self.sampling = SamplingConfig(max_new_tokens=ppo.max_new_tokens, temperature=ppo.temperature, top_k=0,
                                       top_p=1.0)

    def sampled(self, model: Llama) -> dict[str, float]:
        with self.trainer.autocast():
            return evaluate_policy(model, self.ref, self.reward, self.prompts, self.sampling, stop_ids(self.tok),
                                   self.tok.pad_id, self.batch_size, self.seed)

    def measure(self, model: Llama) -> list[str]:
        s = self.sampled(model)
        lines = [f"sampled (T={self.ppo.temperature}): score {s['score']:+.3f}, KL to SFT {s['kl']:.3f} nats/reply, "
                 f"reply length {s['response_len']:.1f}"]
        gens = generate_replies(model, self.tok, self.messages, self.ppo.max_new_tokens, batch_size=self.batch_size,
                                system=self.args.system)
        score = float(reward_scores(self.reward, gens, self.tok, self.batch_size).mean())
        kl = kl_to_reference(model, self.ref, gens, self.tok, self.batch_size)
        lines.append(f"greedy: score {score:+.3f}, KL to SFT {kl:.4f} nats/token")
        if self.items:
            acc = choice_accuracy(model, self.tok, self.items, self.batch_size, self.trainer.env.device,
                                  self.args.system)
            lines.append(f"choice accuracy on {len(self.items)} held-out items: {acc['choice_acc']:.1%}")
        return lines


def main() -> None:
    args, run, paths, env = parse_stage_args(__doc__, "ppo", add_flags)
    ppo = apply_overrides(PPOConfig(), args)
    tok = load_stage_tokenizer(run, paths)
    cfg = model_config_for(run, tok.vocab_size)
    init = init_checkpoint(run.init, paths, "sft")
    if args.reward and not Path(args.reward).exists():
        raise UserError(f"--reward {args.reward}: no such file or directory")
    reward_path = init_checkpoint(args.reward, paths, "reward")
    reward = load_reward_model(reward_path, env.device).requires_grad_(False)
    check_sizes(ppo, cfg, reward)
    prompts = [render_prompt(m, tok, args.system)
               for m in read_fitting_prompts(args.prompts, tok, ppo.max_prompt_len, args.system)]

    torch.manual_seed(run.seed)
    policy = load_init_model(init, cfg).train()
    ref = frozen_copy(policy)
    critic = critic_from(reward) if args.separate_value else None
    trainer = compile_from_run(Trainer(PolicyWithValue(policy, critic), env), run, loss=make_ppo_loss(ppo))
    check_value_layout(args, paths.stage("ppo"))
    resume_if_asked(trainer, args, paths.stage("ppo"))
    loader = RolloutLoader(trainer, ref, reward, prompts[env.rank::env.world_size], ppo, run.batch_size,
                           stop_ids(tok), tok.pad_id, seed=run.seed)
    report = Report(args, ppo, tok, ref, reward, trainer, run.seed)
    before = report.measure(ref) if env.is_main else []
    if env.is_main:
        print(f"init {init}, reward {reward_path}; {len(prompts)} training prompts, {len(report.prompts)} held-out; "
              f"{run.max_steps} steps of {run.batch_size} replies, rollouts of {ppo.rollout_size} x "
              f"{ppo.ppo_epochs} epochs; {env.world_size} x {env.device}")
        print("held-out before PPO:\n" + "\n".join(f"  {line}" for line in before))
    periodic = cb.Evaluator(every=run.eval_every,
                            fn=lambda t: {f"eval_{k}": v for k, v in report.sampled(policy).items()})
    trainer.fit(loader, max_steps=run.max_steps, callbacks=standard_callbacks(run, paths, "ppo", [periodic]))
    if env.is_main:
        after = report.measure(policy)
        print(f"held-out, {len(report.prompts)} prompts; KL coefficient now "
              f"{trainer.extra_state.get('kl_coef', ppo.kl_coef):.4f}")
        for b, a in zip(before, after):
            print(f"  before PPO {b}\n  after PPO  {a}")
    shutdown()


if __name__ == "__main__":
    main_guard(main)
