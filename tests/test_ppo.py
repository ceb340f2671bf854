"""PPO: GAE, clipped losses and KL controllers against hand-computed values; rollouts; a tiny PPO run that raises
a deterministic reward on held-out prompts with bounded KL; PPO checkpoints load as language models."""
import importlib.util
import json
import math
import random
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from babyllama.chat import render_prompt, stop_ids
from babyllama.checkpoint import latest_checkpoint, load_model
from babyllama.config import ModelConfig
from babyllama.distributed import DistEnv
from babyllama.errors import UserError
from babyllama.generation import Generator, SamplingConfig
from babyllama.model import Llama
from babyllama.reward_model import RewardModel, mark_reward_checkpoint
from babyllama.runs import model_config_for, run_preset
from babyllama.ppo import (AdaptiveKLController, FixedKLController, PolicyWithValue, PPOConfig, RolloutLoader,
                           critic_from, evaluate_policy, frozen_copy, gae, generate_rollout, make_ppo_loss, masked_whiten,
                           per_token_rewards, policy_loss, value_loss)
from babyllama.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def test_gae_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, -1.0], [0.2, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 2 + 1 = 3; d1 = 0 + 0.9 * -1 - 1 = -1.9 -> A1 = -1.9 + 0.72 * 3; d0 = 1 + 0.9 - 0.5 = 1.4
    a1 = -1.9 + 0.72 * 3
    # row 1 ends after t=1 (value 9 beyond the end is ignored): A1 = 1 - 0.4; d0 = 0.5 + 0.9 * 0.4 - 0.2
    b1 = 0.6
    expected = torch.tensor([[1.4 + 0.72 * a1, a1, 3.0], [0.66 + 0.72 * b1, b1, 0.0]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, (expected + values) * mask)


def test_per_token_rewards_add_score_on_last_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, kl = per_token_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 2.0, 0.0], [-0.1, 0.0, -1.0]]))


def test_policy_loss_hand_computed():
    ratios = torch.tensor([[1.5, 0.5, 1.1]])
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, m = policy_loss(old + ratios.log(), old, adv, torch.ones(1, 3), clip_eps=0.2)
    # t0: max(-1.5, -1.2) = -1.2 (clipped); t1: max(-0.5, -0.8) = -0.5; t2: max(1.1, 1.1) = 1.1
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3, abs=1e-6)
    assert m["clipfrac"].item() == pytest.approx(1 / 3)
    assert m["approx_kl"].item() == pytest.approx(sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1)) / 3, abs=1e-6)


def test_policy_loss_gradient_vanishes_when_clipped():
    logp = torch.tensor([[math.log(1.5)]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), clip_eps=0.2)
    loss.backward()
    assert logp.grad.item() == 0.0


def test_value_loss_hand_computed():
    values, old = torch.tensor([[0.5, 0.1, 3.0]]), torch.zeros(1, 3)
    returns, mask = torch.tensor([[1.0, -1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac = value_loss(values, old, returns, mask, clip=0.2)
    # t0: clipped value 0.2 -> max(0.25, 0.64) = 0.64 (clipped); t1: inside the clip -> 1.21; t2 masked
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_masked_whiten():
    x, mask = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    w = masked_whiten(x, mask)
    kept = w[mask.bool()]
    assert w[0, 2] == 0 and kept.mean().abs() < 1e-6 and kept.var(unbiased=False).sub(1).abs() < 1e-4


def test_adaptive_kl_controller_moves_towards_target():
    high, low = AdaptiveKLController(0.1, target=6.0, horizon=100), AdaptiveKLController(0.1, 6.0, 100)
    high.update(kl=12.0, n_samples=10)  # error clipped to +0.2
    low.update(kl=3.0, n_samples=10)  # error -0.5 clipped to -0.2
    assert high.value == pytest.approx(0.1 * 1.02) and low.value == pytest.approx(0.1 * 0.98)
    near = AdaptiveKLController(0.1, 6.0, 100)
    near.update(kl=6.6, n_samples=10)
    assert near.value == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    fixed = FixedKLController(0.1)
    fixed.update(kl=100.0, n_samples=10)
    assert fixed.value == 0.1


# ---- rollouts and the loop ----
WORDS = ("moon river song light stone water wind flower night star cloud rain snow sun tree bird "
         "mountain leaf dream road sea fire home heart friend king queen sword crown").split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from babyllama.tokenizer import train_tokenizer
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=12)) for _ in range(600)]
    with pytest.warns(UserWarning, match="many pieces will be rare"):  # a small text is all these tests need
        return train_tokenizer(texts, 320, tmp_path_factory.mktemp("tok"))


def tiny_policy(vocab: int) -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                             max_seq_len=128))


