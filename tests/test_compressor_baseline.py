"""Compressor baseline: PPMd / xz bits per byte given the training text, the reproduced train/val split, sampling,
the cache, and the lines evaluate, the command line and pretraining's TensorBoard get."""
import json
import math
import random
import re
import warnings
from pathlib import Path

import pytest
import torch

from babyllama.data.token_bins import corpus_record, prepare_token_bins
from babyllama.data.tokenizer import Tokenizer, train_tokenizer
from babyllama.errors import UserError
from babyllama.eval import compressors as cb
from babyllama.eval import evaluate as ev
from babyllama.model.config import ModelConfig
from babyllama.model.llama import Llama
from babyllama.train.checkpoint import atomic_save

WORDS = "the king and queen of a far land rode to sea 明月 春风 江水 故乡".split()


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 40))) for i in range(n)]


def random_text(n: int, seed: int = 0) -> str:
    """n bytes drawn uniformly from 64 ASCII symbols: 6 bits of entropy per byte, which no compressor beats."""
    rng = random.Random(seed)
    symbols = [chr(c) for c in range(48, 112)]
    return "".join(rng.choice(symbols) for _ in range(n))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """out/demo as pretraining leaves it: run.json naming the corpus, a tokenizer, token data split 80/20."""
    root = tmp_path_factory.mktemp("baseline")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents(120)), "utf-8")
    run = root / "out" / "demo"
    with warnings.catch_warnings():  # little text for the vocabulary: enough for a test
        warnings.simplefilter("ignore")
        tok = train_tokenizer(documents(120), 300, run / "tokenizer")
    record = corpus_record([corpus], "auto", "text")
    texts = (json.loads(line)["text"] for line in corpus.open(encoding="utf-8"))
    prepare_token_bins(texts, tok, run / "data", val_fraction=0.2, seed=3, num_workers=1, corpus=record)
    config = {"corpus": [str(corpus)], "corpus_format": "auto", "corpus_field": "text", "seed": 3,
              "val_fraction": 0.2}
    (run / "pretrain").mkdir(parents=True)
    (run / "pretrain" / "run.json").write_text(json.dumps({"stage": "pretrain", "config": config}), "utf-8")
    return run


def test_repetitive_text_compresses_below_random_bytes():
    rep, rnd = "To be, or not to be: that is the question.\n" * 40, random_text(1500)
    out = cb.compressor_bpb([], {"rep": [rep], "rnd": [rnd]})["sets"]
    for c in cb.COMPRESSORS:
        assert out["rep"][f"{c}_bpb"] < 1.0 < 5.5 < out["rnd"][f"{c}_bpb"]
        assert out["rnd"]["bytes"] == 1500 and out["rnd"][f"{c}_bits"] == out["rnd"][f"{c}_bpb"] * 1500


def test_training_text_is_what_the_compressor_is_given():
    """Held-out text seen in training costs far fewer bits than the same text unseen; unrelated training text
    does not help."""
    held = random_text(3000, seed=1)
    seen = cb.compressor_bpb([held], {"h": [held]})["sets"]["h"]
    unseen = cb.compressor_bpb([random_text(3000, seed=2)], {"h": [held]})["sets"]["h"]
    for c in cb.COMPRESSORS:
        assert seen[f"{c}_bpb"] < 1.0 and unseen[f"{c}_bpb"] > 5.5


def test_margin_is_over_the_better_compressor():
    row = {"ppmd_bpb": 2.0, "xz_bpb": 2.5}
    assert cb.margin(1.8, row) == pytest.approx({"best": "ppmd", "bits": 0.2, "pct": 10.0})
    assert cb.margin(2.2, {"ppmd_bpb": 3.0, "xz_bpb": 2.0})["pct"] == pytest.approx(-10.0)


def test_the_split_is_the_token_datas(run_dir):
    rc = cb.RunCorpus.of_run(run_dir)
    meta = json.loads((run_dir / "data" / "meta.json").read_text())
    sample = cb.sample_split(rc)  # checks both document counts against meta.json
    assert len(sample.train) == meta["splits"]["train"]["documents"]
    assert len(sample.heldout) == meta["splits"]["val"]["documents"] > 0
    assert not set(sample.train) & set(sample.heldout)


def test_sampling_is_deterministic_every_kth_document(run_dir):
    rc = cb.RunCorpus.of_run(run_dir)
    full = cb.sample_split(rc).train
    budget = sum(len(d.encode()) for d in full) // 4
    a, b = cb.sample_split(rc, max_train_bytes=budget), cb.sample_split(rc, max_train_bytes=budget)
    k = a.info["stride"]
    assert a.train == b.train and k >= 4
    assert a.train == full[::k][:len(a.train)]  # every k-th training document, in corpus order
    assert a.info["train_bytes"] < budget + max(len(d.encode()) for d in full)
    few = cb.sample_split(rc, max_heldout_bytes=1, need_train=False)
    assert few.train == [] and few.heldout == cb.sample_split(rc).heldout[:1]


def test_second_call_is_cached(run_dir, monkeypatch):
    calls = []
    sizes = {c: (lambda data, f=f: calls.append(1) or f(data)) for c, f in cb.COMPRESSORS.items()}
    monkeypatch.setattr(cb, "COMPRESSORS", sizes)
    sets = {"x": documents(5, seed=9)}
    first = cb.run_baseline(run_dir, sets)
    n = len(calls)
    second = cb.run_baseline(run_dir, sets)
    assert not first["cached"] and second["cached"] and n > 0 and len(calls) == n
    assert second["sets"] == first["sets"] and (run_dir / "eval" / "baseline" / f"{first['key']}.json").is_file()
    other = cb.run_baseline(run_dir, {"x": documents(6, seed=9)})  # other held-out text: another entry
    assert not other["cached"] and other["key"] != first["key"]


