"""Build the shipped verifiable skill suite (data/skills/): items a program can check, Chinese and English.

    babyllama data build skills                    # -> data/skills/skills_{train,heldout}.jsonl + README.md
    babyllama data build skills --train-per-skill 2000 --heldout-per-skill 400 --seed 0

Skills (the item schema and the checks: babyllama/eval/skills.py):
- `add`, `sub`: a + b and a - b (a >= b) of numbers 0-99, asked in zh or en; the answer in digits;
- `to_words`: a number 0-999 written out, in Chinese numerals (三百零五) or English words (three hundred five);
- `from_words`: the reverse, numerals or words to digits;
- `count`: how many characters a Chinese phrase has, or how many letters an English word has;
- `copy`: repeat a line of verse or a few words of Shakespeare;
- `reverse`: a short Chinese phrase or an English word written backwards;
- `next_line`: the second half of a couplet from its first half, checked for the right length (as long as the
  first half, all Chinese characters): the exact line is not knowable for an unseen poem;
- `length`: a reply of exactly N Chinese characters, or N English words, about a topic.

Train and held-out never share a problem: the held-out arithmetic pairs and numbers are set aside first and never
drawn for training, and the held-out phrases, words, couplets and topics come from the HELD-OUT corpus files
(data/corpus/*_heldout.jsonl) or a held-out topic list, the training ones from the TRAIN files. Every random
choice comes from --seed.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

from babyllama.cli import ArgumentParser
from babyllama.data.corpus import iter_records
from babyllama.eval.skills import SkillItem, check_reply
from babyllama.files import write_atomic
from babyllama.shipped import CORPUS, SKILLS

_DIGITS = "零一二三四五六七八九"
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ZH_COUNT = {3: "三", 4: "四", 5: "五", 6: "六", 7: "七"}
_HALF = re.compile(r"[^，。？！；：、]+")
_CJK_ONLY = re.compile(r"[\u4e00-\u9fff]+")
# topics of the length skill: training and held-out ones are disjoint
ZH_TOPICS = {"train": "春月山水花风雨雪秋夜江云天日柳人心年家门光香寒声烟石松竹船", "heldout": "草鸟酒城霜舟马泪梦灯"}
EN_TOPICS = {"train": ("love night king death heaven blood heart sun world soul honour war crown fortune sea moon lord "
                       "life man father son eyes hand day name duke mother").split(),
             "heldout": "grief sleep sword queen time earth god fear hope friend".split()}

TEMPLATES = {
    ("add", "zh"): ("计算：{a}+{b}", "{a}加{b}等于多少？", "{a}+{b}=?"),
    ("add", "en"): ("What is {a} plus {b}?", "Compute {a} + {b}.", "{a}+{b}=?"),
    ("sub", "zh"): ("计算：{a}-{b}", "{a}减{b}等于多少？", "{a}-{b}=?"),
    ("sub", "en"): ("What is {a} minus {b}?", "Compute {a} - {b}.", "{a}-{b}=?"),
    ("to_words", "zh"): ("把{n}写成汉字。", "{n}用中文数字怎么写？"),
    ("to_words", "en"): ("Write {n} in words.", "How do you write {n} in English words?"),
    ("from_words", "zh"): ("“{w}”用阿拉伯数字怎么写？", "把“{w}”写成数字。"),
    ("from_words", "en"): ("Write \"{w}\" as a number.", "What number is \"{w}\"?"),
    ("count", "zh"): ("“{s}”有几个字？", "数一数“{s}”有多少个字。"),
    ("count", "en"): ("How many letters are in the word \"{s}\"?", "Count the letters of \"{s}\"."),
    ("copy", "zh"): ("请重复这句话：{s}", "照抄：{s}"),
    ("copy", "en"): ("Repeat exactly: {s}", "Copy this: {s}"),
    ("reverse", "zh"): ("把“{s}”倒过来写。", "倒序写出：{s}"),
    ("reverse", "en"): ("Spell the word \"{s}\" backwards.", "Reverse the letters of \"{s}\"."),
    ("next_line", "zh"): ("“{s}”的下一句是什么？", "接下一句：{s}"),
    ("length", "zh"): ("用{n}个字描写{s}。", "请用{n}个字写一句关于{s}的诗。", "关于{s}，用{n}个字回答。"),
    ("length", "en"): ("Describe {s} in exactly {n} words.", "Say something about {s} in {n} words.",
                       "Write {n} words about {s}."),
}
ALL_SKILLS = ("add", "sub", "to_words", "from_words", "count", "copy", "reverse", "next_line", "length")
# What the shipped suite holds: the skills the baby chain measurably learns. The others stayed at 0-2% held-out
# after 600-1800 SFT steps with the baby model (4M parameters), also when SFT learned nothing else (docs/skills.md);
# build them for a larger model with --skills.
SHIPPED_SKILLS = ("count", "next_line", "length")


# ======================================================================= numbers
def zh_numeral(n: int) -> str:
    """0-999 in Chinese numerals: 十五, 二十, 一百零五, 一百一十."""
    if n < 10:
        return _DIGITS[n]
    if n < 20:
        return "十" + (_DIGITS[n - 10] if n > 10 else "")
    if n < 100:
        return _DIGITS[n // 10] + "十" + (_DIGITS[n % 10] if n % 10 else "")
    rest = n % 100
    head = _DIGITS[n // 100] + "百"
    if rest == 0:
        return head
    if rest < 10:
        return head + "零" + _DIGITS[rest]
    return head + (_DIGITS[1] + zh_numeral(rest) if rest < 20 else zh_numeral(rest))


def en_words(n: int) -> str:
    """0-999 in English words: forty-two, three hundred five."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")
    return f"{_ONES[n // 100]} hundred" + (f" {en_words(n % 100)}" if n % 100 else "")


