"""pretrain/pretrain.py and pretrain/infer.py end to end, as subprocesses on a tiny zh+en corpus: bad input is one
`error:` line with exit code 2 that overwrites nothing; kill + --resume reproduces the uninterrupted loss curve;
2-process gloo DDP trains the same parameters as one process with the same global batch; inference prints."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from babyllama.errors import UserError
from babyllama.eval import compare
from babyllama.files import LOCK_FILE
from babyllama.serve.process import free_port
from babyllama.shipped import PUBLISHED
from babyllama.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN, INFER = str(ROOT / "pretrain" / "pretrain.py"), str(ROOT / "pretrain" / "infer.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS, BATCH, SEQ_LEN = 30, 4, 31
# fp32 eager: the exact claims below (2 processes = 1 by the weights, resumes) are made in fp32; bf16 + compile,
# what `auto` picks for pretraining on a bf16 CPU, is held to them in test_trainer.py and test_compare.py's replay.
# Eager also spares the runs of >= 200 steps (the lock test's) a minute of compiling.
TINY = ["--model", "tiny", "--vocab-size", "300", "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH),
        "--max-steps", str(STEPS), "--warmup-steps", "30", "--eval-every", "10", "--eval-batches", "2",
        "--ckpt-every", "3", "--workers", "1", "--device", "cpu", "--mixed-precision", "fp32",
        "--torch-compile", "off"]


@dataclass
class Run:
    root: Path  # holds out/ and runs/
    corpus: Path | None = None  # default root/corpus.jsonl

    def __post_init__(self):
        self.corpus = self.corpus or self.root / "corpus.jsonl"

    @property
    def out(self) -> Path:  # out/<name> for the default --name baby
        return self.root / "out" / "baby"

    def args(self, *extra: str) -> list[str]:
        """pretrain.py's command line; later flags override earlier ones."""
        return [sys.executable, PRETRAIN, "--out", str(self.root / "out"), "--runs", str(self.root / "runs"),
                "--corpus", str(self.corpus), *TINY, *extra]

    def pretrain(self, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.args(*extra), capture_output=True, text=True, env=ENV, timeout=300)

    def losses(self) -> list[tuple[int, float]]:
        rows = [json.loads(line) for line in (self.out / "pretrain" / "log.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows]


def write_corpus(path: Path) -> None:
    """Eight poems and eight speeches of the shipped held-out corpus, interleaved (about 4 KB)."""
    texts = [[json.loads(line)["text"] for line in (ROOT / "data" / "corpus" / f"{name}_heldout.jsonl").open()][:8]
             for name in ("poetry_zh", "shakespeare_en")]
    lines = [json.dumps({"text": t}, ensure_ascii=False) for pair in zip(*texts) for t in pair]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def new_run(root: Path, like: Run | None = None) -> Run:
    """A run directory with the corpus, or with `like`'s corpus file, tokenizer and token data (not its
    checkpoints): token data is reused only for the corpus files it was prepared from."""
    root.mkdir(parents=True, exist_ok=True)
    if like is None:
        run = Run(root)
        write_corpus(run.corpus)
        return run
    for part in ("tokenizer", "data"):
        shutil.copytree(like.out / part, root / "out" / "baby" / part)
    return Run(root, like.corpus)


def digests(directory: Path) -> dict[str, str]:
    """Every file's hash, but for the lock files (they hold the PID of the last run that took them)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def assert_stopped(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A run stopped during training: exit code 2, and its last stderr line (after the progress bar) is
    `error: ...` holding every fragment."""
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("error: ") and all(f in last for f in fragments), proc.stderr


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2 and exactly one stderr line, `error: ...`, holding every fragment."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Run:
    """One uninterrupted run: tokenizer, token data, checkpoints every 3 steps, log.jsonl."""
    run = new_run(tmp_path_factory.mktemp("trained"))
    proc = run.pretrain()
    assert proc.returncode == 0, proc.stderr
    assert [s for s, _ in run.losses()] == list(range(1, STEPS + 1))
    return run


@pytest.fixture
def untouched(trained):
    """Asserts that a test leaves every file of the trained run byte-identical."""
    before = digests(trained.root)
    yield trained
    assert digests(trained.root) == before


@pytest.fixture(scope="module")
def big_tokenizer(tmp_path_factory) -> Path:
    """A 70,000-token tokenizer.json: more ids than uint16 holds and than the 0.2b preset's 64,793."""
    import tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 70_000)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    path = tmp_path_factory.mktemp("big_tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


# ======================================================================= bad input: one line, exit 2
@pytest.mark.parametrize("content,expected", [
    (None, ["{corpus}: no such file or directory", "check the corpus path"]),
    ("", ["{corpus}: no documents", "--corpus-field"]),
    ('{{"text": "床前明月光"}}\n{{"text": "To be\n', ["{corpus}:2: invalid JSON", "one object per line"]),
    ('{{"text": "床前明月光"}}\n{{"body": "To be"}}\n', ["{corpus}:2: record has no field 'text' (keys: body)",
                                                       "--corpus-field"]),
], ids=["missing", "empty", "malformed-line", "missing-field"])
def test_bad_corpus(tmp_path, content, expected):
    run = Run(tmp_path)
    if content is not None:
        run.corpus.write_text(content.format(), encoding="utf-8")
    assert_user_error(run.pretrain(), *(e.format(corpus=run.corpus) for e in expected))
    assert not (tmp_path / "out").exists()  # no half-trained tokenizer or half-written data left behind


def test_tokenizer_beyond_the_data_dtype(tmp_path, trained, big_tokenizer):
    run = new_run(tmp_path, like=trained)
    before = digests(run.out)
    assert_user_error(run.pretrain("--tokenizer", str(big_tokenizer)),
                      f"{run.out / 'data' / 'meta.json'}: the token data is uint16, which cannot hold the ids of "
                      f"the 70,000-token tokenizer", f"delete {run.out / 'data'}")
    assert digests(run.out) == before


def test_tokenizer_beyond_the_model_at_a_path(tmp_path, trained, big_tokenizer):
    """A preset's vocabulary follows the tokenizer; an architecture read with --model PATH cannot grow."""
    run = new_run(tmp_path)
    model = trained.out / "pretrain"
    assert_user_error(run.pretrain("--tokenizer", str(big_tokenizer), "--model", str(model)),
                      f"the tokenizer has 70,000 tokens but the model at --model {model} has 300 embedding rows")
    assert not run.out.joinpath("data").exists()  # refused before tokenizing the corpus


def test_corrupt_or_truncated_bin(tmp_path, trained):
    run = new_run(tmp_path, like=trained)
    shard = run.out / "data" / "train_00000.bin"
    intact = shard.read_bytes()
    for cut in (1, 2):  # not a whole number of uint16 ids; whole ids but fewer than meta.json lists
        shard.write_bytes(intact[:-cut])
        before = digests(run.out)
        assert_user_error(run.pretrain(), f"{shard}: {len(intact) - cut:,} bytes, expected {len(intact):,}",
                          "truncated or corrupt", "delete the directory")
        assert digests(run.out) == before


def test_kept_tokenizer_and_data_of_another_vocab_size_or_corpus(tmp_path, trained):
    run = new_run(tmp_path, like=trained)
    before = digests(run.out)
    delete = f"use another --out, or delete {run.out / 'tokenizer'} and {run.out / 'data'}"
    assert_user_error(run.pretrain("--vocab-size", "400"),
                      f"{run.out / 'tokenizer'} holds a 300-token tokenizer but this run has --vocab-size 400", delete)
    other = tmp_path / "other.jsonl"
    other.write_text(trained.corpus.read_text("utf-8") * 2, "utf-8")
    size = trained.corpus.stat().st_size
    assert_user_error(run.pretrain("--corpus", str(other)), f"{run.out / 'tokenizer'}: the tokenizer was trained on "
                      f"another corpus (file 1 of 1: corpus.jsonl ({size:,} bytes, ends ",
                      f"vs now other.jsonl ({2 * size:,} bytes, ends ", delete,
                      f"pass --tokenizer {run.out / 'tokenizer'} to use it anyway")
    # a tokenizer passed by the user is the user's choice; the token data still remembers its corpus
    assert_user_error(run.pretrain("--corpus", str(other), "--corpus-format", "jsonl", "--tokenizer",
                                   str(run.out / "tokenizer")),
                      f"{run.out / 'data' / 'meta.json'}: the token data was prepared from another corpus (file 1 of "
                      f"1: corpus.jsonl ({size:,} bytes", "format 'auto' vs now 'jsonl')",
                      f"use another --out, or delete {run.out / 'data'} to rebuild")
    assert digests(run.out) == before


def test_damaged_tokenizer_corpus_record(tmp_path, trained):
    run = new_run(tmp_path, like=trained)
    record = run.out / "tokenizer" / "corpus.json"
    record.write_text("{", encoding="utf-8")
    assert_user_error(run.pretrain(), f"{record}: not the JSON this script writes; delete it")


def test_kept_tokenizer_and_data_follow_a_moved_corpus(tmp_path, trained):
    """The corpus is recorded by its files' names, sizes and contents, not their paths: moving it (or the whole
    repository) keeps the tokenizer and token data."""
    moved = tmp_path / "moved" / trained.corpus.name
    moved.parent.mkdir()
    shutil.copy(trained.corpus, moved)
    run = new_run(tmp_path / "run", like=trained)
    kept = digests(run.out)
    proc = Run(run.root, moved).pretrain("--max-steps", "1")
    assert proc.returncode == 0, proc.stderr
    assert "tokenizing" not in proc.stdout and "training a" not in proc.stdout
    assert {k: v for k, v in digests(run.out).items() if not k.startswith("pretrain")} == kept


def test_resume_with_another_config(untouched):
    assert_user_error(untouched.pretrain("--resume", "--seq-len", "15"), "checkpoint is for another model config",
                      f"max_seq_len: checkpoint {SEQ_LEN} vs now 15")


def test_resume_without_checkpoint(tmp_path):
    run = new_run(tmp_path)
    assert_user_error(run.pretrain("--resume"), f"--resume: no checkpoint in {run.out / 'pretrain'}",
                      "run without --resume")
    assert not (tmp_path / "out").exists()  # refused before building the tokenizer and data


def test_existing_checkpoints_without_resume(untouched):
    assert_user_error(untouched.pretrain(), f"{untouched.out / 'pretrain'} already has checkpoints",
                      "pass --resume")


def test_invalid_mixed_precision(untouched):
    assert_user_error(untouched.pretrain("--resume", "--mixed-precision", "bf17"),
                      "--mixed-precision bf17: must be auto, bf16, fp16 or fp32 (none)")


def test_infer_without_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, INFER, "--out", str(tmp_path / "out"), "--prompt", "To be"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert_user_error(proc, f"no checkpoint in {tmp_path / 'out' / 'baby' / 'pretrain'}",
                      f"train first (babyllama pretrain --name baby --out {tmp_path / 'out'})", "--ckpt")


# ======================================================================= kill, then --resume
def test_killed_then_resumed_run_has_the_uninterrupted_losses(tmp_path, trained):
    run = new_run(tmp_path, like=trained)
    first_checkpoint = run.out / "pretrain" / "step_00000003.pt"
    proc = subprocess.Popen(run.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 120
    while not first_checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert not (run.out / "pretrain" / f"step_{STEPS:08d}.pt").exists()
    resumed = run.pretrain("--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert run.losses() == trained.losses()  # each step once (rows past the checkpoint dropped), same values


def test_run_record_names_command_config_versions_and_final_metrics(untouched):
    record = json.loads((untouched.out / "pretrain" / "run.json").read_text())
    assert record["commands"] == [f"python pretrain/pretrain.py {' '.join(untouched.args()[2:])}"]
    assert record["config"]["max_steps"] == STEPS and record["config"]["model"] == "tiny"
    assert record["steps"] == STEPS and record["world_size"] == 1 and record["wall_s"] > 0
    checkpoint = torch.load(untouched.out / "pretrain" / f"step_{STEPS:08d}.pt", weights_only=False)
    assert record["tokenizer"] == checkpoint["extra"]["tokenizer"]
    assert len(record["git"]["commit"]) == 40 and record["software"]["torch"] == torch.__version__
    assert record["machine"]["torch_threads"] == 1 and record["machine"]["OMP_NUM_THREADS"] == "1"
    assert set(record["metrics"]) == {"val_loss"} and 0 < record["metrics"]["val_loss"] < 10


# ======================================================================= divergence, resume with new settings, flags
def test_diverging_run_stops_keeps_the_last_good_checkpoint_and_resumes_with_a_lower_lr(tmp_path, trained):
    run = new_run(tmp_path, like=trained)
    assert run.pretrain("--stop-at", "12").returncode == 0  # a run in parts: the schedule of --max-steps, not 12
    assert run.losses() == trained.losses()[:12]
    assert json.loads((run.out / "pretrain" / "run.json").read_text())["steps"] == 12
    # a rescue gone wrong: weights of ~1e28 after one step make the next loss non-finite on any CPU (with lr 1000
    # how many steps that took depended on the machine's kernels)
    proc = run.pretrain("--resume", "--lr", "1e30")
    assert_stopped(proc, "training diverged and stopped; the last good checkpoint is "
                   f"{run.out / 'pretrain' / 'step_00000012.pt'}: continue from it with --resume and a lower --lr")
    assert "lr 0.001 -> 1e+30" in proc.stdout
    for path in (run.out / "pretrain").glob("step_*.pt"):  # never a NaN checkpoint, so rotation kept the good ones
        weights = torch.load(path, weights_only=False)["model"]
        assert all(torch.isfinite(t).all() for t in weights.values()), path
    resumed = run.pretrain("--resume", "--lr", "1e-3")
    assert resumed.returncode == 0, resumed.stderr
    assert "changed settings" not in resumed.stdout  # the step-12 checkpoint was saved with lr 0.001
    assert run.losses() == trained.losses()  # from the kept step 12 on, exactly the uninterrupted run
    assert len(json.loads((run.out / "pretrain" / "run.json").read_text())["commands"]) == 2  # the stopped one too


def test_resume_applies_every_changed_schedule_setting_and_says_so(tmp_path, trained):
    run = new_run(tmp_path, like=trained)
    shutil.copytree(trained.out / "pretrain", run.out / "pretrain")
    proc = run.pretrain("--resume", "--max-steps", "36", "--lr", "5e-4", "--weight-decay", "0.05", "--warmup-steps",
                        "10", "--min-lr-ratio", "0.5", "--clip-grad-norm", "0.5", "--ckpt-every", "2",
                        "--eval-every", "4")
    assert proc.returncode == 0, proc.stderr
    assert ("with changed settings, applied from here on: lr 0.001 -> 0.0005, min_lr_ratio 0.1 -> 0.5, "
            "warmup_steps 30 -> 10, max_steps 30 -> 36, weight_decay 0.1 -> 0.05, clip_grad_norm 1.0 -> 0.5"
            ) in proc.stdout
    rows = {r["step"]: r for r in map(json.loads, (run.out / "pretrain" / "log.jsonl").read_text().splitlines())}
    progress = (31 - 10) / (36 - 10)  # the new cosine (warmup 10, 36 steps, floor 0.5) at step 31
    assert rows[32]["lr"] == pytest.approx(5e-4 * (0.5 + 0.25 * (1 + math.cos(math.pi * progress))))
    assert "val_loss" in rows[32] and "val_loss" not in rows[31]  # --eval-every 4
    last = torch.load(run.out / "pretrain" / "step_00000036.pt", weights_only=False)
    assert [g["weight_decay"] for g in last["optimizer"]["param_groups"]] == [0.05, 0.0]
    assert (run.out / "pretrain" / "step_00000032.pt").exists()  # --ckpt-every 2


def test_skipped_nonfinite_steps_are_counted_and_logged_as_null(tmp_path, trained):
    run = new_run(tmp_path, like=trained)
    proc = run.pretrain("--lr", "1e30", "--on-nonfinite", "skip")  # non-finite from the second step, on any CPU
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (run.out / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] > 0 and any(r["grad_norm"] is None for r in rows)


def test_loss_spike_stops_the_run(tmp_path, trained):
    run = new_run(tmp_path, like=trained)
    assert_stopped(run.pretrain("--lr", "30", "--loss-spike-factor", "3"), "--loss-spike-factor", "diverged")


@pytest.mark.parametrize("flag,value,message", [
    ("--batch-size", "0", "--batch-size 0: must be at least 1"), ("--lr", "-1", "--lr -1.0: must be a positive"),
    ("--lr", "nan", "--lr nan: must be a positive"), ("--max-steps", "0", "--max-steps 0: must be at least 1"),
    ("--grad-accum", "0", "--grad-accum 0"), ("--eval-every", "0", "--eval-every 0"),
    ("--ckpt-every", "0", "--ckpt-every 0"), ("--log-every", "0", "--log-every 0"), ("--seq-len", "0", "--seq-len 0"),
    ("--keep-checkpoints", "-1", "--keep-checkpoints -1"), ("--on-nonfinite", "maybe", "must be stop or skip"),
    ("--min-lr-ratio", "2", "in [0, 1]"), ("--val-fraction", "1", "between 0 and 1"),
])
def test_flags_out_of_range_are_refused_before_any_work(flag, value, message):
    from babyllama.train.stage import parse_stage_args

    with pytest.raises(UserError, match=re.escape(message)):
        parse_stage_args("", "pretrain", argv=[flag, value, "--out", "/nonexistent/never-created"])


def test_second_run_on_a_stage_is_refused_naming_the_holder_and_a_killed_runs_lock_is_released(tmp_path, trained):
    run = new_run(tmp_path, like=trained)
    lock = run.out / "pretrain" / LOCK_FILE
    first = subprocess.Popen(run.args("--max-steps", "100000"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 120
    holder = f"(PID {first.pid} on "
    while not (lock.exists() and holder in lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert holder in lock.read_text(), "the first run never took the lock"
    try:
        assert_user_error(run.pretrain(), f"is in use by another pretrain run (PID {first.pid} on ",
                          "wait for it to finish, or pass another --out")
        prepare = [sys.executable, "-m", "babyllama", "data", "prepare", "--corpus", str(run.corpus), "--tokenizer",
                   str(run.out / "tokenizer"), "--dest", str(run.out / "data"), "--overwrite"]
        rebuild = subprocess.run(prepare, capture_output=True, text=True, env=ENV, timeout=120)
        assert_user_error(rebuild, f"{run.out / 'data'} is in use by another pretraining run (PID {first.pid} on ")
    finally:
        first.kill()
        first.wait()
    resumed = run.pretrain("--resume")  # the kernel released the killed run's lock
    assert resumed.returncode == 0, resumed.stderr


def test_a_corrupted_checkpoint_is_one_line_naming_the_previous_one(tmp_path, trained):
    kept = sorted((trained.out / "pretrain").glob("step_*.pt"))[-2:]
    for path in kept:
        shutil.copy(path, tmp_path / path.name)
    newest = tmp_path / kept[-1].name
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 2048] = bytes(2048)  # 2 KB inside a tensor's bytes
    newest.write_bytes(data)
    with pytest.raises(UserError, match=f"{newest}: corrupted .* fails its checksum.*previous checkpoint "
                                        f"{tmp_path / kept[0].name}"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / kept[0].name)["step"] > 0


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, trained):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    try:
        run = new_run(mount, like=trained)
        assert_stopped(run.pretrain(), "no space left on the device of", "--resume")
        saved = sorted((run.out / "pretrain").glob("step_*.pt"))
        assert saved and load_checkpoint(saved[-1])["step"] == int(saved[-1].stem.split("_")[1])
        assert not [p for p in (run.out / "pretrain").iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(mount)])


# ======================================================================= --init, --model PATH
def test_init_continues_from_given_weights_with_their_architecture(tmp_path, trained):
    run = new_run(tmp_path, like=trained)
    checkpoints = str(trained.out / "pretrain")
    proc = run.pretrain("--model", checkpoints, "--init", checkpoints, "--max-steps", "2")
    assert proc.returncode == 0, proc.stderr
    fresh_first, trained_last = trained.losses()[0][1], trained.losses()[-1][1]
    assert abs(run.losses()[0][1] - trained_last) < abs(run.losses()[0][1] - fresh_first)


def test_model_flag_reads_hf_and_checkpoint_configs(tmp_path, trained):
    from babyllama.model.config import ModelConfig
    from babyllama.train.run_config import PretrainConfig, model_config_for

    cfg = ModelConfig.from_dict(torch.load(trained.out / "pretrain" / f"step_{STEPS:08d}.pt",
                                           weights_only=False)["model_config"])
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    assert model_config_for(PretrainConfig(model=str(tmp_path)), 300) == cfg
    assert model_config_for(PretrainConfig(model=str(trained.out / "pretrain"), seq_len=8), 300).max_seq_len == 8


def test_model_flag_reads_a_bert4torch_directory_and_refuses_bad_json(tmp_path):
    from babyllama.model.config import preset
    from babyllama.train.run_config import PretrainConfig, model_config_for

    cfg = preset("tiny", vocab_size=300)
    b4t = {"pos_emb_type": "rotary", "layer_norm_mode": "rmsnorm", "layer_norm_eps": cfg.norm_eps,
           **{k: v for k, v in cfg.to_hf().items() if k != "rms_norm_eps"}}
    (tmp_path / "bert4torch_config.json").write_text(json.dumps(b4t))
    assert model_config_for(PretrainConfig(model=str(tmp_path)), 300) == cfg
    bad = tmp_path / "x.json"
    bad.write_text('{"hidden_size": 8,\n oops}')
    with pytest.raises(UserError, match=f"{bad}:2: invalid JSON"):
        model_config_for(PretrainConfig(model=str(bad)), 300)


# ======================================================================= DDP
def run_process_group(cmd: list[str], timeout: float, nodes: int = 1) -> tuple[int, str]:
    """(exit code, stderr) of `cmd` in its own session (`nodes` copies of it at once, `{node}` in it replaced by
    each one's rank); on timeout the whole group is killed, so that a hung rank does not outlive the test (killing
    torchrun alone would orphan it)."""
    procs = [subprocess.Popen([a.replace("{node}", str(n)) for a in cmd], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True) for n in range(nodes)]
    try:
        stderr = "".join(p.communicate(timeout=timeout)[1] for p in procs)
    except subprocess.TimeoutExpired:
        for p in procs:
            # torchrun starts every rank in a session of its own, so the launcher's group does not hold them.
            for process in [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]:
                process.kill()
            p.communicate()
        raise
    return max(p.returncode for p in procs), stderr


@pytest.mark.parametrize("nodes", [1, 2])
def test_two_gloo_processes_train_like_one_with_the_global_batch(tmp_path, trained, nodes):
    """2 processes on one node, or 2 nodes of one process (torchrun --nnodes 2, rendezvous on 127.0.0.1): the
    same run as one process with the whole batch, by the weights and by `babyllama.eval.compare` of the logs."""
    windows = (json.loads((trained.out / "data" / "meta.json").read_text())["splits"]["train"]["tokens"]
               // (SEQ_LEN + 1))
    # The run crosses an epoch end where 2 ranks padded to 2 x ceil(windows / 2) samples would get one more
    # (padded) global batch than one process.
    assert windows % BATCH == 3 and windows // BATCH < STEPS
    run = new_run(tmp_path, like=trained)
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--node-rank={node}",
                f"--nproc-per-node={2 // nodes}", "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    # the card's script on one node, the `babyllama` command (torchrun -m) on two: the same job either way
    program = [PRETRAIN] if nodes == 1 else ["-m", "babyllama", "pretrain"]
    returncode, stderr = run_process_group(launcher + program + run.args("--batch-size", str(BATCH // 2))[2:],
                                           timeout=300, nodes=nodes)
    assert returncode == 0, stderr[-3000:]
    record = json.loads((run.out / "pretrain" / "run.json").read_text())
    assert record["world_size"] == 2 and f"--nnodes={nodes}" in record["commands"][0]
    assert (" -m babyllama pretrain --out " if nodes == 2 else " pretrain/pretrain.py --out ") in record["commands"][0]
    [result], _ = compare.compare_runs(run.out, trained.out, compare.load_tolerance(PUBLISHED / "baby" /
                                                                                   compare.TOLERANCE))
    assert result.judgement.verdict == "reproduced" and result.diff.largest()[0] < 1e-4
    assert any("processes 1 -> 2 (global batch 4 -> 4)" in note for note in result.notes)
    name = f"step_{STEPS:08d}.pt"
    ddp = torch.load(run.out / "pretrain" / name, weights_only=False)
    single = torch.load(trained.out / "pretrain" / name, weights_only=False)
    assert ddp["consumed"] == single["consumed"] // 2 and ddp["epoch"] == single["epoch"] == 1
    for key, value in single["model"].items():
        assert torch.allclose(ddp["model"][key], value, atol=1e-5), key


def test_bad_corpus_under_torchrun_stops_every_rank(tmp_path):
    run = Run(tmp_path)  # no corpus file: rank 0 fails while building the tokenizer, rank 1 must not wait forever
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    returncode, stderr = run_process_group(launcher + run.args()[1:], timeout=200)
    assert returncode != 0
    assert stderr.count(f"error: {run.corpus}: no such file or directory") == 2  # one line from each rank


# ======================================================================= inference
def infer(run: Run, *extra: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, INFER, "--out", str(run.root / "out"), "--device", "cpu", "--max-new-tokens", "12", *extra]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=ENV, timeout=120)


def test_infer_prompt_prints_a_continuation(untouched):
    proc = infer(untouched, "--prompt", "To be")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("To be") and len(proc.stdout.rstrip("\n")) > len("To be")


def test_infer_refuses_a_tokenizer_larger_than_the_model(untouched, big_tokenizer):
    assert_user_error(infer(untouched, "--tokenizer", str(big_tokenizer), "--prompt", "To be"),
                      f"tokenizer {big_tokenizer} has 70,000 tokens but the checkpoint "
                      f"{untouched.out / 'pretrain' / f'step_{STEPS:08d}.pt'} has vocab_size 300", "--tokenizer")


def test_infer_refuses_another_tokenizer_of_the_same_size(untouched, other_tokenizer):
    checkpoint = untouched.out / "pretrain" / f"step_{STEPS:08d}.pt"
    assert_user_error(infer(untouched, "--tokenizer", str(other_tokenizer), "--prompt", "To be"),
                      f"tokenizer {other_tokenizer / 'tokenizer.model'} is not the one checkpoint {checkpoint} was "
                      "trained with", "was it retrained?", "--tokenizer")


def test_init_refuses_weights_trained_with_another_tokenizer(tmp_path, trained, other_tokenizer):
    proc = new_run(tmp_path).pretrain("--tokenizer", str(other_tokenizer), "--init", str(trained.out / "pretrain"))
    assert_user_error(proc, "is not the one checkpoint", f"{trained.out / 'pretrain'}", "was trained with")
    assert not list((tmp_path / "out" / "baby").glob("pretrain/*.pt"))


def test_infer_reads_prompts_from_stdin(untouched):
    proc = infer(untouched, stdin="床前明月光，\n\nTo be\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("床前明月光，") and "\nTo be" in proc.stdout and ">>>" not in proc.stdout


def test_infer_reads_bytes_that_are_not_utf8_and_continues_a_too_long_prompt_from_its_end(untouched):
    long = "To be, or not to be, that is the question. " * 10
    cmd = [sys.executable, INFER, "--out", str(untouched.root / "out"), "--device", "cpu", "--max-new-tokens", "12"]
    proc = subprocess.run(cmd, input=b"\xff\xfeTo be\n" + long.encode() + b"\n", capture_output=True, timeout=120,
                          env={**ENV, "PYTHONIOENCODING": "utf-8:strict"})  # a strict locale raised on such bytes
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().startswith("\ufffd\ufffdTo be")
    notes = proc.stderr.decode().splitlines()
    assert notes[0] == "note: the input is not valid UTF-8; undecodable bytes were replaced by U+FFFD"
    assert re.fullmatch(r"note: the prompt has \d+ tokens; continuing from its last 18 \(the model's context is "
                        rf"{SEQ_LEN}, --max-new-tokens 12\)", notes[1]) and len(notes) == 2
    assert_user_error(infer(untouched, "--max-new-tokens", "100000000", "--prompt", "To be"),
                      f"--max-new-tokens 100000000: must be between 1 and the model's context, {SEQ_LEN}")
