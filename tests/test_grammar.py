"""Constrained decoding (babyllama/model/grammar.py): a random tiny model, any seed and temperature, writes replies
that parse and validate under `json_object`, a JSON schema and the tool-call grammar, with SentencePiece, its HF
tokenizer.json and a byte-level BPE; special tokens and padded ids are never allowed, the stop id exactly when the
grammar may end, and the reply is completed within its budget. Bad schemas are one-line `UserError`s; `babyllama
chat --json-schema FILE` replies with valid JSON."""
from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import jsonschema
import pytest
import tokenizers
import torch
from test_chat import SAMPLE_TEXT, make_tokenizer

from babyllama.chat import session
from babyllama.data.tokenizer import IM_END, IM_START, Tokenizer
from babyllama.errors import UserError
from babyllama.model.config import preset
from babyllama.model.generate import Generator, SamplingConfig, sample_next
from babyllama.model.grammar import GrammarCompiler
from babyllama.model.llama import Llama
from babyllama.train.checkpoint import atomic_save

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "home": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
                 "required": ["city"]},
        "note": {"type": "string"},
    },
    "required": ["name", "age", "color", "tags", "home"],
}
FUNCTIONS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "days": {"type": "integer"}}, "required": ["city", "days"]},
    "search": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def byte_level_tokenizer(out):
    """A GPT-2-style byte-level BPE (HF `tokenizers`) with ChatML special tokens."""
    rng = random.Random(0)
    words = [" ".join("".join(rng.choices("abcdefghij{}[]\":,0123", k=rng.randint(2, 5))) for _ in range(8))
             for _ in range(200)]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", IM_START, IM_END],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SAMPLE_TEXT * 10 + words, trainer)
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    return Tokenizer.load(out / "tokenizer.json")


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    with warnings.catch_warnings():  # "little text for the vocabulary": enough here
        warnings.simplefilter("ignore")
        make_tokenizer(out)
    return out


@pytest.fixture(scope="module", params=["sentencepiece", "hf-from-sentencepiece", "hf-byte-level"])
def tok(request, sp_dir, tmp_path_factory):
    if request.param == "sentencepiece":
        return Tokenizer.load(sp_dir / "tokenizer.model")
    if request.param == "hf-from-sentencepiece":
        return Tokenizer.load(sp_dir / "tokenizer.json")
    return byte_level_tokenizer(tmp_path_factory.mktemp("bpe") / "tokenizer")


@pytest.fixture(scope="module")
def model(tok):
    """Random weights, an embedding 9 rows larger than the tokenizer (ids the model does not mask itself)."""
    torch.manual_seed(0)
    return Llama(preset("tiny", vocab_size=tok.vocab_size + 9, max_seq_len=256, tie_embeddings=False)).eval()


def constrained_reply(model, tok, grammar, seed: int, temperature: float, max_new: int) -> tuple[str, bool]:
    """Sample under `grammar` as a server row would (mask, sample, advance), checking the mask at every step;
    returns the text and whether it ended with the stop id."""
    stop = tok.token_to_id(IM_END)
    specials = [i for i in tok.special_tokens.values() if i != stop]
    cfg = SamplingConfig(max_new_tokens=max_new, temperature=temperature, top_k=0, top_p=1.0)
    constraint = grammar.constraint([stop], max_tokens=max_new)
    rng = torch.Generator().manual_seed(seed)

    def sample(logits):
        allowed = constraint.allowed()
        assert not allowed[specials].any()  # never a special token inside the text
        assert bool(allowed[stop]) == constraint.accepting  # the stop id exactly when the grammar may end
        assert allowed[stop] or not constraint.done
        constraint.mask(logits[0])
        assert torch.isinf(logits[0, tok.vocab_size:]).all()  # the padded rows
        assert torch.equal(torch.isfinite(logits[0, :tok.vocab_size]), allowed)
        picked = sample_next(logits, cfg, rng)
        constraint.advance(int(picked[0]))
        return picked

    prompt = [tok.bos_id, tok.token_to_id(IM_START), *tok.encode("user\nJSON please"), stop]
    ids = []
    for step in Generator(model).generate_batch([prompt], cfg, stop_ids=[stop], sample=sample):
        ids.append(int(step[0]))
        if ids[-1] == stop:
            break
    return tok.decode(ids[:-1] if ids[-1] == stop else ids), ids[-1] == stop


