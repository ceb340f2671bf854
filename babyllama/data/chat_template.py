"""Chat template (ChatML) and assistant-only loss masks.

Template
--------
A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`; the
optional system message comes first. Each message is rendered as

    <|im_start|>{role}\\n{content}<|im_end|>\\n

and a training sequence is `<s>` followed by the rendered messages, e.g.

    <s><|im_start|>system
    You are a helpful assistant.<|im_end|>
    <|im_start|>user
    写一首题为《静夜思》的诗<|im_end|>
    <|im_start|>assistant
    床前明月光，疑是地上霜。
    举头望明月，低头思故乡。<|im_end|>

For generation the prompt ends with `<|im_start|>assistant\\n` and decoding stops at `<|im_end|>` (or `</s>`),
see `stop_ids`. To format your own data, write one JSON object per line, `{"messages": [...]}` as above
(or any format `babyllama.data.sft.read_conversations` reads); you never type the special tokens yourself.

Tokenization
------------
`<s>`, `<|im_start|>` and `<|im_end|>` are inserted by id. The role header `"{role}\\n"`, the content and the
`"\\n"` after `<|im_end|>` are encoded as separate pieces of text (the same way for training and for
generation). Text that spells a special token (a user typing "<|im_end|>") is encoded as plain characters, so
message text can never forge a turn boundary.

Labels
------
`encode_chat` returns `labels` aligned with `input_ids` (-100 = no loss): only the assistant's content tokens
and the assistant's `<|im_end|>` are supervised, so the model learns to answer and to stop; `<s>`, system and
user messages, role headers and the trailing newlines are not. Shift by one for next-token targets (the
SFT collate in `babyllama.data.sft` does this).

Truncation
----------
With `max_len`, the system message and the most recent whole turns that fit are kept (a turn = the user
message(s) plus the assistant reply that follows). If even the newest turn does not fit, it is shortened so
that its headers and the start of the reply survive: first the user content loses tokens from its END (its
start is kept: the instruction comes first in alpaca-style `instruction\ninput` prompts and in our templates),
but it keeps at least half of the tokens that the headers leave for text; then, if still too long, the reply
loses its end (and its `<|im_end|>`, since a cut reply must not teach the model to stop there). Only when
`<s>`, the system message and the headers alone leave no room for a reply token does `encode_chat` raise
`NoSupervisedTokens` (a `UserError`): the SFT dataset catches it and drops the sample, counting it in
`SFTDataset.dropped`. Messages after the last assistant reply carry no loss and are dropped.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from babyllama.data.tokenizer import BOS, EOS, IM_END, IM_START, PAD, UNK
from babyllama.errors import UserError
from babyllama.model.llama import IGNORE_INDEX

ROLES = ("system", "user", "assistant")
DEFAULT_SYSTEM = "You are a helpful assistant."
# Strings that some tokenizers turn into special ids when they occur in text; we never let them.
_SPECIAL_TEXT = re.compile("|".join(re.escape(s) for s in (IM_START, IM_END, BOS, EOS, PAD, UNK)))

Message = dict[str, str]
Encoded = tuple[list[int], list[int]]  # (input_ids, labels)


class NoSupervisedTokens(UserError):
    """A conversation has no assistant token left to learn from (none at all, or cut away by `max_len`)."""


# ---- text form ----
def render_text(messages: Sequence[Message], system: str | None = None, add_generation_prompt: bool = False) -> str:
    """The conversation as template text (without `<s>`); what `decode(encode_chat(...)[0][1:])` gives back."""
    msgs = with_system(messages, system)
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in msgs)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def with_system(messages: Sequence[Message], system: str | None) -> list[Message]:
    """Prepend `system` as the system message unless the conversation already has one."""
    msgs = list(messages)
    if system is not None and not (msgs and msgs[0].get("role") == "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def check_messages(messages: Any, where: str = "conversation") -> list[Message]:
    """Validate roles and contents; raise `UserError` naming `where` and the offending message."""
    if not isinstance(messages, (list, tuple)):
        raise UserError(f"{where}: expected a list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise UserError(f"{where}: message {i} needs a role in {ROLES}, got {m!r:.80}")
        if not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i} ({m['role']}) needs a string 'content'")
        if m["role"] == "system" and i != 0:
            raise UserError(f"{where}: message {i}: a system message may only come first")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ---- ids ----
def special_id(tokenizer: Any, token: str) -> int:
    tid = tokenizer.token_to_id(token)
    if tid is None or tid < 0:
        raise UserError(f"the tokenizer has no {token} token; train it with the chat special tokens")
    return tid


def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant reply during generation."""
    return [special_id(tokenizer, IM_END), tokenizer.eos_id]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """`tokenizer.encode(text)`, except that special-token spellings are encoded character by character."""
    if not _SPECIAL_TEXT.search(text):
        return tokenizer.encode(text)
    ids: list[int] = []
    pos = 0
    for m in _SPECIAL_TEXT.finditer(text):
        if m.start() > pos:
            ids += tokenizer.encode(text[pos:m.start()])
        for ch in m.group():
            ids += tokenizer.encode(ch)
        pos = m.end()
    return ids + (tokenizer.encode(text[pos:]) if pos < len(text) else [])


