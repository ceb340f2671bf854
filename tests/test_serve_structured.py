"""Structured output and tools from `babyllama serve`, with the official `openai` client: `chat.completions.parse`
with a pydantic model, `response_format` json_object, required and named tool calls (streamed or not) and the round
trip of a call's result, all from a random tiny model, whose every constrained reply must still parse and
validate."""
from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field
from serve_fixtures import server, tiny_run

from babyllama.data.chat_template import render_prompt
from babyllama.data.tokenizer import Tokenizer
from babyllama.serve.tools import ToolUse, held_back, parse_calls, render_messages

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                                                 "maximum": 14}},
                                       "required": ["zone"]}}}


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=150)
    mood: Literal["happy", "sad"]
    tags: list[str] = Field(max_length=3)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("structured") / "out"
    tiny_run(out, context=2048)  # room for the tools' instructions in the system message
    return out


@pytest.fixture(scope="module")
def url(run):
    with server(run) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(content: str = "Who is there?") -> list[dict]:
    return [{"role": "user", "content": content}]


def test_parse_with_a_pydantic_model(client):
    for seed, temperature in [(0, 0.0), (1, 1.0), (2, 1.5), (3, 2.0)]:
        reply = client.chat.completions.parse(model="sft", messages=ask(), response_format=Person, max_tokens=120,
                                              seed=seed, temperature=temperature)
        person = reply.choices[0].message.parsed  # the client validated it with pydantic
        assert isinstance(person, Person) and reply.choices[0].finish_reason == "stop", reply


def test_json_object_streamed_or_not(client):
    for seed in range(3):
        kw = dict(model="sft", messages=ask("JSON please"), response_format={"type": "json_object"}, max_tokens=60,
                  seed=seed)
        text = client.chat.completions.create(**kw).choices[0].message.content
        assert isinstance(json.loads(text), dict)
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                  if c.choices]
        assert "".join(pieces) == text


def test_a_short_budget_still_closes_the_json(client):
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    reply = client.chat.completions.create(
        model="sft", messages=ask(), max_tokens=16, seed=5,
        response_format={"type": "json_schema", "json_schema": {"name": "story", "schema": schema}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_required_and_named_calls_validate_and_round_trip(client, url):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for seed, choice in [(0, "required"), (1, "required"), (2, {"type": "function", "function": {"name": "get_time"}})]:
        reply = client.chat.completions.create(model="sft", messages=ask("Weather in Paris?"), tools=[WEATHER, CLOCK],
                                               tool_choice=choice, max_tokens=200, seed=seed, temperature=1.0)
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1, reply
        call = message.tool_calls[0]
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        if isinstance(choice, dict):
            assert call.function.name == "get_time"
        # the result goes back as a tool message; the conversation goes on
        history = [*ask("Weather in Paris?"), message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
        after = client.chat.completions.create(model="sft", messages=history, tools=[WEATHER, CLOCK], max_tokens=5,
                                               temperature=0)
        assert after.choices[0].finish_reason in ("stop", "length")
    streamed = list(client.chat.completions.create(model="sft", messages=ask(), tools=[WEATHER], stream=True,
                                                   tool_choice="required", max_tokens=200, seed=3))
    deltas = [d for c in streamed if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    jsonschema.validate(json.loads(deltas[0].function.arguments), schemas["get_weather"])
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "tool_calls"


def test_tools_are_in_the_prompt_and_none_leaves_them_out(client, run):
    tok = Tokenizer.load(run / "baby" / "tokenizer")
    tools = ToolUse([WEATHER["function"]], "auto")
    with_tools = client.chat.completions.create(model="sft", messages=ask(), tools=[WEATHER], max_tokens=1)
    assert with_tools.usage.prompt_tokens == len(render_prompt(render_messages(ask(), tools), tok))
    without = client.chat.completions.create(model="sft", messages=ask(), tools=[WEATHER], tool_choice="none",
                                             max_tokens=1)
    assert without.usage.prompt_tokens == len(render_prompt(ask(), tok))


def test_calls_in_a_reply_are_parsed_and_streamed_text_held_back():
    tools = ToolUse([WEATHER["function"]], "auto")
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n' \
           '</tool_call>'
    content, calls = parse_calls(text, tools)
    assert content == "Let me look." and json.loads(calls[0]["function"]["arguments"])["city"] == "Paris"
    assert parse_calls("<tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>", tools)[1] == []  # unknown
    assert parse_calls("no call", tools) == ("no call", [])
    assert held_back("Sure <tool_") == len("<tool_") and held_back("Sure.") == 0
    rendered = render_messages([{"role": "system", "content": "Be brief."}, *ask(),
                                {"role": "assistant", "content": None, "tool_calls": calls},
                                {"role": "tool", "tool_call_id": calls[0]["id"], "content": "18"},
                                {"role": "tool", "tool_call_id": "x", "content": "19"}], tools)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert rendered[0]["content"].startswith("Be brief.\n\n# Tools") and '"get_weather"' in rendered[0]["content"]
    assert rendered[3]["content"] == "<tool_response>\n18\n</tool_response>\n<tool_response>\n19\n</tool_response>"


BAD = [  # (extra body, param, words)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "nonsense"),
    ({"response_format": {"type": "xml"}}, "response_format", "must be"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "does not have"),
    ({"tool_choice": "required"}, "tool_choice", "lists no function"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "send one of them"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[]"}}]}]},
     "messages[0].tool_calls[0]", "JSON object"),
]


def test_bad_structured_requests_are_openai_errors(url):
    for extra, param, words in BAD:
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "sft", "messages": ask(), **extra}, timeout=60)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param and words in error["message"], (extra, error)


def test_auto_calls_stream_text_first_then_the_calls(run):
    """A model trained on the format writes text, then a call: the text streams (a possible `<tool_call>` start held
    back), the call comes as one `tool_calls` delta, finish_reason "tool_calls"; non-streamed, the same."""
    import time

    from babyllama.serve.app import _Observer, _Reply
    from babyllama.serve.metrics import ServerMetrics
    from babyllama.serve.protocol import parse_chat

    tok = Tokenizer.load(run / "baby" / "tokenizer")
    req = parse_chat({"model": "sft", "messages": ask(), "tools": [WEATHER], "stream": True}, 4)
    reply = _Reply(req, tok, None, 10, _Observer(ServerMetrics(lambda: {"decoding": 0, "waiting": 0}), "sft",
                                                 time.monotonic()))
    pieces = ["Let me ", "check <tool", "_call>\n{\"name\": \"get_weather\", ", "\"arguments\": {\"city\": \"Paris\", "
              "\"unit\": \"celsius\"}}\n</tool_call>"]
    chunks = [c for p in pieces for c in reply.take(("text", 0, p, []))] + reply.take(("end", 0, "stop", 30, [], 0))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "Let me check "  # sent before the call began
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert len(calls) == 1 and json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    message = reply.choices()[0]["message"]
    assert message["content"] == "Let me check" and message["tool_calls"][0]["id"] == calls[0]["id"]
