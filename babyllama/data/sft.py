"""SFT data: readers for common instruction formats, builders from shipped material, dataset and batching.

Readers (`read_conversations(path, fmt="auto")` -> list of message lists, see `babyllama.data.chat_template`); a file is JSON
lines or one JSON array, and the format is told by the keys of the first record:

| fmt | record |
|---|---|
| `openai` | `{"messages": [{"role": "system"/"user"/"assistant", "content": str}]}` |
| `sharegpt` | `{"conversations": [{"from": "human"/"gpt"/"system", "value": str}], "system"?: str}` |
| `alpaca` | `{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}` |
| `belle` | alpaca-style `instruction/input/output`, or `conversations` with `from: human/assistant` |
| `firefly` | `{"conversation": [{"human", "assistant"}], ...}` or `{"kind", "input", "target"}` |

A record that does not fit raises `UserError` naming `path:line` and the field.

Batching: `SFTDataset` tokenizes every conversation once with `encode_chat` and keeps the ids in memory;
`build_sft_loader` makes length-bucketed batches (no packing, so attention never crosses samples) with right
padding. A batch is `(input_ids, targets)`, both `(B, T)` int64: `targets` are the labels shifted by one
(next-token targets, -100 on prompt and pad positions), ready for `Llama(input_ids, targets)`. Right padding
with causal attention needs no attention mask: real tokens never attend to the pads after them.
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from babyllama.data.chat_template import IGNORE_INDEX, Message, NoSupervisedTokens, check_messages, encode_chat
from babyllama.errors import UserError, where

FORMATS = ("openai", "sharegpt", "alpaca", "belle", "firefly")

# Task templates, shared by the SFT builders and the held-out multiple-choice items so that they match.
ZH_WRITE = "写一首题为《{title}》的诗"
ZH_AUTHOR = "《{title}》的作者是谁？"
ZH_NEXT = "“{line}”的下一句是什么？"
EN_CONTINUE = "Continue this speech by {speaker}: {line}"
EN_WHO = "Who says: \"{line}\"?"
EN_PLAY = "Which play is this line from? \"{line}\""
EN_NEXT = "Which line follows \"{line}\"?"


# ======================================================================= readers
def read_conversations(path: str | Path, fmt: str = "auto") -> list[list[Message]]:
    """All conversations in a JSON-lines or JSON-array file of `fmt` (or auto-detected) records."""
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"unknown SFT format {fmt!r}; choose one of {', '.join(FORMATS)} or 'auto'")
    out: list[list[Message]] = []
    detected = fmt == "auto"
    for loc, record in iter_json_records(path):
        if not isinstance(record, dict):
            raise UserError(f"{loc}: expected a JSON object, got {type(record).__name__}")
        if fmt == "auto":
            fmt = detect_format(record, loc)
        try:
            out.append(record_to_messages(record, fmt, loc))
        except UserError as e:
            if detected and out:  # the record may just be of another format than the first one
                raise UserError(f"{e} (read as {fmt!r}, the format detected from the first record; "
                                f"one file holds one format)") from e
            raise
    if not out:
        raise UserError(f"{path}: no records")
    return out


def iter_json_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(`path:line`, value) for each JSON line, or for each element of a top-level JSON array."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # tolerate a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from e
    if text.lstrip().startswith("["):
        yield from _iter_json_array(text, path)
        return
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside strings
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where(path, lineno)}: invalid JSON ({e.msg})") from e
            yield where(path, lineno), value


def _iter_json_array(text: str, path: str | Path) -> Iterator[tuple[str, Any]]:
    """Decode array elements one at a time so each one's line number is known."""
    decoder, ws = json.JSONDecoder(), re.compile(r"[\s,]*")
    pos = ws.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    while pos < len(text) and text[pos] != "]":
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"{where(path, e.lineno)}: invalid JSON ({e.msg})") from e
        yield where(path, line), value
        pos = ws.match(text, end).end()


def detect_format(record: dict, loc: str = "record") -> str:
    """Format name from a record's keys (see the module docstring)."""
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "conversation" in record or {"input", "target"} <= record.keys():
        return "firefly"
    if {"instruction", "output"} <= record.keys():
        return "alpaca"
    raise UserError(f"{loc}: cannot tell the SFT format from keys {sorted(record)}; "
                    f"expected messages / conversations / conversation / instruction+output, or pass the format")


