"""Report: plots and tables from a tiny real run's TensorBoard events and log.jsonl; --evaluate evaluates every
trained stage first."""
import itertools
import json
import struct
from pathlib import Path

import pytest
import torch
from tiny import tiny_config

from babyllama.align.reward_model import RewardModel, mark_reward_checkpoint
from babyllama.commands import report
from babyllama.data.corpus import iter_records
from babyllama.data.tokenizer import train_tokenizer
from babyllama.errors import UserError
from babyllama.eval.evaluate import HELDOUT, write_results
from babyllama.model.llama import Llama
from babyllama.train import callbacks as cb
from babyllama.train.checkpoint import atomic_save
from babyllama.train.trainer import Trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_run(out: Path, runs: Path, stage: str, steps: int) -> None:
    """`steps` optimizer steps of a tiny model with the stages' loggers and a validation every 3 steps."""
    torch.manual_seed(0)
    model = Llama(tiny_config(50, dim=16, n_layers=1, n_heads=2, n_kv_heads=None, ffn_dim=32, max_seq_len=16))
    batches = [tuple(torch.randint(0, 50, (2, 2, 8)).unbind(0)) for _ in range(steps)]
    trainer = Trainer(model)
    trainer.compile(optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    loggers = [cb.Evaluator(batches[:2], every=3), cb.TextLogger(out / stage / "log.jsonl"),
               cb.TensorBoard(runs / stage)]
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
    report.main(["--name", "demo", "--out", str(run / "out"), "--runs", str(run / "runs"), "--dest", str(dest)])
    for stage in ("pretrain", "sft"):
        assert (dest / f"{stage}.png").read_bytes()[:8] == PNG_MAGIC
    readme = (dest / "README.md").read_text()
    assert readme.index("| pretrain | 6 |") < readme.index("| sft | 4 |")  # stages in pipeline order
    assert "--evaluate" not in readme
    assert "![pretrain](pretrain.png)" in readme
    assert "| bpb | 2.5000 | 2.2500 |" in readme and "| idiom_acc | 0.2500 | — |" in readme
    assert "| chat_choice_acc | — | 0.5000 |" in readme


def test_tensorboard_and_log_jsonl_give_the_same_series(run):
    tb = report.read_tensorboard(run / "runs" / "demo" / "pretrain")
    log = cb.read_text_log(run / "out" / "demo" / "pretrain" / "log.jsonl")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss"} <= set(tb) & set(log)
    assert tb["loss"][0] == log["loss"][0] == list(range(1, 7)) and tb["val_loss"][0] == [3, 6]
    assert tb["loss"][1] == pytest.approx(log["loss"][1], rel=1e-6)


def test_log_jsonl_fallback_keeps_the_last_value_of_a_redone_step(tmp_path):
    log = tmp_path / "out" / "demo" / "sft" / "log.jsonl"
    log.parent.mkdir(parents=True)
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    series = report.stage_series(tmp_path / "runs" / "demo", tmp_path / "out" / "demo", "sft")
    assert series["loss"] == ([1, 2, 3], [3.0, 1.5, 1.0])
    dest = report.make_report("demo", tmp_path / "out", tmp_path / "runs", tmp_path / "report")
    assert "No evaluation results" in dest.read_text() and (tmp_path / "report" / "sft.png").is_file()


def test_missing_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no training logs for run 'nope'"):
        report.make_report("nope", tmp_path / "out", tmp_path / "runs", tmp_path / "report")


# what each stage's log.jsonl holds besides the loss (one step): the metrics the stage scripts log
STAGE_LOGS = {"pretrain": {}, "reward": {"accuracy": 0.5, "margin": 0.1, "val_accuracy": 0.625, "val_margin": 0.2},
              "dpo": {"reward_accuracy": 0.5, "reward_margin": 0.01, "val_reward_accuracy": 0.75},
              "ppo": {"score": -0.5, "kl": 0.02, "eval_score": -0.25, "eval_kl": 0.03}}


def png_height(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[20:24])[0]  # IHDR: width, then height, big-endian


def test_evaluate_flag_evaluates_every_trained_stage_then_draws(tmp_path):
    out = tmp_path / "out" / "demo"
    texts = [r["text"] for path in HELDOUT.values() for r in itertools.islice(iter_records(path), 60)]
    with pytest.warns(UserWarning):  # few characters per vocabulary entry: expected for a test tokenizer
        tok = train_tokenizer(texts, 300, out / "tokenizer")
    torch.manual_seed(0)
    lm = Llama(tiny_config(tok.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=None, ffn_dim=32, max_seq_len=32))
    kind: dict = {}
    mark_reward_checkpoint(kind)
    weights = {"pretrain": lm.state_dict(), "reward": RewardModel.from_lm(lm).state_dict(), "dpo": lm.state_dict(),
               "ppo": {f"policy.{k}": v for k, v in lm.state_dict().items()}}  # PPO keeps the policy under policy.
    for step, (stage, extra) in enumerate(STAGE_LOGS.items(), 1):
        atomic_save({"model": weights[stage], "model_config": lm.config.to_dict(),
                     "extra": kind if stage == "reward" else {}}, out / stage / f"step_{step:08d}.pt")
        (out / stage / "log.jsonl").write_text(json.dumps({"step": step, "loss": 1.0, **extra}) + "\n")
    dest = tmp_path / "report"
    report.main(["--name", "demo", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"),
                 "--dest", str(dest), "--evaluate", "--max-docs", "2", "--max-items", "4", "--device", "cpu"])
    assert sorted(p.stem for p in (out / "eval").glob("*.json")) == sorted(STAGE_LOGS)
    readme = (dest / "README.md").read_text()
    assert "--evaluate`" in readme
    assert "| metric | pretrain (step 1) | reward (step 2) | dpo (step 3) | ppo (step 4) |" in readme
    reward_acc = next(line for line in readme.splitlines() if line.startswith("| reward_acc |"))
    assert reward_acc.count("—") == 3 and "| reward_margin |" in readme and "| chat_choice_acc |" in readme
    assert "| reward | 2 | 1 | — | — | accuracy 0.5, val_accuracy 0.625, margin 0.1, val_margin 0.2 |" in readme
    assert "eval_score -0.25, kl 0.02, eval_kl 0.03 |" in readme and "val_reward_accuracy 0.75" in readme
    heights = {stage: png_height(dest / f"{stage}.png") for stage in STAGE_LOGS}
    assert heights["reward"] == heights["dpo"] == heights["ppo"] > heights["pretrain"]  # a third row of panels
    with pytest.raises(UserError, match="no stage checkpoints"):
        report.main(["--name", "nope", "--out", str(tmp_path / "out"), "--evaluate"])