# ======================================================================= text material
def zh_halves(records: Iterable[dict]) -> list[tuple[str, str]]:
    """(first, second) halves of couplets whose halves are 5 or 7 Chinese characters of equal length."""
    pairs = []
    for r in records:
        for line in r["lines"]:
            halves = _HALF.findall(line)
            if len(halves) == 2 and len(halves[0]) == len(halves[1]) in (5, 7) and all(
                    _CJK_ONLY.fullmatch(h) for h in halves):
                pairs.append((halves[0], halves[1]))
    return sorted(set(pairs))


def en_words_of(records: Iterable[dict]) -> tuple[list[str], list[list[str]]]:
    """(distinct lower-case words of 3-8 letters, each verse line as a list of its plain words)."""
    lines = [re.findall(r"[A-Za-z]+", line) for r in records for line in r["lines"]]
    words = sorted({w.lower() for line in lines for w in line if 3 <= len(w) <= 8})
    return words, [line for line in lines if len(line) >= 2]


class Material:
    """The phrases, words and couplets of one split of the shipped corpus; held-out material leaves out what the
    training files also have (a common word, a repeated line)."""

    def __init__(self, split: str, corpus_dir: Path, train: "Material | None" = None):
        suffix = "train" if split == "train" else "heldout"
        self.halves = zh_halves(iter_records(corpus_dir / f"poetry_zh_{suffix}.jsonl"))
        self.words, self.lines = en_words_of(iter_records(corpus_dir / f"shakespeare_en_{suffix}.jsonl"))
        if train is not None:
            seen = {h for pair in train.halves for h in pair}
            self.halves = [p for p in self.halves if not seen & set(p)]
            self.words = sorted(set(self.words) - set(train.words))
        self.zh_topics, self.en_topics = ZH_TOPICS[split], EN_TOPICS[split]
        self.short_words = [w for w in self.words if len(w) <= 6]
        single = [h for pair in self.halves for h in pair]
        # the length skill's reference replies: by length, and by length and topic
        self.zh_fitting = {n: [h for h in single if len(h) >= n] for n in _ZH_COUNT}
        self.zh_topical = {(n, t): [h for h in self.zh_fitting[n] if t in h] for n in _ZH_COUNT for t in self.zh_topics}
        self.en_fitting = {n: [line for line in self.lines if len(line) >= n] for n in range(2, 7)}
        self.en_topical = {(n, t): [line for line in self.en_fitting[n] if t in (w.lower() for w in line)]
                           for n in range(2, 7) for t in self.en_topics}


# ======================================================================= one item per skill
def item(skill: str, lang: str, rng: random.Random, answer: str, check: str = "exact", **fields: object) -> SkillItem:
    prompt = rng.choice(TEMPLATES[(skill, lang)]).format(**fields)
    return {"skill": skill, "lang": lang, "prompt": prompt, "answer": answer, "check": check}


