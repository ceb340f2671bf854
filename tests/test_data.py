"""Pretraining data: token shards + meta.json, windows over memory maps, the resumable DDP sampler, the CLI."""
from __future__ import annotations

import json
import os
import pickle
import random
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from babyllama.commands import prepare as prepare_cli
from babyllama.data.sampler import IndexPermutation, ResumableSampler
from babyllama.data.token_bins import (
    TokenWindowDataset,
    build_pretrain_loader,
    check_corpus_matches,
    check_tokenizer_matches,
    corpus_record,
    file_identity,
    prepare_token_bins,
    read_meta,
)
from babyllama.data.tokenizer import train_tokenizer
from babyllama.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
EOS = 2


class ByteTokenizer:
    """Picklable stand-in: one token per UTF-8 byte, shifted by `offset`; eos = 2."""

    def __init__(self, offset: int = 3, vocab_size: int | None = None):
        self.offset, self.eos_id = offset, EOS
        self.vocab_size = vocab_size if vocab_size is not None else offset + 256

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - self.offset for i in ids).decode("utf-8")


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{i}:" + "".join(rng.choice("abc 春风吹") for _ in range(rng.randint(0, 60))) for i in range(n)]


def prepare(tmp_path: Path, docs: list[str], tok=None, name: str = "data", **kw) -> tuple[Path, dict]:
    kw = {"val_fraction": 0.2, "num_workers": 1, "shard_tokens": 1000, **kw}
    out = tmp_path / name
    return out, prepare_token_bins(iter(docs), tok or ByteTokenizer(), out, **kw)


