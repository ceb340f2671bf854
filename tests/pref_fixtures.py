"""Shared by the preference, reward, DPO, PPO and stage-script tests: a tokenizer trained in code, synthetic pairs,
a tiny model, a tiny trained reward model."""
import json
import random

import torch
from test_chat import make_tokenizer  # noqa: F401  (re-exported for the test modules)
from tiny import tiny_config

from babyllama.align.pairs import evaluate_pairs
from babyllama.align.reward_model import RewardModel, pair_loss
from babyllama.data.preference import PreferenceDataset, PreferencePair, build_preference_loader
from babyllama.model.llama import Llama
from babyllama.train.optim import build_adamw
from babyllama.train.trainer import Trainer

GOOD = ["fine", "thanks", "hello", "helpful", "today", "doing"]
BAD = ["question", "not", "be", "that", "or", "is"]


def synthetic_pairs(n: int, seed: int) -> list[PreferencePair]:
    """Chosen replies use GOOD words, rejected ones BAD words: learnable in a few dozen tiny steps."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [{"role": "user", "content": f"how are you {rng.randint(0, 99)}?"}]
        k = rng.randint(2, 5)
        pairs.append(PreferencePair(prompt, " ".join(rng.choices(GOOD, k=k)), " ".join(rng.choices(BAD, k=k))))
    return pairs


def loaders(tok, batch_size: int = 8):
    train = PreferenceDataset(synthetic_pairs(160, 0), tok, max_len=64)
    valid = PreferenceDataset(synthetic_pairs(48, 1), tok, max_len=64)
    return (build_preference_loader(train, batch_size, seed=0),
            build_preference_loader(valid, batch_size, shuffle=False))


def train_reward_model(tok, steps: int = 15) -> tuple[RewardModel, dict[str, float], dict[str, float]]:
    """A tiny reward model trained with `pair_loss` on `loaders(tok)`: (model in eval mode, held-out metrics
    before training, after)."""
    train, valid = loaders(tok)
    torch.manual_seed(0)
    rm = RewardModel.from_lm(Llama(tiny_config(tok.vocab_size)))
    trainer = Trainer(rm)
    trainer.compile(loss=pair_loss, optimizer=build_adamw(rm, 3e-3, 0.0))
    before = evaluate_pairs(trainer, pair_loss, valid)
    trainer.fit(train, epochs=100, max_steps=steps)
    return rm.eval(), before, evaluate_pairs(trainer, pair_loss, valid)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def pair_records(n: int, seed: int) -> list[dict]:
    """`synthetic_pairs` as records of the `pairs` file format."""
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in synthetic_pairs(n, seed)]
