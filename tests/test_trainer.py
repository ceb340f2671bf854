"""Trainer: learning, exact resume, grad accumulation equivalence, callbacks, 2-process gloo DDP."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_config
from torch.utils.data import DataLoader, TensorDataset

from babyllama.data.sampler import ResumableSampler
from babyllama.errors import UserError
from babyllama.model.config import ModelConfig
from babyllama.model.llama import Llama
from babyllama.train import callbacks as cb
from babyllama.train.optim import build_adamw, warmup_cosine
from babyllama.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CFG = tiny_config(64, max_seq_len=16)


def pattern_data(n: int, seed: int = 0) -> TensorDataset:
    """Sequences x_t = (a + b t) mod 64: learnable, so the loss must fall."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, 64, (n, 1), generator=g), torch.randint(1, 8, (n, 1), generator=g)
    seq = (a + b * torch.arange(17)) % 64
    return TensorDataset(seq[:, :-1], seq[:, 1:])


def make_trainer(batch: int = 8, accum: int = 1, steps: int = 40, seed: int = 0, torch_compile: bool = False,
                 precision: str | None = None):
    torch.manual_seed(seed)
    trainer = Trainer(Llama(CFG))
    opt = build_adamw(trainer.network, lr=3e-3)
    trainer.compile(optimizer=opt, scheduler=warmup_cosine(opt, 5, steps), grad_accumulation_steps=accum,
                    torch_compile=torch_compile, mixed_precision=precision)
    data = pattern_data(256)
    loader = DataLoader(data, batch_size=batch, sampler=ResumableSampler(len(data), seed=1))
    return trainer, loader


class Recorder(cb.Callback):
    def __init__(self):
        self.losses = []

    def on_step_end(self, trainer, logs):
        self.losses.append(round(logs["loss"], 6))


def test_training_lowers_validation_loss():
    trainer, loader = make_trainer(steps=120)
    val = DataLoader(pattern_data(64, seed=9), batch_size=32)
    before = trainer.evaluate(val)
    trainer.fit(loader, epochs=20, max_steps=120)
    assert trainer.evaluate(val) < before - 1.0


def test_compiled_training_follows_the_eager_loss_curve():
    """torch.compile of the model (the GPU default; here fp32 on CPU) trains like eager: the same losses step by
    step with grad accumulation, and the same weights after 30 steps."""
    curves, weights = [], []
    for compiled in (False, True):
        trainer, loader = make_trainer(accum=2, steps=30, torch_compile=compiled)
        rec = Recorder()
        trainer.fit(loader, epochs=5, max_steps=30, callbacks=[rec])
        curves.append(rec.losses)
        weights.append(torch.cat([p.detach().flatten() for p in trainer.network.parameters()]))
    assert len(curves[1]) == 30 and max(abs(a - b) for a, b in zip(*curves)) < 1e-4
    assert curves[1][-1] < curves[1][0] - 0.5  # it learned
    assert (weights[0] - weights[1]).abs().max() < 1e-3


def test_resume_continues_exactly(tmp_path):
    ref, loader = make_trainer(steps=30)
    rec = Recorder()
    ref.fit(loader, epochs=5, max_steps=30, callbacks=[rec])  # 32 batches/epoch: crosses no epoch, then resumes
    first, loader1 = make_trainer(steps=30)
    first.fit(loader1, epochs=5, max_steps=12, callbacks=[cb.Checkpoint(tmp_path, every=100)])
    resumed, loader2 = make_trainer(steps=30, seed=123)  # different init: everything must come from the file
    resumed.resume(str(tmp_path))
    rec2 = Recorder()
    resumed.fit(loader2, epochs=5, max_steps=30, callbacks=[rec2])
    assert rec2.losses == rec.losses[12:]