@pytest.mark.parametrize("kind", ["json_object", "schema", "tool_call"])
def test_every_constrained_reply_parses_and_validates(model, tok, kind):
    compiler = GrammarCompiler.of(tok)
    grammar = {"json_object": compiler.json_object, "schema": lambda: compiler.json_schema(SCHEMA),
               "tool_call": lambda: compiler.tool_call(FUNCTIONS)}[kind]()
    for seed, temperature in [(0, 0.0), (1, 1.0), (2, 1.0), (3, 3.0)]:
        # short budgets, so that endings are forced too (the shortest schema reply takes 64 of these tokens)
        max_new = (24, 40, 64)[seed % 3] + (64 if kind != "json_object" else 0)
        text, stopped = constrained_reply(model, tok, grammar, seed, temperature, max_new)
        assert stopped, text  # the stop id came within the budget
        if kind == "tool_call":
            assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>"), text
            call = json.loads(text[len("<tool_call>\n"):-len("\n</tool_call>")])
            assert set(call) == {"name", "arguments"} and call["name"] in FUNCTIONS, text
            jsonschema.validate(call["arguments"], FUNCTIONS[call["name"]])
        else:
            jsonschema.validate(json.loads(text), SCHEMA if kind == "schema" else {"type": "object"})
        assert "\ufffd" not in text  # whole UTF-8 characters only


def test_a_budget_too_short_for_the_text_still_ends_in_valid_json(model, tok):
    grammar = GrammarCompiler.of(tok).json_schema({"type": "object", "properties": {"text": {"type": "string"}},
                                                   "required": ["text"]})
    for seed in range(3):  # hot sampling writes long strings: the forced completion closes them in time
        text, stopped = constrained_reply(model, tok, grammar, seed, 4.0, 30)
        assert stopped and isinstance(json.loads(text)["text"], str), text


ITEMS = {"type": "object", "required": ["a", "d", "b"], "properties": {
    "a": {"type": "array", "minItems": 2, "items": {"type": "object", "required": ["x", "y"], "properties": {
        "x": {"type": "number"}, "y": {"type": "string", "pattern": "^a*b$"}}}},
    "d": {"type": "string", "format": "date-time"},
    "b": {"anyOf": [{"type": "integer", "minimum": 10}, {"type": "boolean"}]}}}


def test_logits_that_favour_json_punctuation_still_end_valid_within_the_budget(tok):
    """Random logits with a bias for a few tokens (punctuation, digits, escapes): numbers with exponents, escapes,
    commas that open another array item of a required object near the end of the budget."""
    grammar = GrammarCompiler.of(tok).json_schema(ITEMS)
    stop = tok.token_to_id(IM_END)
    for seed in range(12):
        rng, pick = torch.Generator().manual_seed(seed), random.Random(seed)
        bias = torch.zeros(tok.vocab_size)
        bias[[tok.encode(c)[-1] for c in pick.sample('\\[{"0123456789.e-:,}ab', 6)]] = pick.choice([3.0, 20.0])
        max_new = pick.choice([100, 140, 200])
        constraint, ids = grammar.constraint([stop], max_tokens=max_new), []
        while not ids or ids[-1] != stop:
            assert len(ids) < max_new
            logits = torch.randn(1, tok.vocab_size, generator=rng) + bias
            constraint.mask(logits[0])
            ids.append(int(sample_next(logits, SamplingConfig(temperature=pick.choice([0.0, 1.0, 2.0])), rng)[0]))
            constraint.advance(ids[-1])
        jsonschema.validate(json.loads(tok.decode(ids[:-1])), ITEMS)


def test_a_comma_opening_one_more_large_item_near_the_end_of_the_budget_is_refused(sp_dir):
    """An array of 4-integer objects and logits that always prefer `,` and `{`: near the end of the budget a
    comma would open an item longer than the slack; it is refused, and every reply ends valid."""
    tok = Tokenizer.load(sp_dir / "tokenizer.model")
    item = {"type": "object", "additionalProperties": False, "required": list("pqrs"),
            "properties": {k: {"type": "integer"} for k in "pqrs"}}
    schema = {"type": "object", "required": ["list"], "properties": {"list": {"type": "array", "items": item}}}
    grammar, stop = GrammarCompiler.of(tok).json_schema(schema), tok.token_to_id(IM_END)
    bias = torch.tensor([50.0 * (b"," in piece) + 40.0 * (b"{" in piece) for piece in tok.token_bytes])
    for seed in range(40):
        rng, max_new = torch.Generator().manual_seed(seed), 60 + 7 * seed
        constraint, ids = grammar.constraint([stop], max_tokens=max_new), []
        while not ids or ids[-1] != stop:
            assert len(ids) < max_new
            logits = torch.randn(tok.vocab_size, generator=rng) + bias
            constraint.mask(logits)
            ids.append(int(logits.argmax()))
            constraint.advance(ids[-1])
        jsonschema.validate(json.loads(tok.decode(ids[:-1])), schema)


