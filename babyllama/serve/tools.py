"""Function calling in the chat template, as Qwen2.5 and Hermes models write it (what llama.cpp's and vLLM's
`hermes` parsers read): the tools' signatures go into the system message inside `<tools></tools>`, the model
answers a call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, and a tool's result comes back as a
user turn holding `<tool_response>...</tool_response>`. So the chat template itself (three roles, what SFT trains
on) is unchanged: a model that has seen this format in its SFT data calls tools; any model can be made to by
`tool_choice` "required" or a named function, whose reply is constrained to a valid call
(`babyllama.model.grammar`).
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL_BLOCK = re.compile(re.escape(CALL_OPEN) + r"\s*(\{.*?\})\s*" + re.escape(CALL_CLOSE), re.S)
_INSTRUCTIONS = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML \
tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass
class ToolUse:
    """A request's tools and how they may be used: `choice` is "auto", "required" or the name of the function
    the reply must call ("none" is no `ToolUse` at all)."""

    functions: list[dict[str, Any]]  # OpenAI's {"name", "description"?, "parameters"?}
    choice: str
    parallel: bool = True  # "required": one call or several (parallel_tool_calls)

    @property
    def constrained(self) -> bool:
        return self.choice != "auto"

    def schemas(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, arguments schema) of each function the reply may call."""
        named = [f for f in self.functions if self.choice in ("auto", "required") or f["name"] == self.choice]
        return [(f["name"], f.get("parameters") or {"type": "object"}) for f in named]


def render_messages(messages: list[dict[str, Any]], tools: ToolUse | None) -> list[dict[str, str]]:
    """OpenAI chat messages (with tools, assistant `tool_calls` and `tool` results) as the template's plain
    system/user/assistant messages."""
    out: list[dict[str, str]] = []
    if tools is not None:
        listed = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False)
                           for f in tools.functions)
        system = _INSTRUCTIONS.format(tools=listed)
        if messages and messages[0]["role"] == "system":
            system = messages[0]["content"] + "\n\n" + system
            messages = messages[1:]
        out.append({"role": "system", "content": system})
    for m in messages:
        if m["role"] == "tool":
            response = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1]["content"] += "\n" + response  # the results of parallel calls: one turn
            else:
                out.append({"role": "user", "content": response})
        elif m.get("tool_calls"):
            calls = [call_text(c["function"]["name"], json.loads(c["function"]["arguments"]))
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(filter(None, [m.get("content"), *calls]))})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def call_text(name: str, arguments: dict[str, Any]) -> str:
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CALL_CLOSE}"


def parse_calls(text: str, tools: ToolUse) -> tuple[str | None, list[dict[str, Any]]]:
    """A reply's text and the well-formed calls of known functions in it, in OpenAI's `tool_calls` form. A block
    that is not such a call stays in the text (the model wrote it; nothing is dropped)."""
    known = {name for name, _ in tools.schemas()}
    calls, kept, pos = [], [], 0
    for m in CALL_BLOCK.finditer(text):
        try:
            call = json.loads(m.group(1))
        except ValueError:
            continue
        if not (isinstance(call, dict) and call.get("name") in known and isinstance(call.get("arguments"), dict)):
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": json.dumps(call["arguments"], ensure_ascii=False)}})
    content = ("".join(kept) + text[pos:]).strip()
    return (content or None) if calls else text, calls


def held_back(text: str) -> int:
    """How many characters at the end of streamed `text` could be the start of a `<tool_call>` (held until the
    next piece decides whether a call begins)."""
    return max((k for k in range(1, len(CALL_OPEN)) if text.endswith(CALL_OPEN[:k])), default=0)
