"""`babyllama data build replies`: a teacher's replies as SFT data (sequence-level distillation). Each reply is the
teacher's at that point of the conversation, its own earlier replies included; unfinished or empty replies leave
their conversation out; the files, records and README are what the docs say."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from serve_fixtures import tiny_run

from babyllama.build import replies
from babyllama.data.chat_template import render_prompt
from babyllama.errors import UserError
from babyllama.model.generate import Generator, SamplingConfig
from babyllama.train.checkpoint import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERSATIONS = [
    {"lang": "en", "source": "chat", "messages": [{"role": "user", "content": "hello there"},
                                                  {"role": "assistant", "content": "hi"}]},
    {"lang": "en", "source": "chat", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "one"},
        {"role": "assistant", "content": "x"}, {"role": "user", "content": "two and more words"},
        {"role": "assistant", "content": "y"}]},
    {"lang": "zh", "source": "chat", "messages": [{"role": "user", "content": "你好"},
                                                  {"role": "assistant", "content": "好"}]},
    {"lang": "en", "source": "poems", "messages": [{"role": "user", "content": "a poem"},
                                                   {"role": "assistant", "content": "roses"}]},
    {"lang": "en", "source": "chat", "messages": [{"role": "user", "content": "never ends"},
                                                  {"role": "assistant", "content": "z"}]},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The output root: baby/{tokenizer,pretrain,sft,dpo} (conftest's `tok` reads its tokenizer)."""
    root = tmp_path_factory.mktemp("replies")
    tiny_run(root)
    return root


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in CONVERSATIONS), encoding="utf-8")
    return path


@pytest.fixture
def scripted(monkeypatch, tok):
    """`Generator.generate` replaced by a script of the prompt: the reply names the prompt's length in tokens and
    ends with <|im_end|>, except after the prompt "never ends", which runs to the budget. Records every call."""
    calls = []
    end = tok.token_to_id("<|im_end|>")

    def generate(self, prompts, cfg, stop_ids=(), generator=None):
        calls.append([list(p) for p in prompts])
        rows = []
        for p in prompts:
            if "never ends" in tok.decode(p):
                rows.append(tok.encode("a b c d e f g h i j k l m n o p q r s t u v w x y z")[:cfg.max_new_tokens])
            else:
                rows.append(tok.encode(f"len {len(p)}"))
        assert end in stop_ids
        return rows

    monkeypatch.setattr(Generator, "generate", generate)
    return calls


def test_each_reply_is_the_teachers_at_that_point_of_the_conversation(run, tok, scripted):
    model = load_model(run / "baby" / "sft", tokenizer=tok)
    writer = replies.ReplyWriter(model, tok, SamplingConfig(max_new_tokens=16, temperature=0), batch_size=2)
    convs = [c["messages"] for c in CONVERSATIONS]
    out = writer.answer(convs, progress=False)
    for conv, answered in zip(convs, out):
        if conv[-2]["content"] == "never ends":
            assert answered is None  # cut by the budget: left out
            continue
        assert [m["role"] for m in answered] == [m["role"] for m in conv]
        assert [m["content"] for m in answered if m["role"] != "assistant"] == \
               [m["content"] for m in conv if m["role"] != "assistant"]
        for k, m in enumerate(answered):  # its own earlier replies are in the prompt of the next
            if m["role"] == "assistant":
                assert m["content"] == f"len {len(render_prompt(answered[:k], tok))}"
    # rounds: every first reply before any second one; batches of at most 2 prompts, shortest first
    assert [len(c) for c in scripted] == [2, 2, 1, 1]
    lengths = [len(p) for c in scripted[:3] for p in c]
    assert lengths == sorted(lengths)


def test_a_prompt_without_room_for_a_reply_leaves_only_its_own_conversation_out(run, tok, scripted):
    model = load_model(run / "baby" / "sft", tokenizer=tok)
    writer = replies.ReplyWriter(model, tok, SamplingConfig(max_new_tokens=16, temperature=0), batch_size=4)
    long = [{"role": "user", "content": " ".join(["hello there"] * 400)}, {"role": "assistant", "content": "x"}]
    assert len(render_prompt(long[:1], tok)) >= model.config.max_seq_len
    answered = writer.answer([CONVERSATIONS[0]["messages"], long], progress=False)
    assert answered[1] is None and answered[0][-1]["content"].startswith("len ")
    assert [len(call) for call in scripted] == [1]  # the long prompt was never decoded