def encode_message(tokenizer: Any, role: str, content: str) -> Encoded:
    """One rendered message as ids, with labels on the assistant content and its `<|im_end|>` only."""
    return _render_message(tokenizer, role, encode_text(tokenizer, content))


def _render_message(tokenizer: Any, role: str, content_ids: list[int]) -> Encoded:
    head = [special_id(tokenizer, IM_START)] + encode_text(tokenizer, f"{role}\n")
    body = content_ids + [special_id(tokenizer, IM_END)]
    tail = encode_text(tokenizer, "\n")
    ids = head + body + tail
    if role != "assistant":
        return ids, [IGNORE_INDEX] * len(ids)
    return ids, [IGNORE_INDEX] * len(head) + body + [IGNORE_INDEX] * len(tail)


def split_turns(messages: Sequence[Message]) -> tuple[list[Message], list[list[Message]]]:
    """(system messages, turns): a turn is the non-assistant messages plus the assistant replies after them.

    Messages after the last assistant reply are left out (they carry no loss)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns: list[list[Message]] = []
    current: list[Message] = []
    for m in messages[len(system):]:
        if current and m["role"] != "assistant" and current[-1]["role"] == "assistant":
            turns.append(current)
            current = []
        current.append(m)
    if current and current[-1]["role"] == "assistant":
        turns.append(current)
    return system, turns


def _join(parts: Sequence[Encoded]) -> Encoded:
    ids: list[int] = []
    labels: list[int] = []
    for part_ids, part_labels in parts:
        ids += part_ids
        labels += part_labels
    return ids, labels


def encode_chat(messages: Sequence[Message], tokenizer: Any, max_len: int | None = None,
                system: str | None = None) -> Encoded:
    """Tokenize a conversation for SFT: `(input_ids, labels)`, same length, labels -100 except assistant tokens.

    `system` is used when the conversation has no system message. Raises `NoSupervisedTokens` when nothing
    is left to learn (see the module docstring for the truncation rule)."""
    sys_msgs, turns = split_turns(with_system(check_messages(messages), system))
    if not turns:
        raise NoSupervisedTokens("conversation has no assistant message")
    prefix = _join([([tokenizer.bos_id], [IGNORE_INDEX])] + [encode_message(tokenizer, **m) for m in sys_msgs])
    blocks = [_join([encode_message(tokenizer, **m) for m in turn]) for turn in turns]
    if max_len is None:
        return _join([prefix] + blocks)
    budget = max_len - len(prefix[0])
    keep = _first_fitting(blocks, budget)
    newest = blocks[-1] if len(blocks[-1][0]) <= budget else _shorten_turn(tokenizer, turns[-1], budget)
    ids, labels = _join([prefix, *blocks[keep:-1], newest])
    if all(label == IGNORE_INDEX for label in labels[:max_len]):
        raise NoSupervisedTokens(f"no assistant token fits in max_len={max_len}: <s> and the system message "
                                 f"take {len(prefix[0])} tokens; shorten the system message or raise the context")
    return ids, labels


def _shorten_turn(tokenizer: Any, turn: Sequence[Message], budget: int) -> Encoded:
    """The turn cut to `budget` tokens: the user content loses its end first, down to half the room for text,
    then the reply loses its end (see the module docstring)."""
    contents = [encode_text(tokenizer, m["content"]) for m in turn]
    length = len(_join([_render_message(tokenizer, m["role"], c) for m, c in zip(turn, contents)])[0])
    room = budget - (length - sum(map(len, contents)))  # tokens left for message text after the headers
    prompt = [i for i, m in enumerate(turn) if m["role"] != "assistant"]  # the turn's leading user message(s)
    prompt_len = sum(len(contents[i]) for i in prompt)
    cut = min(length - budget, max(0, prompt_len - room // 2))  # half the text room stays for the question
    for i in reversed(prompt):  # later user messages lose first, so the turn's start is kept
        drop = min(cut, len(contents[i]))
        contents[i], cut = contents[i][: len(contents[i]) - drop], cut - drop
    ids, labels = _join([_render_message(tokenizer, m["role"], c) for m, c in zip(turn, contents)])
    return ids[: max(budget, 0)], labels[: max(budget, 0)]


def _first_fitting(blocks: Sequence[Encoded], budget: int) -> int:
    """Index of the oldest turn such that it and all newer turns fit in `budget`; the newest turn at least."""
    total = 0
    for k in range(len(blocks) - 1, -1, -1):
        total += len(blocks[k][0])
        if total > budget:
            return min(k + 1, len(blocks) - 1)
    return 0


def render_prompt(messages: Sequence[Message], tokenizer: Any, system: str | None = None) -> list[int]:
    """Prompt ids for generation: `<s>`, every message, then `<|im_start|>assistant\\n`."""
    msgs = with_system(check_messages(messages), system)
    body = [t for m in msgs for t in encode_message(tokenizer, **m)[0]]
    return [tokenizer.bos_id] + body + assistant_header(tokenizer)


def assistant_header(tokenizer: Any) -> list[int]:
    return [special_id(tokenizer, IM_START)] + encode_text(tokenizer, "assistant\n")


class ChatHistory:
    """Conversation state for an interactive chat: the system prompt plus a window of recent turns.

    Keeps at most `max_turns` turns (a turn = a user message and the replies to it) and, in `prompt_ids`,
    drops the oldest turns until the prompt fits `max_tokens` (leave room for the reply:
    `generation.prompt_budget`); a newest message too long alone keeps its newest tokens, as a too-long prompt
    does in every front end (`generation.fit_context`). Messages are tokenized once, when added.
    """

    def __init__(self, tokenizer: Any, system: str | None = None, max_turns: int | None = None,
                 max_tokens: int | None = None):
        self.tokenizer, self.system = tokenizer, system
        self.max_turns, self.max_tokens = max_turns, max_tokens
        system_ids = encode_message(tokenizer, "system", system)[0] if system is not None else []
        self._prefix = [tokenizer.bos_id] + system_ids
        self._turns: list[list[tuple[Message, list[int]]]] = []
        self.cut: tuple[int, int] | None = None  # (tokens, kept) of the message the last prompt_ids shortened

    def add(self, role: str, content: str) -> None:
        """Append a user or assistant message (an assistant message continues the current turn)."""
        if role not in ("user", "assistant"):
            raise UserError(f"ChatHistory.add: role must be 'user' or 'assistant', got {role!r}")
        msg = {"role": role, "content": content}
        entry = (msg, encode_message(self.tokenizer, role, content)[0])
        if not self._turns or (role == "user" and self._turns[-1][-1][0]["role"] == "assistant"):
            self._turns.append([entry])
        else:
            self._turns[-1].append(entry)
        if self.max_turns is not None:
            del self._turns[: max(0, len(self._turns) - self.max_turns)]

    def add_user(self, content: str) -> None:
        self.add("user", content)

    def add_assistant(self, content: str) -> None:
        self.add("assistant", content)

    def clear(self) -> None:
        self._turns.clear()

    @property
    def messages(self) -> list[Message]:
        """The messages in the window, system message first."""
        return with_system([m for turn in self._turns for m, _ in turn], self.system)

    def prompt_ids(self) -> list[int]:
        """Prompt for the next assistant reply within `max_tokens`: the oldest turns go first, then the oldest
        tokens of the newest message (recorded in `cut`)."""
        header = assistant_header(self.tokenizer)
        self.cut = None
        while True:
            ids = self._prefix + [t for turn in self._turns for _, ids in turn for t in ids] + header
            if self.max_tokens is None or len(ids) <= self.max_tokens:
                return ids
            if len(self._turns) > 1:
                del self._turns[0]
                continue
            msg = self._turns[-1][-1][0]
            content = encode_text(self.tokenizer, msg["content"])
            excess = len(ids) - self.max_tokens
            if excess >= len(content):
                raise UserError(f"the system message and the chat template take {len(ids) - len(content)} tokens, "
                                f"the prompt budget is {self.max_tokens}; shorten --system or raise --history-tokens")
            kept = content[excess:]
            self._turns[-1][-1] = ({**msg, "content": self.tokenizer.decode(kept)},
                                   _render_message(self.tokenizer, msg["role"], kept)[0])
            self.cut = (len(content), len(kept))