def test_an_edited_corpus_is_refused(run_dir, tmp_path):
    moved = tmp_path / "demo"
    for part in ("pretrain", "data"):
        (moved / part).mkdir(parents=True)
        for f in (run_dir / part).glob("*.json"):
            (moved / part / f.name).write_bytes(f.read_bytes())
    record = json.loads((moved / "pretrain" / "run.json").read_text())
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(Path(record["config"]["corpus"][0]).read_text("utf-8") + '{"text": "more"}\n', "utf-8")
    record["config"]["corpus"] = [str(corpus)]
    (moved / "pretrain" / "run.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="trained on another corpus"):
        cb.RunCorpus.of_run(moved)
    with pytest.raises(UserError, match="no record of the pretraining run"):
        cb.RunCorpus.of_run(tmp_path / "nothing")


def save_tiny_model(run_dir: Path, stage: str = "pretrain") -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=Tokenizer.load(run_dir / "tokenizer").vocab_size, dim=32, n_layers=1, n_heads=4,
                      ffn_dim=64, max_seq_len=64)
    model = Llama(cfg)
    atomic_save({"model": model.state_dict(), "model_config": cfg.to_dict(), "extra": {}},
                run_dir / stage / "step_00000007.pt")


def test_evaluate_prints_the_baseline_beside_each_language(run_dir, tmp_path, capsys):
    save_tiny_model(run_dir)
    ev.main(["--name", run_dir.name, "--root", str(run_dir.parent), "--max-docs", "3", "--max-items", "2",
             "--device", "cpu"])
    out = capsys.readouterr().out
    result = json.loads((run_dir / "eval" / "pretrain.json").read_text())
    m = result["metrics"]
    keys = list(m)
    for lang in ("zh", "en"):
        assert keys[keys.index(f"{lang}_bpb") + 1:keys.index(f"{lang}_bpb") + 5] == [
            f"{lang}_bpb_ppmd", f"{lang}_bpb_xz", f"{lang}_margin_pct", f"{lang}_margin_bits"]
        best = min(m[f"{lang}_bpb_ppmd"], m[f"{lang}_bpb_xz"])
        assert m[f"{lang}_margin_bits"] == pytest.approx(best - m[f"{lang}_bpb"])
        assert re.search(rf"\| {lang} \| [\d,]+ \| {m[f'{lang}_bpb']:.3f} \| {m[f'{lang}_bpb_ppmd']:.3f} \|", out)
    assert "## Against classical compressors" in out and "Compressors given the run's training text" in out
    # a checkpoint without a pretraining record (an imported model) is evaluated all the same, with a note
    ev.main(["--name", "imported", "--root", str(tmp_path), "--checkpoint", str(run_dir / "pretrain"),
             "--tokenizer", str(run_dir / "tokenizer"), "--max-docs", "2", "--max-items", "2", "--device", "cpu"])
    assert "No compressor baseline:" in capsys.readouterr().out


def test_command_compares_the_model_on_the_runs_own_heldout_split(run_dir, tmp_path, capsys):
    save_tiny_model(run_dir)
    cb.main(["--name", run_dir.name, "--root", str(run_dir.parent), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "the run's held-out split" in out and re.search(r"\| val \| [\d,]+ \| \d+\.\d{3} \|", out)
    held = tmp_path / "mine.txt"
    held.write_text("\n\n".join(documents(4, seed=5)), "utf-8")
    cb.main(["--name", run_dir.name, "--root", str(run_dir.parent), "--device", "cpu", "--heldout", str(held)])
    assert re.search(r"\| heldout \| [\d,]+ \|", capsys.readouterr().out)


class _Main:
    is_main = True


class _Trainer:
    env, step = _Main(), 0


def test_val_bpb_follows_val_loss(run_dir):
    rc = cb.RunCorpus.of_run(run_dir)
    ref = cb.CompressorReference(rc, run_dir, run_dir / "tb", eval_every=10, max_steps=20)
    meta = rc.meta
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    logs = {"loss": 3.0, "val_loss": 2.0}
    ref.on_step_end(_Trainer(), logs)
    assert logs["val_bpb"] == pytest.approx(2.0 * tokens / meta["input"]["bytes"] / math.log(2))
    ref.write_lines(_Trainer())  # step 0 of 20: the run did not finish, nothing is drawn
    assert not (run_dir / "tb").exists()
    done = _Trainer()
    done.step = 20
    ref.write_lines(done)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    val = cb.run_baseline(run_dir, rc=rc)["sets"]["val"]
    for c in cb.COMPRESSORS:  # a flat line from the first validation step to the last step
        points = [(e.step, e.value) for e in acc.Scalars(f"val/val_bpb_{c}")]
        assert points == [(10, pytest.approx(val[f"{c}_bpb"])), (20, pytest.approx(val[f"{c}_bpb"]))]


def test_baseline_of_a_stage_without_a_checkpoint_is_one_line_naming_its_flags(tmp_path):
    from babyllama.errors import UserError
    from babyllama.eval.compressors import main

    (tmp_path / "demo").mkdir()
    with pytest.raises(UserError, match=r"demo/foo: no checkpoint .*pass another --stage \(or --name/--out\)"):
        main(["--name", "demo", "--out", str(tmp_path), "--stage", "foo"])
