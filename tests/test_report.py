"""Report: plots and tables from a tiny real run's TensorBoard events and log.jsonl."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from babyllama import callbacks as cb
from babyllama.config import ModelConfig
from babyllama.errors import UserError
from babyllama.evaluate import write_results
from babyllama.model import Llama
from babyllama.trainer import Trainer

_SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "make_report.py"
_spec = importlib.util.spec_from_file_location("make_report", _SCRIPT)
make_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_run(out: Path, runs: Path, stage: str, steps: int) -> None:
    """`steps` optimizer steps of a tiny model with the stages' loggers and a validation every 3 steps."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=16))
    batches = [tuple(torch.randint(0, 50, (2, 2, 8)).unbind(0)) for _ in range(steps)]
    trainer = Trainer(model)
    trainer.compile(optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    loggers = [cb.Evaluator(batches[:2], every=3), cb.TextLogger(out / stage / "log.jsonl"), cb.TensorBoard(runs / stage)]
    trainer.fit(batches, max_steps=steps, callbacks=loggers)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    out, runs = root / "out" / "demo", root / "runs" / "demo"
    tiny_run(out, runs, "pretrain", 6)
    tiny_run(out, runs, "sft", 4)
    write_results({"stage": "pretrain", "checkpoint": "x", "step": 6, "params": 1000,
                   "metrics": {"bpb": 2.5, "idiom_acc": 0.25}}, out / "eval")
    write_results({"stage": "sft", "checkpoint": "y", "step": 4, "params": 1000,
                   "metrics": {"bpb": 2.25, "chat_choice_acc": 0.5}}, out / "eval")
    return root


def test_report_writes_plots_and_tables(run, tmp_path):
    dest = tmp_path / "report"
    make_report.main(["--name", "demo", "--root", str(run / "out"), "--runs", str(run / "runs"), "--dest", str(dest)])
    for stage in ("pretrain", "sft"):
        assert (dest / f"{stage}.png").read_bytes()[:8] == PNG_MAGIC
    readme = (dest / "README.md").read_text()
    assert readme.index("| pretrain | 6 |") < readme.index("| sft | 4 |")  # stages in pipeline order
    assert "![pretrain](pretrain.png)" in readme
    assert "| bpb | 2.5000 | 2.2500 |" in readme and "| idiom_acc | 0.2500 | — |" in readme
    assert "| chat_choice_acc | — | 0.5000 |" in readme


def test_tensorboard_and_log_jsonl_give_the_same_series(run):
    tb = make_report.read_tensorboard(run / "runs" / "demo" / "pretrain")
    log = make_report.read_log_jsonl(run / "out" / "demo" / "pretrain" / "log.jsonl")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss"} <= set(tb) & set(log)
    assert tb["loss"][0] == log["loss"][0] == list(range(1, 7)) and tb["val_loss"][0] == [3, 6]
    assert tb["loss"][1] == pytest.approx(log["loss"][1], rel=1e-6)


def test_log_jsonl_fallback_keeps_the_last_value_of_a_redone_step(tmp_path):
    log = tmp_path / "out" / "demo" / "sft" / "log.jsonl"
    log.parent.mkdir(parents=True)
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    series = make_report.stage_series(tmp_path / "runs" / "demo", tmp_path / "out" / "demo", "sft")
    assert series["loss"] == ([1, 2, 3], [3.0, 1.5, 1.0])
    dest = make_report.make_report("demo", tmp_path / "out", tmp_path / "runs", tmp_path / "report")
    assert "No evaluation results" in dest.read_text() and (tmp_path / "report" / "sft.png").is_file()


def test_missing_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no training logs for run 'nope'"):
        make_report.make_report("nope", tmp_path / "out", tmp_path / "runs", tmp_path / "report")