def record_to_messages(record: dict, fmt: str, loc: str = "record") -> list[Message]:
    """One record of a known format as a validated message list."""
    if fmt == "belle":
        fmt = "sharegpt" if "conversations" in record else "alpaca"
    messages = _READERS[fmt](record, loc)
    messages = check_messages(messages, loc)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{loc}: the conversation has no assistant reply")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():  # refused like an empty alpaca 'output'
            raise UserError(f"{loc}: message {i} (assistant) has an empty 'content'; an assistant reply needs text")
    return messages


def _text(record: dict, key: str, loc: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise UserError(f"{loc}: missing field '{key}'")
    if not isinstance(value, str):
        raise UserError(f"{loc}: field '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise UserError(f"{loc}: field '{key}' is empty")
    return value


def _list(record: dict, key: str, loc: str, required: bool = True) -> list:
    value = record.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise UserError(f"{loc}: field '{key}' must be a non-empty list")
    return value


def _system(record: dict, loc: str) -> list[Message]:
    system = _text(record, "system", loc, required=False)
    return [{"role": "system", "content": system}] if system else []


def _from_openai(record: dict, loc: str) -> list[Message]:
    return _list(record, "messages", loc)


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


def _from_sharegpt(record: dict, loc: str) -> list[Message]:
    messages = _system(record, loc)
    for i, turn in enumerate(_list(record, "conversations", loc)):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict) or turn.get("from") not in _SHAREGPT_ROLES:
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise UserError(f"{loc}: {field}.from must be one of {sorted(_SHAREGPT_ROLES)}, got {got!r:.60}")
        messages.append({"role": _SHAREGPT_ROLES[turn["from"]], "content": _text(turn, "value", f"{loc}: {field}")})
    return messages


def _from_alpaca(record: dict, loc: str) -> list[Message]:
    messages = _system(record, loc)
    for i, pair in enumerate(_list(record, "history", loc, required=False)):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)):
            raise UserError(f"{loc}: history[{i}] must be a [user, assistant] pair of non-empty strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = _text(record, "instruction", loc)
    extra = _text(record, "input", loc, required=False)
    user = f"{prompt}\n{extra}" if extra.strip() else prompt
    reply = _text(record, "output", loc)
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _from_firefly(record: dict, loc: str) -> list[Message]:
    if "conversation" not in record:  # firefly-train-1.1M: {"kind", "input", "target"}
        return [{"role": "user", "content": _text(record, "input", loc)},
                {"role": "assistant", "content": _text(record, "target", loc)}]
    messages = _system(record, loc)
    for i, turn in enumerate(_list(record, "conversation", loc)):
        field = f"{loc}: conversation[{i}]"
        if not isinstance(turn, dict):
            raise UserError(f"{field} must be an object with 'human' and 'assistant'")
        messages += [{"role": "user", "content": _text(turn, "human", field)},
                     {"role": "assistant", "content": _text(turn, "assistant", field)}]
    return messages


_READERS = {"openai": _from_openai, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca, "firefly": _from_firefly}


# ======================================================================= builders from shipped material
def chat(user: str, assistant: str) -> list[Message]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def chatterbot_dir() -> Path:
    """The data folder of the installed `chatterbot-corpus` package (BSD-3-Clause, Gunther Cox)."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("chatterbot-corpus is not installed: pip install chatterbot-corpus==1.3.3")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


# Identity questions and answers in chatterbot would contradict the self-cognition set.
_IDENTITY = re.compile(r"who are you|your name|who (made|created|built) you|你是谁|你叫什么|名字|谁(创造|开发|制造)了你",
                       re.IGNORECASE)


def read_chatterbot(language_dir: str | Path, exclude: Sequence[str] = ("botprofile",)) -> list[list[Message]]:
    """Conversations from one chatterbot-corpus language folder (`*.yml`), turns alternating user/assistant.

    `exclude` names files (without `.yml`) to skip; conversations about the bot's identity are skipped too."""
    import yaml  # only needed when building from chatterbot

    files = sorted(p for p in Path(language_dir).glob("*.yml") if p.stem not in exclude)
    if not files:
        raise UserError(f"{language_dir}: no chatterbot .yml files")
    out: list[list[Message]] = []
    for path in files:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for lines in data.get("conversations") or []:
            texts = [str(x).strip() for x in lines if x is not None and str(x).strip()]
            texts = texts[: len(texts) // 2 * 2]  # a trailing user line has nothing to learn
            if texts and not any(_IDENTITY.search(t) for t in texts):
                out.append([{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)])
    return out


def unique_lines(records: Sequence[dict]) -> Counter:
    """How many records each line occurs in; lines in several records make ambiguous questions."""
    return Counter(line for r in records for line in set(r["lines"]))


def poetry_instructions(records: Iterable[dict], seed: int = 0, max_per_task: int | None = None,
                        max_write_lines: int = 16) -> list[list[Message]]:
    """zh tasks from poetry records (`title`, `author`, `dynasty`, `lines`): write / author / next line.

    "Write a poem titled X" uses poems of at most `max_write_lines` lines (long ones would be cut at max_len)."""
    records = [r for r in records if r.get("lines") and r.get("title")]
    counts, single_author = unique_lines(records), titles_with_one_author(records)
    rng = random.Random(seed)
    write, author, nxt = [], [], []
    for r in records:
        if len(r["lines"]) <= max_write_lines:
            write.append(chat(ZH_WRITE.format(title=r["title"]), "\n".join(r["lines"])))
        if r["title"] in single_author:
            author.append(chat(ZH_AUTHOR.format(title=r["title"]), author_answer(r)))
        pair = next_line_pair(r["lines"], counts, rng, min_chars=4)
        if pair:
            nxt.append(chat(ZH_NEXT.format(line=pair[0]), pair[1]))
    return _cap([write, author, nxt], max_per_task, rng)


def titles_with_one_author(records: Iterable[dict]) -> set[str]:
    """Titles that name one poem's author: "无题" by many poets has no single answer to "who wrote it?"."""
    authors = defaultdict(set)
    for r in records:
        authors[r["title"]].add(r["author"])
    return {title for title, names in authors.items() if len(names) == 1}


def author_answer(record: dict) -> str:
    dyn = f"（{record['dynasty']}）" if record.get("dynasty") else ""
    return f"《{record['title']}》的作者是{record['author']}{dyn}。"


# Follow-up questions of the multi-turn builders: they refer back to the conversation, not to a title or line.
ZH_FOLLOW_AUTHOR = ("这首诗的作者是谁？", "这首诗是谁写的？", "作者是谁？")
EN_FOLLOW_WHO = ("Who says these lines?", "Who speaks them?", "And who says them?")
EN_FOLLOW_PLAY = ("Which play is it from?", "And which play is that?")


def poetry_dialogues(records: Iterable[dict], seed: int = 0, max_dialogues: int | None = None,
                     max_write_lines: int = 16) -> list[list[Message]]:
    """Multi-turn zh conversations about one poem: write the poem titled X, who wrote it, and for about half of
    them the line after one of its lines (the answer is in the conversation already)."""
    records = [r for r in records if r.get("lines") and r.get("title")]
    counts, single_author = unique_lines(records), titles_with_one_author(records)
    rng = random.Random(seed)
    out = []
    for r in records:
        if len(r["lines"]) > max_write_lines or r["title"] not in single_author:
            continue
        messages = chat(ZH_WRITE.format(title=r["title"]), "\n".join(r["lines"]))
        messages += chat(rng.choice(ZH_FOLLOW_AUTHOR), author_answer(r))
        pair = next_line_pair(r["lines"], counts, rng, min_chars=4)
        if pair and rng.random() < 0.5:
            messages += chat(ZH_NEXT.format(line=pair[0]), pair[1])
        out.append(messages)
    return _cap([out], max_dialogues, rng)


def shakespeare_dialogues(records: Iterable[dict], seed: int = 0,
                          max_dialogues: int | None = None) -> list[list[Message]]:
    """Multi-turn en conversations about one speech: the line after a line, who says them, and for about half
    of them which play they are from."""
    records = [r for r in records if r.get("lines")]
    counts = unique_lines(records)
    rng = random.Random(seed)
    out = []
    for r in records:
        pair = next_line_pair(r["lines"], counts, rng, min_chars=15)
        if not pair:
            continue
        messages = chat(EN_NEXT.format(line=pair[0]), pair[1])
        messages += chat(rng.choice(EN_FOLLOW_WHO), f"{speaker_name(r['speaker'])} says them.")
        if rng.random() < 0.5:
            messages += chat(rng.choice(EN_FOLLOW_PLAY), f"It is from {r['play']}.")
        out.append(messages)
    return _cap([out], max_dialogues, rng)


def speaker_name(name: str) -> str:
    return name.title() if name.isupper() else name


def shakespeare_instructions(records: Iterable[dict], seed: int = 0, max_per_task: int | None = None,
                             max_continue_lines: int = 6) -> list[list[Message]]:
    """en tasks from speeches (`play`, `speaker`, `lines`): continue / who says / which play / next line."""
    records = [r for r in records if r.get("lines")]
    counts = unique_lines(records)
    rng = random.Random(seed)
    cont, who, play, nxt = [], [], [], []
    for r in records:
        lines, speaker = r["lines"], speaker_name(r["speaker"])
        if len(lines) >= 2:
            prompt = EN_CONTINUE.format(speaker=speaker, line=lines[0])
            cont.append(chat(prompt, "\n".join(lines[1:1 + max_continue_lines])))
        quotable = [x for x in lines if counts[x] == 1 and len(x) >= 25]
        if quotable:
            line = rng.choice(quotable)
            who.append(chat(EN_WHO.format(line=line), f"{speaker} says it, in {r['play']}."))
            line = rng.choice(quotable)
            play.append(chat(EN_PLAY.format(line=line), f"It is from {r['play']}."))
        pair = next_line_pair(lines, counts, rng, min_chars=15)
        if pair:
            nxt.append(chat(EN_NEXT.format(line=pair[0]), pair[1]))
    return _cap([cont, who, play, nxt], max_per_task, rng)


def next_line_pair(lines: Sequence[str], counts: Counter, rng: random.Random,
                   min_chars: int) -> tuple[str, str] | None:
    """A random (line, next line) of a record, with an unambiguous first line and both long enough."""
    options = [i for i in range(len(lines) - 1)
               if counts[lines[i]] == 1 and len(lines[i]) >= min_chars and len(lines[i + 1]) >= min_chars]
    if not options:
        return None
    i = rng.choice(options)
    return lines[i], lines[i + 1]


def _cap(tasks: list[list[list[Message]]], max_per_task: int | None, rng: random.Random) -> list[list[Message]]:
    """Keep at most `max_per_task` examples of each task (a seeded sample, in the original order)."""
    out = []
    for task in tasks:
        if max_per_task is not None and len(task) > max_per_task:
            keep = sorted(rng.sample(range(len(task)), max_per_task))
            task = [task[i] for i in keep]
        out += task
    return out


_SELF_ZH = {
    "who": (["你是谁？", "你好，你是谁？", "请介绍一下你自己。", "你叫什么名字？", "你是什么？", "你是哪个模型？"],
            ["我是{name}，一个由{author}开发的小型语言模型助手。有什么可以帮你的吗？",
             "你好！我叫{name}，是{author}训练的一个AI助手。",
             "我是{name}，由{author}开发。我可以陪你聊天，也会背一些古诗。"]),
    "author": (["谁开发了你？", "你是谁创造的？", "你的作者是谁？", "谁训练了你？"],
               ["我是由{author}开发的{name}。", "{author}创造了我，我的名字是{name}。"]),
    "chatgpt": (["你是ChatGPT吗？", "你是OpenAI开发的吗？"],
                ["不是，我是{name}，由{author}开发的小模型。"]),
}
_SELF_EN = {
    "who": (["Who are you?", "Hi, who are you?", "Introduce yourself.", "What is your name?", "What are you?",
             "Which model are you?"],
            ["I am {name}, a small language model assistant developed by {author}. How can I help you?",
             "Hello! My name is {name}, an AI assistant trained by {author}.",
             "I'm {name}, made by {author}. I can chat with you and I know some poems and plays."]),
    "author": (["Who made you?", "Who created you?", "Who is your author?", "Who trained you?"],
               ["I was developed by {author}; my name is {name}.", "{author} created me. I am {name}."]),
    "chatgpt": (["Are you ChatGPT?", "Were you made by OpenAI?"],
                ["No, I am {name}, a small model developed by {author}."]),
}


_SYSTEM_PROMPTS = {
    "zh": ["你是一个乐于助人的助手。", "你是{name}，由{author}开发的AI助手。", "你是一位熟悉古诗词的助手，请简洁地回答。",
           "请用简短的中文回答用户的问题。", "You are a helpful assistant."],
    "en": ["You are a helpful assistant.", "You are {name}, an AI assistant made by {author}.",
           "You are an assistant who knows Shakespeare's plays. Answer briefly.",
           "Answer the user's questions briefly and politely."],
}


def system_prompts(name: str = "BabyLlama", author: str = "babyllama") -> dict[str, list[str]]:
    """Varied system prompts, `{"zh": [...], "en": [...]}`, so the model learns to read a system message; the
    identity ones use the self-cognition set's name and author, so they never contradict it."""
    return {lang: [p.format(name=name, author=author) for p in prompts] for lang, prompts in _SYSTEM_PROMPTS.items()}


def self_cognition(name: str = "BabyLlama", author: str = "babyllama") -> dict[str, list[list[Message]]]:
    """"Who are you?" conversations, `{"zh": [...], "en": [...]}`: every question with every answer of its intent."""
    def build(table: dict) -> list[list[Message]]:
        return [chat(q, a.format(name=name, author=author)) for qs, answers in table.values() for q in qs
                for a in answers]
    return {"zh": build(_SELF_ZH), "en": build(_SELF_EN)}


# ======================================================================= held-out multiple choice
def build_choice_items(records: Iterable[dict], lang: str, seed: int = 0,
                       max_items: int | None = None) -> list[dict]:
    """4-way "which line comes next" items from HELD-OUT records (poems for `zh`, speeches for `en`).

    Each item is `{"messages": [user prompt], "choices": [4 str], "answer": int}`: the true next line and
    three lines of similar length from other records. Answer positions are balanced over 0..3."""
    if lang not in ("zh", "en"):
        raise UserError(f"build_choice_items: lang must be 'zh' or 'en', got {lang!r}")
    template, min_chars = (ZH_NEXT, 4) if lang == "zh" else (EN_NEXT, 15)
    records = [r for r in records if r.get("lines")]
    counts = unique_lines(records)
    by_len: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for k, r in enumerate(records):
        for line in dict.fromkeys(r["lines"]):
            by_len[len(line)].append((k, line))
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    items = []
    for k in order:
        pair = next_line_pair(records[k]["lines"], counts, rng, min_chars)
        distractors = pair and _distractors(by_len, k, pair[1], rng)
        if distractors:
            items.append((pair[0], pair[1], distractors))
        if max_items is not None and len(items) >= max_items:
            break
    answers = [i % 4 for i in range(len(items))]
    rng.shuffle(answers)
    return [_choice_item(template.format(line=line), truth, wrong, pos)
            for (line, truth, wrong), pos in zip(items, answers)]


def _distractors(by_len: dict[int, list[tuple[int, str]]], record: int, truth: str, rng: random.Random,
                 pool_size: int = 16) -> list[str] | None:
    """Three distinct lines from other records, sampled among the ~`pool_size` closest in length to `truth`."""
    pool: list[str] = []
    lengths = sorted(by_len, key=lambda n: (abs(n - len(truth)), n))
    for n in lengths:
        pool += [line for k, line in by_len[n] if k != record and line != truth]
        if len(set(pool)) >= pool_size:
            break
    pool = list(dict.fromkeys(pool))
    return rng.sample(pool, 3) if len(pool) >= 3 else None


def _choice_item(prompt: str, truth: str, wrong: list[str], answer: int) -> dict:
    choices = wrong[:answer] + [truth] + wrong[answer:]
    return {"messages": [{"role": "user", "content": prompt}], "choices": choices, "answer": answer}


# ======================================================================= dataset and batching
class SFTDataset(torch.utils.data.Dataset):
    """Conversations tokenized once with `encode_chat`; item i is `(input_ids, labels)` (aligned, int64).

    Conversations with no supervised token left after truncation to `max_len` are dropped (`self.dropped`);
    `source` (the data file) names them in the error when none is left."""

    def __init__(self, conversations: Iterable[Sequence[Message]], tokenizer: Any, max_len: int,
                 system: str | None = None, source: str | Path = "SFT data"):
        self.max_len, self.pad_id = max_len, tokenizer.pad_id
        self._ids: list[np.ndarray] = []
        self._mask: list[np.ndarray] = []  # True where the token is supervised (compact form of the labels)
        self.dropped = 0
        for messages in conversations:
            try:
                ids, labels = encode_chat(messages, tokenizer, max_len, system)
            except NoSupervisedTokens:
                self.dropped += 1
                continue
            self._ids.append(np.asarray(ids, dtype=np.int32))
            self._mask.append(np.asarray(labels, dtype=np.int64) != IGNORE_INDEX)
        if not self._ids:
            raise UserError(f"{source}: no SFT sample fits max_len={max_len} ({self.dropped} dropped: no room for a "
                            f"reply after <s> and the system message); shorten the system message or raise --seq-len")

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        ids = torch.from_numpy(self._ids[i].astype(np.int64))
        labels = torch.where(torch.from_numpy(self._mask[i]), ids, IGNORE_INDEX)
        return ids, labels

    @property
    def lengths(self) -> list[int]:
        """Row length of each sample in a batch (tokens - 1, after the next-token shift)."""
        return [len(ids) - 1 for ids in self._ids]

    def supervised_tokens(self) -> int:
        return int(sum(m.sum() for m in self._mask))


def collate_sft(samples: Sequence[tuple[Tensor, Tensor]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad aligned `(input_ids, labels)` samples into `(input_ids, targets)` with targets shifted by one."""
    width = max(len(ids) for ids, _ in samples) - 1
    x = torch.full((len(samples), width), pad_id, dtype=torch.long)
    y = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, labels) in enumerate(samples):
        x[b, : len(ids) - 1] = ids[:-1]
        y[b, : len(ids) - 1] = labels[1:]
    return x, y


class BucketBatchSampler:
    """Seeded, resumable, rank-sharded batches of similar-length samples.

    Each epoch: shuffle the indices (seed + epoch), cut them into chunks of `bucket_batches` batches, sort each
    chunk by length, cut it into batches, shuffle the batch order (a short last batch stays last). Rank r of `world_size` takes batches
    r, r + world_size, ... (every rank gets the same number). `bucket_batches=1` is plain random batching.
    `state_dict()` is `{"epoch", "consumed"}` with `consumed` = samples this rank has been given this epoch;
    a completed pass moves on to the next epoch by itself (`set_epoch` also works, as for DistributedSampler).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, bucket_batches: int = 128, drop_last: bool = False):
        if batch_size < 1 or bucket_batches < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: batch_size={batch_size}, bucket_batches={bucket_batches}, "
                             f"rank={rank}, world_size={world_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size, self.bucket_batches, self.drop_last = rank, world_size, bucket_batches, drop_last
        self.epoch = self.consumed = 0

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of an epoch."""
        g = np.random.default_rng([self.seed, epoch])
        order = g.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        chunk = self.batch_size * self.bucket_batches
        batches = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[i:i + self.batch_size].tolist() for i in range(0, len(part), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle:
            full = [full[i] for i in g.permutation(len(full))]
        # the one short batch goes last, so every rank's `consumed` is a multiple of batch_size before it
        batches = full + ([] if self.drop_last else [b for b in batches if len(b) < self.batch_size])
        usable = len(batches) // self.world_size * self.world_size  # equal counts keep DDP ranks in step
        return batches[self.rank:usable:self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        seen = 0
        for batch in self.batches(self.epoch):
            seen += len(batch)
            if seen <= self.consumed:  # resuming: skip what was already given out
                continue
            self.consumed = seen
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


class SFTLoader:
    """Iterable of collated batches; `loader.sampler` is the resumable sampler the Trainer saves and restores."""

    def __init__(self, dataset: SFTDataset, sampler: BucketBatchSampler):
        self.dataset, self.sampler = dataset, sampler

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.sampler:
            yield collate_sft([self.dataset[i] for i in batch], self.dataset.pad_id)

    def __len__(self) -> int:
        return len(self.sampler)


def build_sft_loader(dataset: SFTDataset, batch_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                     world_size: int = 1, bucket_batches: int = 128, drop_last: bool = False) -> SFTLoader:
    """Length-bucketed `(input_ids, targets)` batches over `dataset` (see `BucketBatchSampler`)."""
    sampler = BucketBatchSampler(dataset.lengths, batch_size, seed, shuffle, rank, world_size, bucket_batches,
                                 drop_last)
    return SFTLoader(dataset, sampler)


def padding_fraction(lengths: Sequence[int], batch_size: int, max_len: int | None = None, bucketed: bool = True,
                     seed: int = 0, bucket_batches: int = 128) -> float:
    """Fraction of pad positions over one epoch of batches (right padding to the longest row of each batch)."""
    lengths = [min(n, max_len) if max_len else n for n in lengths]
    sampler = BucketBatchSampler(lengths, batch_size, seed, bucket_batches=bucket_batches if bucketed else 1)
    real = total = 0
    for batch in sampler.batches(0):
        rows = [lengths[i] for i in batch]
        real, total = real + sum(rows), total + max(rows) * len(rows)
    return 1 - real / total if total else 0.0
