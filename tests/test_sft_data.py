"""SFT data: format readers and their errors, builders, dataset/collate, bucketed batching, sampler resume, MC items."""
import json
import random

import pytest
import torch
from test_chat import make_tokenizer
from tiny import tiny_config

from babyllama.build import sft as build_sft
from babyllama.build.builders import (
    EN_FOLLOW_PLAY,
    EN_FOLLOW_WHO,
    EN_NEXT,
    ZH_AUTHOR,
    ZH_FOLLOW_AUTHOR,
    ZH_NEXT,
    build_choice_items,
    poetry_dialogues,
    poetry_instructions,
    read_chatterbot,
    self_cognition,
    shakespeare_dialogues,
    shakespeare_instructions,
    system_prompts,
)
from babyllama.data.chat_template import IGNORE_INDEX, encode_chat
from babyllama.data.sft import (
    BucketBatchSampler,
    SFTDataset,
    build_sft_loader,
    collate_sft,
    padding_fraction,
    read_conversations,
)
from babyllama.errors import UserError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


U, A, S = "user", "assistant", "system"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# ---------------------------------------------------------------- readers
READER_CASES = {
    "alpaca": ({"instruction": "Translate", "input": "你好", "output": "Hello", "system": "Be brief.",
                "history": [["hi", "hello!"]]},
               msgs((S, "Be brief."), (U, "hi"), (A, "hello!"), (U, "Translate\n你好"), (A, "Hello"))),
    "sharegpt": ({"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q"},
                                    {"from": "gpt", "value": "a"}]},
                 msgs((S, "sys"), (U, "q"), (A, "a"))),
    "openai": ({"messages": [{"role": "user", "content": "q\u2028"}, {"role": "assistant", "content": "a"}], "id": 7},
               msgs((U, "q\u2028"), (A, "a"))),  # U+2028 is legal inside a JSON line
    "belle": ({"id": "1", "conversations": [{"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}]},
              msgs((U, "q"), (A, "a"))),
    "firefly": ({"conversation_id": 1, "category": "Brainstorming",
                 "conversation": [{"human": "q1", "assistant": "a1"}, {"human": "q2", "assistant": "a2"}]},
                msgs((U, "q1"), (A, "a1"), (U, "q2"), (A, "a2"))),
    "prompt": ({"skill": "add", "lang": "en", "prompt": "2 + 3 = ?", "answer": "5", "check": "exact"},  # data/skills
               msgs((U, "2 + 3 = ?"), (A, "5"))),
}


@pytest.mark.parametrize("fmt", sorted(READER_CASES))
def test_reader_each_format(tmp_path, fmt):
    record, expected = READER_CASES[fmt]
    path = write_jsonl(tmp_path / "d.jsonl", [record, record])
    assert read_conversations(path, fmt) == [expected, expected]
    assert read_conversations(path) == [expected, expected]  # auto-detected from the keys


def test_reader_belle_instruction_and_firefly_kind(tmp_path):
    belle = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "写诗", "input": "", "output": "春眠不觉晓"}])
    assert read_conversations(belle, "belle") == [msgs((U, "写诗"), (A, "春眠不觉晓"))]
    firefly = write_jsonl(tmp_path / "f.jsonl", [{"kind": "Poetry", "input": "写诗", "target": "春眠不觉晓"}])
    assert read_conversations(firefly) == [msgs((U, "写诗"), (A, "春眠不觉晓"))]


def test_reader_json_array(tmp_path):
    record, expected = READER_CASES["openai"]
    path = tmp_path / "d.json"
    path.write_text(json.dumps([record, record], indent=2, ensure_ascii=False), encoding="utf-8-sig")  # with a BOM
    assert read_conversations(path) == [expected, expected]


@pytest.mark.parametrize("bad, field", [
    ({"instruction": "x"}, "'output'"),
    ({"instruction": "x", "output": 5}, "'output'"),
    ({"instruction": "x", "output": "  "}, "'output'"),
    ({"instruction": "x", "output": "y", "history": [["only one"]]}, "history[0]"),
    ({"instruction": "x", "output": "y", "history": [["q", " "]]}, "history[0]"),
])
def test_bad_alpaca_line_names_path_line_and_field(tmp_path, bad, field):
    good = READER_CASES["alpaca"][0]
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, bad])
    with pytest.raises(UserError) as e:
        read_conversations(path)
    assert f"{path}:3" in str(e.value) and field in str(e.value)


@pytest.mark.parametrize("bad, field", [
    ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "no assistant"),
    ({"conversations": "text"}, "'conversations'"),
    ({"conversations": [{"from": "human"}]}, "'value'"),
])
def test_bad_sharegpt_line(tmp_path, bad, field):
    good = READER_CASES["sharegpt"][0]
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad])
    with pytest.raises(UserError) as e:
        read_conversations(path)
    assert f"{path}:2" in str(e.value) and field in str(e.value)


