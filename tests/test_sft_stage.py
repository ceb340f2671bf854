"""SFT stage: log-likelihood multiple choice, a learnable tiny SFT run, sft/sft.py and the chat CLI end to end."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_config
from torch import nn

from babyllama.commands import sft as sft_command
from babyllama.data.chat_template import IM_END, encode_text, render_prompt
from babyllama.data.sft import SFTDataset, build_sft_loader
from babyllama.data.tokenizer import Tokenizer, train_tokenizer
from babyllama.errors import UserError
from babyllama.eval.choice import ChoiceAccuracy, choice_accuracy, choice_scores, load_choice_items
from babyllama.eval.skills import load_skill_items
from babyllama.model.llama import Llama, Output
from babyllama.shipped import SKILLS_HELDOUT
from babyllama.train.checkpoint import load_model, save_checkpoint
from babyllama.train.run_config import SFTConfig, model_config_for
from babyllama.train.stage import compile_from_run
from babyllama.train.trainer import Callback, Trainer, causal_lm_loss

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # tiny models: threads only contend

# A task a tiny model learns in seconds and that generalises: the sound depends on the animal only, and the
# held-out questions use adjectives never seen in training.
SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa", "owl": "hoot",
          "lion": "roar", "snake": "hiss"}
TRAIN_ADJ = ["big", "small", "red", "old", "happy", "lazy", "wild", "fat", "tall", "shy", "loud", "calm"]
HELD_OUT_ADJ = ["young", "little", "brown", "quick"]


def question(adj: str, animal: str) -> str:
    return f"the {adj} {animal}: what sound?"


def conversations():
    return [[{"role": "user", "content": question(adj, animal)}, {"role": "assistant", "content": sound}]
            for adj in TRAIN_ADJ for animal, sound in SOUNDS.items()]


def held_out_items():
    rng, sounds, items = random.Random(0), list(SOUNDS.values()), []
    for k, (adj, animal) in enumerate((a, n) for a in HELD_OUT_ADJ for n in SOUNDS):
        wrong = rng.sample([s for s in sounds if s != SOUNDS[animal]], 3)
        answer = k % 4
        items.append({"messages": [{"role": "user", "content": question(adj, animal)}], "lang": "en",
                      "choices": wrong[:answer] + [SOUNDS[animal]] + wrong[answer:], "answer": answer})
    return items


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    rng = random.Random(0)
    words = list(SOUNDS) + list(SOUNDS.values()) + TRAIN_ADJ + HELD_OUT_ADJ + "the what sound user assistant".split()
    text = [" ".join(rng.choices(words, k=12)) + "?:\n" for _ in range(3000)]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(text, 320, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


# ---------------------------------------------------------------- scoring
class Bigram(nn.Module):
    """Next-token logits from the previous token only: exact log-probabilities are easy to compute by hand."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        nn.init.normal_(self.table.weight, std=3.0)
        self.config = SimpleNamespace(vocab_size=vocab, max_seq_len=10**9)  # what the scorer reads of a model

    def forward(self, ids, return_logits=True):
        return Output(logits=self.table(ids))


def reference_score(model: Bigram, tok, item, choice: str) -> float:
    prompt = render_prompt(item["messages"], tok)
    reply = encode_text(tok, choice) + [tok.token_to_id(IM_END)]
    ids = prompt + reply
    logp = model.table.weight.detach().log_softmax(-1)
    return sum(float(logp[ids[i - 1], ids[i]]) for i in range(len(prompt), len(ids)))


def test_choice_scores_are_summed_reply_logprobs_and_pick_the_likeliest(tok):
    torch.manual_seed(0)
    model = Bigram(tok.vocab_size)
    items = held_out_items()[:6]
    items[0]["choices"] = ["meow", "meow meow meow woof", "a"]  # replies of different token lengths
    scores = choice_scores(model, tok, items, batch_size=5)  # batches mix items and row lengths
    for item, row in zip(items, scores):
        assert row == pytest.approx([reference_score(model, tok, item, c) for c in item["choices"]], abs=1e-4)
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    assert choice_accuracy(model, tok, [{**it, "answer": b} for it, b in zip(items, best)]) == \
        {"choice_acc": 1.0, "choice_acc_en": 1.0}
    wrong = [{**it, "answer": (b + 1) % len(it["choices"]), "lang": "zh"} for it, b in zip(items, best)]
    assert choice_accuracy(model, tok, wrong, batch_size=64) == {"choice_acc": 0.0, "choice_acc_zh": 0.0}


