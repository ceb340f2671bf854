"""DPO: loss vs hand-computed values, sequence log-probs vs full logits, precomputed reference, tiny run."""
import math

import pytest
import torch
from pref_fixtures import loaders, make_tokenizer
from tiny import tiny_config

from babyllama.align.dpo import DPOLoss, dpo_loss, pair_logps, precompute_reference_logps
from babyllama.align.pairs import evaluate_pairs
from babyllama.data.preference import collate_pairs, pad_rows
from babyllama.model.llama import Llama, frozen_copy
from babyllama.model.scoring import continuation_logprobs, sequence_logprobs
from babyllama.train.optim import build_adamw
from babyllama.train.trainer import Trainer


def logsig(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_loss_hand_computed(beta, eps):
    pc, pr = torch.tensor([-10.0, -12.0]), torch.tensor([-14.0, -11.0])
    rc, rr = torch.tensor([-11.0, -12.0]), torch.tensor([-13.0, -13.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta, eps)
    # pair 0: chosen ratio +1, rejected ratio -1 -> margin 2 beta; pair 1: 0 and +2 -> margin -2 beta
    z = [2 * beta, -2 * beta]
    expected = sum(-(1 - eps) * logsig(x) - eps * logsig(-x) for x in z) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["reward_accuracy"].item() == pytest.approx(0.5)
    assert m["chosen_reward"].item() == pytest.approx(beta * (1 + 0) / 2)
    assert m["rejected_reward"].item() == pytest.approx(beta * (-1 + 2) / 2)
    assert m["reward_margin"].item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("beta,target_losses", [(0.25, [0.0, 16.0]), (0.5, [1.0, 9.0]), (0.1, [9.0, 49.0])])
def test_ipo_loss_hand_computed(beta, target_losses):
    pc, pr = torch.tensor([-10.0, -12.0]), torch.tensor([-14.0, -11.0])
    rc, rr = torch.tensor([-11.0, -12.0]), torch.tensor([-13.0, -13.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta, loss_type="ipo")
    # log-ratio margins +2 and -2 against the target 1 / (2 beta) (2, 1, 5): squared distances, mean over pairs
    assert loss.item() == pytest.approx(sum(target_losses) / 2, rel=1e-6)
    assert m["reward_accuracy"].item() == pytest.approx(0.5)  # the implicit rewards are the sigmoid loss's
    assert m["chosen_reward"].item() == pytest.approx(beta / 2)


def test_ipo_pulls_back_a_margin_past_its_target_where_sigmoid_keeps_pushing():
    """A pair ranked right by more than 1 / (2 beta): IPO's gradient lowers the chosen reply's log-prob (back to
    the target), the sigmoid loss's still raises it."""
    zero = torch.tensor([0.0])
    grads = {}
    for loss_type in ("ipo", "sigmoid"):
        chosen = torch.tensor([4.0], requires_grad=True)  # log-ratio margin 4 > 1 / (2 * 0.5) = 1
        dpo_loss(chosen, zero, zero, zero, beta=0.5, loss_type=loss_type)[0].backward()
        grads[loss_type] = chosen.grad.item()
    assert grads["ipo"] == pytest.approx(2 * (4 - 1))  # d/dm (m - 1)^2 at m = 4
    assert grads["sigmoid"] < 0


def test_loss_type_and_label_smoothing_are_checked():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        DPOLoss(None, loss_type="hinge")
    with pytest.raises(ValueError, match="sigmoid loss only"):
        DPOLoss(None, label_smoothing=0.1, loss_type="ipo")


def test_dpo_loss_at_reference_is_log2():
    x = torch.tensor([-3.0, -5.0])
    loss, m = dpo_loss(x, x - 1, x, x - 1, beta=0.3)
    assert loss.item() == pytest.approx(math.log(2))
    assert m["reward_accuracy"].item() == 0.0


def test_the_scorers_match_full_logits():
    """DPO's batched response scores and evaluation's per-row continuation scores are the same numbers."""
    torch.manual_seed(0)
    model = Llama(tiny_config(50)).eval()
    rows = [(torch.randint(6, 50, (9,)).tolist(), 4), (torch.randint(6, 50, (6,)).tolist(), 2)]
    ids, mask, response = pad_rows(rows, pad_id=3)
    got = sequence_logprobs(model, ids, mask, response)
    for i, (seq, prompt_len) in enumerate(rows):
        logp = model(torch.tensor([seq])).logits[0].log_softmax(-1)
        want = sum(logp[t - 1, seq[t]] for t in range(prompt_len, len(seq)))
        assert got[i].item() == pytest.approx(want.item(), rel=1e-5)
    continued = continuation_logprobs(model, [(seq, len(seq) - prompt_len) for seq, prompt_len in rows], max_batch=1)
    assert continued == pytest.approx(got.tolist(), rel=1e-5)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_precomputed_reference_gives_the_same_loss(tok):
    torch.manual_seed(0)
    policy = Llama(tiny_config(tok.vocab_size))
    reference = frozen_copy(policy)
    with torch.no_grad():
        policy.lm_head.weight.mul_(1.1)  # policy != reference
    dataset = loaders(tok)[1].dataset
    batch = collate_pairs([dataset[i] for i in (3, 0, 7)], dataset.pad_id)
    live = DPOLoss(reference, beta=0.2)(policy, batch)
    precompute_reference_logps(reference, dataset, batch_size=5)
    cached = collate_pairs([dataset[i] for i in (3, 0, 7)], dataset.pad_id)
    assert len(cached) == 4
    torch.testing.assert_close(cached[3], pair_logps(reference, batch))
    stored = DPOLoss(None, beta=0.2)(policy, cached)
    torch.testing.assert_close(stored[0], live[0])


def test_tiny_dpo_run_raises_implicit_reward_accuracy(tok):
    train, valid = loaders(tok)
    torch.manual_seed(0)
    policy = Llama(tiny_config(tok.vocab_size))
    loss = DPOLoss(frozen_copy(policy), beta=0.5)
    trainer = Trainer(policy)
    trainer.compile(loss=loss, optimizer=build_adamw(policy, 3e-3, 0.0))
    before = evaluate_pairs(trainer, loss, valid)
    trainer.fit(train, epochs=100, max_steps=15)
    after = evaluate_pairs(trainer, loss, valid)
    assert before["val_reward_accuracy"] == 0.0 and before["val_loss"] == pytest.approx(math.log(2), rel=1e-4)
    assert after["val_reward_accuracy"] >= 0.9
    assert after["val_reward_margin"] > 0.5
    assert after["val_chosen_reward"] > after["val_rejected_reward"]
