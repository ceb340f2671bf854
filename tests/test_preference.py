"""Preference data: builders (every rejection kind), shipped files, readers and their errors, tokenization, batches."""
import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
from pref_fixtures import make_tokenizer, synthetic_pairs

from babyllama.build.builders import poetry_pairs, prompts_of, records_to_pairs, shakespeare_pairs
from babyllama.data.chat_template import IM_END, render_prompt
from babyllama.data.corpus import iter_records
from babyllama.data.preference import (
    REJECTIONS,
    PreferenceDataset,
    PreferencePair,
    build_preference_loader,
    collate_pairs,
    encode_side,
    read_pairs,
    read_prompts,
)
from babyllama.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CORPUS, SHIPPED = ROOT / "data" / "corpus", ROOT / "data" / "preference"


@pytest.fixture(scope="module")
def built():
    zh = list(islice(iter_records(CORPUS / "poetry_zh_train.jsonl"), 0, None, 12))
    en = list(islice(iter_records(CORPUS / "shakespeare_en_train.jsonl"), 0, None, 15))  # every play
    return poetry_pairs(zh, seed=0) + shakespeare_pairs(en, seed=0)


def test_builders_cover_every_rejection_kind_with_distinct_replies(built):
    kinds = Counter(p["rejection"] for p in built)
    assert set(kinds) == set(REJECTIONS) and min(kinds.values()) >= 10
    for p in built:
        assert p["chosen"].strip() and p["rejected"].strip() and p["chosen"] != p["rejected"]
        assert p["lang"] in ("zh", "en") and p["prompt"].strip()


def test_rejection_kinds_mean_what_they_say(built):
    answers_by_task = {(p["lang"], p["task"]): set() for p in built}
    for p in built:
        answers_by_task[(p["lang"], p["task"])].add(p["chosen"])
    for p in built:
        chosen, rejected, kind = p["chosen"], p["rejected"], p["rejection"]
        if kind == "shuffled":
            assert sorted(chosen.split("\n")) == sorted(rejected.split("\n"))
        elif kind == "truncated":
            assert chosen.startswith(rejected) and len(rejected) < len(chosen)
        elif kind == "wrong_author":
            assert rejected.endswith(chosen[-4:] if p["lang"] == "zh" else chosen.split(" says it")[1])
        elif kind == "wrong_play":
            assert rejected.startswith("It is from ")
        elif kind == "off_topic":
            others = set().union(*(a for (lang, task), a in answers_by_task.items()
                                   if lang == p["lang"] and task != p["task"]))
            assert rejected in others


def test_builders_are_deterministic():
    zh = list(islice(iter_records(CORPUS / "poetry_zh_heldout.jsonl"), 50))
    assert poetry_pairs(zh, seed=3, max_per_task=10) == poetry_pairs(zh, seed=3, max_per_task=10)
    assert len(poetry_pairs(zh, seed=3, max_per_task=10)) <= 30


def test_shipped_files_read_and_come_from_the_right_split():
    train, valid = read_pairs(SHIPPED / "pref_train.jsonl"), read_pairs(SHIPPED / "pref_valid.jsonl")
    assert len(train) > 1000 and len(valid) > 100
    heldout_titles = {r["title"] for r in iter_records(CORPUS / "poetry_zh_heldout.jsonl")}
    rows = [json.loads(line) for line in (SHIPPED / "pref_valid.jsonl").open(encoding="utf-8")]
    titled = [r["prompt"] for r in rows if r["task"] in ("author", "write")]
    assert titled and all(any(f"《{t}》" in q for t in heldout_titles) for q in titled)
    assert len(read_prompts(SHIPPED / "prompts_heldout.jsonl")) >= 50


def test_prompts_of_keeps_references():
    pairs = [{"lang": "en", "task": "who", "prompt": f"q{i}", "chosen": f"a{i}", "rejected": "x"} for i in range(9)]
    out = prompts_of(pairs, per_task=4)
    assert len(out) == 4 and all(o["reference"] == "a" + o["messages"][0]["content"][1:] for o in out)


# ---------------------------------------------------------------- readers
def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731


def test_read_pairs_format(tmp_path):
    path = write(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": [U("q1"), A("a1"), U("q2")], "chosen": [A("good")], "rejected": "bad"},
        {"chosen": [U("q"), A("good")], "rejected": [U("q"), A("bad")]},  # TRL conversational, no prompt
    ])
    assert read_pairs(path) == [PreferencePair([U("q")], "good", "bad"),
                                PreferencePair([U("q1"), A("a1"), U("q2")], "good", "bad"),
                                PreferencePair([U("q")], "good", "bad")]


