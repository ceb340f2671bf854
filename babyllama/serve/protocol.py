"""The OpenAI wire format: request bodies checked field by field, and the response / stream-chunk objects.

Every bad request is an `ApiError` naming the parameter (`param`) in OpenAI's error schema. A parameter this server
does not implement is accepted only with its default value (or null): anything else is a 400 naming it, never
silently ignored.
"""
from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

from babyllama.data.chat_template import ROLES
from babyllama.serve.batcher import TokenLogprob
from babyllama.serve.tools import ToolUse

MAX_STOPS = 4  # as OpenAI
MAX_TOP_LOGPROBS = 20  # chat's limit at OpenAI; vLLM allows the same for completions (OpenAI: 5)

# Parameters of the OpenAI API that change nothing here when they have these values (null always qualifies).
_INERT_CHAT: dict[str, tuple] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},),
    "functions": ([],), "function_call": ("none", "auto"),
    "service_tier": ("auto", "default"), "store": (False,), "metadata": ({},), "modalities": (["text"],),
    "user": None,  # an end-user id for the caller's own records: any string
}
_INERT_COMPLETION: dict[str, tuple] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "best_of": (1,),
    "suffix": ("",), "user": None,
}


class ApiError(Exception):
    """An error reply: HTTP status and OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Sampling:
    """The sampling fields shared by both endpoints; `max_tokens` None = as many as the context leaves."""

    model: str
    stream: bool
    include_usage: bool
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int | None
    stop: list[str]
    seed: int | None
    n: int
    # None: no log-probabilities; k >= 0: each generated token's, with its k most likely alternatives
    logprobs: int | None


@dataclass
class ChatRequest(Sampling):
    messages: list[dict[str, Any]]  # system/user/assistant/tool; an assistant's may hold `tool_calls`
    json_schema: dict[str, Any] | None  # response_format json_object ({"type": "object"}) or json_schema
    tools: ToolUse | None  # None: no tools, or tool_choice "none"


@dataclass
class CompletionRequest(Sampling):
    prompts: list[str | list[int]]  # text (encoded after a bos) or token ids (used as given)
    echo: bool  # the reply starts with the prompt (and, with logprobs, the prompt's own tokens are scored)


def parse_chat(body: Any, max_n: int) -> ChatRequest:
    known = set(_SAMPLING_FIELDS) | {"messages", "logprobs", "top_logprobs", "response_format", "tools",
                                     "tool_choice", "parallel_tool_calls"}
    fields = _common(body, known, _INERT_CHAT, max_n)
    wanted = _bool("logprobs")(body.get("logprobs"))
    top = _integer("top_logprobs", 0, MAX_TOP_LOGPROBS, None)(body.get("top_logprobs"))
    if top is not None and not wanted:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    schema, tools = _response_format(body.get("response_format")), _tools(body)
    if schema is not None and tools is not None and tools.constrained:
        raise ApiError(400, "a required or named tool call and a 'response_format' both constrain the reply; "
                            "send one of them", "response_format")
    return ChatRequest(**fields, logprobs=(top or 0) if wanted else None, messages=_messages(body.get("messages")),
                       json_schema=schema, tools=tools)


def _response_format(value: Any) -> dict[str, Any] | None:
    """OpenAI's `response_format`: text (None), json_object (any object) or json_schema (its `schema`)."""
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = value.get("json_schema") if kind == "json_schema" else None
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict) or not isinstance(
            spec.get("name"), str):
        raise ApiError(400, "'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                            "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                       "response_format", "invalid_value")
    return spec.get("schema", {"type": "object"})


