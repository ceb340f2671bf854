"""Evaluation: bits-per-byte of a uniform model, cloze scoring, item builders, JSON/Markdown output, the chat and
reward-model metrics of later stages."""
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from tiny import tiny_config
from torch import nn

from babyllama.align.reward_model import RewardModel, mark_reward_checkpoint
from babyllama.build.builders import idiom_items
from babyllama.data.corpus import iter_records
from babyllama.data.tokenizer import Tokenizer, train_tokenizer
from babyllama.errors import UserError
from babyllama.eval import evaluate as ev
from babyllama.eval import stats
from babyllama.model.llama import Llama, Output
from babyllama.train.checkpoint import atomic_save

TEXTS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。" * 3, "To be, or not to be: that is the question.\n" * 4,
         "ab"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    texts = [r["text"] for path in ev.HELDOUT.values() for r in itertools.islice(iter_records(path), 120)]
    with pytest.warns(UserWarning):  # few characters per vocabulary entry: expected for a test tokenizer
        return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok"))


def tiny_model(vocab: int, max_seq_len: int = 64) -> Llama:
    torch.manual_seed(0)
    cfg = tiny_config(vocab, n_layers=1, n_kv_heads=None, max_seq_len=max_seq_len)
    return Llama(cfg).eval()


def test_uniform_model_bpb_is_log2_vocab_times_tokens_per_byte(tok):
    model = tiny_model(tok.vocab_size, max_seq_len=16)  # short windows: long texts span several
    nn.init.zeros_(model.lm_head.weight)  # every logit equal: p = 1/V for every token
    m = ev.text_metrics(model, tok, TEXTS)
    tokens = sum(len(tok.encode(t)) for t in TEXTS)  # each text token predicted once, the leading </s> never
    n_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert (m["tokens"], m["bytes"]) == (tokens, n_bytes)
    assert m["loss"] == pytest.approx(math.log(tok.vocab_size), rel=1e-6)
    assert m["ppl"] == pytest.approx(tok.vocab_size, rel=1e-5)
    assert m["bpb"] == pytest.approx(math.log2(tok.vocab_size) * tokens / n_bytes, rel=1e-6)


def test_windows_predict_every_token_once():
    ids = list(range(23))
    rows = ev.windows(ids, 8)
    assert [r[0] for r in rows] == [0, 8, 16] and sum(len(r) - 1 for r in rows) == 22
    assert [t for r in rows for t in r[1:]] == ids[1:]


def test_scores_match_a_plain_forward(tok):
    model = tiny_model(tok.vocab_size)
    item = {"context": "举头望明月，", "choices": ["低头思故乡。", "To be"], "answer": 0}
    scores = ev.cloze_scores(model, tok, [item])[0]
    for choice, score in zip(item["choices"], scores):
        ctx, ans = [tok.eos_id] + tok.encode(item["context"]), tok.encode(choice)
        ids = torch.tensor([ctx + ans])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1)
        expected = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(ans))
        assert score == pytest.approx(expected, abs=1e-4)


def test_a_context_longer_than_the_model_keeps_its_newest_tokens(tok):
    """As a prompt does in every front end (generation.fit_context): the context's oldest tokens go."""
    model = tiny_model(tok.vocab_size, max_seq_len=16)
    item = {"context": "床前明月光，疑是地上霜。" * 10, "choices": ["低头思故乡。"], "answer": 0}
    ans = tok.encode(item["choices"][0])
    ids = ([tok.eos_id] + tok.encode(item["context"]) + ans)[-17:]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    expected = sum(logp[len(ids) - len(ans) - 1 + j, t].item() for j, t in enumerate(ans))
    assert ev.cloze_scores(model, tok, [item])[0][0] == pytest.approx(expected, abs=1e-4)


class FavoursOneToken(nn.Module):
    """Logits that put almost all probability on one token id, whatever the input."""

    def __init__(self, vocab: int, favoured: int):
        super().__init__()
        self.config = tiny_config(vocab, dim=8, n_layers=1, n_heads=1, n_kv_heads=None, ffn_dim=8)
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.bias.data[favoured] = 20.0

    def forward(self, ids, return_logits=True):
        return Output(logits=self.bias.expand(*ids.shape, -1))


