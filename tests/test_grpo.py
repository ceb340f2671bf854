"""GRPO: group advantages (normalised, centred only, constant groups), the k3 KL, both loss aggregations and the
clipped surrogate against hand-computed values; the item order and the held-out sample; a tiny run that learns a
rule-based reward; `babyllama grpo` end to end on the tiny preset (logs, record, a chat-loadable checkpoint) and its
exact --stop-at/--resume; out-of-range flags as one line."""
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from pref_fixtures import make_tokenizer, write_jsonl
from tiny import tiny_config

from babyllama.align.grpo import (
    GroupRollouts,
    aggregate,
    clipped_surrogate,
    group_advantages,
    k3_kl,
    make_grpo_loss,
    on_policy,
    response_logprobs,
)
from babyllama.align.ppo import policy_loss
from babyllama.align.ppo_rollout import generate_rollout
from babyllama.commands import grpo as grpo_command
from babyllama.data.chat_template import stop_ids
from babyllama.errors import UserError
from babyllama.eval.skills import check_reply, per_skill_sample, skill_prompt_ids
from babyllama.model.config import preset
from babyllama.model.generate import SamplingConfig
from babyllama.model.llama import Llama, frozen_copy
from babyllama.train.checkpoint import latest_checkpoint, load_model
from babyllama.train.distributed import DistEnv
from babyllama.train.run_config import GRPOConfig, RunPaths
from babyllama.train.stage import parse_stage_args
from babyllama.train.trainer import Callback, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- math ----
def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    adv, constant = group_advantages(rewards, 4, eps=0.0)
    # group 0: mean 0.25, std (Bessel) sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5; group 1: mean 0.5, std sqrt(1/3)
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5, 0.5 / s, 0.5 / s, -0.5 / s, -0.5 / s]))
    assert constant.tolist() == [False, False]
    eps = group_advantages(rewards, 4)[0]  # the default eps keeps the result finite and close
    assert eps[0].item() == pytest.approx(0.75 / (0.5 + 1e-4))


def test_groups_of_equal_rewards_get_no_advantage():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 1.0, 0.0, 1.0])
    adv, constant = group_advantages(rewards, 3)
    assert constant.tolist() == [True, True, True, False]
    assert adv[:9].eq(0).all() and adv[9:].abs().gt(0.5).all()  # exactly 0, also where 0.3's mean rounds


def test_advantages_only_centred_without_scaling():
    rewards = torch.tensor([2.0, 0.0, 1.0, 1.0, 5.0, 5.0])
    adv, constant = group_advantages(rewards, 2, scale=False)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 0.0]))
    assert constant.tolist() == [False, True, True]


def test_k3_kl_is_non_negative_and_zero_when_the_models_agree():
    torch.manual_seed(0)
    logp, ref = -torch.rand(4, 6) * 5, -torch.rand(4, 6) * 5
    assert (k3_kl(logp, ref) >= 0).all() and k3_kl(logp, logp).eq(0).all()
    # ref twice as likely: exp(log 2) - log 2 - 1
    assert k3_kl(torch.tensor(math.log(0.25)), torch.tensor(math.log(0.5))).item() == pytest.approx(1 - math.log(2))


def test_token_and_sequence_aggregation_hand_computed():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "token").item() == pytest.approx((1 + 2 + 3 + 4) / 4)  # long replies weigh more
    assert aggregate(per_token, mask, "sequence").item() == pytest.approx((2 + 4) / 2)  # every reply weighs the same
    with pytest.raises(ValueError, match="token or sequence"):
        aggregate(per_token, mask, "mean")