def test_bad_openai_firefly_json_and_unknown_format(tmp_path):
    cases = [
        ([READER_CASES["openai"][0], {"messages": [{"role": "tool", "content": "x"}]}], ":2", "role"),
        ([READER_CASES["firefly"][0], {"conversation": [{"human": "q"}]}], ":2", "'assistant'"),
        ([{"text": "hello"}], ":1", "cannot tell"),
        ([READER_CASES["prompt"][0], {"prompt": "2 + 2 = ?", "answer": 4}], ":2", "'answer' must be a string"),
        ([READER_CASES["prompt"][0], {"prompt": " ", "answer": "4"}], ":2", "'prompt' is empty"),
    ]
    for records, line, field in cases:
        path = write_jsonl(tmp_path / "d.jsonl", records)
        with pytest.raises(UserError, match=field) as e:
            read_conversations(path)
        assert f"{path}{line}" in str(e.value)
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(READER_CASES["openai"][0]) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(UserError, match="invalid JSON") as e:
        read_conversations(path)
    assert f"{path}:3" in str(e.value)
    path = write_jsonl(tmp_path / "d.jsonl", [READER_CASES["openai"][0], {"messages": msgs((U, "q"), (A, " "))}])
    with pytest.raises(UserError, match=r"d\.jsonl:2: message 1 \(assistant\) has an empty 'content'"):
        read_conversations(path)  # refused as alpaca refuses an empty 'output'
    array = tmp_path / "a.json"
    array.write_text("[\n" + json.dumps(READER_CASES["openai"][0]) + ",\n" + json.dumps({"messages": []}) + "\n]")
    with pytest.raises(UserError, match="'messages'") as e:
        read_conversations(array)
    assert f"{array}:3" in str(e.value)


def test_later_record_error_names_the_detected_format(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [READER_CASES["alpaca"][0], READER_CASES["sharegpt"][0]])
    with pytest.raises(UserError, match=r"mixed\.jsonl:2: missing field 'instruction' \(read as 'alpaca', the "
                                        r"format detected from the first record"):
        read_conversations(path)
    with pytest.raises(UserError) as e:  # a format given by the user needs no such note
        read_conversations(path, "alpaca")
    assert "detected" not in str(e.value)


# ---------------------------------------------------------------- builders
def test_read_chatterbot(tmp_path):
    (tmp_path / "food.yml").write_text(
        "categories:\n- food\nconversations:\n- - 你喜欢吃什么\n  - 我喜欢电\n  - 真的吗\n"
        "- - 你是谁?\n  - 一个机器人\n- - 1\n  - 2\n", encoding="utf-8")
    (tmp_path / "botprofile.yml").write_text("conversations:\n- - 你几岁\n  - 我还年轻\n", encoding="utf-8")
    assert read_chatterbot(tmp_path) == [msgs((U, "你喜欢吃什么"), (A, "我喜欢电")), msgs((U, "1"), (A, "2"))]


POEMS = [{"title": f"诗{k}", "author": f"诗人{k % 3}", "dynasty": "唐",
          "lines": [f"第{k}首第{i}句，" + "春风" * (1 + (k + i) % 3) + "。" for i in range(4)]} for k in range(40)]
POEMS.append({"title": "诗0", "author": "另一位诗人", "dynasty": "宋", "lines": ["同题异人，不问作者。"]})
SPEECHES = [{"play": ["Hamlet", "Macbeth"][k % 2], "speaker": f"LORD NUMBER {k}",
             "lines": [f"This is speech {k}, line {i}, and " + "so on " * (1 + (k * i) % 4) for i in range(3)]}
            for k in range(40)]


def test_poetry_and_shakespeare_instructions():
    zh = poetry_instructions(POEMS, seed=0)
    prompts = [c[0]["content"] for c in zh]
    assert ZH_AUTHOR.format(title="诗1") in prompts and ZH_AUTHOR.format(title="诗0") not in prompts  # ambiguous
    nxt = [c for c in zh if c[0]["content"].endswith("的下一句是什么？")]
    lines = {line: p["lines"] for p in POEMS for line in p["lines"]}
    for q, a in ((c[0]["content"][1:-9], c[1]["content"]) for c in nxt):
        assert lines[q][lines[q].index(q) + 1] == a
    en = shakespeare_instructions(SPEECHES, seed=0, max_per_task=10)
    assert len(en) == 40
    assert any(c[0]["content"].startswith("Continue this speech by Lord Number") for c in en)
    assert en == shakespeare_instructions(SPEECHES, seed=0, max_per_task=10)
    assert all(c[1]["role"] == A and c[1]["content"] for c in zh + en)


