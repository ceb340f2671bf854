"""Shared by the preference, reward and DPO tests: a tokenizer trained in code, synthetic pairs, a tiny model."""
import random

from babyllama.config import ModelConfig
from babyllama.preference import PreferenceDataset, PreferencePair, build_preference_loader
from test_chat import make_tokenizer  # noqa: F401  (re-exported for the test modules)

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


def tiny_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                       max_seq_len=64)


def loaders(tok, batch_size: int = 8):
    train = PreferenceDataset(synthetic_pairs(160, 0), tok, max_len=64)
    valid = PreferenceDataset(synthetic_pairs(48, 1), tok, max_len=64)
    return (build_preference_loader(train, batch_size, seed=0),
            build_preference_loader(valid, batch_size, shuffle=False))
