"""The OpenAI wire format: request bodies checked field by field, and the response / stream-chunk objects.

Every bad request is an `ApiError` naming the parameter (`param`) in OpenAI's error schema. A parameter this server
does not implement is accepted only with its default value (or null): anything else is a 400 naming it, never
silently ignored.
"""
from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

from babyllama.data.chat_template import ROLES

MAX_STOPS = 4  # as OpenAI

# Parameters of the OpenAI API that change nothing here when they have these values (null always qualifies).
_INERT_CHAT: dict[str, tuple] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "logprobs": (False,),
    "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none", "auto"), "parallel_tool_calls": (True, False),
    "functions": ([],), "function_call": ("none", "auto"), "response_format": ({"type": "text"},),
    "service_tier": ("auto", "default"), "store": (False,), "metadata": ({},), "modalities": (["text"],),
    "user": None,  # an end-user id for the caller's own records: any string
}
_INERT_COMPLETION: dict[str, tuple] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "logprobs": (0,),
    "echo": (False,), "best_of": (1,), "suffix": ("",), "user": None,
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


@dataclass
class ChatRequest(Sampling):
    messages: list[dict[str, str]]


@dataclass
class CompletionRequest(Sampling):
    prompt: str


def parse_chat(body: Any, max_n: int) -> ChatRequest:
    known = set(_SAMPLING_FIELDS) | {"messages"}
    fields = _common(body, known, _INERT_CHAT, max_n)
    return ChatRequest(**fields, messages=_messages(body.get("messages")))


def parse_completion(body: Any, max_n: int) -> CompletionRequest:
    known = set(_SAMPLING_FIELDS) | {"prompt"}
    fields = _common(body, known, _INERT_COMPLETION, max_n)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:  # the client's list form of one prompt
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request; several: send several requests, "
                            "they are decoded together)", "prompt")
    return CompletionRequest(**fields, prompt=prompt)


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


def _common(body: Any, known: set[str], inert: dict[str, tuple | None], max_n: int) -> dict[str, Any]:
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
        max_tokens=_integer(tokens_key, 1, None, None)(body.get(tokens_key)),
        stop=_stop(body.get("stop")),
        seed=_integer("seed", -2**63, 2**64 - 1, None)(body.get("seed")),
        n=_integer("n", 1, max_n, 1)(body.get("n")))


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where)
        extra = [k for k, v in m.items() if k not in ("role", "content") and v is not None]
        if extra:
            raise ApiError(400, f"{where}.{extra[0]} is not supported; send only 'role' and 'content'",
                           f"{where}.{extra[0]}", "unsupported_parameter")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)} (or developer), got "
                                f"{m.get('role')!r:.40}", f"{where}.role")
        if role == "system" and i != 0:
            raise ApiError(400, f"{where}: a system message may only come first", f"{where}.role")
        out.append({"role": role, "content": _content(m.get("content"), f"{where}.content")})
    return out


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


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(rid: str, kind: str, model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}


def chat_choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish}


def chat_delta(index: int, delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def completion_choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