def test_clipped_surrogate_is_ppos_with_the_reply_advantage_on_every_token():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    logp = old + torch.tensor([[1.5, 0.5, 1.1], [0.7, 1.0, 1.3]]).log()
    adv, mask = torch.tensor([1.0, -2.0]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    per_token, clipped = clipped_surrogate(logp, old, adv, clip_eps=0.2)
    # row 0, A = 1: max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5, max(-1.1, -1.1) = -1.1
    torch.testing.assert_close(per_token[0], torch.tensor([-1.2, -0.5, -1.1]))
    # row 1, A = -2: max(1.4, 1.6) = 1.6 (clipped), max(2, 2) = 2, max(2.6, 2.4) = 2.6 (a worse reply made likelier
    # is not clipped: the bound is pessimistic)
    torch.testing.assert_close(per_token[1], torch.tensor([1.6, 2.0, 2.6]))
    assert clipped.tolist() == [[True, False, False], [True, False, False]]
    ppo, metrics = policy_loss(logp, old, adv[:, None].expand_as(logp), mask, clip_eps=0.2)
    torch.testing.assert_close(aggregate(per_token, mask, "token"), ppo)


def test_loss_on_policy_is_minus_the_advantage_and_kl_free_at_the_reference():
    torch.manual_seed(0)
    policy = Llama(tiny_config(64))
    ids = torch.randint(4, 64, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(7).expand(2, 7),
             "prompt_len": 3, "response_mask": torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]]),
             "advantages": torch.tensor([1.0, -0.5])}
    with torch.no_grad():
        batch["ref_logp"] = response_logprobs(policy, batch)
    for agg, want in (("token", -(4 * 1.0 + 2 * -0.5) / 6), ("sequence", -(1.0 - 0.5) / 2)):
        loss, metrics = make_grpo_loss(GRPOConfig(loss_agg=agg, kl_coef=0.1))(policy, batch)
        assert loss.item() == pytest.approx(want, abs=1e-6) and metrics["pg_loss"].item() == pytest.approx(want)
        assert metrics["kl"].item() == pytest.approx(0.0, abs=1e-6) and metrics["clipfrac"].item() == 0
        loss.backward()
        assert policy.lm_head.weight.grad.abs().sum() > 0
        policy.zero_grad(set_to_none=True)


def test_old_log_probs_are_scored_only_when_a_rollout_spans_several_steps():
    cfg = GRPOConfig(prompts_per_rollout=4, group_size=8)  # 32 replies
    assert on_policy(cfg, 32, 1) and on_policy(cfg, 8, 4) and on_policy(cfg, 16, 4)
    assert not on_policy(cfg, 16, 1) and not on_policy(GRPOConfig(grpo_epochs=2), 32, 1)


# ---- items ----
def items_of(skills: str, n: int) -> list[dict]:
    return [{"skill": s, "lang": "en", "prompt": f"{s} {i}", "answer": "x", "check": "words:1"}
            for s in skills for i in range(n)]


def test_item_order_covers_every_item_per_pass_and_survives_resume(tok):
    items = items_of("ab", 3)
    cfg = GRPOConfig(prompts_per_rollout=4)

    def rollouts():
        return GroupRollouts(None, items, [[1, i] for i in range(6)], cfg, tok, 8, check_reply, seed=7)

    straight = [i for cursor in range(0, 16, 4) for i in rollouts().indices_at(cursor)]
    assert sorted(straight[:6]) == list(range(6)) and sorted(straight[6:12]) == list(range(6))
    assert straight[:6] != straight[6:12]
    again = rollouts()  # a new one (as after --resume) continues at the saved cursor
    assert [i for cursor in range(4, 16, 4) for i in again.indices_at(cursor)] == straight[4:]


def test_heldout_sample_takes_each_skill_alike():
    items = items_of("abc", 10)[:-6]  # skill c has 4 items
    sample = per_skill_sample(items, 3, seed=1)
    assert sorted(i["skill"] for i in sample) == sorted("abc" * 3)
    assert per_skill_sample(items, 3, seed=1) == sample and per_skill_sample(items, 3, seed=2) != sample
    assert per_skill_sample(items, 1000) == items


# ---- a tiny run ----
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    with warnings.catch_warnings():  # "little text for the vocabulary": enough for these tests
        warnings.simplefilter("ignore")
        make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    from babyllama.data.tokenizer import Tokenizer
    return Tokenizer.load(tok_dir)


def sampled_pass_rate(policy, tok, prompts, reward, n: int = 64) -> float:
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0)
    roll = generate_rollout(policy.eval(), [prompts[i % len(prompts)] for i in range(n)], sampling, stop_ids(tok),
                            tok.pad_id, torch.Generator().manual_seed(0))
    stops = set(stop_ids(tok))
    return sum(reward(None, tok.decode([t for t in r if t not in stops])) for r in roll.response_lists()) / n