def test_dialogues_refer_back_to_their_first_answer():
    zh = poetry_dialogues(POEMS, seed=0)
    assert zh == poetry_dialogues(POEMS, seed=0) and len(zh) == 39  # "诗0" has two authors
    by_title = {p["title"]: p for p in POEMS[1:40]}
    for conv in zh:
        poem = by_title[conv[0]["content"][len("写一首题为《"):-len("》的诗")]]
        assert conv[1]["content"] == "\n".join(poem["lines"])
        assert conv[2]["content"] in ZH_FOLLOW_AUTHOR and poem["author"] in conv[3]["content"]
        assert len(conv) == 4 or conv[5]["content"] in poem["lines"]
    en = shakespeare_dialogues(SPEECHES, seed=0, max_dialogues=10)
    assert len(en) == 10 and {len(c) for c in en} == {4, 6}
    assert all(c[2]["content"] in EN_FOLLOW_WHO and c[3]["content"].startswith("Lord Number") for c in en)
    assert all(c[4]["content"] in EN_FOLLOW_PLAY and c[5]["content"] in ("It is from Hamlet.", "It is from Macbeth.")
               for c in en if len(c) == 6)


def test_system_prompts_per_language_use_name_and_author():
    prompts = system_prompts(name="Xiaobai", author="Alice")
    assert set(prompts) == {"zh", "en"} and all(len(p) >= 3 for p in prompts.values())
    assert any("Xiaobai" in p and "Alice" in p for p in prompts["zh"])
    assert not any("{" in p for p in prompts["zh"] + prompts["en"])


def test_self_cognition_uses_name_and_author():
    sets = self_cognition(name="Xiaobai", author="Alice")
    assert sets["zh"] and sets["en"]
    assert all("Xiaobai" in c[1]["content"] or "Alice" in c[1]["content"] for c in sets["zh"] + sets["en"])


# ---------------------------------------------------------------- dataset and batching
def conversations(n, seed=0):
    rng = random.Random(seed)
    return [msgs((U, "你是谁？" * rng.randint(1, 3)), (A, "To be, or not to be. " * rng.randint(1, 12)))
            for _ in range(n)]


def test_dataset_and_collate_shift(tok):
    convs = conversations(12) + [msgs((S, "You are a helpful assistant. " * 50), (U, "q"), (A, "a"))]
    ds = SFTDataset(convs, tok, max_len=96)
    assert len(ds) == 12 and ds.dropped == 1
    with pytest.raises(UserError, match=r"^train\.jsonl: no SFT sample fits max_len=96 \(1 dropped"):
        SFTDataset(convs[-1:], tok, max_len=96, source="train.jsonl")
    samples = [ds[i] for i in range(4)]
    x, y = collate_sft(samples, tok.pad_id)
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (4, max(len(s[0]) for s in samples) - 1)
    for b, (ids, labels) in enumerate(samples):
        n = len(ids) - 1
        assert torch.equal(x[b, :n], ids[:-1]) and torch.equal(y[b, :n], labels[1:])
        assert (x[b, n:] == tok.pad_id).all() and (y[b, n:] == IGNORE_INDEX).all()
        assert (ids.tolist(), labels.tolist()) == encode_chat(convs[b], tok, 96)


def test_bucketing_pads_less_than_random_batching(tok):
    ds = SFTDataset(conversations(400), tok, max_len=256)
    bucketed = padding_fraction(ds.lengths, 16, bucketed=True)
    plain = padding_fraction(ds.lengths, 16, bucketed=False)
    assert bucketed < 0.1 < plain and bucketed < plain / 3
    loader = build_sft_loader(ds, 16, seed=3)
    rows = sum(x.shape[0] for x, _ in loader)
    assert rows == len(ds) and len(loader) == 25


def test_sampler_reproducible_resumable_and_sharded():
    lengths = [random.Random(k).randint(5, 200) for k in range(103)]
    a = BucketBatchSampler(lengths, 8, seed=1, bucket_batches=4)
    first = list(a)
    assert first == list(BucketBatchSampler(lengths, 8, seed=1, bucket_batches=4))
    assert list(a) != first and a.state_dict() == {"epoch": 2, "consumed": 0}  # passes advance the epoch
    assert sorted(i for b in first for i in b) == list(range(103))

    s = BucketBatchSampler(lengths, 8, seed=1, bucket_batches=4)
    s.set_epoch(5)
    it = iter(s)
    head = [next(it) for _ in range(3)]
    state = s.state_dict()
    assert state == {"epoch": 5, "consumed": 24}
    resumed = BucketBatchSampler(lengths, 8, seed=1, bucket_batches=4)
    resumed.load_state_dict(state)
    fresh = BucketBatchSampler(lengths, 8, seed=1, bucket_batches=4)
    fresh.set_epoch(5)
    assert head + list(resumed) == list(fresh)

    ranks = [BucketBatchSampler(lengths, 8, seed=1, rank=r, world_size=3) for r in range(3)]
    shards = [list(r) for r in ranks]
    assert len({len(s) for s in shards}) == 1
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen))


