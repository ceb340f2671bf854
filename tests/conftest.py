"""Fixtures shared by several test modules."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than on two that wait on each other when the other core
    is busy: a module of such tests asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(url):
    """The official `openai` client on the module's server (`url`)."""
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok(run):
    """The tokenizer of the module's tiny run (`run`: the output root holding baby/)."""
    from babyllama.data.tokenizer import Tokenizer

    return Tokenizer.load(run / "baby" / "tokenizer")
