"""Fixtures shared by several test modules."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory) -> Path:
    """A 300-token tokenizer like the runs' but trained on other text: same size, other ids."""
    from babyllama.data.tokenizer import train_tokenizer

    texts = [json.loads(line)["text"] for line in (ROOT / "data" / "corpus" / "shakespeare_en_heldout.jsonl").open()]
    out = tmp_path_factory.mktemp("other_tokenizer")
    with warnings.catch_warnings():  # "little text for the vocabulary": enough for this test
        warnings.simplefilter("ignore")
        train_tokenizer(texts[:40], 300, out)
    return out