def test_an_empty_reply_leaves_its_conversation_out(run, tok):
    model = load_model(run / "baby" / "dpo", tokenizer=tok)  # the stage that answers <|im_end|> at once
    writer = replies.ReplyWriter(model, tok, SamplingConfig(max_new_tokens=4, temperature=0), batch_size=4)
    assert writer.answer([c["messages"] for c in CONVERSATIONS], progress=False) == [None] * len(CONVERSATIONS)


def test_generation_in_length_sorted_batches_equals_one_prompt_at_a_time(run, tok):
    model = load_model(run / "baby" / "sft", dtype=torch.float32, tokenizer=tok)
    cfg = SamplingConfig(max_new_tokens=6, temperature=0)
    prompts = [render_prompt(c["messages"][:-1], tok) for c in CONVERSATIONS]
    batched = replies.ReplyWriter(model, tok, cfg, batch_size=len(prompts)).generator.generate(prompts, cfg)
    alone = [Generator(model).generate([p], cfg)[0] for p in prompts]
    assert batched == alone


def test_command_writes_the_chosen_conversations_and_a_readme(run, tok, data, tmp_path, scripted):
    dest = tmp_path / "teacher_replies"
    replies.main(["--teacher", str(run / "baby" / "sft"), "--tokenizer", str(run / "baby" / "tokenizer"),
                  "--data", str(data),
                  "--lang", "en", "--source", "chat", "--dest", str(dest), "--max-new-tokens", "16",
                  "--teacher-name", "tiny-teacher", "--licence", "CC0-1.0 (a test)", "--system", "be short"])
    rows = [json.loads(line) for line in (dest / data.name).read_text(encoding="utf-8").splitlines()]
    assert [r["messages"][-2]["content"] for r in rows] == ["hello there", "two and more words"]
    assert all(r["lang"] == "en" and r["source"] == "chat" and r["teacher"] == "tiny-teacher" for r in rows)
    assert all(r["messages"][-1]["content"].startswith("len ") for r in rows)
    # --system: told to the teacher where a conversation has none, not written into the data
    seen = [tok.decode(p) for call in scripted for p in call]
    assert sum("be short" in s for s in seen) == 2 and sum("be brief" in s for s in seen) == 2
    assert "be short" not in (dest / data.name).read_text(encoding="utf-8")
    text = (dest / "README.md").read_text(encoding="utf-8")
    assert "| `chats.jsonl` | 3 | 2 | 1 |" in text
    assert "CC0-1.0 (a test)" in text and "--lang en --source chat" in text and '"be short"' in text
    from babyllama.data.sft import read_conversations
    assert len(read_conversations(dest / data.name)) == 2  # what `babyllama sft --train-data` reads


def test_bad_input_is_one_line(run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "only a question"}]}\n', encoding="utf-8")
    args = ["--teacher", str(run / "baby" / "sft"), "--tokenizer", str(run / "baby" / "tokenizer"),
            "--dest", str(tmp_path / "d")]
    with pytest.raises(UserError, match=r"bad\.jsonl:1: the conversation has no assistant reply"):
        replies.main([*args, "--data", str(bad)])
    with pytest.raises(UserError, match="--batch-size 0"):
        replies.main([*args, "--data", str(bad), "--batch-size", "0"])