def test_tiny_grpo_run_learns_a_rule_based_reward(tok):
    items = items_of(["one", "two"], 2)
    prompts = [skill_prompt_ids(item, tok) for item in items]

    def reward(item, reply):  # about one reply in six at the start
        return "e" in reply

    torch.manual_seed(0)
    policy = Llama(tiny_config(tok.vocab_size))
    ref = frozen_copy(policy)
    before = sampled_pass_rate(policy, tok, prompts, reward)
    # two epochs in minibatches of 16: the later minibatches are off-policy, so old log-probs are scored and clipped
    cfg = GRPOConfig(group_size=8, prompts_per_rollout=4, grpo_epochs=2, max_new_tokens=8, kl_coef=0.04)
    trainer = Trainer(policy, DistEnv())
    trainer.compile(loss=make_grpo_loss(cfg), optimizer=torch.optim.Adam(policy.parameters(), lr=1e-2))
    rollouts = GroupRollouts(ref, items, prompts, cfg, tok, 16, reward_fn=reward, seed=0)
    logged = []

    class Keep(Callback):
        def on_step_end(self, t, logs): logged.append(logs)

    trainer.fit(rollouts.loader, max_steps=40, callbacks=[rollouts, Keep()])
    after = sampled_pass_rate(policy, tok, prompts, reward)
    # measured: 0.17 -> 0.94
    assert after > before + 0.4, (before, after)
    assert {"reward", "pass_rate", "pass_rate_one", "pass_rate_two", "kl", "response_len", "zero_std_frac",
            "clipfrac", "pg_loss"} <= set(logged[-1])
    assert logged[-1]["kl"] > 0 and max(row["clipfrac"] for row in logged) > 0
    assert trainer.extra_state["prompt_cursor"] == 4 * 10  # a rollout per 2 epochs x 2 minibatches = 4 steps


def test_reward_model_score_joins_the_rule_reward(tok):
    class Constant(torch.nn.Module):  # a "reward model" that scores every reply 2
        def forward(self, input_ids, attention_mask):
            return torch.full((input_ids.shape[0],), 2.0)

    items = items_of(["one"], 2)
    cfg = GRPOConfig(group_size=4, prompts_per_rollout=2, max_new_tokens=4, reward_model_coef=0.5)
    policy = Llama(tiny_config(tok.vocab_size))
    trainer = Trainer(policy, DistEnv())
    trainer.compile(loss=make_grpo_loss(cfg), optimizer=torch.optim.SGD(policy.parameters(), lr=0.0))
    with pytest.raises(ValueError, match="needs a reward model"):
        GroupRollouts(frozen_copy(policy), items, [skill_prompt_ids(i, tok) for i in items], cfg, tok, 8, check_reply)
    rollouts = GroupRollouts(frozen_copy(policy), items, [skill_prompt_ids(i, tok) for i in items], cfg, tok, 8,
                             reward_fn=lambda item, reply: len(reply) % 2 == 0, reward_model=Constant())
    batch = rollouts.collect(trainer)
    assert batch["stats"]["reward"] == pytest.approx(batch["stats"]["pass_rate"] + 1.0)
    assert "old_logp" not in batch and batch["ref_logp"].shape == batch["response_mask"].shape  # on-policy
    assert batch["advantages"].shape == (8,) and trainer.extra_state["prompt_cursor"] == 2


# ---- the stage ----
@pytest.fixture(scope="module")
def chain(tmp_path_factory, tok_dir, tok):
    """An (untrained) SFT checkpoint of the tiny preset, training and held-out skill items."""
    root = tmp_path_factory.mktemp("grpo_chain")
    torch.manual_seed(0)
    sft = Llama(preset("tiny", vocab_size=tok.vocab_size))
    trainer = Trainer(sft, DistEnv())
    trainer.compile(optimizer=torch.optim.SGD(sft.parameters(), lr=0.0))
    trainer.save_checkpoint(str(root / "sft"))
    words = [{"skill": f"w{n}", "lang": "en", "prompt": f"say {n} words", "answer": "x", "check": f"words:{n}"}
             for n in (1, 2, 3)]
    count = {"skill": "count", "lang": "en", "prompt": "how many letters in dog?", "answer": "3", "check": "exact"}
    return {"sft": root / "sft", "train": write_jsonl(root / "train.jsonl", words + [count]),
            "heldout": write_jsonl(root / "heldout.jsonl", words * 2 + [count])}