def test_compiled_bf16_training_is_deterministic_and_resumes_exactly(tmp_path):
    """What --mixed-precision auto / --torch-compile auto pick on a CPU with native bf16: the same losses, bit for
    bit, run after run on one machine (published logs are compared against such runs), and after a resume."""
    curves = []
    for _ in range(2):
        trainer, loader = make_trainer(accum=2, steps=20, torch_compile=True, precision="bf16")
        rec = Recorder()
        trainer.fit(loader, epochs=5, max_steps=20, callbacks=[rec, cb.Checkpoint(tmp_path / str(len(curves)),
                                                                                    every=8, keep=0)])
        curves.append(rec.losses)
    assert curves[0] == curves[1] and curves[0][-1] < curves[0][0] - 0.5
    resumed, loader = make_trainer(accum=2, steps=20, seed=123, torch_compile=True, precision="bf16")
    resumed.resume(str(tmp_path / "0" / "step_00000008.pt"))
    rec = Recorder()
    resumed.fit(loader, epochs=5, max_steps=20, callbacks=[rec])
    assert rec.losses == curves[0][8:]


def test_resume_across_epoch_boundary(tmp_path):
    ref, loader = make_trainer(batch=32, steps=20)  # 8 batches per epoch
    rec = Recorder()
    ref.fit(loader, epochs=5, max_steps=20, callbacks=[rec])
    first, loader1 = make_trainer(batch=32, steps=20)
    first.fit(loader1, epochs=5, max_steps=11, callbacks=[cb.Checkpoint(tmp_path, every=100)])
    resumed, loader2 = make_trainer(batch=32, steps=20)
    resumed.resume(str(tmp_path))
    rec2 = Recorder()
    resumed.fit(loader2, epochs=5, max_steps=20, callbacks=[rec2])
    assert rec2.losses == rec.losses[11:]


def test_grad_accumulation_matches_big_batch():
    big, loader_big = make_trainer(batch=16, accum=1)
    small, loader_small = make_trainer(batch=8, accum=2)
    big.fit(loader_big, max_steps=3)
    small.fit(loader_small, max_steps=3)
    for (n, p), q in zip(big.network.named_parameters(), small.network.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_checkpoint_keeps_newest_and_refuses_other_config(tmp_path):
    trainer, loader = make_trainer()
    trainer.fit(loader, max_steps=6, callbacks=[cb.Checkpoint(tmp_path, every=2, keep=2)])
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000004.pt", "step_00000006.pt"]
    assert not list(tmp_path.glob("*.tmp"))
    other = Trainer(Llama(ModelConfig(**{**CFG.to_dict(), "n_layers": 3})))
    other.compile(optimizer=build_adamw(other.network, 1e-3))
    with pytest.raises(UserError, match="n_layers: checkpoint 2 vs now 3"):
        other.resume(str(tmp_path))


def test_loggers_write_text_and_tensorboard(tmp_path):
    trainer, loader = make_trainer()
    val = DataLoader(pattern_data(32, seed=9), batch_size=16)
    trainer.fit(loader, max_steps=4, callbacks=[cb.Evaluator(val, every=2), cb.TextLogger(tmp_path / "log.jsonl"),
                                                 cb.TensorBoard(tmp_path / "tb")])
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0]) and "val_loss" in rows[1]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