def test_read_hh_format(tmp_path):
    convo = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    path = write(tmp_path / "hh.jsonl", [{"chosen": convo + " fine, thanks", "rejected": convo + " go away"}])
    assert read_pairs(path) == [PreferencePair([U("hi"), A("hello"), U("how are you?")], "fine, thanks", "go away")]
    assert read_pairs(path, "hh") == read_pairs(path)


@pytest.mark.parametrize("bad,message", [
    ('{"prompt": "q", "chosen": "a"', "invalid JSON"),
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string or a list"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt' must be a non-empty string"),
    ({"prompt": "q", "chosen": [U("x"), A("a")], "rejected": [U("y"), A("b")]}, "different messages"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "just text"}, "field 'rejected' is not"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"}, "differ before"),
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, "field 'chosen' has an empty reply"),
    ({"prompt": "q", "chosen": "a", "rejected": [A("")]}, "field 'rejected' has an empty reply"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant:"}, "'rejected' has an empty"),
    ({"prompt": "q", "chosen": "same", "rejected": [A("same")]}, "'chosen' and 'rejected' have the same reply"),
])
def test_malformed_records_name_file_and_line(tmp_path, bad, message):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"} if "Human" not in str(bad) else \
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}
    path = write(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(UserError, match=message) as e:
        read_pairs(path)
    assert f"{path}:2" in str(e.value)


def test_read_prompts_error_names_line(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"messages": [U("q")]}, {"prompt": "q2"}, {"text": "x"}])
    with pytest.raises(UserError, match=f"{path}:3"):
        read_prompts(path)


def test_read_prompts_drops_trailing_replies_and_needs_a_user_message(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"messages": [U("q1"), A("a1"), U("q2"), A("a2"), A("a3")]},
                                        {"prompt": "q", "chosen": "good", "rejected": "bad"}])
    assert read_prompts(path) == [[U("q1"), A("a1"), U("q2")], [U("q")]]
    system = {"role": "system", "content": "be brief"}
    path = write(tmp_path / "bad.jsonl", [{"prompt": "q"}, {"messages": [system, A("a reply")]}])
    with pytest.raises(UserError, match=f"{path}:2: field 'messages' has no user message") as e:
        read_prompts(path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- tokenization and batches
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_encode_side_layout_and_truncation(tok):
    prompt = render_prompt([U("To be, or not to be, that is the question. " * 3)], tok)
    ids, prompt_len = encode_side(prompt, "I am fine, thanks.", tok)
    assert ids[:prompt_len] == prompt and ids[-1] == tok.token_to_id(IM_END) and len(ids) > prompt_len + 1
    for max_len in (len(ids) - 2, prompt_len, 5, 2):
        cut, cut_prompt = encode_side(prompt, "I am fine, thanks.", tok, max_len)
        assert len(cut) == max_len and len(cut) - cut_prompt >= 1  # at least one reply token survives
        assert cut[0] == tok.bos_id and cut[cut_prompt] == ids[prompt_len]  # <s> kept, reply starts intact
    with pytest.raises(UserError):
        encode_side(prompt, "x", tok, 1)


def test_collate_pairs_shapes_and_masks(tok):
    ds = PreferenceDataset(records_to_pairs([{"prompt": "q", "chosen": "I am fine, thanks.", "rejected": "no"},
                                             {"prompt": "hello there", "chosen": "hi", "rejected": "go"}]), tok, 64)
    ids, mask, response = collate_pairs([ds[0], ds[1]], ds.pad_id)
    assert ids.shape == mask.shape == response.shape and ids.shape[:2] == (2, 2)
    for b in range(2):
        c, c_len, r, r_len = ds[b]
        for side, (seq, plen) in enumerate(((c, c_len), (r, r_len))):
            assert torch.equal(ids[b, side, : len(seq)], seq) and int(mask[b, side].sum()) == len(seq)
            assert response[b, side].nonzero().flatten().tolist() == list(range(plen, len(seq)))
            assert (ids[b, side, len(seq):] == ds.pad_id).all()


def test_loader_resumes_mid_epoch(tok):
    ds = PreferenceDataset(synthetic_pairs(30, 0), tok, 64)
    full = [b[0] for b in build_preference_loader(ds, 4, seed=1)]
    resumed = build_preference_loader(ds, 4, seed=1)
    resumed.sampler.load_state_dict({"epoch": 0, "consumed": 8})
    assert all(torch.equal(a, b) for a, b in zip(full[2:], [b[0] for b in resumed]))
