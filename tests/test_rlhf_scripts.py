"""reward/reward.py, rlhf/dpo.py, rlhf/ppo.py and rlhf/infer.py end to end, as subprocesses on the tiny preset: each
trains a few steps, logs its metrics, resumes, and leaves a checkpoint the next tool reads. The pretrain/SFT chain
they start from (a tokenizer, an untrained SFT checkpoint and a reward model on it) is built once per module."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pref_fixtures import make_tokenizer, pair_records, write_jsonl
from tiny import tiny_config

from babyllama.align.ppo import PPOConfig
from babyllama.align.reward_model import RewardModel, is_reward_checkpoint, load_reward_model, mark_reward_checkpoint
from babyllama.commands import ppo as ppo_command
from babyllama.data.chat_template import render_prompt, stop_ids
from babyllama.errors import UserError
from babyllama.model.config import preset
from babyllama.model.generate import Generator, SamplingConfig
from babyllama.model.llama import Llama
from babyllama.train.checkpoint import latest_checkpoint, load_model
from babyllama.train.distributed import DistEnv
from babyllama.train.run_config import stage_config
from babyllama.train.stage import parse_stage_args
from babyllama.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: threads only contend


def save_stage(model: torch.nn.Module, directory: Path, reward: bool = False) -> Path:
    trainer = Trainer(model, DistEnv())
    trainer.compile(optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    if reward:
        mark_reward_checkpoint(trainer.extra_state)
    trainer.save_checkpoint(str(directory))
    return directory


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """What pretraining and SFT leave (a tokenizer, an SFT checkpoint of the tiny preset), a reward model on that
    checkpoint, preference pairs and held-out prompts."""
    root = tmp_path_factory.mktemp("chain")
    tok = make_tokenizer(root / "tok")
    torch.manual_seed(0)
    sft = Llama(preset("tiny", vocab_size=tok.vocab_size))
    heldout = [{"messages": [{"role": "user", "content": "how are you 101?"},
                             {"role": "assistant", "content": "dropped"}]},
               {"messages": [{"role": "user", "content": "how are you 102?"}]}]
    return SimpleNamespace(
        tok=tok, tok_dir=root / "tok", sft=save_stage(sft, root / "sft"),
        reward=save_stage(RewardModel.from_lm(sft), root / "reward", reward=True),
        train=write_jsonl(root / "train.jsonl", pair_records(24, 0)),
        valid=write_jsonl(root / "valid.jsonl", pair_records(8, 1)),
        heldout=write_jsonl(root / "heldout.jsonl", heldout))


def stage_command(script: str, chain, out: Path, *extra: str) -> list[str]:
    batches = [] if script.endswith("ppo.py") else ["--eval-batches", "2"]  # PPO evaluates on held-out prompts
    return [sys.executable, str(ROOT / script), "--name", "baby", "--model", "tiny", "--out", str(out / "out"),
            "--runs", str(out / "runs"), "--tokenizer", str(chain.tok_dir), "--device", "cpu", "--init",
            str(chain.sft), "--batch-size", "4", "--eval-every", "2", *batches, "--ckpt-every", "2",
            "--warmup-steps", "1", *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def log_rows(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- reward
def test_reward_script_trains_logs_resumes_and_writes_a_reward_checkpoint(chain, tmp_path):
    cmd = stage_command("reward/reward.py", chain, tmp_path, "--train-data", chain.train, "--valid-data", chain.valid)
    first = run(cmd + ["--max-steps", "4"])
    assert "held-out preference pairs (8): before training accuracy" in first.stdout
    run(cmd + ["--max-steps", "6", "--resume"])
    stage = tmp_path / "out" / "baby" / "reward"
    rows = log_rows(stage)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "accuracy", "margin", "lr", "grad_norm"} <= set(rows[-1])
    assert {"val_loss", "val_accuracy", "val_margin"} <= set(rows[1]) and "val_accuracy" in rows[5]
    state = torch.load(latest_checkpoint(stage), weights_only=False)
    assert state["step"] == 6 and is_reward_checkpoint(state)  # still a reward checkpoint after --resume
    ids = torch.tensor([[1, 7, 9, 11]])
    assert load_reward_model(stage)(ids).shape == (1,)


# ---------------------------------------------------------------- DPO and the chat tool
@pytest.fixture(scope="module")
def dpo_run(chain, tmp_path_factory):
    """rlhf/dpo.py --precompute-ref for 4 steps, then --resume to 6; (output dir, stdout of both runs)."""
    out = tmp_path_factory.mktemp("dpo")
    cmd = stage_command("rlhf/dpo.py", chain, out, "--train-data", chain.train, "--valid-data", chain.valid,
                        "--precompute-ref", "--reward-model", str(chain.reward), "--eval-prompts", chain.heldout,
                        "--choice-data", "none", "--max-new-tokens", "6", "--max-prompt-len", "40",
                        "--lr", "5e-3")  # far enough from the reference for a clearly positive KL
    first = run(cmd + ["--max-steps", "4"])
    again = run(cmd + ["--max-steps", "6", "--resume"])
    return out, first.stdout + again.stdout


def test_dpo_script_precomputes_the_reference_resumes_and_reports_sampled_kl(dpo_run):
    out, stdout = dpo_run
    stage = out / "out" / "baby" / "dpo"
    rows = log_rows(stage)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin"} <= set(rows[-1])
    assert "val_reward_accuracy" in rows[1] and "val_reward_margin" in rows[5]
    assert torch.load(latest_checkpoint(stage), weights_only=False)["step"] == 6
    assert stdout.count("reference precomputed") == 2
    reports = [line for line in stdout.splitlines() if line.startswith(("SFT model: ", "DPO policy: "))]
    assert len(reports) == 4
    for line in reports:  # the PPO stage's numbers: sampled replies' score and KL per reply, greedy score
        assert "score " in line and "reply tokens " in line and "greedy score " in line
        kl = float(line.split("KL to SFT (nats/reply) ")[1].split(",")[0])
        assert kl >= 0 and (kl == 0) == line.startswith("SFT model: ")


def test_infer_answers_with_the_dpo_checkpoint(chain, dpo_run):
    out, _ = dpo_run
    question = "how are you 7?"
    proc = run([sys.executable, str(ROOT / "rlhf" / "infer.py"), "--out", str(out / "out"), "--tokenizer",
                str(chain.tok_dir), "--prompt", question, "--temperature", "0", "--repetition-penalty", "1.0",
                "--max-new-tokens", "6", "--device", "cpu"])  # default stages: ppo (none here), then dpo
    model = load_model(out / "out" / "baby" / "dpo")
    want = Generator(model).generate([render_prompt([{"role": "user", "content": question}], chain.tok)],
                                     SamplingConfig(max_new_tokens=6, temperature=0), stop_ids(chain.tok))[0]
    assert proc.stdout.strip() == chain.tok.decode(want).strip()


# ---------------------------------------------------------------- PPO
def test_ppo_script_trains_logs_resumes_and_writes_a_chat_checkpoint(chain, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pair_records(20, 3)])
    cmd = stage_command("rlhf/ppo.py", chain, tmp_path, "--reward", str(chain.reward), "--prompts", prompts,
                        "--eval-prompts", chain.heldout, "--choice-data", "none", "--rollout-size", "4",
                        "--max-new-tokens", "8", "--max-prompt-len", "40")
    first = run(cmd + ["--max-steps", "4"])
    assert "2 held-out" in first.stdout and "PPO policy: score" in first.stdout and "greedy score" in first.stdout
    run(cmd + ["--max-steps", "6", "--resume"])
    ckpt = latest_checkpoint(tmp_path / "out" / "baby" / "ppo")
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 6 and state["extra"]["prompt_cursor"] == 4 * 3  # rollouts at steps 1, 3, 5
    rows = log_rows(ckpt.parent)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and "eval_score" in rows[1] and "eval_kl" in rows[1]
    assert {"score", "kl", "kl_coef", "pg_loss", "vf_loss", "entropy", "clipfrac", "approx_kl"} <= set(rows[-1])
    assert load_model(ckpt).config.max_seq_len == 64
    with pytest.raises(UserError, match="was trained without --separate-value"):
        ppo_command.check_value_layout(PPOConfig(separate_value=True), True, ckpt.parent)


def test_ppo_with_lora_trains_adapters_and_the_value_head_and_resumes(chain, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pair_records(20, 3)])
    cmd = stage_command("rlhf/ppo.py", chain, tmp_path, "--reward", str(chain.reward), "--prompts", prompts,
                        "--eval-prompts", chain.heldout, "--choice-data", "none", "--rollout-size", "4",
                        "--max-new-tokens", "8", "--max-prompt-len", "40", "--lora-rank", "4", "--lr", "1e-2")
    run(cmd + ["--max-steps", "4"])
    run(cmd + ["--max-steps", "6", "--resume"])
    ckpt = latest_checkpoint(tmp_path / "out" / "baby" / "ppo")
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 6 and state["extra"]["lora"]["rank"] == 4
    assert {k.split(".")[0] for k in state["model"] if ".lora_" not in k} == {"value"}  # adapters + the value head
    assert (ckpt.parent / state["extra"]["lora"]["base"]).resolve() == latest_checkpoint(chain.sft).resolve()
    merged, sft = load_model(ckpt), load_model(chain.sft)  # what chat loads: the adapters merged, no value head
    assert merged.state_dict().keys() == sft.state_dict().keys()
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, sft.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(merged.model.embed_tokens.weight, sft.model.embed_tokens.weight)  # frozen


def test_ppo_script_refuses_replies_longer_than_the_model():
    cfg = tiny_config(300, n_layers=1, n_kv_heads=None)
    reward = RewardModel(cfg)
    ppo_command.check_sizes(PPOConfig(max_prompt_len=40, max_new_tokens=24), cfg, reward)
    with pytest.raises(UserError, match="exceeds the model's max_seq_len 64"):
        ppo_command.check_sizes(PPOConfig(max_prompt_len=60, max_new_tokens=8), cfg, reward)
    with pytest.raises(UserError, match="vocab_size 300 differs"):
        ppo_command.check_sizes(PPOConfig(max_prompt_len=40, max_new_tokens=24), replace(cfg, vocab_size=400),
                                reward)


@pytest.mark.parametrize("stage,argv,message", [
    ("dpo", ["--beta", "0"], "--beta 0.0: must be a positive number"),
    ("dpo", ["--label-smoothing", "0.5"], "--label-smoothing 0.5: must be in [0, 0.5)"),
    ("dpo", ["--train-data", "nowhere.jsonl"], "--train-data nowhere.jsonl: must be an existing file"),
    ("dpo", ["--eval-prompt-count", "0"], "--eval-prompt-count 0: must be at least 1"),
    ("dpo", ["--loss", "ipo", "--label-smoothing", "0.1"], "--label-smoothing 0.1: applies to --loss sigmoid only"),
    ("ppo", ["--gamma", "2"], "--gamma 2.0: must be in [0, 1]"),
    ("ppo", ["--temperature", "nan"], "--temperature nan: must be a positive number"),
    ("ppo", ["--kl-coef", "-1"], "--kl-coef -1.0: must be 0 or a positive number"),
    ("ppo", ["--rollout-size", "0"], "--rollout-size 0: must be at least 1"),
    ("ppo", ["--prompts", "a.jsonl", "b.jsonl"], "--prompts a.jsonl b.jsonl: must be existing files"),
    ("ppo", ["--choice-data", "nowhere.jsonl"], "--choice-data nowhere.jsonl: must be an existing file or none"),
])
def test_rlhf_flags_out_of_range_are_one_line_before_any_work(stage, argv, message):
    stage_config(stage).check()  # the defaults pass
    with pytest.raises(UserError) as e:
        parse_stage_args("", stage, [*argv, "--out", "/nonexistent/never-created"])
    assert str(e.value).startswith(message)