def split_tokens(out: Path, meta: dict, split: str) -> np.ndarray:
    dtype = np.dtype("<u2" if meta["dtype"] == "uint16" else "<u4")
    parts = [np.fromfile(out / s["file"], dtype=dtype) for s in meta["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def split_docs(out: Path, meta: dict, split: str, tok) -> list[str]:
    stream = split_tokens(out, meta, split).tolist()
    assert not stream or stream[-1] == EOS
    docs, cur = [], []
    for t in stream:
        if t == EOS:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    return docs


# ======================================================================= preparation
@pytest.mark.parametrize("offset,dtype", [(3, "uint16"), (70_000, "uint32")])
def test_round_trip_and_meta(tmp_path, offset, dtype):
    docs, tok = make_docs(300), ByteTokenizer(offset)
    out, meta = prepare(tmp_path, docs, tok)
    assert meta == json.loads((out / "meta.json").read_text()) == read_meta(out)
    assert (meta["format"], meta["version"], meta["dtype"]) == ("babyllama-tokens", 1, dtype)
    assert (meta["vocab_size"], meta["eos_id"], meta["seed"]) == (offset + 256, EOS, 0)
    assert meta["tokenizer"]["class"].endswith("ByteTokenizer") and meta["tokenizer"]["path"] is None
    assert meta["input"] == {"documents": 300, "bytes": sum(len(d.encode()) for d in docs)}
    itemsize = 2 if dtype == "uint16" else 4
    for split in ("train", "val"):
        s = meta["splits"][split]
        assert s["tokens"] == sum(x["tokens"] for x in s["shards"])
        assert [x["file"] for x in s["shards"]] == [f"{split}_{i:05d}.bin" for i in range(len(s["shards"]))]
        for x in s["shards"]:
            assert x["bytes"] == x["tokens"] * itemsize == (out / x["file"]).stat().st_size
            assert x["tokens"] <= 1000
    assert len(meta["splits"]["train"]["shards"]) > 3
    train, val = (split_docs(out, meta, s, tok) for s in ("train", "val"))
    assert (len(train), len(val)) == (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"])
    assert 30 <= len(val) <= 90  # ~20% of 300
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in set(train)]  # corpus order kept within a split
    total = sum(len(tok.encode(d)) + 1 for d in docs)
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == total
    assert sorted(p.name for p in out.iterdir() if p.suffix not in (".bin", ".json")) == []  # no *.tmp left


def test_meta_json_rename_is_synced_to_the_directory(tmp_path, monkeypatch):
    real_fsync, synced = os.fsync, []

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append((tmp_path / "data" / "meta.json").exists())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    prepare(tmp_path, make_docs(20), ByteTokenizer(3))
    assert synced[-1:] == [True]  # the directory is synced once meta.json (the completion mark) is in place


def test_split_is_deterministic_by_seed(tmp_path):
    docs, tok = make_docs(200), ByteTokenizer()
    a, meta_a = prepare(tmp_path, docs, name="a", seed=5)
    b, meta_b = prepare(tmp_path, docs, name="b", seed=5)
    c, meta_c = prepare(tmp_path, docs, name="c", seed=6)
    assert meta_a == meta_b
    assert split_docs(a, meta_a, "val", tok) == split_docs(b, meta_b, "val", tok)
    assert split_docs(a, meta_a, "val", tok) != split_docs(c, meta_c, "val", tok)


def test_multiprocess_matches_single_process(tmp_path):
    docs = make_docs(2500)  # several 512-document chunks in flight
    one, meta_one = prepare(tmp_path, docs, name="one", num_workers=1)
    two, meta_two = prepare(tmp_path, docs, name="two", num_workers=2)
    assert meta_one == meta_two
    for split in ("train", "val"):
        assert np.array_equal(split_tokens(one, meta_one, split), split_tokens(two, meta_two, split))


def test_tiny_corpus_still_gets_a_val_document(tmp_path):
    docs = make_docs(5)
    out, meta = prepare(tmp_path, docs, val_fraction=0.01)
    assert split_docs(out, meta, "val", ByteTokenizer()) == [docs[-1]]
    _, meta = prepare(tmp_path, docs, name="none", val_fraction=0.0)
    assert meta["splits"]["val"] == {"documents": 0, "tokens": 0, "shards": []}


def test_ids_beyond_uint16_are_refused_not_wrapped(tmp_path):
    lying = ByteTokenizer(offset=65_400, vocab_size=65_535)  # claims uint16 but "春" gives ids >= 2**16
    with pytest.raises(UserError, match=r"document 1: .*id (\d+), outside its vocabulary of 65535") as e:
        prepare(tmp_path, ["abc", "a春"] * 600, lying, shard_tokens=4)
    assert int(e.value.args[0].split("id ")[1].split(",")[0]) >= 2**16
    assert not any((tmp_path / "data").glob("*"))  # nothing half-written left behind
    with pytest.raises(UserError, match="document 1001: .*id 198"):
        prepare(tmp_path, ["ok"] * 1001 + ["é"], ByteTokenizer(vocab_size=150), num_workers=2)  # from a worker


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out, _ = prepare(tmp_path, make_docs(50))
    with pytest.raises(UserError, match=rf"{out}.*--overwrite \(overwrite=True\)"):
        prepare(tmp_path, make_docs(50))
    (out / "notes.txt").write_text("mine")
    _, meta = prepare(tmp_path, make_docs(20), overwrite=True)
    assert meta["input"]["documents"] == 20 and (out / "notes.txt").read_text() == "mine"
    assert len(list(out.glob("*.bin"))) == sum(len(s["shards"]) for s in meta["splits"].values())  # old ones gone


def test_leftovers_of_an_interrupted_run_are_replaced(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "train_00000.bin").write_bytes(b"\0" * 10)
    (out / "train_00001.bin.tmp").write_bytes(b"\0" * 3)
    (out / ".meta.json.k3j4x9.tmp").write_bytes(b"{")  # outdir.atomic_file's temp file, killed mid-write
    _, meta = prepare(tmp_path, make_docs(20))
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train_00000.bin", "val_00000.bin"]
    assert (out / "train_00000.bin").stat().st_size == meta["splits"]["train"]["shards"][0]["bytes"]


# ======================================================================= reading
def test_windows_cross_shard_index_arithmetic(tmp_path):
    out, meta = prepare(tmp_path, make_docs(300), shard_tokens=700)
    seq_len = 63
    ds = TokenWindowDataset(out, "train", seq_len=seq_len)
    shards = [np.fromfile(out / s["file"], dtype="<u2") for s in meta["splits"]["train"]["shards"]]
    expected = [s[k * 64:(k + 1) * 64] for s in shards for k in range(len(s) // 64)]  # never across shards
    assert len(shards) > 3 and len(ds) == len(expected)
    for i, w in enumerate(expected):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (seq_len,)
        assert torch.equal(x, torch.from_numpy(w[:-1].astype(np.int64)))
        assert torch.equal(y, torch.from_numpy(w[1:].astype(np.int64)))
    with pytest.raises(IndexError):
        ds[len(ds)]
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker gets: paths, not mapped data
    assert len(pickle.dumps(ds)) < sum(map(len, shards)) / 5 and torch.equal(clone[len(ds) - 1][1], ds[len(ds) - 1][1])


def test_uint32_windows_read_back(tmp_path):
    out, _ = prepare(tmp_path, make_docs(100), ByteTokenizer(70_000))
    x, y = TokenWindowDataset(out, "train", seq_len=16)[0]
    tokens = torch.cat([x, y])
    assert bool(((tokens == EOS) | (tokens >= 70_000)).all()) and int(tokens.max()) > 65_535


def test_loader_batches_and_sampler(tmp_path):
    out, _ = prepare(tmp_path, make_docs(300))
    loader = build_pretrain_loader(out, "train", 31, 4, seed=3, num_workers=1)
    assert isinstance(loader.sampler, ResumableSampler) and loader.tokens_per_batch == 4 * 31
    x, y = next(iter(loader))
    assert x.shape == y.shape == (4, 31) and torch.equal(x[:, 1:], y[:, :-1])
    batches = list(loader)
    assert sum(len(b[0]) for b in batches) == len(loader.dataset) == loader.sampler.num_samples
    val = build_pretrain_loader(out, "val", 31, 4, shuffle=False)
    assert torch.equal(next(iter(val))[0], next(iter(val))[0])


def test_drop_last_ranks_split_the_global_batches_of_one_process(tmp_path):
    out, _ = prepare(tmp_path, make_docs(300))
    loader = build_pretrain_loader(out, "train", 5, 4, seed=3, drop_last=True)
    n = len(loader.dataset)
    assert n % 4 == 3  # 2 ranks padded to 2 x ceil(n / 2) samples would get one more (padded) global batch
    single = [x for x, _ in loader]
    ranks = [[x for x, _ in build_pretrain_loader(out, "train", 5, 2, seed=3, rank=r, world_size=2, drop_last=True)]
             for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == n // 4
    for k, batch in enumerate(single):
        assert torch.equal(batch[0::2], ranks[0][k]) and torch.equal(batch[1::2], ranks[1][k])


# ---- bad inputs
def test_too_few_windows_for_one_global_batch(tmp_path):
    out, _ = prepare(tmp_path, make_docs(20))
    n = len(TokenWindowDataset(out, "train", seq_len=8))
    with pytest.raises(UserError, match=rf"split 'train' has {n:,} windows of 9 tokens, fewer than one global "
                                        rf"batch \(2 x {n}\)"):
        build_pretrain_loader(out, "train", 8, n, world_size=2, drop_last=True)


def test_data_of_another_tokenizer_is_refused(tmp_path):
    out, _ = prepare(tmp_path, make_docs(50))
    assert check_tokenizer_matches(out, ByteTokenizer())["vocab_size"] == 259
    with pytest.raises(UserError, match="token data is uint16, which cannot hold the ids of the 70,256-token"):
        check_tokenizer_matches(out, ByteTokenizer(offset=70_000))
    with pytest.raises(UserError, match=r"made by another tokenizer \(259 tokens.*\(300 tokens\); delete"):
        check_tokenizer_matches(out, ByteTokenizer(vocab_size=300))


def test_truncated_or_corrupt_shard(tmp_path):
    out, meta = prepare(tmp_path, make_docs(200))
    shard = out / meta["splits"]["train"]["shards"][1]["file"]
    size = shard.stat().st_size
    for cut in (1, 2):
        shard.write_bytes(b"\0" * (size - cut))
        with pytest.raises(UserError, match=rf"{shard.name}: {size - cut:,} bytes, expected {size:,}.*"
                                            r"rerun `babyllama data prepare`"):
            TokenWindowDataset(out, "train", seq_len=8)
    shard.unlink()
    with pytest.raises(UserError, match=f"{shard.name}: missing"):
        TokenWindowDataset(out, "train", seq_len=8)
    TokenWindowDataset(out, "val", seq_len=8)  # the other split is not affected


def test_out_of_range_ids_in_a_shard_of_the_right_size(tmp_path):
    out, meta = prepare(tmp_path, make_docs(200))
    shard = out / meta["splits"]["train"]["shards"][1]["file"]
    tokens = np.fromfile(shard, dtype="<u2")
    tokens[20] = 0xFFFF  # garbage bytes: the size is right, the id is beyond the 259-token vocabulary
    tokens.tofile(shard)
    ds = TokenWindowDataset(out, "train", seq_len=8)  # opening checks sizes only: no scan of the corpus
    first = meta["splits"]["train"]["shards"][0]["tokens"] // 9  # windows of the shard before
    ds[first + 1]  # the windows around it read fine
    with pytest.raises(UserError, match=rf"{shard.name}: token 20 is id 65535, beyond the vocabulary of 259 in "
                                        r"meta.json; the file is corrupt: rerun `babyllama data prepare`"):
        ds[first + 2]  # tokens 18..26 of the shard


def test_corpus_record_expands_paths_and_names_what_differs(tmp_path, monkeypatch):
    """Files are recorded by name, size and a hash of their ends: a moved corpus matches, an edited file does not."""
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    monkeypatch.chdir(tmp_path)
    record = corpus_record(["a.jsonl", "b.jsonl"], "auto", "text")
    assert record == corpus_record([str(tmp_path / "*.jsonl")], "auto", "text")  # a glob or a directory: its files
    assert [f["name"] for f in record["files"]] == ["a.jsonl", "b.jsonl"] and record["files"][0]["bytes"] == 14
    out, meta = prepare(tmp_path, make_docs(50), corpus=record)
    assert meta["corpus"] == read_meta(out)["corpus"] == record
    check_corpus_matches(out, record, "redo")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).rename(moved / name)
    check_corpus_matches(out, corpus_record([moved], "auto", "text"), "redo")  # the same files, moved
    with pytest.raises(UserError, match=r"meta.json: the token data was prepared from another corpus \(2 files "
                                        r"\(a.jsonl, b.jsonl\) vs now 1 \(a.jsonl\); field 'text' vs now "
                                        r"'body'\); redo"):
        check_corpus_matches(out, corpus_record([moved / "a.jsonl"], "auto", "body"), "redo")
    (moved / "b.jsonl").write_text('{"text": "y"}\n')  # edited, same size
    with pytest.raises(UserError, match=r"\(file 2 of 2: b.jsonl \(14 bytes, ends [0-9a-f]{16}\) vs now b.jsonl "
                                        r"\(14 bytes, ends [0-9a-f]{16}\)\); redo"):
        check_corpus_matches(out, corpus_record([moved], "auto", "text"), "redo")
    old, _ = prepare(tmp_path, make_docs(50), name="old")  # no corpus given, as data prepared before the record
    check_corpus_matches(old, corpus_record([moved / "a.jsonl"], "auto", "body"), "redo")
    paths, _ = prepare(tmp_path, make_docs(50), name="paths", corpus={"files": ["/x/a.jsonl"], "format": "auto",
                                                                        "field": "text"})
    check_corpus_matches(paths, corpus_record([moved], "auto", "text"), "redo")  # an older record: any corpus


def test_file_identity_hashes_both_ends_of_big_files(tmp_path):
    big = tmp_path / "big.txt"
    body = bytearray(b"x" * 300_000)
    big.write_bytes(body)
    first = file_identity(big)
    body[-1:] = b"y"  # the last byte: past the first 16 KiB
    big.write_bytes(body)
    assert file_identity(big)["ends_sha256"] != first["ends_sha256"] and file_identity(big)["bytes"] == 300_000


def test_missing_or_bad_meta(tmp_path):
    out, meta = prepare(tmp_path, make_docs(100))
    meta_path = out / "meta.json"
    meta_path.write_text("{not json")
    with pytest.raises(UserError, match="meta.json: unreadable"):
        TokenWindowDataset(out, seq_len=8)
    meta_path.write_text(json.dumps({**meta, "dtype": "uint16", "vocab_size": 100_000}))
    with pytest.raises(UserError, match="uint16 cannot hold the ids of a 100,000-token vocabulary"):
        TokenWindowDataset(out, seq_len=8)
    meta_path.unlink()
    with pytest.raises(UserError, match="meta.json not found.*run `babyllama data prepare --dest "):
        build_pretrain_loader(out, "train", 8, 2)


def test_too_few_tokens_for_a_window(tmp_path):
    out, meta = prepare(tmp_path, make_docs(100))
    n = meta["splits"]["val"]["tokens"]
    with pytest.raises(UserError, match=rf"split 'val' has {n:,} tokens .* needs 4,097"):
        TokenWindowDataset(out, "val", seq_len=4096)


# ======================================================================= sampler
@pytest.mark.parametrize("n", [1, 2, 3, 5, 103, 1024, 4097])
def test_index_permutation_is_a_bijection(n):
    out = IndexPermutation(n, (7, 0))(np.arange(n, dtype=np.uint64))
    assert sorted(out.tolist()) == list(range(n))


def test_index_permutation_shuffles_like_a_random_one():
    n = 20_000
    a = IndexPermutation(n, (1, 0))(np.arange(n, dtype=np.uint64)).astype(np.float64)
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05  # no trace of the input order
    # neighbouring indices land far apart: a random permutation's median |jump| is (1 - 1/sqrt 2) n = 0.29 n
    assert 0.25 < np.median(np.abs(np.diff(a))) / n < 0.34
    b = IndexPermutation(n, (1, 1))(np.arange(n, dtype=np.uint64))
    assert (a == b).mean() < 0.01  # another seed (epoch) is another order


def test_sampler_blocks_equal_the_whole_epoch():
    s = ResumableSampler(1000, seed=3, rank=1, world_size=3)
    whole = s.rank_indices(2)
    assert torch.equal(torch.cat([s.rank_indices(2, 0, 100), s.rank_indices(2, 100, s.per_rank)]), whole)


def test_sampler_ranks_cover_and_match_one_process():
    n, ws = 103, 4
    single = list(ResumableSampler(n, seed=7))
    assert sorted(single) == list(range(n))
    ranks = [list(ResumableSampler(n, seed=7, rank=r, world_size=ws)) for r in range(ws)]
    assert {len(r) for r in ranks} == {26} and set().union(*ranks) == set(range(n))
    interleaved = [ranks[k % ws][k // ws] for k in range(26 * ws)]
    assert interleaved == single + single[:1]  # padded like DistributedSampler
    dropped = [list(ResumableSampler(n, seed=7, rank=r, world_size=ws, drop_last=True)) for r in range(ws)]
    assert sum(map(len, dropped)) == 100 and len(set().union(*dropped)) == 100
    assert list(ResumableSampler(5, shuffle=False, rank=1, world_size=2)) == [1, 3, 0]


def test_sampler_resumes_mid_epoch_exactly():
    a = ResumableSampler(50, seed=1, rank=1, world_size=2)
    a.set_epoch(3)
    full = list(a.rank_indices(3))
    it = iter(a)
    seen = [next(it) for _ in range(9)]
    assert seen == full[:9] and a.state_dict()["consumed"] == 9
    b = ResumableSampler(50, seed=1, rank=1, world_size=2)
    b.load_state_dict({"epoch": 3, "consumed": 9})  # what the trainer stores
    assert len(b) == 16 and list(b) == full[9:]
    assert b.state_dict()["epoch"] == 4 and list(b) == list(a.rank_indices(4))  # a finished pass moves on
    with pytest.raises(UserError, match="world_size=4"):
        b.load_state_dict({**a.state_dict(), "world_size": 4})
    with pytest.raises(UserError, match="beyond"):
        b.load_state_dict({"epoch": 0, "consumed": 26})


def test_sampler_epochs_and_seeds_differ():
    s = ResumableSampler(1000, seed=0)
    assert list(s) != list(s)  # epoch 0, then epoch 1
    assert torch.equal(s.rank_indices(2), ResumableSampler(1000, seed=0).rank_indices(2))
    assert not torch.equal(s.rank_indices(0), ResumableSampler(1000, seed=1).rank_indices(0))
    again = ResumableSampler(1000, seed=0)
    it = iter(again)
    next(it)
    assert list(again)[0] == next(iter(ResumableSampler(1000, seed=0)))  # an unfinished pass restarts


# ======================================================================= CLI
def test_cli_end_to_end(tmp_path):
    inputs = [str(ROOT / "data" / "corpus" / f"{name}_heldout.jsonl") for name in ("poetry_zh", "shakespeare_en")]
    docs = [json.loads(line)["text"] for path in inputs for line in open(path, encoding="utf-8")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small corpus for a tokenizer: fine for this test
        tok = train_tokenizer(docs, 400, tmp_path / "tok")
    out = tmp_path / "bins"
    prepare_cli.main(["--input", *inputs, "--tokenizer", str(tmp_path / "tok"), "--dest", str(out), "--workers", "2",
              "--val-fraction", "0.05"])
    meta = read_meta(out)
    assert meta["tokenizer"]["path"] == str(tmp_path / "tok" / "tokenizer.model")
    assert len(meta["tokenizer"]["sha256"]) == 64
    assert meta["input"]["documents"] == len(docs) and meta["vocab_size"] == 400
    assert meta["corpus"] == {"files": [file_identity(Path(p)) for p in inputs], "format": "auto", "field": "text"}
    assert sum(s["tokens"] for s in meta["splits"].values()) == sum(len(tok.encode(d)) + 1 for d in docs)
    decoded = split_docs(out, meta, "train", tok) + split_docs(out, meta, "val", tok)
    assert meta["splits"]["val"]["documents"] > 0 and sorted(decoded) == sorted(docs)
    proc = subprocess.run([sys.executable, "-m", "babyllama", "data", "prepare", "--corpus", *inputs, "--tokenizer",
                           str(tmp_path / "tok"), "--dest", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {out} is not empty")
    assert "--overwrite" in proc.stderr