def chat_prompts(tok, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [render_prompt([{"role": "user", "content": " ".join(rng.choices(WORDS, k=3))}], tok) for _ in range(n)]


class TokenSetReward(nn.Module):
    """Deterministic stand-in with the RewardModel interface: how many of a row's real tokens are in `targets`
    (tokens the prompts never use, so only the response counts)."""

    def __init__(self, targets: Tensor):
        super().__init__()
        self.register_buffer("targets", targets)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return (torch.isin(input_ids, self.targets).float() * attention_mask).sum(1)


def test_rollout_masks_and_padding(tok):
    policy = tiny_policy(tok.vocab_size).eval()
    prompts = [[1, 7, 9, 11], [1, 8]]
    greedy = SamplingConfig(max_new_tokens=6, temperature=0)
    free = Generator(policy).generate(prompts, greedy)
    stop = free[0][2]  # row 0 stops at its third token
    roll = generate_rollout(policy, prompts, greedy, [stop], tok.pad_id)
    assert roll.prompt_len == 4 and roll.input_ids[1, :2].tolist() == [tok.pad_id] * 2
    assert roll.attention_mask[1, :4].tolist() == [0, 0, 1, 1] and roll.position_ids[1, 2:4].tolist() == [0, 1]
    cut = Generator(policy).generate(prompts, greedy, stop_ids=[stop])
    for row, want, ids in zip(roll.response_lists(), cut, roll.responses.tolist()):
        assert row[:len(want)] == want and len(row) in (len(want), len(want) + 1)  # the stop token is kept
        assert ids[len(row):] == [tok.pad_id] * (len(ids) - len(row))
    assert roll.response_lists()[0] == free[0][:3]


def test_prompt_order_covers_every_prompt_per_pass_and_survives_resume():
    prompts = [[1, i] for i in range(5)]
    cfg = PPOConfig(rollout_size=3)

    def loader(state):
        return RolloutLoader(SimpleNamespace(extra_state=state), None, None, prompts, cfg, 2, [2], 3, seed=7)

    state = {}
    one = loader(state)
    straight = [p for _ in range(4) for p in one.next_prompts()]
    assert sorted(straight[:5]) == prompts and sorted(straight[5:10]) == prompts and straight[:5] != straight[5:10]
    resumed_state = {}
    first = loader(resumed_state).next_prompts()
    again = loader(resumed_state)  # a new loader (as after --resume) continues at the saved cursor
    assert first + [p for _ in range(3) for p in again.next_prompts()] == straight
    assert state["prompt_cursor"] == 12


def test_tiny_ppo_run_raises_reward_with_bounded_kl(tok, tmp_path):
    train_prompts, heldout = chat_prompts(tok, 64, seed=1), chat_prompts(tok, 32, seed=2)
    in_prompts = {t for p in train_prompts + heldout for t in p}
    reward = TokenSetReward(torch.tensor([t for t in range(6, 134) if t not in in_prompts]))  # ~40% of the vocab
    policy = tiny_policy(tok.vocab_size)
    ref = frozen_copy(policy)
    stops = stop_ids(tok)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0)
    before = evaluate_policy(policy, ref, reward, heldout, sampling, stops, tok.pad_id, seed=0)

    cfg = PPOConfig(rollout_size=16, ppo_epochs=2, max_new_tokens=8, kl_coef=0.05, kl_target=1.0, kl_horizon=100)
    trainer = Trainer(PolicyWithValue(policy), DistEnv())
    trainer.compile(loss=make_ppo_loss(cfg), optimizer=torch.optim.Adam(trainer.module.parameters(), lr=1e-2))
    loader = RolloutLoader(trainer, ref, reward, train_prompts, cfg, batch_size=8, stop_ids=stops,
                           pad_id=tok.pad_id, seed=0)
    logged = []

    class Keep:
        def on_train_begin(self, t): ...
        def on_step_end(self, t, logs): logged.append(logs)
        def on_train_end(self, t): ...

    trainer.fit(loader, max_steps=24, callbacks=[Keep()])
    after = evaluate_policy(policy, ref, reward, heldout, sampling, stops, tok.pad_id, seed=0)

    assert before["kl"] == pytest.approx(0.0, abs=1e-5)
    assert after["score"] > before["score"] + 1.0, (before, after)  # measured: 2.9 -> 4.8 target tokens of 8
    assert 0 < after["kl"] < 10.0, after  # measured: 5.4 nats per response
    assert {"pg_loss", "vf_loss", "entropy", "clipfrac", "approx_kl", "score", "kl", "kl_coef"} <= set(logged[-1])
    assert trainer.extra_state["kl_coef"] != cfg.kl_coef  # the adaptive controller moved it
    assert trainer.extra_state["prompt_cursor"] == 16 * 6  # one rollout of 16 prompts per 4 steps

    trainer.save_checkpoint(str(tmp_path))
    lm = load_model(latest_checkpoint(tmp_path))
    ids = torch.tensor([heldout[0]])
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, policy.eval()(ids).logits)


