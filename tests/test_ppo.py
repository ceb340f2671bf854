"""PPO: GAE, clipped losses and KL controllers against hand-computed values; rollouts, their reward-model inputs and
chunked scoring; a tiny PPO run that raises a trained reward model's score on held-out prompts with bounded KL;
PPO checkpoints load as language models. The rlhf/ppo.py script: tests/test_rlhf_scripts.py."""
import math

import pytest
import torch
from pref_fixtures import make_tokenizer, synthetic_pairs, train_reward_model
from tiny import tiny_config
from torch import nn

from babyllama.align.ppo import (
    AdaptiveKLController,
    FixedKLController,
    PolicyWithValue,
    PPOConfig,
    critic_from,
    gae,
    make_ppo_loss,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)
from babyllama.align.ppo_rollout import Rollout, RolloutLoader, Rollouts, evaluate_policy, experience, generate_rollout
from babyllama.align.reward_model import RewardModel
from babyllama.data.chat_template import IM_END, render_prompt, special_id, stop_ids
from babyllama.model.generate import Generator, SamplingConfig
from babyllama.model.llama import Llama, frozen_copy
from babyllama.train.checkpoint import latest_checkpoint, load_model
from babyllama.train.distributed import DistEnv
from babyllama.train.trainer import Callback, Trainer


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
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def tiny_policy(vocab: int, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(tiny_config(vocab, max_seq_len=128))


def pair_prompts(tok, n: int, seed: int) -> list[list[int]]:
    """Distinct rendered prompts of `synthetic_pairs` (the reward model's questions, "how are you <0-99>?")."""
    out = []
    for p in synthetic_pairs(n, seed):
        ids = render_prompt(p.prompt, tok)
        if ids not in out:
            out.append(ids)
    return out


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
    for row, want, ids, stopped in zip(roll.response_lists(), cut, roll.responses.tolist(), roll.stopped.tolist()):
        assert row[:len(want)] == want and len(row) in (len(want), len(want) + 1)  # the stop token is kept
        assert ids[len(row):] == [tok.pad_id] * (len(ids) - len(row))
        assert stopped == (len(row) == len(want) + 1)
    assert roll.response_lists()[0] == free[0][:3] and roll.stopped[0]


def test_reward_inputs_end_every_reply_with_im_end():
    """The reward model reads prompt + reply + <|im_end|> (as in training): the stop token becomes <|im_end|>,
    a reply cut at max_new_tokens gets one appended."""
    END, EOS, PAD = 5, 2, 3
    ids = torch.tensor([[7, 8, 9, END, PAD, PAD],  # stopped at <|im_end|>
                        [7, 8, 9, 10, 11, 12],  # cut at max_new_tokens (R = 4)
                        [PAD, 8, EOS, PAD, PAD, PAD]])  # stopped at </s> at once: an empty reply
    response_mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    attention_mask = torch.cat([(ids[:, :2] != PAD).long(), response_mask.long()], 1)
    roll = Rollout(ids, attention_mask, (attention_mask.cumsum(1) - 1).clamp(min=0), response_mask,
                   torch.tensor([True, False, True]), 2)
    got_ids, got_mask = roll.reward_inputs(END)
    assert got_ids.shape == (3, 7)
    assert [r[m.bool()].tolist() for r, m in zip(got_ids, got_mask)] == \
        [[7, 8, 9, END], [7, 8, 9, 10, 11, 12, END], [8, END]]
    assert got_mask[2].tolist() == [0, 1, 1, 0, 0, 0, 0]  # still left-padded, right-padded after <|im_end|>


def test_scoring_in_chunks_matches_one_pass(tok):
    model = PolicyWithValue(tiny_policy(tok.vocab_size))
    nn.init.normal_(model.value.weight)
    ref, rm = frozen_copy(tiny_policy(tok.vocab_size, seed=1)), RewardModel(tiny_policy(tok.vocab_size).config)
    prompts = pair_prompts(tok, 5, seed=3) + [[1, 7], [1, 7, 9, 11, 13, 15, 17, 19, 21, 23]]  # mixed lengths
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0)
    stops, end = stop_ids(tok), special_id(tok, IM_END)
    roll = generate_rollout(model.policy, prompts, sampling, stops, tok.pad_id, torch.Generator().manual_seed(0))
    whole, stats = experience(model, ref, rm, roll, 0.1, PPOConfig(), end, chunk_size=len(prompts))
    chunked, chunked_stats = experience(model, ref, rm, roll, 0.1, PPOConfig(), end, chunk_size=3)
    for key in ("old_logp", "old_values", "returns", "advantages"):
        torch.testing.assert_close(chunked[key], whole[key], atol=1e-5, rtol=1e-5)
    assert chunked_stats == pytest.approx(stats, abs=1e-5) and stats["kl"] != 0
    args = (model.policy, ref, rm, prompts, sampling, stops, tok.pad_id, end)
    assert evaluate_policy(*args, batch_size=4, chunk_size=2) == pytest.approx(evaluate_policy(*args, batch_size=4))


