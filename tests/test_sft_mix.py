"""SFT with pretraining text mixed in (--pretrain-mix) and several training files: rows of each kind, targets,
determinism, exact resume, mix 0 as before, the missing-data error, the CLI end to end."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_chat import SAMPLE_TEXT, make_tokenizer
from tiny import tiny_config

from babyllama.commands import sft as sft_command
from babyllama.data.chat_template import IGNORE_INDEX
from babyllama.data.mix import build_mixed_loader, pretrain_rows
from babyllama.data.sft import SFTDataset, build_sft_loader
from babyllama.data.token_bins import TokenWindowDataset, prepare_token_bins
from babyllama.data.tokenizer import Tokenizer, train_tokenizer
from babyllama.errors import UserError
from babyllama.model.llama import Llama
from babyllama.train import callbacks as cb
from babyllama.train.checkpoint import save_checkpoint
from babyllama.train.run_config import SFTConfig, model_config_for
from babyllama.train.stage import compile_from_run
from babyllama.train.trainer import Trainer, causal_lm_loss

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SFT_TRAIN = ROOT / "data" / "sft" / "sft_train.jsonl"
MAX_LEN = 33  # a row is at most 32 tokens (--seq-len 32); a window 33


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    make_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


@pytest.fixture(scope="module")
def data_dir(tok, tmp_path_factory):
    """Pretraining token data of the same tokenizer: 30-odd training windows of MAX_LEN tokens."""
    rng = random.Random(1)
    docs = [" ".join(rng.choices(SAMPLE_TEXT, k=2)) for _ in range(30)]
    out = tmp_path_factory.mktemp("bins") / "data"
    prepare_token_bins(iter(docs), tok, out, val_fraction=0.1, num_workers=1)
    return out


def conversations(n=22):
    rng = random.Random(0)
    return [[{"role": "user", "content": "你是谁？" * rng.randint(1, 2)},
             {"role": "assistant", "content": "To be. " * rng.randint(1, 4)}] for _ in range(n)]


@pytest.fixture(scope="module")
def dataset(tok):
    return SFTDataset(conversations(), tok, MAX_LEN)


def test_pretrain_rows_and_the_mixes_refused():
    assert [pretrain_rows(m, 16) for m in (0.0, 0.25, 0.1, 0.5)] == [0, 4, 2, 8]  # 1.6 -> 2: rounded half up
    assert pretrain_rows(0.5, 3) == 2
    assert pretrain_rows(0.01, 16) == pretrain_rows(0.2, 2) == 0  # a small batch rounds to conversations only
    SFTConfig(pretrain_mix=0.2, batch_size=2, train_data=[str(SFT_TRAIN)]).check()
    for mix, batch in ((0.97, 16), (0.5, 1)):
        with pytest.raises(UserError, match=rf"^--pretrain-mix {mix}: {batch} of the {batch} rows of a batch .* "
                                            r"leaving no conversation"):
            SFTConfig(pretrain_mix=mix, batch_size=batch, train_data=[str(SFT_TRAIN)]).check()
    with pytest.raises(UserError, match=r"^--pretrain-mix 1.0: must be in \[0, 1\)"):
        SFTConfig(pretrain_mix=1.0, train_data=[str(SFT_TRAIN)]).check()
    SFTConfig(pretrain_mix=0.25, train_data=[str(SFT_TRAIN)]).check()


def test_mixed_batches_hold_the_sft_batches_then_windows_of_real_tokens(dataset, data_dir, tok):
    loader = build_mixed_loader(dataset, data_dir, 0.25, batch_size=8, seed=3)  # 2 windows + 6 conversations
    windows = TokenWindowDataset(data_dir, "train", seq_len=MAX_LEN - 1)
    plain = list(build_sft_loader(dataset, 6, seed=3))  # the same conversations, batched as without the mix
    mixed = list(loader)
    assert len(mixed) == len(plain) == 4 and [x.shape[0] for x, _ in mixed] == [8, 8, 8, 6]  # 22 = 3 x 6 + 4
    order = iter(loader.sampler.windows.rank_indices(0, 0, 8).tolist())  # pretraining's order, 2 a batch
    for (x, y), (px, py) in zip(mixed, plain):
        n, width = px.shape
        assert x.shape == y.shape == (n + 2, width)  # as wide as its conversations
        assert torch.equal(x[:n], px) and torch.equal(y[:n], py)
        for r in range(n, n + 2):  # a window's first width + 1 tokens, every next token learned
            tokens = torch.from_numpy(windows.window(next(order))[:width + 1].astype("int64"))
            assert torch.equal(x[r], tokens[:-1]) and torch.equal(y[r], tokens[1:])
            assert (y[r] != IGNORE_INDEX).all()
    assert loader.sampler.state_dict() == {"epoch": 1, "consumed": 0}


def epochs(dataset, data_dir, n, seed=3):
    """The input rows of `n` epochs' batches as the trainer draws them: each epoch from its start."""
    loader = build_mixed_loader(dataset, data_dir, 0.25, batch_size=8, seed=seed)
    out = []
    for e in range(n):
        loader.sampler.load_state_dict({"epoch": e, "consumed": 0})
        out.append([x for x, _ in loader])
    return out