def arithmetic(skill: str, pairs: Sequence[tuple[int, int]]) -> Callable[[random.Random, str], SkillItem]:
    def make(rng: random.Random, lang: str) -> SkillItem:
        a, b = rng.choice(pairs)  # an unordered pair: a + b and b + a are one problem
        a, b = (max(a, b), min(a, b)) if skill == "sub" or rng.random() < 0.5 else (min(a, b), max(a, b))
        return item(skill, lang, rng, str(a + b if skill == "add" else a - b), a=a, b=b)
    return make


def to_words(numbers: Sequence[int]) -> Callable[[random.Random, str], SkillItem]:
    def make(rng: random.Random, lang: str) -> SkillItem:
        n = rng.choice(numbers)
        return item("to_words", lang, rng, zh_numeral(n) if lang == "zh" else en_words(n), n=n)
    return make


def from_words(numbers: Sequence[int]) -> Callable[[random.Random, str], SkillItem]:
    def make(rng: random.Random, lang: str) -> SkillItem:
        n = rng.choice(numbers)
        return item("from_words", lang, rng, str(n), w=zh_numeral(n) if lang == "zh" else en_words(n))
    return make


def zh_phrase(m: Material, rng: random.Random, low: int, high: int) -> str:
    half = rng.choice(m.halves)[rng.randrange(2)]
    n = rng.randint(low, min(high, len(half)))
    start = rng.randrange(len(half) - n + 1)
    return half[start:start + n]


def text_skill(skill: str, m: Material) -> Callable[[random.Random, str], SkillItem]:
    def make(rng: random.Random, lang: str) -> SkillItem:
        if skill == "count":
            s = zh_phrase(m, rng, 2, 7) if lang == "zh" else rng.choice(m.words)
            return item(skill, lang, rng, str(len(s)), s=s)
        if skill == "copy":
            if lang == "zh":
                s = rng.choice(m.halves)[rng.randrange(2)]
            else:
                line = rng.choice(m.lines)
                n = rng.randint(2, min(5, len(line)))
                start = rng.randrange(len(line) - n + 1)
                s = " ".join(line[start:start + n])
            return item(skill, lang, rng, s, s=s)
        if skill == "reverse":
            s = zh_phrase(m, rng, 3, 5) if lang == "zh" else rng.choice(m.short_words)
            return item(skill, lang, rng, s[::-1], s=s)
        if skill == "next_line":
            first, second = rng.choice(m.halves)
            return item(skill, lang, rng, second, f"zh_chars:{len(second)}", s=first)
        return length_item(m, rng, lang)
    return make


def length_item(m: Material, rng: random.Random, lang: str) -> SkillItem:
    """A reply of exactly n characters (zh) or words (en) about a topic; the reference reply is a piece of verse of
    that length, with the topic in it where the corpus has one."""
    if lang == "zh":
        n, topic = rng.randint(3, 7), rng.choice(m.zh_topics)
        half = rng.choice(m.zh_topical[(n, topic)] or m.zh_fitting[n])
        at = half.find(topic)
        start = rng.randint(max(0, at - n + 1), min(at, len(half) - n)) if at >= 0 else rng.randrange(len(half) - n + 1)
        return item("length", lang, rng, half[start:start + n], f"zh_chars:{n}", n=_ZH_COUNT[n], s=topic)
    n, topic = rng.randint(2, 6), rng.choice(m.en_topics)
    line = rng.choice(m.en_topical[(n, topic)] or m.en_fitting[n])
    start = rng.randrange(len(line) - n + 1)
    return item("length", lang, rng, " ".join(line[start:start + n]), f"words:{n}", n=n, s=topic)


def languages(skill: str) -> tuple[str, ...]:
    return tuple(lang for lang in ("zh", "en") if (skill, lang) in TEMPLATES)


