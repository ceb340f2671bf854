"""Corpus readers (every format, auto-detection, bad input) and the shipped-corpus builder's parsers."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from babyllama.build import corpus as bc
from babyllama.data.corpus import iter_documents, iter_records
from babyllama.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus"


def write_jsonl(path: Path, rows: list, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path


def docs(path, **kw) -> list[str]:
    return list(iter_documents(path, **kw))


def raises(match: str, path, **kw) -> str:
    with pytest.raises(UserError, match=match) as e:
        docs(path, **kw)
    return str(e.value)


# ======================================================================= formats
def test_txt_blank_line_separated(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("第一篇\n第二行\n\n\n  \nsecond doc\nline 2\n\nthird\n", encoding="utf-8")
    assert docs(p) == ["第一篇\n第二行", "second doc\nline 2", "third"]


def test_txt_without_blank_lines_is_one_document_per_line(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("床前明月光\n疑是地上霜\nlast", encoding="utf-8")
    assert docs(p) == ["床前明月光", "疑是地上霜", "last"]


def test_txt_gz_and_bom(tmp_path):
    p = tmp_path / "a.txt.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write("\ufeffone\n\ntwo\n")
    assert docs(p) == ["one", "two"]


def test_jsonl_minimind_and_custom_field(tmp_path):
    p = write_jsonl(tmp_path / "pretrain_hq.jsonl", [{"text": "<s>hello</s>"}, {"text": ""}, {"text": "好"}])
    assert docs(p) == ["<s>hello</s>", "好"]
    q = write_jsonl(tmp_path / "b.jsonl", [{"body": "x"}, {"body": None}, {"body": "y"}])
    assert docs(q, field="body") == ["x", "y"]


def test_c4_json_gz(tmp_path):
    rows = [{"text": f"doc {i}", "timestamp": "2019-04-25T12:57:54Z", "url": "https://x"} for i in range(3)]
    p = write_jsonl(tmp_path / "c4-train.00000-of-01024.json.gz", rows, gzip.open)
    assert docs(p) == ["doc 0", "doc 1", "doc 2"]
    assert docs(p, fmt="c4") == ["doc 0", "doc 1", "doc 2"]


def test_wikipedia_cn_json_array_auto_field(tmp_path):
    rows = [{"completion": "昭通机场是位于中国云南昭通的民用机场。", "source": "wikipedia.zh2307"},
            {"completion": "第二条\n两行", "source": "wikipedia.zh2307"}]
    p = tmp_path / "wikipedia-cn-20230720-filtered.json"
    p.write_text(json.dumps(rows, ensure_ascii=False, indent=4), encoding="utf-8")
    assert docs(p) == [r["completion"] for r in rows]
    assert docs(p, fmt="wikipedia-cn") == [r["completion"] for r in rows]
    assert docs(p, fmt="json", field="source") == ["wikipedia.zh2307"] * 2


def test_json_array_streams_across_chunks(tmp_path, monkeypatch):
    import babyllama.data.jsonl as jsonl
    monkeypatch.setattr(jsonl, "_CHUNK", 7)  # elements straddle many buffer refills
    rows = [{"text": f"doc {i} " + "字" * i, "n": [1, {"k": "]"}]} for i in range(40)]
    p = tmp_path / "a.json"
    p.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    assert docs(p) == [r["text"].strip() for r in rows]


def test_baidubaike(tmp_path):
    row = {"title": "红色食品", "summary": "红色食品是指...",
           "sections": [{"title": "简介", "content": "内容一"}, {"title": "营养", "content": "内容二"}]}
    p = write_jsonl(tmp_path / "563w_baidubaike.json", [row, dict(row, summary=None, sections=[])])
    assert docs(p) == ["红色食品\n红色食品是指...\n简介\n内容一\n营养\n内容二", "红色食品"]
    assert docs(p, fmt="baidubaike")[0].startswith("红色食品\n")


def test_parquet_row_batches(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "train-00000.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(2500)] + [None], "id": list(range(2501))}), p,
                   row_group_size=1000)
    out = docs(p)
    assert len(out) == 2500 and out[0] == "row 0" and out[-1] == "row 2499"
    q = tmp_path / "wiki.parquet"
    pq.write_table(pa.table({"completion": ["a", "b"]}), q)
    assert docs(q) == ["a", "b"]
    with pytest.raises(UserError, match=r"no column 'body' \(columns: text, id\)"):
        docs(p, fmt="parquet", field="body")


def test_directory_and_glob_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("from b\n", encoding="utf-8")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "from a"}])
    write_jsonl(tmp_path / "sub" / "c.json.gz", [{"text": "from c"}], gzip.open)
    (tmp_path / "README.md").write_text("not data", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("hidden", encoding="utf-8")
    assert docs(tmp_path) == ["from a", "from b", "from c"]
    assert docs(tmp_path / "*.txt") == ["from b"]
    assert docs(str(tmp_path / "**" / "*.gz")) == ["from c"]


def test_iter_records(tmp_path):
    rows = [{"play": "Hamlet", "speaker": "Hamlet", "lines": ["To be"], "text": "Hamlet:\nTo be"}]
    assert list(iter_records(write_jsonl(tmp_path / "s.jsonl", rows))) == rows
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"lines": []}])
    with pytest.raises(UserError, match=r"bad\.jsonl:1: record has no 'text' \(keys: lines\)"):
        list(iter_records(bad))


# ======================================================================= bad input
def test_missing_path(tmp_path):
    raises(r"nope\.jsonl: no such file", tmp_path / "nope.jsonl")
    raises(r"no file matches", tmp_path / "*.jsonl")


def test_empty_corpus(tmp_path):
    (tmp_path / "e.txt").write_text("\n\n  \n", encoding="utf-8")
    raises(r"e\.txt: no documents", tmp_path / "e.txt")
    write_jsonl(tmp_path / "e.jsonl", [{"text": ""}])
    raises(r"e\.jsonl: no documents", tmp_path / "e.jsonl")
    (tmp_path / "d").mkdir()
    raises(r"directory has no corpus files", tmp_path / "d")


def test_malformed_jsonl_names_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "broken\n', encoding="utf-8")
    msg = raises(r"m\.jsonl:3: invalid JSON", p)
    assert str(p) in msg
    q = tmp_path / "list.jsonl"
    q.write_text('{"text": "ok"}\n["a"]\n', encoding="utf-8")
    raises(r"list\.jsonl:2: expected a JSON object, got list", q)


def test_malformed_json_array_names_line(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n  {"completion": "ok"},\n  {"completion": oops}\n]\n', encoding="utf-8")
    raises(r"a\.json:3: invalid JSON", p)
    q = tmp_path / "open.json"
    q.write_text('[{"text": "a"},\n {"text": "b"}', encoding="utf-8")
    raises(r"open\.json:2: JSON array is not closed", q)


def test_missing_field_names_field_and_keys(tmp_path):
    p = write_jsonl(tmp_path / "f.jsonl", [{"text": "a"}, {"content2": "b", "id": 1}])
    raises(r"f\.jsonl:2: record has no field 'text' \(keys: content2, id\)", p)
    q = write_jsonl(tmp_path / "g.jsonl", [{"body": "a"}])
    raises(r"g\.jsonl:1: record has no field 'text' \(keys: body\).*--corpus-field", q)
    r = write_jsonl(tmp_path / "h.jsonl", [{"text": ["not", "a", "string"]}])
    raises(r"h\.jsonl:1: field 'text' is a list", r)


def test_unsupported_extension_and_format(tmp_path):
    p = tmp_path / "corpus.csv"
    p.write_text("a,b\n", encoding="utf-8")
    raises(r"corpus\.csv: unsupported extension", p)
    raises(r"unknown corpus format 'xml'", p, fmt="xml")


def test_not_utf8(tmp_path):
    p = tmp_path / "gbk.txt"
    p.write_bytes("中文\n\n文本".encode("gbk"))
    raises(r"gbk\.txt: not UTF-8", p)


# ======================================================================= build_corpus parsers
POEMS = [  # chinese-poetry's schema, traditional script
    {"author": "李白", "paragraphs": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"],
     "title": "靜夜思", "id": "x"},
    {"author": "王維", "paragraphs": ["紅豆生南國，春來發幾枝。", ""], "title": "相思"},  # an empty line
    {"author": "某", "paragraphs": ["□□□滿山，花落始知靜。"], "title": "殘"},  # garbled
    {"author": "某", "paragraphs": ["遠去更宜長（辛本作「良」）。"], "title": "注"},  # an editor's note
    {"author": "某", "paragraphs": ["一二三四五，六七八九十。"], "title": "送許□"},  # garbled title
    {"author": "蘇軾", "paragraphs": ["明月幾時有？把酒問青天。"], "rhythmic": "水調歌頭"},  # ci: no title
    {"author": "白居易", "paragraphs": ["離離原上草，一歲一枯榮。"], "title": "賦得古原草送別（一作草）"},
    {"author": "某", "paragraphs": ["城上高樓接大荒,海天愁思正茫茫?"], "title": "[安定]城樓"},
]


def test_poems_from_json_converts_filters_and_builds_text():
    out = bc.poems_from_json(POEMS, "唐")
    assert [p["title"] for p in out] == ["静夜思", "水调歌头", "赋得古原草送别", "安定城楼"]
    assert out[-1]["lines"] == ["城上高楼接大荒，海天愁思正茫茫？"]  # ASCII punctuation made full-width
    first = out[0]
    assert first == {"title": "静夜思", "author": "李白", "dynasty": "唐",
                     "lines": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"],
                     "text": "静夜思\n李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"}
    assert bc.poems_from_json([{"title": "关雎", "content": ["关关雎鸠，在河之洲。"]}], "先秦")[0]["author"] == "佚名"


def test_is_regular_and_dedupe():
    assert bc.is_regular(["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"])
    assert bc.is_regular(["朝辞白帝彩云间，千里江陵一日还。", "两岸猿声啼不住，轻舟已过万重山。"])
    assert not bc.is_regular(["明月几时有？把酒问青天。"])
    assert not bc.is_regular(["床前明月光，疑是地上霜。", "朝辞白帝彩云间，千里江陵一日还。"])
    poems = bc.poems_from_json(POEMS[:1] * 3, "唐")
    assert len(bc.dedupe(poems)) == 1


PLAY = """HAMLET, PRINCE OF DENMARK