def test_mixed_batches_are_deterministic_by_seed(dataset, data_dir):
    a, b, c = (sum(epochs(dataset, data_dir, 3, seed), []) for seed in (5, 5, 6))
    assert len(a) == 12 and all(torch.equal(x1, x2) for x1, x2 in zip(a, b))
    assert not all(x1.shape == x2.shape and torch.equal(x1, x2) for x1, x2 in zip(a, c))


@pytest.mark.parametrize("stop", [1, 3, 4, 9, 22])  # mid-epoch, before and after the short batch, later epochs
def test_mixed_loader_resumes_from_the_trainers_position(dataset, data_dir, stop):
    """The trainer keeps the epoch and the rows consumed in it (both kinds) and hands them back on resume: the
    rest is the same batches, windows included (the windows' own epochs end in between: 7 epochs of 4 batches
    draw 56 windows)."""
    assert len(TokenWindowDataset(data_dir, "train", seq_len=MAX_LEN - 1)) < 40
    ref = epochs(dataset, data_dir, 7)
    epoch, done = divmod(stop - 1, 4)  # after the last batch of an epoch the trainer is still in that epoch
    position = {"epoch": epoch, "consumed": sum(x.shape[0] for x in ref[epoch][:done + 1])}
    resumed = build_mixed_loader(dataset, data_dir, 0.25, batch_size=8, seed=3)
    resumed.sampler.load_state_dict(position)
    assert resumed.sampler.state_dict() == position
    rest = [x for x, _ in resumed]
    assert len(rest) == 3 - done and all(torch.equal(a, b) for a, b in zip(rest, ref[epoch][done + 1:]))
    assert all(torch.equal(a, b) for a, b in zip([x for x, _ in resumed], ref[epoch + 1]))  # then the next epoch


def fit(dataset, data_dir, tok, steps, stop=None, ckpt=None, resume=None):
    torch.manual_seed(0)
    model = Llama(tiny_config(tok.vocab_size, max_seq_len=MAX_LEN - 1))
    run = SFTConfig(lr=3e-3, warmup_steps=2, max_steps=steps, mixed_precision="fp32", torch_compile="off")
    trainer = compile_from_run(Trainer(model), run, loss=causal_lm_loss)
    if resume:
        trainer.resume(str(resume))
    loader = build_mixed_loader(dataset, data_dir, 0.25, batch_size=8, seed=3, tokenizer=tok)
    trainer.fit(loader, max_steps=stop or steps, callbacks=[cb.Checkpoint(ckpt, every=100)] if ckpt else [])
    return torch.cat([p.detach().flatten() for p in trainer.network.parameters()])


@pytest.mark.parametrize("stop", [3, 4])
def test_stopped_and_resumed_mixed_sft_equals_an_uninterrupted_one(dataset, data_dir, tok, tmp_path, stop):
    whole = fit(dataset, data_dir, tok, steps=7)  # 4 batches an epoch: crosses two epoch ends
    fit(dataset, data_dir, tok, steps=7, stop=stop, ckpt=tmp_path)
    assert torch.equal(fit(dataset, data_dir, tok, steps=7, resume=tmp_path), whole)


def test_mix_zero_keeps_the_plain_sft_batches(dataset, tok, tmp_path):
    """At --pretrain-mix 0 the stage builds the plain SFT loader, as before the mix."""
    run = SFTConfig(batch_size=8, seed=3, pretrain_mix=0.0)
    assert pretrain_rows(run.pretrain_mix, run.batch_size) == 0
    loader = sft_command.training_batches(run, dataset, tmp_path / "no-such-data", tok, rank=0, world_size=1)
    old = build_sft_loader(dataset, batch_size=8, seed=3)
    assert type(loader) is type(old)
    pairs = list(zip(loader, old))
    assert len(pairs) == 3 and all(torch.equal(a, b) for batches in pairs for a, b in zip(*batches))
    small = SFTConfig(batch_size=2, seed=3)  # the default mix of 2 rows rounds to no window: no token data needed
    assert type(sft_command.training_batches(small, dataset, tmp_path / "no-such-data", tok, 0, 1)) is type(old)