_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _tools(body: dict[str, Any]) -> ToolUse | None:
    """`tools` (functions only), `tool_choice` and `parallel_tool_calls`."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    functions = []
    for i, tool in enumerate(tools or []):
        where = f"tools[{i}]"
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not _FUNCTION_NAME.fullmatch(str(function.get("name"))):
            raise ApiError(400, f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} with "
                                "a name of letters, digits, _ or - (at most 64)", where, "invalid_value")
        if not isinstance(function.get("parameters", {}), dict):
            raise ApiError(400, f"{where}.function.parameters must be a JSON schema object",
                           f"{where}.function.parameters", "invalid_value")
        functions.append({k: v for k, v in function.items() if k in ("name", "description", "parameters")})
    if tools is not None and not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list of functions", "tools", "invalid_value")
    names = [f["name"] for f in functions]
    if isinstance(choice, dict):
        named = choice.get("function", {}).get("name") if choice.get("type") == "function" and isinstance(
            choice.get("function"), dict) else None
        if named not in names:
            raise ApiError(400, f"'tool_choice' names a function that 'tools' does not have: {named!r:.60}; "
                                f"it has: {', '.join(names) or 'none'}", "tool_choice", "invalid_value")
        choice = named
    elif choice not in (None, "none", "auto", "required"):
        raise ApiError(400, "'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", "tool_choice", "invalid_value")
    elif choice == "required" and not functions:
        raise ApiError(400, "'tool_choice' is \"required\" but 'tools' lists no function", "tool_choice",
                       "invalid_value")
    parallel = _bool("parallel_tool_calls")(body.get("parallel_tool_calls", True))
    if not functions or choice == "none":
        return None
    return ToolUse(functions, choice or "auto", parallel)


def parse_completion(body: Any, max_n: int, vocab_size: int | None = None) -> CompletionRequest:
    """`vocab_size` bounds the ids of a prompt given as token ids."""
    known = set(_SAMPLING_FIELDS) | {"prompt", "logprobs", "echo"}
    fields = _common(body, known, _INERT_COMPLETION, max_n, allow_zero_tokens=bool(body.get("echo")))
    prompts = _prompts(body.get("prompt"), vocab_size)
    if len(prompts) * fields["n"] > max_n:
        raise ApiError(400, f"{len(prompts)} prompts x n={fields['n']} choices is more than this server's "
                            f"{max_n} rows; send fewer prompts per request", "prompt", "invalid_value")
    return CompletionRequest(**fields, logprobs=_integer("logprobs", 0, MAX_TOP_LOGPROBS, None)(body.get("logprobs")),
                             prompts=prompts, echo=_bool("echo")(body.get("echo")))


def parse_tokenize(body: Any) -> tuple[str, bool]:
    """`/tokenize` (vLLM's): {"prompt": str, "add_special_tokens": bool (default true: a bos first)}."""
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        raise ApiError(400, "'prompt' must be a string", "prompt")
    add = body.get("add_special_tokens", True)
    if not isinstance(add, bool):
        raise ApiError(400, "'add_special_tokens' must be true or false", "add_special_tokens", "invalid_type")
    return body["prompt"], add


def parse_detokenize(body: Any, vocab_size: int) -> list[int]:
    """`/detokenize` (vLLM's): {"tokens": [int, ...]}."""
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                               and 0 <= t < vocab_size for t in tokens):
        raise ApiError(400, f"'tokens' must be a list of token ids below {vocab_size}", "tokens")
    return tokens


def _prompts(prompt: Any, vocab_size: int | None) -> list[str | list[int]]:
    """OpenAI's four forms: a string, a list of strings, a list of token ids, a list of lists of token ids."""
    def ids(v: Any) -> bool:
        return (isinstance(v, list) and bool(v) and all(isinstance(i, int) and not isinstance(i, bool)
                                                        and 0 <= i < (vocab_size or 2**31) for i in v))
    if isinstance(prompt, str) or ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids(p) for p in prompt):
        return prompt
    bound = f" below {vocab_size}" if vocab_size else ""
    raise ApiError(400, f"'prompt' must be a string, a list of strings, a non-empty list of token ids{bound}, or a "
                        "list of such lists", "prompt")


# ---- fields
def _number(name: str, low: float, high: float, default: float, low_open: bool = False) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if v is None:
            return default
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or v > high or v < low or (low_open and v == low):
            bound = f"{'>' if low_open else '>='} {low} and <= {high}"
            raise ApiError(400, f"'{name}' must be a number {bound}, got {v!r:.40}", name, "invalid_value")
        return float(v)
    return check


def _integer(name: str, low: int, high: int | None, default: int | None) -> Callable[[Any], int | None]:
    def check(v: Any) -> int | None:
        if v is None:
            return default
        if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v > high):
            bound = f">= {low}" + (f" and <= {high}" if high is not None else "")
            raise ApiError(400, f"'{name}' must be an integer {bound}, got {v!r:.40}", name, "invalid_value")
        return v
    return check


def _stop(v: Any) -> list[str]:
    stops = [] if v is None else [v] if isinstance(v, str) else v
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings",
                       "stop", "invalid_value")
    return stops


def _bool(name: str) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if v is None:
            return False
        if not isinstance(v, bool):
            raise ApiError(400, f"'{name}' must be true or false, got {v!r:.40}", name, "invalid_type")
        return v
    return check


_SAMPLING_FIELDS = ("model", "stream", "stream_options", "temperature", "top_p", "top_k", "max_tokens",
                    "max_completion_tokens", "stop", "seed", "n")


