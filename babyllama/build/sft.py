"""Build the shipped SFT set and the held-out multiple-choice eval set (deterministic from --seed).

    pip install chatterbot-corpus==1.3.3
    babyllama data build sft                                   # -> data/sft/
    babyllama data build sft --assistant-name Xiaobai --author Alice  # the self-cognition set's name and author
    babyllama data build sft --tokenizer out/baby/tokenizer   # also report token lengths and padding

Writes, in the OpenAI `messages` format (plus `source` and `lang` keys, which readers ignore):
- `sft_train.jsonl`, `sft_valid.jsonl`: chatterbot-corpus (zh + en), instructions and multi-turn dialogues
  templated from the shipped corpus TRAIN files (poems, Shakespeare), and the self-cognition set; a seeded
  --system-share of the conversations starts with one of a few zh/en system prompts;
- `choice_eval.jsonl`: 4-way "which line comes next" items from the HELD-OUT corpus files only;
- `README.md`: what is inside, counts, and the licences.
"""
from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from babyllama.build import builders
from babyllama.cli import ArgumentParser
from babyllama.data.sft import SFTDataset, padding_fraction
from babyllama.errors import UserError
from babyllama.shipped import REPO_ROOT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-dir", type=Path, default=REPO_ROOT / "data" / "corpus",
                   help="folder of the shipped corpus files templated from (default: data/corpus)")
    p.add_argument("--chatterbot-dir", type=Path, default=None,
                   help="chatterbot-corpus data folder (default: the installed package)")
    p.add_argument("--dest", type=Path, default=REPO_ROOT / "data" / "sft",
                   help="folder to write the sets and their README to (default: data/sft)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    p.add_argument("--assistant-name", default="BabyLlama", help="the assistant's name in the self-cognition set")
    p.add_argument("--author", default="babyllama", help="the assistant's author in the self-cognition set")
    p.add_argument("--self-repeat", type=int, default=3, help="copies of the (small) self-cognition set")
    p.add_argument("--poetry-per-task", type=int, default=1300, help="examples per templated zh poetry task (3)")
    p.add_argument("--shakespeare-per-task", type=int, default=900, help="examples per templated en task (4)")
    p.add_argument("--dialogues", type=int, default=500, help="multi-turn conversations per language")
    p.add_argument("--system-share", type=float, default=0.2, help="share of conversations given a system prompt")
    p.add_argument("--valid-size", type=int, default=300, help="examples held out as sft_valid.jsonl (default: 300)")
    # Every usable line pair of the held-out files (684 zh, 818 en): an accuracy near 27% then has a binomial
    # standard error of 1.1 points overall; one item per held-out record (376) gave 2.3 and could not show a
    # 5-point change.
    p.add_argument("--choice-items", type=int, default=1000, help="multiple-choice items per language, at most")
    p.add_argument("--choice-per-record", type=int, default=30,
                   help="items drawn from one held-out poem or speech, at most (different lines of it)")
    p.add_argument("--tokenizer", default=None, help="report token lengths and padding with this tokenizer")
    p.add_argument("--max-len", type=int, default=512,
                   help="with --tokenizer: tokens per example at most; longer ones count as dropped (default: 512)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="with --tokenizer: batch size of the padding report (default: 16)")
    return p.parse_args(argv)


def load_records(path: Path) -> list[dict]:
    if not path.exists():
        raise UserError(f"{path} is missing: build the shipped corpus first (data/corpus/)")
    from babyllama.data.corpus import iter_records
    return list(iter_records(path))


def tagged(convs: list, source: str, lang: str) -> list[dict]:
    return [{"source": source, "lang": lang, "messages": m} for m in convs]


def build_examples(args: argparse.Namespace) -> list[dict]:
    bot = args.chatterbot_dir or builders.chatterbot_dir()
    poems = load_records(args.corpus_dir / "poetry_zh_train.jsonl")
    speeches = load_records(args.corpus_dir / "shakespeare_en_train.jsonl")
    self_set = builders.self_cognition(args.assistant_name, args.author)
    examples = (
        tagged(builders.read_chatterbot(bot / "chinese"), "chatterbot", "zh")
        + tagged(builders.read_chatterbot(bot / "english"), "chatterbot", "en")
        + tagged(builders.poetry_instructions(poems, args.seed, args.poetry_per_task), "poetry", "zh")
        + tagged(builders.poetry_dialogues(poems, args.seed, args.dialogues), "poetry_dialogue", "zh")
        + tagged(builders.shakespeare_instructions(speeches, args.seed, args.shakespeare_per_task), "shakespeare", "en")
        + tagged(builders.shakespeare_dialogues(speeches, args.seed, args.dialogues), "shakespeare_dialogue", "en")
        + tagged(self_set["zh"] * args.self_repeat, "self", "zh")
        + tagged(self_set["en"] * args.self_repeat, "self", "en"))
    rng = random.Random(args.seed)
    add_system_prompts(examples, builders.system_prompts(args.assistant_name, args.author), args.system_share, rng)
    rng.shuffle(examples)
    return examples


def add_system_prompts(examples: list[dict], prompts: dict[str, list[str]], share: float,
                       rng: random.Random) -> None:
    """Start about `share` of the examples with a system prompt of their language; the rest keep none, as when
    a user passes no --system."""
    for e in examples:
        if rng.random() < share:
            e["messages"] = [{"role": "system", "content": rng.choice(prompts[e["lang"]])}, *e["messages"]]


def build_choices(args: argparse.Namespace) -> list[dict]:
    items = []
    for lang, name in (("zh", "poetry_zh_heldout.jsonl"), ("en", "shakespeare_en_heldout.jsonl")):
        records = load_records(args.corpus_dir / name)
        items += [{"lang": lang, **it} for it in builders.build_choice_items(records, lang, args.seed,
                                                                             args.choice_items,
                                                                             args.choice_per_record)]
    return items


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def counts_table(train: list[dict], valid: list[dict]) -> str:
    keys = sorted(Counter((e["lang"], e["source"]) for e in train + valid))
    tr, va = Counter((e["lang"], e["source"]) for e in train), Counter((e["lang"], e["source"]) for e in valid)
    rows = [f"| {lang} | {src} | {tr[(lang, src)]} | {va[(lang, src)]} |" for lang, src in keys]
    shapes = [(what, sum(map(test, train)), sum(map(test, valid))) for what, test in SHAPES]
    return "\n".join(["| lang | source | train | valid |", "|---|---|---|---|", *rows,
                      f"| all | all | {len(train)} | {len(valid)} |",
                      *(f"| all | {what} | {t} | {v} |" for what, t, v in shapes)])


SHAPES = [("with a system prompt", lambda e: e["messages"][0]["role"] == "system"),
          ("multi-turn (2+ replies)", lambda e: sum(m["role"] == "assistant" for m in e["messages"]) > 1)]


def token_report(args: argparse.Namespace, train: list[dict]) -> str:
    from babyllama.data.tokenizer import Tokenizer
    ds = SFTDataset([e["messages"] for e in train], Tokenizer.load(args.tokenizer), args.max_len)
    n = sorted(ds.lengths)
    pad = {b: padding_fraction(ds.lengths, args.batch_size, bucketed=b, seed=args.seed) for b in (True, False)}
    return (f"tokens per example: median {n[len(n) // 2]}, p95 {n[int(len(n) * 0.95)]}, max {n[-1]}; "
            f"{ds.dropped} dropped at max_len={args.max_len}; supervised tokens {ds.supervised_tokens()}; "
            f"padding at batch {args.batch_size}: bucketed {pad[True]:.1%}, random {pad[False]:.1%}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    examples = build_examples(args)
    valid, train = examples[: args.valid_size], examples[args.valid_size:]
    choices = build_choices(args)
    args.dest.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.dest / "sft_train.jsonl", train)
    write_jsonl(args.dest / "sft_valid.jsonl", valid)
    write_jsonl(args.dest / "choice_eval.jsonl", choices)
    table = counts_table(train, valid)
    n_choices = Counter(c["lang"] for c in choices)
    (args.dest / "README.md").write_text(README.format(table=table, zh=n_choices["zh"], en=n_choices["en"],
                                                          seed=args.seed, name=args.assistant_name, author=args.author,
                                                          system_share=args.system_share),
                                            encoding="utf-8")
    print(table)
    print(f"choice_eval: {dict(n_choices)}")
    if args.tokenizer:
        print(token_report(args, train))


README = """# Shipped SFT data

Generated by `babyllama data build sft --seed {seed} --assistant-name {name} --author {author}`; do not edit by hand.

| file | what |
|---|---|
| `sft_train.jsonl`, `sft_valid.jsonl` | `{{"source", "lang", "messages": [{{"role", "content"}}]}}`, \
the OpenAI chat format |
| `choice_eval.jsonl` | `{{"lang", "messages", "choices": [4 str], "answer": int}}`: \
which line comes next ({zh} zh, {en} en) |

{table}

Sources:
- `chatterbot`: the Chinese (simplified) and English dialogues of chatterbot-corpus 1.3.3 (PyPI
  `chatterbot-corpus`), without `botprofile.yml` and without conversations about the bot's identity, which
  the self-cognition set replaces. Licence below.
- `poetry`, `shakespeare`: questions templated from the shipped corpus TRAIN files only (`data/corpus/
  *_train.jsonl`; see `data/corpus/` for their sources and licences): write a poem titled X, who wrote X,
  the next line of a poem; continue a speech, who says a line, which play a line is from, the next line.
- `poetry_dialogue`, `shakespeare_dialogue`: multi-turn conversations from the same TRAIN files, whose later
  questions refer back ("write the poem titled X" -> "who wrote it?" -> sometimes "the line after Y?";
  "which line follows Y?" -> "who says them?" -> sometimes "which play is that?").
- `self`: "who are you" questions and answers written for this project (name and author are options of the
  build script), repeated to weigh them up.
- System prompts: {system_share:.0%} of the conversations (drawn with the seed, any source) start with one of a
  few zh/en system prompts (`babyllama/build/builders.py` `system_prompts`); the rest have none.
- `choice_eval.jsonl` uses the HELD-OUT corpus files only; nothing in it is trained on.

## chatterbot-corpus licence

Copyright (c) 2016, Gunther Cox
All rights reserved.

Redistribution and use in source and binary forms, with or without modification, are permitted provided that
the following conditions are met:

* Redistributions of source code must retain the above copyright notice, this list of conditions and the
  following disclaimer.
* Redistributions in binary form must reproduce the above copyright notice, this list of conditions and the
  following disclaimer in the documentation and/or other materials provided with the distribution.
* Neither the name of ChatterBot nor the names of its contributors may be used to endorse or promote products
  derived from this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED
WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A
PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY
DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO,
PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR
OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH
DAMAGE.
"""