def test_load_choice_items_names_line_and_field(tmp_path):
    good = held_out_items()[0]
    path = write_jsonl(tmp_path / "c.jsonl", [good, {**good, "answer": 4}])
    with pytest.raises(UserError, match=r"c\.jsonl:2: 'answer'"):
        load_choice_items(path)
    path = write_jsonl(tmp_path / "d.jsonl", [good, {**good, "choices": "meow"}])
    with pytest.raises(UserError, match=r"d\.jsonl:2: 'choices'"):
        load_choice_items(path)
    assert load_choice_items(write_jsonl(tmp_path / "e.jsonl", [good]))[0]["choices"] == good["choices"]


def test_strict_load_refuses_extra_weights(tmp_path):
    cfg = tiny_config(64, n_layers=1, n_kv_heads=None, max_seq_len=16)
    state = {"model": {**Llama(cfg).state_dict(), "value_head.weight": torch.zeros(1, 32)},
             "model_config": cfg.to_dict()}
    path = save_checkpoint(tmp_path, 1, state)
    assert load_model(path).config == cfg  # lenient by default: chat can load a checkpoint with extra heads
    with pytest.raises(UserError, match="value_head.weight"):
        load_model(path, strict=True)


# ---------------------------------------------------------------- a learnable SFT run
class Logs(Callback):
    def __init__(self):
        self.rows = []

    def on_step_end(self, trainer, logs):
        self.rows.append(dict(logs))


