"""Reward model: last-token pooling under left/right padding, Bradley-Terry loss, checkpoint kind, tiny training."""
import math

import pytest
import torch
from tiny import tiny_config

from babyllama.align.reward_model import RewardModel, bradley_terry_loss, load_reward_model, mark_reward_checkpoint
from babyllama.errors import UserError
from babyllama.model.llama import Llama
from babyllama.train.trainer import Trainer

CFG = tiny_config(64, max_seq_len=32)
PAD = 3


def padded(rows, width, left):
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


@pytest.mark.parametrize("left", [False, True])
def test_pooling_matches_unpadded_scores(left):
    torch.manual_seed(0)
    rm = RewardModel(CFG).eval()
    rows = [torch.randint(6, 64, (n,)) for n in (7, 3, 5)]
    alone = torch.cat([rm(r[None]) for r in rows])
    ids, mask = padded(rows, 9, left)
    torch.testing.assert_close(rm(ids, mask), alone, atol=1e-5, rtol=1e-5)
    # the pad id must not matter (pooling reads the mask, not the ids)
    torch.testing.assert_close(rm(ids.masked_fill(mask == 0, 7), mask), alone, atol=1e-5, rtol=1e-5)


def test_pooling_with_padding_on_both_sides_of_a_row():
    """A PPO rollout row: a left-padded prompt, then a reply right-padded after its stop token."""
    torch.manual_seed(0)
    rm = RewardModel(CFG).eval()
    prompt, reply = torch.randint(6, 64, (3,)), torch.randint(6, 64, (2,))
    ids = torch.cat([torch.full((2,), PAD), prompt, reply, torch.full((3,), PAD)])[None]
    mask = (ids != PAD).long()
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1, 1, 0, 0, 0]]
    alone = rm(torch.cat([prompt, reply])[None])
    torch.testing.assert_close(rm(ids, mask), alone, atol=1e-5, rtol=1e-5)
    other_row, other_mask = padded([torch.randint(6, 64, (10,))], 10, left=False)  # batched with a full row
    both = rm(torch.cat([ids, other_row]), torch.cat([mask, other_mask]))
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-5)


def test_score_reads_last_token_only():
    torch.manual_seed(0)
    rm = RewardModel(CFG).eval()
    ids = torch.randint(6, 64, (1, 6))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1 - 6) % 58 + 6
    assert not torch.allclose(rm(ids), rm(changed))


def test_bradley_terry_hand_computed():
    c, r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.5, -1.0])
    loss, m = bradley_terry_loss(c, r)
    expected = sum(-math.log(1 / (1 + math.exp(-d))) for d in (1.0, -0.5, 0.0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["accuracy"].item() == pytest.approx(1 / 3)
    assert m["margin"].item() == pytest.approx(0.5 / 3)


def test_from_lm_keeps_backbone_and_checkpoint_roundtrip(tmp_path):
    from babyllama.train.checkpoint import load_model
    from babyllama.train.optim import build_adamw

    torch.manual_seed(0)
    lm = Llama(CFG)
    rm = RewardModel.from_lm(lm)
    assert set(rm.state_dict()) == set(lm.state_dict()) | {"score.weight"}
    torch.testing.assert_close(rm.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    trainer = Trainer(rm)
    trainer.compile(optimizer=build_adamw(rm, 1e-3))
    trainer.save_checkpoint(str(tmp_path / "plain"))
    with pytest.raises(UserError, match="not a reward-model checkpoint"):
        load_reward_model(tmp_path / "plain")
    mark_reward_checkpoint(trainer.extra_state)
    trainer.save_checkpoint(str(tmp_path / "rm"))
    ids = torch.randint(6, 64, (2, 5))
    torch.testing.assert_close(load_reward_model(tmp_path / "rm")(ids), rm.eval()(ids))
    backbone = load_model(tmp_path / "rm")  # the LM loader reads the backbone of a reward checkpoint
    torch.testing.assert_close(backbone(ids).logits, lm.eval()(ids).logits)


def test_tiny_reward_training_raises_heldout_accuracy(tmp_path_factory):
    from pref_fixtures import make_tokenizer, train_reward_model

    _, before, after = train_reward_model(make_tokenizer(tmp_path_factory.mktemp("tok")))
    assert after["val_accuracy"] >= 0.95
    assert after["val_margin"] > before["val_margin"] + 1.0
    assert after["val_loss"] < before["val_loss"]
