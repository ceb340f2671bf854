"""The verifiable skill suite: its checks, its builder and the shipped files, and greedy accuracy per skill."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from pref_fixtures import make_tokenizer

from babyllama.build import skills as build
from babyllama.errors import UserError
from babyllama.eval.skills import (
    accuracy_by_skill,
    check_reply,
    describe_skills,
    load_skill_items,
    per_skill_sample,
    skill_metrics,
)
from babyllama.shipped import SKILLS_HELDOUT, SKILLS_TRAIN


def item(check: str, answer: str = "68") -> dict:
    return {"skill": "add", "lang": "zh", "prompt": "计算：23+45", "answer": answer, "check": check}


@pytest.mark.parametrize("reply, right", [("68", True), (" 68。", True), ("68.", True), ("６８", True),
                                          ("86", False), ("68 apples", False), ("", False)])
def test_exact_check_ignores_only_spacing_case_and_a_final_stop(reply, right):
    assert check_reply(item("exact"), reply) is right


def test_exact_check_reads_number_words_with_or_without_hyphens():
    words = item("exact", "forty-two")
    assert check_reply(words, "Forty two") and check_reply(words, "forty-two.") and not check_reply(words, "fortytwo")


@pytest.mark.parametrize("reply, right", [("春风不度关", True), ("春风，不度关。", True), ("春风不度玉门关", False),
                                          ("春风ab度关", False), ("12345", False)])
def test_zh_chars_check_counts_chinese_characters_only(reply, right):
    assert check_reply(item("zh_chars:5"), reply) is right


@pytest.mark.parametrize("reply, right", [("the king is dead", True), ("The king's men ride.", True),
                                          ("the king", False), ("国王 is dead now", False)])
def test_words_check_counts_english_words(reply, right):
    assert check_reply(item("words:4"), reply) is right


@pytest.mark.parametrize("n, zh, en", [(0, "零", "zero"), (10, "十", "ten"), (15, "十五", "fifteen"),
                                       (40, "四十", "forty"), (42, "四十二", "forty-two"), (100, "一百", "one hundred"),
                                       (105, "一百零五", "one hundred five"), (110, "一百一十", "one hundred ten"),
                                       (999, "九百九十九", "nine hundred ninety-nine")])
def test_numbers_are_written_out_as_people_write_them(n, zh, en):
    assert build.zh_numeral(n) == zh and build.en_words(n) == en


def test_the_builder_is_seeded_and_train_and_heldout_share_no_problem():
    a, b = (build.build_items(60, 30, seed=3, skills=build.ALL_SKILLS) for _ in range(2))
    assert a == b and build.build_items(60, 30, seed=4, skills=build.ALL_SKILLS) != a
    assert not {i["prompt"] for i in a["train"]} & {i["prompt"] for i in a["heldout"]}
    sums = lambda split: {tuple(sorted(map(int, i["prompt"].replace("=?", "").split("+"))))  # noqa: E731
                          for i in a[split] if i["skill"] == "add" and i["prompt"].endswith("=?")}
    assert not sums("train") & sums("heldout")  # 23+45 held out means 45+23 is never trained
    assert all(check_reply(i, i["answer"]) for split in a.values() for i in split)
    assert set(Counter(i["skill"] for i in a["heldout"])) == set(build.ALL_SKILLS)
    shipped = build.build_items(60, 30, seed=3)  # a skill's items do not depend on which others are built
    assert shipped["train"] == [i for i in a["train"] if i["skill"] in build.SHIPPED_SKILLS]


def test_the_shipped_files_are_what_the_builder_makes(tmp_path):
    build.main(["--dest", str(tmp_path)])
    for shipped in (SKILLS_TRAIN, SKILLS_HELDOUT):
        assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes(), f"rebuild {shipped}"
    heldout = Counter(i["skill"] for i in load_skill_items(SKILLS_HELDOUT))
    assert min(heldout.values()) >= 300, heldout  # hundreds of held-out items per skill


def test_bad_skill_files_are_one_line_errors(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"skill": "add", "prompt": "1+1"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"items.jsonl:1: a skill item needs"):
        load_skill_items(path)
    path.write_text(json.dumps(item("close enough")) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="'check' must be"):
        load_skill_items(path)
    path.write_text(json.dumps(item("exact")) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="no items of skill copy"):
        load_skill_items(path, ["copy"])


def test_accuracy_per_skill_and_the_sample():
    items = [dict(item("exact"), skill=s) for s in "aab"]
    m = accuracy_by_skill(items, [True, False, True])
    assert m == {"skill_acc": 2 / 3, "skill_items": 3, "skill_acc_a": 0.5, "skill_acc_b": 1.0,
                 "skill_items_a": 2, "skill_items_b": 1}
    assert describe_skills(m) == "66.7% (a 50%, b 100%)"
    sample = per_skill_sample(items, 1, seed=0)
    assert sorted(i["skill"] for i in sample) == ["a", "b"] and per_skill_sample(items, None) == items


def test_skill_metrics_checks_the_models_greedy_replies(tmp_path):
    from babyllama.data.tokenizer import Tokenizer
    from babyllama.model.config import preset
    from babyllama.model.llama import Llama

    make_tokenizer(tmp_path)
    tok = Tokenizer.load(tmp_path)
    torch.manual_seed(0)
    model = Llama(preset("tiny", vocab_size=tok.vocab_size)).eval()
    items = load_skill_items(SKILLS_HELDOUT)[:40]
    m = skill_metrics(model, tok, items, batch_size=16, max_new_tokens=6)
    assert m["skill_items"] == 40 and 0 <= m["skill_acc"] <= 1
    assert skill_metrics(model, tok, items, batch_size=7, max_new_tokens=6) == m  # greedy: batching changes nothing