@pytest.fixture(scope="module")
def trained(tok, tmp_path_factory):
    """A dim-64 model fine-tuned on the animal task with the SFT stage's own pieces; its checkpoint on disk."""
    torch.manual_seed(0)
    cfg = tiny_config(tok.vocab_size, dim=64, ffn_dim=128, max_seq_len=128, tie_embeddings=True)
    data = SFTDataset(conversations(), tok, max_len=cfg.max_seq_len + 1)
    run = SFTConfig(lr=3e-3, warmup_steps=5, max_steps=200, weight_decay=0.0, mixed_precision="fp32",
                    torch_compile="off")
    trainer = compile_from_run(Trainer(Llama(cfg)), run, loss=causal_lm_loss)
    items = held_out_items()
    evaluator, logs = ChoiceAccuracy(items, tok, every=100), Logs()
    before = evaluator.compute(trainer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a dim-64 model runs several times faster on one thread than on contended two
    try:
        trainer.fit(build_sft_loader(data, batch_size=16, seed=0), epochs=10**9, max_steps=run.max_steps,
                    callbacks=[evaluator, logs])
    finally:
        torch.set_num_threads(threads)
    ckpt_dir = tmp_path_factory.mktemp("sft")
    trainer.save_checkpoint(str(ckpt_dir))
    return {"before": before, "after": evaluator.compute(trainer), "logs": logs.rows, "ckpt": ckpt_dir,
            "model": trainer.network}


def test_sft_raises_held_out_choice_accuracy(trained):
    assert trained["after"]["choice_acc"] >= 0.9  # chance is 0.25
    assert trained["after"]["choice_acc"] > trained["before"]["choice_acc"] + 0.3
    logged = [r for r in trained["logs"] if "choice_acc" in r]
    assert [r["step"] for r in logged] == [100, 200] and "choice_acc_en" in logged[-1]


# ---------------------------------------------------------------- chat CLI
def chat(args, tok_dir, ckpt, stdin=None):
    cmd = [sys.executable, str(ROOT / "sft" / "infer.py"), "--ckpt", str(ckpt), "--tokenizer", str(tok_dir),
           "--temperature", "0", "--max-new-tokens", "6", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=ENV, timeout=120)


def test_one_shot_prompt_prints_the_learned_reply(trained, tok_dir):
    out = chat(["--prompt", question("brown", "cat")], tok_dir, trained["ckpt"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "meow"


def test_compiled_bf16_chat_gives_the_learned_replies(trained, tok_dir):
    """--compile --dtype bf16 (the GPU settings) on CPU: the compiled decode step answers the same, turn after turn."""
    turns = [question("brown", "cat"), question("little", "dog")]
    out = chat(["--compile", "--dtype", "bf16"], tok_dir, trained["ckpt"], stdin="\n".join(turns) + "\n")
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stdout.splitlines() if line.startswith("assistant> ")] == [
        "assistant> meow", "assistant> woof"]


def test_chat_on_stdin_keeps_history_until_reset(trained, tok_dir):
    turns = [question("little", "dog"), question("quick", "cow"), "/reset", question("young", "owl")]
    out = chat(["--show-prompt"], tok_dir, trained["ckpt"], stdin="\n".join(turns) + "\n")
    assert out.returncode == 0, out.stderr
    replies = [line.removeprefix("assistant> ") for line in out.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 3 and replies[0] == "woof" and "(history cleared)" in out.stdout
    prompts = [p.split("\n", 1)[1] for p in out.stderr.split("--- prompt")[1:]]
    assert len(prompts) == 3
    assert turns[0] in prompts[1] and "woof" in prompts[1] and prompts[1].count("<|im_start|>assistant") == 2
    assert turns[0] not in prompts[2] and turns[1] not in prompts[2] and turns[3] in prompts[2]


def test_chat_history_window_drops_oldest_turns(trained, tok_dir):
    turns = [question(a, "cat") for a in HELD_OUT_ADJ]
    out = chat(["--show-prompt", "--history-tokens", "40"], tok_dir, trained["ckpt"], stdin="\n".join(turns))
    assert out.returncode == 0, out.stderr
    last = out.stderr.split("--- prompt")[-1]
    assert int(last.split("(")[1].split(" ")[0]) <= 40
    assert turns[-1] in last and turns[0] not in last


def test_chat_history_turns_keeps_only_the_newest(trained, tok_dir):
    turns = [question("little", "dog"), question("quick", "cow")]
    out = chat(["--show-prompt", "--history-turns", "1"], tok_dir, trained["ckpt"], stdin="\n".join(turns))
    assert out.returncode == 0, out.stderr
    last = out.stderr.split("--- prompt")[-1]
    assert turns[1] in last and turns[0] not in last and last.count("<|im_start|>user") == 1
    bad = chat(["--history-turns", "0"], tok_dir, trained["ckpt"], stdin="")
    assert bad.returncode == 2 and "--history-turns" in bad.stderr and "at least 1" in bad.stderr


# ---------------------------------------------------------------- sft/sft.py
@pytest.fixture(scope="module")
def workspace(tok_dir, tmp_path_factory):
    """out/baby/{tokenizer,pretrain} with a randomly initialised baby model (64-token context), plus data files."""
    root = tmp_path_factory.mktemp("ws")
    shutil.copytree(tok_dir, root / "out" / "baby" / "tokenizer")
    cfg = model_config_for(SFTConfig(seq_len=64), Tokenizer.load(tok_dir).vocab_size)
    save_checkpoint(root / "out" / "baby" / "pretrain", 1, {"model": Llama(cfg).state_dict(),
                                                             "model_config": cfg.to_dict()})
    convs = [{"messages": m} for m in conversations()]
    files = {"--train-data": write_jsonl(root / "train.jsonl", convs),
             "--valid-data": write_jsonl(root / "valid.jsonl", convs[:8]),
             "--choice-data": write_jsonl(root / "choice.jsonl", held_out_items()[:8]),
             "--skill-data": write_jsonl(root / "skills.jsonl", load_skill_items(SKILLS_HELDOUT)[::150])}
    return root, [a for kv in files.items() for a in map(str, kv)]


def sft_cli(root, *args):
    cmd = [sys.executable, str(ROOT / "sft" / "sft.py"), "--name", "baby", "--out", str(root / "out"),
           "--runs", str(root / "runs"), "--seq-len", "64", "--pretrain-mix", "0", *args]  # mixed: test_sft_mix.py
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def test_sft_cli_trains_logs_and_reports(workspace):
    root, data_flags = workspace
    out = sft_cli(root, *data_flags, "--max-steps", "4", "--eval-every", "2", "--batch-size", "8")
    assert out.returncode == 0, out.stderr
    assert "final SFT validation loss" in out.stdout and "before SFT" in out.stdout and "padding" in out.stdout
    assert (root / "out" / "baby" / "sft" / "step_00000004.pt").is_file()
    logs = [json.loads(line) for line in (root / "out" / "baby" / "sft" / "log.jsonl").read_text().splitlines()]
    assert {"val_loss", "choice_acc", "choice_acc_en", "skill_acc", "skill_acc_count"} <= {
        k for row in logs if row["step"] == 4 for k in row}
    scalars = tensorboard_scalars(root / "runs" / "baby" / "sft")
    assert scalars["val_loss"] == [2, 4] and scalars["choice_acc"] == [2, 4] and scalars["loss"] == [1, 2, 3, 4]
    assert scalars["skill_acc_next_line"] == [2, 4]
    metrics = json.loads((root / "out" / "baby" / "sft" / "run.json").read_text())["metrics"]
    assert {"before_skill_acc", "skill_acc", "skill_items"} <= set(metrics) and "skill accuracy on" in out.stdout


def tensorboard_scalars(log_dir: Path) -> dict[str, list[int]]:
    """Steps of each scalar in the event files of `log_dir`, by name without its `train/` or `val/` group."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(log_dir.glob("events.out.tfevents.*")), f"no TensorBoard event file in {log_dir}"
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag.split("/", 1)[-1]: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_sft_cli_resume_continues_the_log(workspace, tmp_path):
    root, data_flags = workspace
    for part in ("tokenizer", "pretrain"):  # a fresh SFT directory: the other tests' run stays as it is
        shutil.copytree(root / "out" / "baby" / part, tmp_path / "out" / "baby" / part)
    flags = [*data_flags, "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), "--choice-data", "none",
             "--eval-every", "2", "--batch-size", "8"]
    first = sft_cli(root, *flags, "--max-steps", "2")
    assert first.returncode == 0, first.stderr
    again = sft_cli(root, *flags, "--resume", "--max-steps", "4")
    assert again.returncode == 0, again.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "baby" / "sft" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    assert tensorboard_scalars(tmp_path / "runs" / "baby" / "sft")["val_loss"] == [2, 4]


def test_sft_cli_names_the_validation_file_it_cannot_use(workspace, tok_dir, tmp_path):
    root, data_flags = workspace
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    out = sft_cli(root, *data_flags, "--valid-data", str(empty), "--out", str(tmp_path / "out"),
                  "--init", str(root / "out" / "baby" / "pretrain"), "--tokenizer", str(tok_dir))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"error: {empty}: no records")


def test_validation_batches_refuse_fewer_batches_than_ranks(tok, tmp_path):
    path = write_jsonl(tmp_path / "valid.jsonl", [{"messages": m} for m in conversations()[:8]])
    valid = sft_command.load_dataset(str(path), "auto", tok, 64, None)
    loader = dict(batch_size=8, seed=0, rank=0, world_size=1)
    assert len(sft_command.validation_batches(valid, str(path), 20, **loader)) == 1
    with pytest.raises(UserError, match=rf"--valid-data {path}: no validation batch .* 2 ranks"):
        sft_command.validation_batches(valid, str(path), 20, **{**loader, "world_size": 2})
    with pytest.raises(UserError, match=rf"{path}: no SFT sample fits max_len=3"):
        sft_command.load_dataset(str(path), "auto", tok, 3, None)


def test_sft_cli_refuses_checkpoint_of_another_config(workspace, tok, tok_dir, tmp_path):
    root, data_flags = workspace
    other = tiny_config(tok.vocab_size, dim=64, n_kv_heads=None, ffn_dim=128)
    ckpt = save_checkpoint(tmp_path, 7, {"model": Llama(other).state_dict(), "model_config": other.to_dict()})
    out = sft_cli(root, *data_flags, "--init", str(ckpt), "--tokenizer", str(tok_dir), "--out", str(tmp_path))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("error:") and "dim: checkpoint 64 vs now 256" in out.stderr


def test_sft_cli_distils_from_a_teacher(workspace, tmp_path):
    root, data_flags = workspace
    for part in ("tokenizer", "pretrain"):
        shutil.copytree(root / "out" / "baby" / part, tmp_path / "out" / "baby" / part)
    teacher = root / "out" / "baby" / "pretrain"  # any checkpoint of this tokenizer teaches
    out = sft_cli(root, *data_flags, "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"),
                  "--choice-data", "none", "--skill-data", "none", "--max-steps", "2", "--batch-size", "8",
                  "--teacher", str(teacher), "--distill-alpha", "1")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "baby" / "sft" / "log.jsonl").read_text().splitlines()]
    # the student starts as its teacher: nothing to learn from it at step 1, and alpha 1 leaves only that term
    assert rows[0]["kd"] < 1e-4 and rows[0]["loss"] == pytest.approx(rows[0]["kd"], abs=1e-6)