def test_the_stop_id_is_the_callers_and_only_at_the_end(tok):
    grammar = GrammarCompiler.of(tok).json_schema({"enum": ["yes"]})
    eos = tok.eos_id
    constraint = grammar.constraint([eos])
    for token in tok.encode('"yes"'):
        assert not constraint.allowed()[eos]
        constraint.advance(token)
    allowed = constraint.allowed()
    assert constraint.done and allowed.nonzero().flatten().tolist() == [eos]  # plain completion: </s> ends it
    logits = torch.zeros(tok.vocab_size + 3)
    constraint.mask(logits)
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [eos]
    with pytest.raises(ValueError, match="not allowed"):
        grammar.constraint([eos]).advance(tok.encode("no")[0])


@pytest.mark.parametrize("schema, says", [
    ([{"type": "string"}], "a JSON schema must be a JSON object, got an array"),
    ({"type": "strin"}, "Invalid type: strin"),
    ({"type": "string", "maxLength": -1}, "maxLength"),
    ({"not": {"type": "string"}}, 'Unimplemented keys: ["not"]'),
    ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
    ({"properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}, "/$defs/missing"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum (5) is greater than maximum (1)"),
])
def test_a_bad_schema_is_one_line_naming_its_source(sp_dir, schema, says):
    compiler = GrammarCompiler.of(Tokenizer.load(sp_dir))
    with pytest.raises(UserError) as e:
        compiler.json_schema(schema, source="response_format")
    assert str(e.value).startswith("response_format: ") and says in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="^tools: the parameters of 'f': Invalid type: nope$"):
        compiler.tool_call({"f": {"type": "nope"}})
    with pytest.raises(UserError, match="^grammar: "):
        compiler.lark("start: missing_rule")


def test_the_compiler_is_built_once_per_tokenizer(sp_dir):
    assert GrammarCompiler.of(Tokenizer.load(sp_dir)) is GrammarCompiler.of(Tokenizer.load(sp_dir))


@pytest.fixture
def chat_ckpt(sp_dir, tmp_path):
    tok = Tokenizer.load(sp_dir)
    torch.manual_seed(0)
    model = Llama(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256, tie_embeddings=False))
    ckpt = tmp_path / "step_00000001.pt"
    atomic_save({"model": model.state_dict(), "model_config": model.config.to_dict()}, ckpt)
    return ckpt


def test_chat_json_schema_replies_are_valid_json(sp_dir, chat_ckpt, tmp_path, monkeypatch, capsys):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\nWho are you?\n/reset\nJSON, please\n"))
    session.main(argv=["--ckpt", str(chat_ckpt), "--tokenizer", str(sp_dir), "--device", "cpu", "--dtype", "fp32",
                       "--json-schema", str(schema_file), "--temperature", "1.5", "--max-new-tokens", "100"])
    replies = [line[len("assistant> "):] for line in capsys.readouterr().out.splitlines()
               if line.startswith("assistant> ")]
    assert len(replies) == 3
    for reply in replies:
        jsonschema.validate(json.loads(reply), SCHEMA)
    # a budget shorter than the shortest valid reply (64 of this tokenizer's tokens): said, not hidden
    session.main(argv=["--ckpt", str(chat_ckpt), "--tokenizer", str(sp_dir), "--device", "cpu", "--dtype", "fp32",
                       "--json-schema", str(schema_file), "--max-new-tokens", "20", "--prompt", "hi"])
    assert "note: the reply's 20-token budget ended before its JSON did" in capsys.readouterr().err


def test_chat_refuses_a_bad_schema_file_before_loading_the_model(sp_dir, tmp_path):
    missing_ckpt = tmp_path / "never_read.pt"
    common = ["--ckpt", str(missing_ckpt), "--tokenizer", str(sp_dir), "--device", "cpu", "--json-schema"]
    not_json, bad = tmp_path / "not.json", tmp_path / "bad.json"
    not_json.write_text('{"type": "object",\n oops}')
    bad.write_text('{"type": "object", "properties": {"a": {"type": "strng"}}}')
    for path, says in [(not_json, f"{not_json}:2: not valid JSON"), (bad, f"{bad}: Invalid type: strng"),
                       (tmp_path / "absent.json", f"{tmp_path / 'absent.json'}: cannot read the JSON schema")]:
        with pytest.raises(UserError) as e:
            session.main(argv=[*common, str(path), "--prompt", "hi"])
        assert str(e.value).startswith(says) and "\n" not in str(e.value)


def test_the_engine_benchmark_smoke_walks_valid_json(tmp_path):
    """bench/grammar_engines.py --smoke (xgrammar and outlines-core are not dependencies: left out here)."""
    engines = ["none", "llguidance", "ours", "ours+budget"]
    out = subprocess.run([sys.executable, "-m", "babyllama", "bench", "grammar_engines", "--smoke", "--engines",
                          ",".join(engines), "--dest", str(tmp_path / "rows.jsonl")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["engine"] for r in rows] == ["baby decode step", *engines]
    assert all(r["token_us"] > 0 for r in rows) and all(r["valid"] == "3/3" for r in rows[2:])
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == len(rows)