def _common(body: Any, known: set[str], inert: dict[str, tuple | None], max_n: int,
            allow_zero_tokens: bool = False) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    for key, value in body.items():
        if key in known or value is None:
            continue
        if key not in inert:
            raise ApiError(400, f"unsupported parameter '{key}'; remove it", key, "unsupported_parameter")
        allowed = inert[key]
        if allowed is not None and value not in allowed:
            raise ApiError(400, f"unsupported parameter '{key}' (only {' or '.join(map(json.dumps, allowed))} is "
                                f"supported); remove it", key, "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: a stage listed by GET /v1/models (e.g. 'sft')", "model")
    stream = _bool("stream")(body.get("stream"))
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ApiError(400, "'stream_options' is only allowed with stream=true, as {\"include_usage\": bool}",
                       "stream_options")
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise ApiError(400, "give 'max_tokens' or 'max_completion_tokens', not both", "max_completion_tokens")
    tokens_key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    return dict(
        model=model, stream=stream, include_usage=_bool("stream_options.include_usage")((options or {}).get(
            "include_usage")),
        temperature=_number("temperature", 0, 2, 1.0)(body.get("temperature")),
        top_p=_number("top_p", 0, 1, 1.0, low_open=True)(body.get("top_p")),
        top_k=_integer("top_k", 0, None, 0)(body.get("top_k")),
        # 0 only with echo: score the prompt, write nothing
        max_tokens=_integer(tokens_key, 0 if allow_zero_tokens else 1, None, None)(body.get(tokens_key)),
        stop=_stop(body.get("stop")),
        seed=_integer("seed", -2**63, 2**64 - 1, None)(body.get("seed")),
        n=_integer("n", 1, max_n, 1)(body.get("n")))


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where)
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in (*ROLES, "tool"):
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, tool (or developer), got "
                                f"{m.get('role')!r:.40}", f"{where}.role")
        allowed = {"tool": ("tool_call_id",), "assistant": ("tool_calls",)}.get(role, ())
        extra = [k for k, v in m.items() if k not in ("role", "content", *allowed) and v is not None]
        if extra:
            raise ApiError(400, f"{where}.{extra[0]} is not supported; send only 'role' and 'content'"
                                + "".join(f" (and '{k}')" for k in allowed), f"{where}.{extra[0]}",
                           "unsupported_parameter")
        if role == "system" and i != 0:
            raise ApiError(400, f"{where}: a system message may only come first", f"{where}.role")
        if m.get("tool_calls") is not None:
            out.append({"role": role, "content": None if m.get("content") is None else _content(
                m["content"], f"{where}.content"), "tool_calls": _tool_calls(m["tool_calls"], where)})
        else:
            out.append({"role": role, "content": _content(m.get("content"), f"{where}.content")})
    return out


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's earlier calls, as this server (or OpenAI) returned them."""
    for j, call in enumerate(calls if isinstance(calls, list) else [None]):
        function = call.get("function") if isinstance(call, dict) else None
        try:
            ok = isinstance(function, dict) and isinstance(function.get("name"), str) and isinstance(
                json.loads(function.get("arguments")), dict)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ApiError(400, f"{where}.tool_calls[{j}] must be {{\"function\": {{\"name\": str, \"arguments\": "
                                "a JSON object as a string}}", f"{where}.tool_calls[{j}]", "invalid_value")
    return calls


def _content(content: Any, where: str) -> str:
    """A string, or a list of text parts (what some clients send) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where} must be a string or a list of text parts ({{\"type\": \"text\", \"text\": ...}}); "
                        "this model reads text only", where)


# ---- replies
def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def envelope(rid: str, kind: str, model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}


def chat_choice(index: int, text: str | None, finish: str | None, logprobs: dict | None = None,
                tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message = {"role": "assistant", "content": text, **({"tool_calls": tool_calls} if tool_calls else {})}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def chat_delta(index: int, delta: dict[str, str], finish: str | None = None,
               logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def token_text(raw: bytes) -> str:
    """A token's text as OpenAI writes it: the text, or `bytes:\\xNN...` for part of a UTF-8 character."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def chat_logprobs(scored: list[TokenLogprob], token_bytes: list[bytes]) -> dict[str, Any]:
    """`choices[].logprobs` of chat: one entry per token with its bytes and its top alternatives."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes[token]
        return {"token": token_text(raw), "logprob": logprob, "bytes": list(raw)}
    return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]}
                        for s in scored], "refusal": None}


def completion_logprobs(scored: list[TokenLogprob], token_bytes: list[bytes], special: set[int],
                        offset: int = 0) -> dict[str, Any]:
    """`choices[].logprobs` of completions (the legacy schema): tokens, their log-probabilities (None for a
    prompt's first token, which nothing predicts), the top alternatives and the sampled token by text, and each
    token's character offset in the choice's text (from `offset`; `special` tokens are not in the text)."""
    tokens, offsets = [], []
    for s in scored:
        tokens.append(token_text(token_bytes[s.token]))
        offsets.append(offset)
        if s.token not in special:
            offset += len(token_bytes[s.token].decode("utf-8", errors="ignore"))
    tops = [None if s.logprob is None else {token_text(token_bytes[t]): lp for t, lp in (*s.top, (s.token, s.logprob))}
            for s in scored]
    return {"tokens": tokens, "token_logprobs": [s.logprob for s in scored], "top_logprobs": tops,
            "text_offset": offsets}