class FakeClock:
    """`time` for the trainer module: moves only when the test says (a loss call, a slow callback)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_throughput_covers_the_logging_window_without_callbacks(monkeypatch):
    clock, peak, flops_per_token = FakeClock(), 1e6, 5000.0
    monkeypatch.setattr("babyllama.train.trainer.time", clock)
    monkeypatch.setattr("babyllama.train.trainer.peak_flops", lambda device: peak)

    def slow_loss(model, batch):  # step n takes n seconds
        clock.now += trainer.step + 1
        return model(batch[0], batch[1]).loss

    class Slow(cb.Callback):  # a checkpoint or evaluation: 100 s that are not training
        def on_step_end(self, trainer, logs):
            clock.now += 100.0

    class Logged(cb.Callback):
        def __init__(self):
            self.rows = []

        def on_step_end(self, trainer, logs):
            if "loss" in logs:
                self.rows.append(logs)

    torch.manual_seed(0)
    trainer = Trainer(Llama(CFG))
    trainer.compile(loss=slow_loss, optimizer=build_adamw(trainer.network, lr=3e-3), log_every=3,
                    flops_per_token=flops_per_token)
    logged = Logged()
    trainer.fit(DataLoader(pattern_data(64), batch_size=8), max_steps=6, callbacks=[Slow(), logged])
    tokens = 3 * 8 * 16  # a window: three steps of 8 sequences of 16 tokens
    assert [row["tokens_per_s"] for row in logged.rows] == [tokens / (1 + 2 + 3), tokens / (4 + 5 + 6)]
    for row in logged.rows:
        assert row["mfu"] == pytest.approx(flops_per_token * row["tokens_per_s"] / peak, rel=1e-12)


def run_worker(prefix: Path, *args: str, procs: int = 1, port: int = 29517) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    worker = str(ROOT / "tests" / "ddp_worker.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={port}"]
    subprocess.run((launcher if procs > 1 else [sys.executable]) + [worker, str(prefix), *args], check=True, env=env,
                   timeout=300)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Weights after 5 steps of one process with the global batch of 16, which every 2-process mode must match."""
    prefix = tmp_path_factory.mktemp("single") / "single"
    run_worker(prefix)
    return torch.load(f"{prefix}_rank0.pt")


@pytest.mark.parametrize("mode,port", [("ddp", 29517), ("ddp-accum", 29519)])
def test_two_process_gloo_matches_single_process(tmp_path, single, mode, port):
    run_worker(tmp_path / "ddp", mode, procs=2, port=port)
    r0, r1 = torch.load(tmp_path / "ddp_rank0.pt"), torch.load(tmp_path / "ddp_rank1.pt")
    for k in single:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.allclose(r0[k], single[k], atol=1e-5), k
    if mode == "ddp-accum":  # no_sync skipped the first micro-batch's all-reduce: one per step (one bucket)
        assert json.loads((tmp_path / "ddp_syncs.json").read_text()) == [0, 1, 2, 3, 4]


def test_fsdp_two_process_with_resume_matches_single_process(tmp_path, single):
    run_worker(tmp_path / "fsdp", "fsdp", procs=2, port=29518)
    sharded = torch.load(tmp_path / "fsdp_rank0.pt")
    assert sharded.keys() == single.keys()
    for k in single:
        assert torch.allclose(sharded[k], single[k], atol=1e-5), k
    checkpoint = torch.load(next((tmp_path / "fsdp_ckpt").glob("step_*.pt")), weights_only=False)
    assert checkpoint["step"] == 3 and checkpoint["model"].keys() == single.keys()


def test_a_run_under_aten_cpu_capability_compiles_into_its_own_inductor_cache(tmp_path):
    """torch 2.13's inductor cache does not key on ATEN_CPU_CAPABILITY: graphs compiled for AVX2 (8-float loops),
    reused by a default AVX-512 run (16-float vectors), wrote past their buffers and aborted it. A run with the
    variable set compiles into a cache of its own."""
    script = ("import torch; from babyllama.hardware import separate_inductor_cache; separate_inductor_cache(); "
              "print(torch.compile(lambda x: (x * x).sum(-1))(torch.ones(64, 32)).sum().item())")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**env, "TMPDIR": str(tmp_path), "ATEN_CPU_CAPABILITY": "avx2"})
    assert proc.returncode == 0 and proc.stdout.strip() == "2048.0", proc.stderr[-2000:]
    graphs = [d.parent.name for d in tmp_path.glob("torchinductor_*/fxgraph")]  # (headers may stay shared)
    assert len(graphs) == 1 and graphs[0].endswith("-avx2")
