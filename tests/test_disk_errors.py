"""A write the filesystem refuses (no space, disk quota, file size limit) is one line, exit 2, and loses nothing:
no partial output is left and a previous complete output stays as it was."""
from __future__ import annotations

import errno
import json
import os
import random
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from babyllama.cli import main_guard
from babyllama.data.token_bins import prepare_token_bins, read_meta
from babyllama.data.tokenizer import Tokenizer, train_tokenizer
from babyllama.errors import UserError
from babyllama.files import raise_if_disk_full

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
WORDS = "the of and to a in that is was he for it with as his on be at by had not are but from or have".split()


def guarded(error: BaseException, capsys) -> str:
    """stderr of `main_guard` running a main that raises `error`, after checking exit code 2 and one line."""
    def main() -> None:
        raise error

    with pytest.raises(SystemExit) as stop:
        main_guard(main)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left on the device of"),
                                        (getattr(errno, "EDQUOT", None), "disk quota exceeded on the device of"),
                                        (errno.EFBIG, "file size limit (ulimit -f) exceeded in")])
def test_main_guard_says_each_refused_write_in_one_line(capsys, code, words):
    if code is None:
        pytest.skip("no EDQUOT on this platform")
    line = guarded(OSError(code, os.strerror(code), "/data/run/step_00010.pt"), capsys)
    assert line.startswith(f"error: {words} /data/run while writing step_00010.pt; ")
    assert "another --out" in line and "--resume" in line


def test_main_guard_finds_the_os_error_behind_torch_save(capsys):
    try:
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            # as torch.save raises it: the OSError only as the context, not the cause
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
    except RuntimeError as e:
        error = e
    assert "file size limit (ulimit -f) exceeded in the output; raise the limit" in guarded(error, capsys)
    with pytest.raises(UserError, match=r"file size limit \(ulimit -f\) exceeded in /r while writing x\.pt; "):
        raise_if_disk_full(Path("/r/x.pt"), error)  # atomic_file's check: names the file it writes


def test_main_guard_leaves_other_errors_alone():
    def main() -> None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")

    with pytest.raises(FileNotFoundError):
        main_guard(main)


# ======================================================================= real writes past `ulimit -f`
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(a jsonl corpus of ~60 KB, a 300-token tokenizer trained on it)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(400)]
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # little text for the vocabulary: fine here
        train_tokenizer(docs, 300, root / "tok")
    return path, root / "tok"