def test_value_head_shares_the_backbone_unless_a_critic_is_given(tok, tmp_path):
    policy = tiny_policy(tok.vocab_size)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    shared = PolicyWithValue(policy)
    nn.init.normal_(shared.value.weight)
    shared(ids)[1].sum().backward()
    assert policy.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    policy.zero_grad(set_to_none=True)

    separate = PolicyWithValue(policy, critic_from(RewardModel(policy.config)))
    nn.init.normal_(separate.value.weight)
    logits, values = separate(ids)
    torch.testing.assert_close(logits, policy(ids).logits)
    values.sum().backward()
    assert all(p.grad is None for p in policy.parameters())  # the value loss never reaches the policy
    assert separate.critic.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0

    trainer = Trainer(separate, DistEnv())
    trainer.compile(loss=make_ppo_loss(PPOConfig()), optimizer=torch.optim.SGD(separate.parameters(), lr=0.0))
    trainer.save_checkpoint(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(ids).logits, policy(ids).logits)


# ---- the script ----
def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def save_start_checkpoints(out, vocab: int) -> None:
    """An (untrained) SFT checkpoint and a reward model on it, as the earlier stages would leave them."""
    cfg = model_config_for(run_preset("baby", "ppo"), vocab)
    cfg.max_seq_len = 64  # what --seq-len 64 asks for
    torch.manual_seed(0)
    for stage, model in (("sft", Llama(cfg)), ("reward", None)):
        model = model if model is not None else RewardModel.from_lm(Llama(cfg))
        trainer = Trainer(model, DistEnv())
        trainer.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
        if stage == "reward":
            mark_reward_checkpoint(trainer.extra_state)
        trainer.save_checkpoint(str(out / "baby" / stage))


def test_ppo_script_trains_logs_resumes_and_writes_a_chat_checkpoint(tok, tmp_path):
    tok.save(tmp_path / "tok")
    save_start_checkpoints(tmp_path / "out", tok.vocab_size)
    rng = random.Random(3)
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": " ".join(rng.choices(WORDS, k=3))} for _ in range(20)])
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [
        {"messages": [{"role": "user", "content": "moon river"}, {"role": "assistant", "content": "dropped"}]},
        {"messages": [{"role": "user", "content": "king of the sea"}]}])
    base = [sys.executable, str(ROOT / "rlhf" / "ppo.py"), "--name", "baby", "--out", str(tmp_path / "out"),
            "--runs", str(tmp_path / "runs"), "--tokenizer", str(tmp_path / "tok"), "--seq-len", "64",
            "--prompts", train, "--eval-prompts", heldout, "--choice-data", "none", "--rollout-size", "4",
            "--batch-size", "4", "--max-new-tokens", "8", "--max-prompt-len", "40", "--eval-every", "2"]
    first = subprocess.run(base + ["--max-steps", "4"], capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "after PPO  greedy: score" in first.stdout and "20 training prompts, 2 held-out" in first.stdout

    again = subprocess.run(base + ["--max-steps", "6", "--resume"], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    ckpt = latest_checkpoint(tmp_path / "out" / "baby" / "ppo")
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 6 and state["extra"]["prompt_cursor"] == 4 * 3  # rollouts at steps 1, 3, 5
    logs = [json.loads(line) for line in (ckpt.parent / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in logs] == [1, 2, 3, 4, 5, 6] and "eval_score" in logs[1] and "kl_coef" in logs[-1]
    assert load_model(ckpt).config.max_seq_len == 64
    with pytest.raises(UserError, match="was trained without --separate-value"):
        load_script().check_value_layout(SimpleNamespace(resume=True, separate_value=True), ckpt.parent)



def load_script():
    spec = importlib.util.spec_from_file_location("ppo_script", ROOT / "rlhf" / "ppo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_ppo_script_refuses_replies_longer_than_the_model():
    script = load_script()
    cfg = ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=4, ffn_dim=64, max_seq_len=64)
    reward = RewardModel(cfg)
    script.check_sizes(PPOConfig(max_prompt_len=40, max_new_tokens=24), cfg, reward)
    with pytest.raises(UserError, match="exceeds the model's max_seq_len 64"):
        script.check_sizes(PPOConfig(max_prompt_len=60, max_new_tokens=8), cfg, reward)
    with pytest.raises(UserError, match="vocab_size 300 differs"):
        script.check_sizes(PPOConfig(max_prompt_len=40, max_new_tokens=24), replace(cfg, vocab_size=400), reward)