# ======================================================================= the two splits
def build_items(train_per_skill: int, heldout_per_skill: int, seed: int = 0, corpus_dir: Path = CORPUS,
                skills: Sequence[str] = SHIPPED_SKILLS) -> dict[str, list[SkillItem]]:
    """{"train": [...], "heldout": [...]}: per skill, items drawn evenly over its languages, distinct prompts."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(100) for b in range(a, 100)]
    rng.shuffle(pairs)
    numbers = list(range(1000))
    rng.shuffle(numbers)
    split_pairs = {"heldout": pairs[:600], "train": pairs[600:]}
    split_numbers = {"heldout": numbers[:150], "train": numbers[150:]}
    out = {}
    train = Material("train", corpus_dir)
    for split, per_skill in (("train", train_per_skill), ("heldout", heldout_per_skill)):
        m = train if split == "train" else Material(split, corpus_dir, train)
        makers = {"add": arithmetic("add", split_pairs[split]), "sub": arithmetic("sub", split_pairs[split]),
                  "to_words": to_words(split_numbers[split]), "from_words": from_words(split_numbers[split]),
                  **{s: text_skill(s, m) for s in ("count", "copy", "reverse", "next_line", "length")}}
        items: list[SkillItem] = []
        for skill in ALL_SKILLS:  # every skill draws from the generator, so a skill's items do not depend on the others
            made = distinct(makers[skill], languages(skill), per_skill, rng)
            items += made if skill in skills else []
        out[split] = items
    seen = {i["prompt"] for i in out["train"]}  # e.g. a common two-word phrase both corpus splits have
    out["heldout"] = [i for i in out["heldout"] if i["prompt"] not in seen]
    return out


def distinct(make: Callable[[random.Random, str], SkillItem], langs: Sequence[str], n: int,
             rng: random.Random) -> list[SkillItem]:
    """`n` items with distinct prompts, alternating the languages (fewer when the material runs out)."""
    seen: dict[str, SkillItem] = {}
    for attempt in range(n * 20):
        if len(seen) == n:
            break
        new = make(rng, langs[attempt % len(langs)])
        if check_reply(new, new["answer"]):  # the reference reply must pass its own check
            seen.setdefault(new["prompt"], new)
    return list(seen.values())


def write_jsonl(path: Path, items: Sequence[SkillItem]) -> None:
    write_atomic(path, "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items).encode("utf-8"))


def readme(splits: dict[str, list[SkillItem]], args: argparse.Namespace) -> str:
    counts = {s: Counter((i["skill"], i["lang"]) for i in items) for s, items in splits.items()}
    rows = [f"| {skill} | {lang} | {counts['train'][(skill, lang)]} | {counts['heldout'][(skill, lang)]} | "
            f"`{next(i['prompt'] for i in splits['heldout'] if (i['skill'], i['lang']) == (skill, lang))}` |"
            for skill in args.skills for lang in languages(skill)]
    return "\n".join([
        "# Verifiable skill suite", "",
        "Items a program can check, for SFT (`skills_train.jsonl` is one of SFT's default training files), GRPO's "
        "rule rewards (`babyllama grpo`) and every stage's held-out skill accuracy (`skills_heldout.jsonl`, "
        "`babyllama evaluate`). Generated, do not edit by hand:", "",
        f"    babyllama data build skills --train-per-skill {args.train_per_skill} --heldout-per-skill "
        f"{args.heldout_per_skill} --seed {args.seed}", "",
        f"Skills: {', '.join(args.skills)}; `--skills` also builds "
        f"{', '.join(s for s in ALL_SKILLS if s not in args.skills)} (sums, numbers in words, copying and reversing: "
        "the baby model stayed at 0-2% on them after SFT, docs/skills.md).", "",
        "Schema and checks: `babyllama/eval/skills.py`; how the items are made and why train and held-out share no "
        "problem: `babyllama/build/skills.py`. The phrases, words and couplets are taken from the shipped corpus "
        "(data/corpus: public-domain Tang poems and Shakespeare), the held-out ones from its held-out files.", "",
        "| skill | lang | train | held-out | a held-out prompt |", "|---|---|---|---|---|", *rows, ""])


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=SKILLS, help="folder to write the two splits and README to")
    ap.add_argument("--skills", nargs="+", choices=ALL_SKILLS, default=list(SHIPPED_SKILLS),
                    help=f"skills to build (default: {' '.join(SHIPPED_SKILLS)})")
    ap.add_argument("--train-per-skill", type=int, default=2000, help="training items per skill (default: 2000)")
    ap.add_argument("--heldout-per-skill", type=int, default=400, help="held-out items per skill (default: 400)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    ap.add_argument("--corpus-dir", type=Path, default=CORPUS, help="the shipped corpus folder (default: data/corpus)")
    args = ap.parse_args(argv)
    splits = build_items(args.train_per_skill, args.heldout_per_skill, args.seed, args.corpus_dir, args.skills)
    args.dest.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        write_jsonl(args.dest / f"skills_{split}.jsonl", items)
    write_atomic(args.dest / "README.md", readme(splits, args).encode("utf-8"))
    print(f"wrote {len(splits['train'])} training and {len(splits['heldout'])} held-out items to {args.dest}")