def limited(kb: int, *args: str) -> subprocess.CompletedProcess:
    """`python -m babyllama ARGS` under `ulimit -f kb`: no file it writes may grow past `kb` KB."""
    command = shlex.join([sys.executable, "-m", "babyllama", *args])
    return subprocess.run(["bash", "-c", f"ulimit -f {kb}; exec {command}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)


def assert_one_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert all(f in lines[0] for f in fragments), lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_token_data_past_the_file_size_limit_is_one_line_and_leaves_nothing(tmp_path, corpus):
    text, tok = corpus
    out = tmp_path / "data"
    proc = limited(20, "data", "prepare", "--corpus", str(text), "--tokenizer", str(tok), "--dest", str(out),
                   "--workers", "1")  # a shard is ~50 KB
    assert_one_line(proc, f"file size limit (ulimit -f) exceeded in {out} while writing train_00000.bin",
                    "raise the limit")
    assert not out.exists()  # no shard, temp file or lock left (and the directory made for it is gone)


def test_token_data_past_the_file_size_limit_keeps_the_previous_data(tmp_path, corpus):
    text, tok = corpus
    out = tmp_path / "data"
    docs = [json.loads(line)["text"] for line in text.open(encoding="utf-8")]
    prepare_token_bins(iter(docs[:20]), Tokenizer.load(tok), out, num_workers=1)  # small: fits the limit
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    proc = limited(20, "data", "prepare", "--corpus", str(text), "--tokenizer", str(tok), "--dest", str(out),
                   "--workers", "2", "--overwrite")  # through the worker pool
    assert_one_line(proc, "file size limit (ulimit -f) exceeded", "train_00000.bin")
    assert snapshot(out) == before
    assert read_meta(out)["input"]["documents"] == 20


def test_tokenizer_past_the_file_size_limit_keeps_the_previous_one(tmp_path, corpus):
    text, tok = corpus
    out = tmp_path / "tok"
    out.mkdir()
    for path in tok.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    before = snapshot(out)
    proc = limited(8, "data", "tokenizer", "--corpus", str(text), "--vocab-size", "300", "--dest", str(out),
                   "--overwrite")  # tokenizer.json is ~9 KB
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.splitlines()[-1]  # after the warning about little text for the vocabulary
    assert last.startswith(f"error: file size limit (ulimit -f) exceeded in {out} while writing tokenizer.json")
    assert "Traceback" not in proc.stderr
    assert snapshot(out) == before  # no temp directory, no file replaced


def test_refused_evaluation_results_keep_the_previous_ones(tmp_path):
    """`babyllama evaluate` replaces <stage>.json/.md whole or not at all (`evaluate.write_results`)."""
    from babyllama.eval.evaluate import write_results

    small = {"stage": "sft", "checkpoint": "out/x/sft/step_00000600.pt", "step": 600, "params": 4_000_000,
             "metrics": {"bpb": 2.5}}
    json_path, md_path = write_results(small, tmp_path)
    before = json_path.read_bytes(), md_path.read_bytes()
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from babyllama.cli import main_guard; "
            f"from babyllama.eval.evaluate import write_results; "
            f"big = {{**{small!r}, 'checkpoint': 'x' * 300_000}}; "  # over a 200-block (100 KiB) file-size limit
            f"main_guard(lambda: write_results(big, {str(tmp_path)!r}))")
    proc = subprocess.run(["bash", "-c", f"ulimit -f 200; {shlex.quote(sys.executable)} -c {shlex.quote(code)}"],
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: file size limit (ulimit -f) exceeded"), proc.stderr
    assert (json_path.read_bytes(), md_path.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft.json", "sft.md"]  # no temp file left


# ======================================================================= exports past `ulimit -f`
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus) -> tuple[Path, Path, dict]:
    """(a stage directory holding a ~500 KB checkpoint, its 300-token tokenizer, the model's weights)."""
    from tiny import tiny_config

    from babyllama.model.llama import Llama
    from babyllama.train.checkpoint import atomic_save

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = Llama(tiny_config(300, dim=64, ffn_dim=160)).eval()
    stage = tmp_path_factory.mktemp("run") / "sft"
    atomic_save({"model": model.state_dict(), "model_config": model.config.to_dict(), "step": 1},
                stage / "step_00000001.pt")
    return stage, corpus[1], model.state_dict()


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (temp files included) by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def same_weights(path: Path, expected: dict) -> bool:
    from babyllama.train.checkpoint import load_model

    loaded = load_model(path).state_dict()
    return all(loaded[k].equal(v) for k, v in expected.items())


@pytest.mark.parametrize("kind", ["hf", "bert4torch", "gguf"])
def test_export_past_the_file_size_limit_keeps_the_previous_export(tmp_path, checkpoint, kind):
    """Over an earlier good export, with --overwrite: one line naming the file, exit 2, the earlier export byte for
    byte as it was (and loadable), no temp file or directory left beside it."""
    from babyllama.convert.bert4torch import export_bert4torch, import_bert4torch
    from babyllama.convert.hf import export_hf, import_hf

    stage, tok, weights = checkpoint
    dest = tmp_path / {"hf": "hf", "bert4torch": "b4t", "gguf": "baby.gguf"}[kind]
    if kind == "hf":
        export_hf(stage, tok, dest)
        big = "model.safetensors"
    elif kind == "bert4torch":
        export_bert4torch(stage, dest)
        big = "bert4torch_model.pt"
    else:
        pytest.importorskip("gguf")
        from babyllama.convert.gguf import export_gguf

        export_gguf(stage, tok, dest)  # f32: ~260 KB
        big = dest.name
    before = tree(tmp_path)
    args = ["--ckpt", str(stage), "--dest", str(dest), "--overwrite"]
    args += ["--tokenizer", str(tok)] if kind != "bert4torch" else []
    proc = limited(100, "export", kind, *args)  # the weights are ~500 KB (f32), every other file under 10 KB
    where = dest.parent if kind == "gguf" else dest
    assert_one_line(proc, f"file size limit (ulimit -f) exceeded in {where} while writing {big}; raise the limit")
    assert tree(tmp_path) == before
    if kind == "hf":
        assert same_weights(import_hf(dest, tmp_path / "back" / "hf"), weights)
    elif kind == "bert4torch":
        assert same_weights(import_bert4torch(dest, tmp_path / "back" / "b4t"), weights)
    else:
        import gguf

        reader = gguf.GGUFReader(dest)  # reads every tensor's extent: a truncated file is refused
        assert reader.fields["tokenizer.ggml.tokens"].data and len(reader.tensors) == 3 + 9 * 2  # 9 per layer


def test_export_past_the_file_size_limit_into_a_new_directory_leaves_nothing(tmp_path, checkpoint):
    stage, tok, _ = checkpoint
    dest = tmp_path / "new" / "hf"
    proc = limited(100, "export", "hf", "--ckpt", str(stage), "--tokenizer", str(tok), "--dest", str(dest))
    assert_one_line(proc, f"file size limit (ulimit -f) exceeded in {dest} while writing model.safetensors")
    assert list(tmp_path.iterdir()) == []  # not even the parent made for it


def test_import_past_the_file_size_limit_keeps_the_previous_import(tmp_path, checkpoint):
    from babyllama.convert.hf import export_hf, import_hf

    stage, tok, weights = checkpoint
    hf = export_hf(stage, tok, tmp_path / "hf")
    imported = tmp_path / "imported"
    import_hf(hf, imported)
    before = tree(imported)
    proc = limited(100, "import", "hf", str(hf), "--dest", str(imported), "--overwrite")
    assert_one_line(proc, f"file size limit (ulimit -f) exceeded in {imported} while writing step_00000000.pt")
    assert tree(imported) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hf", "imported"]
    assert same_weights(imported, weights)