def grpo_argv(chain, tok_dir, out, *extra: str) -> list[str]:
    return ["--name", "baby", "--model", "tiny", "--out", str(out / "out"), "--runs", str(out / "runs"),
            "--tokenizer", str(tok_dir), "--device", "cpu", "--init", str(chain["sft"]), "--prompts", chain["train"],
            "--skill-data", chain["heldout"], "--eval-skill-items", "1", "--group-size", "8",
            "--prompts-per-rollout", "4",
            "--max-new-tokens", "8", "--max-prompt-len", "40", "--eval-every", "2", "--ckpt-every", "2",
            "--warmup-steps", "1", "--lr", "1e-2", "--max-steps", "4", *extra]


def test_grpo_stage_logs_records_and_writes_a_chat_checkpoint(chain, tok_dir, tmp_path, capsys):
    grpo_command.main(grpo_argv(chain, tok_dir, tmp_path))
    stage = tmp_path / "out" / "baby" / "grpo"
    rows = [json.loads(line) for line in (stage / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "reward", "pass_rate", "kl", "response_len", "zero_std_frac", "clipfrac",
            "pg_loss"} <= set(rows[-1])
    assert any(k.startswith("pass_rate_") for k in rows[-1])
    assert {"eval_skill_acc", "eval_skill_acc_w1", "eval_skill_acc_count"} <= set(rows[1])
    metrics = json.loads((stage / "run.json").read_text())["metrics"]
    assert {"heldout_before_skill_acc", "heldout_skill_acc", "heldout_skill_acc_w2", "heldout_skill_items",
            "heldout_kl", "heldout_response_len"} <= set(metrics)
    assert metrics["heldout_skill_items"] == 7 and metrics["heldout_kl"] >= 0
    out = capsys.readouterr().out
    assert "SFT model vs GRPO policy" in out and "count" in out and "nats/reply" in out
    state = torch.load(latest_checkpoint(stage), weights_only=False)
    assert state["step"] == 4 and state["extra"]["prompt_cursor"] == 16
    model = load_model(stage)  # what `babyllama chat --stage grpo` loads
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     load_model(chain["sft"]).state_dict().values()))
    from babyllama.data.tokenizer import Tokenizer
    from babyllama.serve.models import ModelRegistry

    served = ModelRegistry(RunPaths.of("baby", tmp_path / "out"), Tokenizer.load(tok_dir), torch.device("cpu"), None)
    assert "grpo" in served.available() and served.get("grpo").checkpoint == latest_checkpoint(stage)  # model "grpo"


def test_grpo_stage_resumes_exactly(chain, tok_dir, tmp_path):
    grpo_command.main(grpo_argv(chain, tok_dir, tmp_path / "straight"))
    grpo_command.main(grpo_argv(chain, tok_dir, tmp_path / "parts", "--stop-at", "2"))
    grpo_command.main(grpo_argv(chain, tok_dir, tmp_path / "parts", "--resume"))
    straight, parts = (torch.load(latest_checkpoint(tmp_path / run / "out" / "baby" / "grpo"), weights_only=False)
                       for run in ("straight", "parts"))
    assert straight["step"] == parts["step"] == 4
    assert straight["extra"]["prompt_cursor"] == parts["extra"]["prompt_cursor"]
    for key, value in straight["model"].items():
        assert torch.equal(value, parts["model"][key]), key


def test_rlhf_grpo_script_is_the_command():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "rlhf" / "grpo.py"), "--help"], capture_output=True, text=True,
                          cwd=root, timeout=120)
    assert proc.returncode == 0 and "--group-size" in proc.stdout and "--loss-agg" in proc.stdout


@pytest.mark.parametrize("argv,message", [
    (["--group-size", "1"], "--group-size 1: must be at least 2"),
    (["--loss-agg", "mean"], "--loss-agg mean: must be one of token, sequence"),
    (["--kl-coef", "-0.1"], "--kl-coef -0.1: must be 0 or a positive number"),
    (["--reward-model-coef", "nan"], "--reward-model-coef nan: must be 0 (no reward model) or a positive number"),
    (["--prompts", "nowhere.jsonl"], "--prompts nowhere.jsonl: must be existing files"),
    (["--vf-coef", "1"], "--vf-coef is a setting of ppo; grpo does not use it"),
])
def test_grpo_flags_out_of_range_are_one_line_before_any_work(chain, argv, message):
    files = ["--prompts", chain["train"], "--skill-data", chain["heldout"]]
    with pytest.raises(UserError) as e:
        parse_stage_args("", "grpo", [*files, *argv, "--out", "/nonexistent/never-created"])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