def test_cloze_picks_the_choice_the_model_prefers(tok):
    a, b = tok.encode("1"), tok.encode("2")
    assert len(a) == len(b) == 1  # digits are single tokens
    items = [{"context": f"第{i}题", "choices": ["2222"] * i + ["1111"] + ["2222"] * (3 - i), "answer": i}
             for i in range(4)]
    assert ev.cloze_accuracy(FavoursOneToken(tok.vocab_size, a[0]), tok, items) == 1.0
    assert ev.cloze_accuracy(FavoursOneToken(tok.vocab_size, b[0]), tok, items) == 0.0


def test_heldout_items_are_well_formed():
    poems = list(iter_records(ev.HELDOUT["zh"]))
    speeches = list(iter_records(ev.HELDOUT["en"]))
    poem_items, word_items = ev.poem_items(poems), ev.last_word_items(speeches)
    assert len(poem_items) > 100 and len(word_items) > 100
    texts = {r["text"] for r in poems}
    for it in poem_items:
        answer = it["choices"][it["answer"]]
        assert len(set(it["choices"])) == 4 and {len(c) for c in it["choices"]} == {len(answer)}
        assert any(t.startswith(it["context"] + answer) for t in texts)
    speech_texts = [r["text"] for r in speeches]
    for it in word_items[:50]:
        answer = it["choices"][it["answer"]]
        assert len({c.lower() for c in it["choices"]}) == 4 and re.fullmatch(r"\s+[A-Za-z][A-Za-z']*", answer)
        assert any(t.startswith(it["context"] + answer) for t in speech_texts)
    assert ev.poem_items(poems) == poem_items  # deterministic for a seed


def test_idiom_items_have_one_completing_choice():
    idioms = ["一丝不苟", "一丝不挂", "守株待兔", "画蛇添足", "亡羊补牢", "对牛弹琴", "井底之蛙", "刻舟求剑",
              "杯弓蛇影", "望梅止渴", "自相矛盾", "掩耳盗铃", "胸有成竹", "叶公好龙", "狐假虎威", "滥竽充数"]
    items = idiom_items(idioms, n=len(idioms))
    assert items
    for it in items:
        completing = [c for c in it["choices"] if it["context"] + c in idioms]
        assert completing == [it["choices"][it["answer"]]]
    shipped = ev.load_items(ev.IDIOMS)
    assert len(shipped) == 400 and all(len(it["context"]) == 2 and len(it["choices"]) == 4 for it in shipped)


def test_idiom_items_from_fewer_than_twelve_endings():
    idioms = ["一丝不苟", "一丝不挂", "守株待兔", "画蛇添足", "亡羊补牢"]  # 5 distinct endings
    items = idiom_items(idioms, n=len(idioms))
    assert items and all(len(it["choices"]) == 4 and it["context"] + it["choices"][it["answer"]] in idioms
                         for it in items)


def test_bad_items_file_names_the_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"context": "a", "choices": ["b", "c"], "answer": 0}\n{"context": "a", "choices": ["b"]}\n')
    with pytest.raises(UserError, match=r"items.jsonl:2"):
        ev.load_items(path)


def save_stage(run: Path, stage: str, model: nn.Module, step: int, extra: dict | None = None) -> Path:
    """A stage checkpoint as the stage scripts write it (model + model_config [+ extra])."""
    path = run / stage / f"step_{step:08d}.pt"
    atomic_save({"model": model.state_dict(), "model_config": model.config.to_dict(), "extra": extra or {}}, path)
    return path


def test_command_writes_json_and_markdown(tmp_path, tok, capsys):
    run = tmp_path / "out" / "demo"
    tok.save(run / "tokenizer")
    save_stage(run, "pretrain", tiny_model(tok.vocab_size), 42)
    ev.main(["--name", "demo", "--stage", "pretrain", "--out", str(tmp_path / "out"), "--max-docs", "4",
             "--max-items", "6"])
    result = json.loads((run / "eval" / "pretrain.json").read_text())
    assert result["step"] == 42 and result["stage"] == "pretrain"
    m = result["metrics"]
    assert m["bpb"] > 0 and m["zh_tokens"] > 0 and m["en_bytes"] > 0
    assert m["poem_next_line_items"] == m["idiom_items"] == 6
    assert all(0 <= m[k] <= 1 for k in ("poem_next_line_acc", "en_last_word_acc", "idiom_acc"))
    md = (run / "eval" / "pretrain.md").read_text()
    assert "| bpb |" in md and md in capsys.readouterr().out
    with pytest.raises(UserError, match="no checkpoint"):
        ev.main(["--name", "demo", "--stage", "sft", "--root", str(tmp_path / "out")])