def test_missing_or_foreign_token_data_is_one_line(dataset, data_dir, tok, tmp_path):
    with pytest.raises(UserError, match=rf"^--pretrain-mix 0.25: no pretraining token data in {tmp_path}; run "
                                        r"`babyllama pretrain` for this run first, or `babyllama data prepare"):
        build_mixed_loader(dataset, tmp_path, 0.25, batch_size=8)
    other = train_tokenizer(SAMPLE_TEXT * 20, 300, tmp_path / "other")
    with pytest.raises(UserError, match="made by another tokenizer"):
        build_mixed_loader(dataset, data_dir, 0.25, batch_size=8, tokenizer=other)


# ---------------------------------------------------------------- several training files, the CLI
def test_load_dataset_concatenates_files_of_different_formats(tok, tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "你是谁？"},
                                              {"role": "assistant", "content": "To be."}]}) + "\n")
    skills = tmp_path / "skills.jsonl"
    skills.write_text("".join(json.dumps({"skill": "add", "lang": "en", "prompt": f"{a} + 1 = ?", "answer": str(a + 1),
                                          "check": "exact"}) + "\n" for a in range(3)))
    both = sft_command.load_dataset([str(chats), str(skills)], "auto", tok, 64, None)
    assert len(both) == 4
    assert torch.equal(both[0][0], sft_command.load_dataset(str(chats), "auto", tok, 64, None)[0][0])
    assert torch.equal(both[3][0], sft_command.load_dataset(str(skills), "prompt", tok, 64, None)[2][0])
    broken = tmp_path / "broken.jsonl"
    broken.write_text(skills.read_text() + json.dumps({"prompt": "2 + 2 = ?"}) + "\n")
    with pytest.raises(UserError, match=rf"^{broken}:4: missing field 'answer'"):
        sft_command.load_dataset([str(chats), str(broken)], "auto", tok, 64, None)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def sft_cli(out, *args):
    cmd = [sys.executable, "-m", "babyllama", "sft", "--name", "baby", "--out", str(out / "out"), "--runs",
           str(out / "runs"), "--seq-len", str(MAX_LEN - 1), "--choice-data", "none", "--batch-size", "8",
           "--eval-every", "2", "--max-steps", "4", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)


def test_sft_cli_mixes_pretraining_text_and_resumes_exactly(tok_dir, tok, data_dir, tmp_path):
    """Two --train-data files of two formats; --pretrain-mix refused without token data, then a run stopped at
    step 2 and resumed ends with the weights of an uninterrupted one."""
    run = tmp_path / "out" / "baby"
    shutil.copytree(tok_dir, run / "tokenizer")
    cfg = model_config_for(SFTConfig(seq_len=MAX_LEN - 1), tok.vocab_size)
    save_checkpoint(run / "pretrain", 1, {"model": Llama(cfg).state_dict(), "model_config": cfg.to_dict()})
    skills = [{"skill": "add", "lang": "en", "prompt": f"{a} + 1 = ?", "answer": str(a + 1), "check": "exact"}
              for a in range(8)]
    flags = ["--train-data", write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in conversations()]),
             write_jsonl(tmp_path / "skills.jsonl", skills),
             "--valid-data", write_jsonl(tmp_path / "valid.jsonl", [{"messages": m} for m in conversations(8)]),
             "--pretrain-mix", "0.25"]
    missing = sft_cli(tmp_path, *flags)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert missing.stderr.startswith(f"error: --pretrain-mix 0.25: no pretraining token data in {run / 'data'}")
    shutil.copytree(data_dir, run / "data")  # made with this tokenizer
    first = sft_cli(tmp_path, *flags, "--stop-at", "2")
    assert first.returncode == 0, first.stderr
    assert "30 train / 8 valid conversations" in first.stdout  # 22 conversations + 8 skill items
    assert f"8 rows (a batch: 6 conversations + 2 windows of {run / 'data'}, pretrain mix 0.25)" in first.stdout
    again = sft_cli(tmp_path, *flags, "--resume")
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "sft" / "run.json").read_text())["config"]["pretrain_mix"] == 0.25
    shutil.move(run / "sft", tmp_path / "resumed")
    whole = sft_cli(tmp_path, *flags)
    assert whole.returncode == 0, whole.stderr
    a = torch.load(tmp_path / "resumed" / "step_00000004.pt", weights_only=False)["model"]
    b = torch.load(run / "sft" / "step_00000004.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