def test_bench_reply_distill_scores_students_against_the_teacher(run, tmp_path):
    def write(path, convs):
        path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs), encoding="utf-8")
        return str(path)

    asks = [[{"role": "user", "content": q}] for q in ("hello there", "one two", "never mind")]
    taught = write(tmp_path / "taught.jsonl", [[*q, {"role": "assistant", "content": "teacher says hi"}] for q in asks])
    original = write(tmp_path / "original.jsonl",
                     [[*q, {"role": "assistant", "content": f"reply {i}"}] for i, q in enumerate(asks + asks[:1])])
    baby = run / "baby"
    args = [sys.executable, "-m", "babyllama", "bench", "reply_distill", "--students", str(baby / "pretrain"),
            str(baby / "sft"), "--labels", "a", "b", "--tokenizer", str(baby / "tokenizer"), "--teacher",
            str(baby / "dpo"), "--teacher-tokenizer", str(baby / "tokenizer"), "--teacher-replies", taught,
            "--max-new-tokens", "4", "--examples", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*args, "--original", original], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["student"] for r in rows] == ["a", "b"] and "minus_a" in rows[1] and "minus_a" not in rows[0]
    for r in rows:
        assert all(r[m]["n"] == 3 and 0 < r[m]["mean"] < 100 for m in ("teacher_bpb", "original_bpb", "judged_bpb"))
    assert math.isclose(rows[1]["minus_a"]["teacher_bpb"]["mean"],
                        rows[1]["teacher_bpb"]["mean"] - rows[0]["teacher_bpb"]["mean"], abs_tol=2e-4)
    assert "> hello there" in proc.stdout
    unmatched = write(tmp_path / "unmatched.jsonl", [[*asks[0], {"role": "assistant", "content": "x"}]])
    proc = subprocess.run([*args, "--original", unmatched], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "has no conversation asking what 2 of --teacher-replies ask" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shipped_teacher_replies_answer_the_shipped_prompts():
    """data/sft_smollm2: each file answers the English chatterbot conversations of the shipped file of its name, and
    its README counts what it holds."""
    from babyllama.shipped import REPO_ROOT

    shipped, ours = REPO_ROOT / "data" / "sft", REPO_ROOT / "data" / "sft_smollm2"
    readme = (ours / "README.md").read_text(encoding="utf-8")
    for name in ("sft_train.jsonl", "sft_valid.jsonl"):
        rows = [json.loads(line) for line in (ours / name).read_text(encoding="utf-8").splitlines()]
        source = [json.loads(line) for line in (shipped / name).read_text(encoding="utf-8").splitlines()]
        asked = {json.dumps([m for m in r["messages"] if m["role"] != "assistant"]) for r in source
                 if r["lang"] == "en" and r["source"] == "chatterbot"}
        assert all(r["lang"] == "en" and r["source"] == "chatterbot" and r["teacher"] == "SmolLM2-135M-Instruct"
                   for r in rows)
        assert all(json.dumps([m for m in r["messages"] if m["role"] != "assistant"]) in asked for r in rows)
        assert f"| `{name}` | {len([r for r in source if r['lang'] == 'en' and r['source'] == 'chatterbot']):,} | " \
               f"{len(rows):,} |" in readme
    assert "Apache-2.0" in readme and "BSD-3-Clause" in readme


def test_bench_split_holds_taught_prompts_out_of_both_training_sets(tmp_path):
    from babyllama.shipped import REPO_ROOT

    proc = subprocess.run([sys.executable, "-m", "babyllama", "bench", "reply_distill", "--split", str(tmp_path),
                           "--hold-out", "50"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr

    def read(name):
        return [json.loads(line) for line in (tmp_path / name).read_text(encoding="utf-8").splitlines()]

    def asks(r):
        return json.dumps([m for m in r["messages"] if m["role"] != "assistant"])

    a, b, taught, original = (read(f"{n}.jsonl") for n in ("A_train", "B_train", "heldout_teacher",
                                                             "heldout_original"))
    held = {asks(r) for r in taught}
    assert len(held) >= 50 and not held & {asks(r) for r in a + b}  # no held-out prompt is trained on
    assert held <= {asks(r) for r in original}
    assert all(r["teacher"] == "SmolLM2-135M-Instruct" for r in taught)
    chatterbot_en = [r for r in b if r["lang"] == "en" and r["source"] == "chatterbot"]
    assert chatterbot_en and all(r.get("teacher") == "SmolLM2-135M-Instruct" for r in chatterbot_en)
    assert not any("teacher" in r for r in a)