def test_sft_stage_adds_chat_choice_and_skill_accuracy(tmp_path, tok, capsys):
    run = tmp_path / "out" / "demo"
    tok.save(run / "tokenizer")
    save_stage(run, "sft", tiny_model(tok.vocab_size), 3)
    ev.main(["--name", "demo", "--stage", "sft", "--out", str(tmp_path / "out"), "--max-docs", "2",
             "--max-items", "4", "--show-replies", "1"])
    m = json.loads((run / "eval" / "sft.json").read_text())["metrics"]
    assert {"chat_choice_acc", "bpb", "skill_acc", "skill_acc_count", "skill_acc_next_line"} <= set(m)
    assert m["skill_items"] == 4 * 3 and m["skill_items_length"] == 4  # --max-items per skill
    replies = capsys.readouterr().out.split("| skill | prompt | greedy reply | right |")[1].strip().splitlines()
    assert len(replies) == 1 + 3 and all(row.endswith(("| yes |", "| no |")) for row in replies[1:])
    assert all(0 <= v <= 1 for k, v in m.items() if k.startswith("chat_choice_acc"))
    assert m["chat_choice_items"] == 4 == sum(v for k, v in m.items() if k.startswith("chat_choice_items_"))
    assert not any(k.startswith("reward_") for k in m)
    # the Markdown shows every accuracy with its 95% interval over the items
    low, high = stats.wilson_interval(m["chat_choice_acc"], 4)
    assert f"| chat_choice_acc | {m['chat_choice_acc']:.4f} [{low:.3f}, {high:.3f}] |" in \
        (run / "eval" / "sft.md").read_text()


def write_pairs(path: Path, sides: list[tuple[str, str]]) -> Path:
    rows = [{"prompt": "床前明月光的下一句是什么？", "chosen": c, "rejected": r} for c, r in sides]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_reward_stage_accuracy_and_margin(tmp_path, tok):
    good, bad = "疑是地上霜。", "To be, or not to be."
    # the same two replies, 3 pairs one way round and 1 the other: whichever the model scores higher,
    # reward_acc is 3/4 or 1/4, and negating the score head swaps the two
    pairs = write_pairs(tmp_path / "pairs.jsonl", [(good, bad)] * 3 + [(bad, good)])
    run = tmp_path / "out" / "demo"
    tok.save(run / "tokenizer")
    rm = RewardModel.from_lm(tiny_model(tok.vocab_size))
    kind: dict = {}
    mark_reward_checkpoint(kind)
    save_stage(run, "reward", rm, 5, kind)
    ev.main(["--name", "demo", "--stage", "reward", "--root", str(tmp_path / "out"), "--max-docs", "2",
             "--max-items", "4", "--pairs", str(pairs)])
    m = json.loads((run / "eval" / "reward.json").read_text())["metrics"]
    assert m["reward_pairs"] == 4 and m["reward_acc"] in (0.25, 0.75) and "chat_choice_acc" in m
    assert abs(m["reward_margin"]) > 0  # 2 * (score(good) - score(bad)) / 4: distinct replies, distinct scores

    with torch.no_grad():
        rm.score.weight.neg_()
    flipped = ev.reward_metrics(save_stage(run, "reward", rm, 6, kind), tok, "cpu", pairs)
    assert flipped["reward_acc"] == 1 - m["reward_acc"]
    assert flipped["reward_margin"] == pytest.approx(-m["reward_margin"], abs=1e-6)
    with torch.no_grad():
        rm.score.weight.zero_()
    ties = ev.reward_metrics(save_stage(run, "reward", rm, 7, kind), tok, "cpu", pairs)
    assert (ties["reward_acc"], ties["reward_margin"]) == (0.0, 0.0)  # a tie is not a win
    with pytest.raises(UserError, match="not a reward-model checkpoint"):
        ev.reward_metrics(save_stage(run, "sft", tiny_model(tok.vocab_size), 1), tok, "cpu", pairs)