PERSONS REPRESENTED.

Hamlet, Son to the former.
Bernardo, Officer.
Francisco, a Soldier
Two Clowns, Grave-diggers.

ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king!

[Enter Ghost,
armed.]

I'll cross it, though it blast me.

1 Clown.
Is she to be buried?

Ber.
He.

Fran.
Farewell. [Exit.]

Enter the Duke, attended

Ham.
Ay.
"""

CAPS_PLAY = """CAST

THESEUS, Duke of Athens.

ACT I

SCENE I. Athens.

THESEUS
Now, fair Hippolyta, our nuptial hour
   Draws on apace;

FIRST CITIZEN.

[Aside.]
We know't, we know't.

[Exit.]

Ay.
"""


def test_parse_play_title_case_abbreviations():
    speeches = bc.parse_play(PLAY, "Hamlet")
    assert [s["speaker"] for s in speeches] == ["Bernardo", "Francisco", "Bernardo", "1 Clown", "Bernardo",
                                                "Francisco", "Hamlet"]
    assert speeches[2]["lines"] == ["Long live the king!", "I'll cross it, though it blast me."]
    assert speeches[0] == {"play": "Hamlet", "speaker": "Bernardo", "lines": ["Who's there?"],
                           "text": "Bernardo:\nWho's there?"}
    assert speeches[5]["lines"] == ["Farewell."]  # the unbracketed `Enter the Duke` paragraph is dropped


def test_parse_play_caps_speakers_and_directions():
    speeches = bc.parse_play(CAPS_PLAY, "A Midsummer Night's Dream")
    assert [(s["speaker"], s["lines"]) for s in speeches] == [
        ("Theseus", ["Now, fair Hippolyta, our nuptial hour", "Draws on apace;"]),
        ("First Citizen", ["We know't, we know't.", "Ay."])]  # `Ay.` once: not a speaker here


def test_parse_poem_and_metadata():
    poems = bc.parse_poem("THE SONNETS\nby William Shakespeare\n\n\nI\n\nFrom fairest creatures\nThat thereby\n",
                          "Sonnets")
    assert poems == [{"title": "Sonnets", "lines": ["From fairest creatures", "That thereby"],
                      "text": "From fairest creatures\nThat thereby"}]
    assert bc.play_titles("[hamlet_gut]\ntitle = Hamlet\nnotes = 100%\n") == {"hamlet_gut": "Hamlet"}


def test_split_is_deterministic_and_about_five_percent():
    rows = [{"title": f"t{i}", "author": "a"} for i in range(4000)]
    train, heldout = bc.split(rows, bc.poem_key)
    assert 0.035 < len(heldout) / len(rows) < 0.065
    assert bc.split(rows, bc.poem_key) == (train, heldout)
    assert not {bc.poem_key(r) for r in train} & {bc.poem_key(r) for r in heldout}


def test_detag_and_fortunes():
    assert bc.detag("迈向/v  充满/v  Windows/nx  NT/nx  １２月/t") == "迈向充满Windows NT１２月"
    assert bc.parse_fortunes("\x1b[33m一\x1b[m\n%\n二\n%\n") == ["一", "二"]


# ======================================================================= the shipped corpus
@pytest.mark.parametrize("name", ["poetry_zh", "shakespeare_en"])
def test_shipped_files_parse_and_are_disjoint(name):
    train = list(iter_records(CORPUS / f"{name}_train.jsonl"))
    heldout = list(iter_records(CORPUS / f"{name}_heldout.jsonl"))
    assert len(train) > 1000 and len(heldout) > 50
    for r in train[:200] + heldout[:200]:
        assert r["lines"] and all(r["lines"]) and r["text"].endswith("\n".join(r["lines"]))
    if name == "poetry_zh":
        assert {"title", "author", "dynasty"} <= train[0].keys()
        keys = lambda rows: {(r["title"], r["author"]) for r in rows}  # noqa: E731  whole poems held out
        assert any("\u4e00" <= c <= "\u9fff" for c in train[0]["text"])
    else:
        assert {"play", "speaker"} <= train[0].keys() and train[0]["text"].isascii()
        keys = lambda rows: {r["text"] for r in rows if len(r["lines"]) >= 3}  # noqa: E731  "My lord?" recurs
    assert not keys(train) & keys(heldout)
    assert docs(CORPUS / f"{name}_train.jsonl")[0] == train[0]["text"]