def test_prompt_order_covers_every_prompt_per_pass_and_survives_resume():
    prompts = [[1, i] for i in range(5)]
    cfg = PPOConfig(rollout_size=3)

    def rollouts():
        return Rollouts(None, None, prompts, cfg, 2, [2], 3, 5, seed=7)

    one = rollouts()
    straight = [p for cursor in range(0, 12, 3) for p in one.prompts_at(cursor)]
    assert sorted(straight[:5]) == prompts and sorted(straight[5:10]) == prompts and straight[:5] != straight[5:10]
    first = rollouts().prompts_at(0)
    again = rollouts()  # a new one (as after --resume) continues at the saved cursor
    assert first + [p for cursor in range(3, 12, 3) for p in again.prompts_at(cursor)] == straight


def test_rollout_loader_serves_ppo_epochs_of_minibatches_per_rollout():
    loader = RolloutLoader(ppo_epochs=2, batch_size=2)
    batches = iter(loader)
    with pytest.raises(RuntimeError, match="no rollout"):  # the rollouts are put in by `Rollouts`, not made here
        next(batches)
    batches = iter(loader)
    loader.put({"input_ids": torch.arange(5)[:, None], "prompt_len": 1})
    served = [next(batches) for _ in range(6)]  # 2 passes x 3 minibatches of at most 2 of the 5 rows
    assert loader.left == 0 and [len(b["input_ids"]) for b in served] == [2, 2, 1] * 2
    assert sorted(torch.cat([b["input_ids"] for b in served[3:]]).flatten().tolist()) == list(range(5))
    loader.put({"input_ids": torch.arange(10, 13)[:, None], "prompt_len": 1})
    assert next(batches)["input_ids"].min() >= 10 and loader.left == 3


def test_tiny_ppo_run_raises_reward_model_score_with_bounded_kl(tok, tmp_path):
    reward, _, rm_after = train_reward_model(tok)  # GOOD-word replies over BAD-word ones
    assert rm_after["val_accuracy"] >= 0.95
    reward.requires_grad_(False)
    train_prompts = pair_prompts(tok, 160, seed=0)  # the reward model's training questions
    heldout = [render_prompt([{"role": "user", "content": f"how are you {n}?"}], tok) for n in range(100, 132)]
    policy = tiny_policy(tok.vocab_size)
    ref = frozen_copy(policy)
    stops, end = stop_ids(tok), special_id(tok, IM_END)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0)
    before = evaluate_policy(policy, ref, reward, heldout, sampling, stops, tok.pad_id, end, seed=0)

    cfg = PPOConfig(rollout_size=16, ppo_epochs=2, max_new_tokens=8, kl_coef=0.2, kl_target=1.0, kl_horizon=100)
    trainer = Trainer(PolicyWithValue(policy), DistEnv())
    trainer.compile(loss=make_ppo_loss(cfg), optimizer=torch.optim.Adam(trainer.network.parameters(), lr=1e-2))
    rollouts = Rollouts(ref, reward, train_prompts, cfg, batch_size=8, stop_ids=stops, pad_id=tok.pad_id, end_id=end,
                        seed=0)
    logged = []

    class Keep(Callback):
        def on_step_end(self, t, logs): logged.append(logs)

    trainer.fit(rollouts.loader, max_steps=48, callbacks=[rollouts, Keep()])
    after = evaluate_policy(policy, ref, reward, heldout, sampling, stops, tok.pad_id, end, seed=0)

    assert before["kl"] == pytest.approx(0.0, abs=1e-5)
    # measured: score -0.80 -> +1.56 (the reward model scores GOOD-word replies ~+5, BAD-word ones ~-5)
    assert after["score"] > before["score"] + 1.0, (before, after)
    assert 0 < after["kl"] < 10.0, after  # measured: 6.5 nats per response of 8 tokens
    assert {"pg_loss", "vf_loss", "entropy", "clipfrac", "approx_kl", "score", "kl", "kl_coef"} <= set(logged[-1])
    assert trainer.extra_state["kl_coef"] != cfg.kl_coef  # the adaptive controller moved it
    assert trainer.extra_state["prompt_cursor"] == 16 * 12  # one rollout of 16 prompts per 4 steps

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