def test_loader_batches_feed_the_model(tok):
    from babyllama.model.llama import Llama
    ds = SFTDataset(conversations(8), tok, max_len=64)
    vocab = max(int(ds[i][0].max()) for i in range(len(ds))) + 1
    torch.manual_seed(0)
    model = Llama(tiny_config(vocab, n_layers=1))
    x, y = next(iter(build_sft_loader(ds, 4)))
    assert torch.isfinite(model(x, y).loss)


# ---------------------------------------------------------------- held-out multiple choice
def test_choice_items_from_heldout_only():
    held = [{"title": f"H{k}", "author": "a", "lines": [f"留{k}句{i}，" + "山" * ((k + i) % 5) for i in range(4)]}
            for k in range(30)]
    items = build_choice_items(held, "zh", seed=0)
    assert items == build_choice_items(held, "zh", seed=0) and len(items) == 30
    held_lines = {line for r in held for line in r["lines"]}
    nexts = {a: r["lines"][i + 1] for r in held for i, a in enumerate(r["lines"][:-1])}
    for item in items:
        (msg,) = item["messages"]
        line = msg["content"][1:-len("”的下一句是什么？")]
        assert msg == {"role": "user", "content": ZH_NEXT.format(line=line)}
        assert len(item["choices"]) == len(set(item["choices"])) == 4 and set(item["choices"]) <= held_lines
        assert item["choices"][item["answer"]] == nexts[line]
        wrong = [c for i, c in enumerate(item["choices"]) if i != item["answer"]]
        own = next(r["lines"] for r in held if line in r["lines"])
        assert not set(wrong) & set(own)  # distractors come from other poems
        assert all(abs(len(c) - len(nexts[line])) <= 2 for c in wrong)  # of similar length
    counts = [sum(item["answer"] == p for item in items) for p in range(4)]
    assert min(counts) >= 7


def test_choice_items_en():
    items = build_choice_items(SPEECHES, "en", seed=1, max_items=12)
    assert len(items) == 12
    assert all(it["messages"][0]["content"].startswith(EN_NEXT.split("{")[0]) for it in items)
    assert {it["answer"] for it in items} == {0, 1, 2, 3}
    with pytest.raises(UserError):
        build_choice_items(SPEECHES, "fr")


# ---------------------------------------------------------------- build script
def test_build_script_is_deterministic_and_readable(tmp_path):
    corpus, bot = tmp_path / "corpus", tmp_path / "bot"
    for sub in (corpus, bot / "chinese", bot / "english"):
        sub.mkdir(parents=True)
    (bot / "chinese" / "food.yml").write_text("conversations:\n- - 你喜欢吃什么\n  - 我喜欢电\n", encoding="utf-8")
    (bot / "english" / "food.yml").write_text("conversations:\n- - Do you eat?\n  - I eat power.\n", encoding="utf-8")
    for name, records in (("poetry_zh", POEMS), ("shakespeare_en", SPEECHES)):
        rows = [{**r, "text": "\n".join(r["lines"])} for r in records]
        write_jsonl(corpus / f"{name}_train.jsonl", rows[:30])
        write_jsonl(corpus / f"{name}_heldout.jsonl", rows[30:])
    outputs = []
    for out in (tmp_path / "a", tmp_path / "b"):
        build_sft.main(["--corpus-dir", str(corpus), "--chatterbot-dir", str(bot), "--dest", str(out),
                        "--valid-size", "5", "--choice-items", "4"])
        outputs.append([(out / f).read_bytes() for f in ("sft_train.jsonl", "sft_valid.jsonl", "choice_eval.jsonl")])
    assert outputs[0] == outputs[1]
    train = read_conversations(tmp_path / "a" / "sft_train.jsonl")
    assert len(train) + 5 == 2 + sum(len(build(records[:30])) for build, records in (
        (poetry_instructions, POEMS), (poetry_dialogues, POEMS), (shakespeare_instructions, SPEECHES),
        (shakespeare_dialogues, SPEECHES))) + 3 * 56  # the caps are far above these small files
    with_system = sum(c[0]["role"] == S for c in train)
    assert 0.1 * len(train) < with_system < 0.3 * len(train)  # --system-share 0.2
    assert sum(sum(m["role"] == A for m in c) > 1 for c in train) >= 50
    held = {line for r in POEMS[30:] + SPEECHES[30:] for line in r["lines"]}
    for row in map(json.loads, (tmp_path / "a" / "choice_eval.jsonl").read_text(encoding="utf-8").splitlines()):
        assert set(row["choices"]) <= held
