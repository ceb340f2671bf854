"""Sequence-level distillation measured: how close students come to a teacher on held-out prompts.

    babyllama bench reply_distill --split kd/         # hold out 200 taught prompts: kd/{A,B}_train.jsonl, kd/heldout_*
    babyllama sft --name A --train-data kd/A_train.jsonl data/skills/skills_train.jsonl     # and B the same
    babyllama bench reply_distill --students out/A/sft out/B/sft --labels shipped teacher \\
        --tokenizer out/baby/tokenizer --teacher imported_smol --teacher-tokenizer imported_smol/tokenizer \\
        --teacher-replies kd/heldout_teacher.jsonl --original kd/heldout_original.jsonl

`--split DIR` writes the two training sets and the held-out sets: --hold-out prompts the teacher answered (each
asked once in the shipped training file, drawn with --seed) leave both training sets; A_train.jsonl is the shipped
training file without them, B_train.jsonl the same with the --lang/--source conversations replaced by the
teacher's answers (those it did not finish are gone); the held-out sets are those prompts plus the teacher's
answers to the shipped validation prompts that training does not ask, with the teacher's replies
(heldout_teacher.jsonl) and with the shipped ones (heldout_original.jsonl).

For every conversation of --teacher-replies (the teacher's replies to prompts no student trained on, written by
`babyllama data build replies`) and every student, in bits per byte of reply text (UTF-8), so that models with
other tokenizers compare:
- `teacher_bpb`: the teacher's replies under the student (lower: the student writes more like the teacher);
- `original_bpb`: the original replies to the same prompts (--original, matched by their system and user
  messages) under the student;
- `judged_bpb`: the student's own greedy reply to the prompt (its last reply replaced), under the teacher,
  its end-of-reply token included (lower: more what the teacher would write); `reply_bytes`: its length.
Conversations that do not fit the students' context (either version) are left out and counted. Each is a mean over
conversations with a 95% t interval, and for every student after the first the paired
difference to the first (negative: lower than the first). Prints one JSON object per student, a table, and
--examples replies side by side.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from jsonl import emit  # bench/ is on sys.path as the script's folder

from babyllama.cli import ArgumentParser
from babyllama.data.chat_template import IGNORE_INDEX, Message, encode_chat, render_prompt, stop_ids
from babyllama.data.jsonl import json_objects
from babyllama.data.sft import read_conversations
from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.eval.stats import mean_interval
from babyllama.model.generate import Generator, SamplingConfig, within_context
from babyllama.model.scoring import row_logprobs
from babyllama.train.checkpoint import load_model

METRICS = ("teacher_bpb", "original_bpb", "judged_bpb", "reply_bytes")


def asked(messages: Sequence[Message]) -> tuple[tuple[str, str], ...]:
    """What a conversation asks: its system and user messages (the key that pairs it with its original)."""
    return tuple((m["role"], m["content"]) for m in messages if m["role"] != "assistant")


def replies_bpb(model, tokenizer: Tokenizer, conversations: Sequence[Sequence[Message]]) -> list[float]:
    """Bits per byte of the assistant messages of each conversation (their end tokens included) under `model`."""
    encoded = [encode_chat(c, tokenizer) for c in conversations]
    out = []
    for (_, labels), logp, c in zip(encoded, row_logprobs(model, [ids for ids, _ in encoded]), conversations):
        scored = torch.tensor(labels[1:]) != IGNORE_INDEX  # logp[t - 1] is log p(ids[t] | ids[:t])
        size = sum(len(m["content"].encode("utf-8")) for m in c if m["role"] == "assistant")
        out.append(-float(logp[scored].sum()) / math.log(2) / max(size, 1))
    return out


@torch.inference_mode()
def greedy_replies(model, tokenizer: Tokenizer, prompts: Sequence[Sequence[Message]], max_new_tokens: int,
                   batch_size: int = 16) -> list[str]:
    generator, stops = Generator(model), stop_ids(tokenizer)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0)
    texts = []
    for start in range(0, len(prompts), batch_size):
        ids = [render_prompt(p, tokenizer) for p in prompts[start:start + batch_size]]
        rows = generator.generate(ids, within_context(cfg, max(map(len, ids)), model.config.max_seq_len), stops)
        texts += [tokenizer.decode(r, skip_special=True).strip() for r in rows]
    return texts


def split(dest: Path, shipped: tuple[str, str], taught: tuple[str, str], lang: str, source: str, hold_out: int,
          seed: int) -> None:
    """The files of the measurement (see the module docstring): A/B training sets without the held-out prompts."""
    def rows(path: str) -> list[dict]:
        return [record for _, record in json_objects(path)]

    def key(record: dict) -> str:
        return json.dumps(asked(record["messages"]))

    def write(name: str, records: list[dict]) -> None:
        (dest / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")

    train, valid, taught_train, taught_valid = rows(shipped[0]), rows(shipped[1]), rows(taught[0]), rows(taught[1])
    times = Counter(key(r) for r in train)
    once = sorted({key(r) for r in taught_train if times[key(r)] == 1})
    random.Random(seed).shuffle(once)
    held = set(once[:hold_out])
    trained = {key(r) for r in train if key(r) not in held}
    dest.mkdir(parents=True, exist_ok=True)
    write("A_train.jsonl", [r for r in train if key(r) not in held])
    write("B_train.jsonl", [r for r in train if not (r.get("lang") == lang and r.get("source") == source)]
          + [r for r in taught_train if key(r) not in held])
    write("heldout_teacher.jsonl", [r for r in taught_train if key(r) in held]
          + [r for r in taught_valid if key(r) not in trained])
    write("heldout_original.jsonl", [r for r in train if key(r) in held] + valid)
    print(f"wrote {dest}: {len(held)} held-out prompts of {len(once)} asked once")


def interval(values: Sequence[float]) -> dict:
    mean, low, high = mean_interval(values)
    return {"mean": round(mean, 4), "low": round(low, 4), "high": round(high, 4), "n": len(values)}


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", type=Path, default=None, help="write the training and held-out sets here and exit")
    p.add_argument("--shipped", nargs=2, default=["data/sft/sft_train.jsonl", "data/sft/sft_valid.jsonl"],
                   help="with --split: the shipped training and validation files")
    p.add_argument("--taught", nargs=2,
                   default=["data/sft_smollm2/sft_train.jsonl", "data/sft_smollm2/sft_valid.jsonl"],
                   help="with --split: the teacher's answers to them (`babyllama data build replies`)")
    p.add_argument("--lang", default="en", help="with --split: the `lang` of the conversations the teacher answered")
    p.add_argument("--source", default="chatterbot", help="with --split: their `source`")
    p.add_argument("--hold-out", type=int, default=200, help="with --split: prompts held out of both training sets")
    p.add_argument("--seed", type=int, default=0, help="with --split: which prompts")
    p.add_argument("--students", nargs="+", help="checkpoints (files or stage folders) to compare")
    p.add_argument("--labels", nargs="+", help="a name per student (default: the paths)")
    p.add_argument("--tokenizer", help="the students' tokenizer")
    p.add_argument("--teacher", help="the teacher's checkpoint")
    p.add_argument("--teacher-tokenizer")
    p.add_argument("--teacher-replies", help="held-out conversations with the teacher's replies")
    p.add_argument("--original", help="the same conversations with their original replies")
    p.add_argument("--max-new-tokens", type=int, default=128, help="budget of the students' greedy replies")
    p.add_argument("--examples", type=int, default=6, help="replies printed side by side")
    p.add_argument("--dest", default=None, help="append the JSON rows to this file")
    args = p.parse_args(argv)
    if args.split is not None:
        return split(args.split, args.shipped, args.taught, args.lang, args.source, args.hold_out, args.seed)
    needed = ("students", "tokenizer", "teacher", "teacher_tokenizer", "teacher_replies", "original")
    missing = [f"--{n.replace('_', '-')}" for n in needed if getattr(args, n) is None]
    if missing:
        raise UserError(f"{', '.join(missing)}: needed to compare students (or pass --split DIR)")
    labels = args.labels or args.students
    if len(labels) != len(args.students):
        raise UserError(f"--labels: {len(labels)} names for {len(args.students)} students")
    taught = read_conversations(args.teacher_replies)
    originals = {asked(m): m for m in read_conversations(args.original)}
    missing = [c for c in taught if asked(c) not in originals]
    if missing:
        raise UserError(f"{args.original}: has no conversation asking what {len(missing)} of --teacher-replies ask "
                        f"(the first: {missing[0][-2]['content']!r}); give the file the replies were written for")
    tok, teacher_tok = Tokenizer.load(args.tokenizer), Tokenizer.load(args.teacher_tokenizer)
    teacher = load_model(args.teacher, dtype=torch.float32, tokenizer=teacher_tok)
    students = [load_model(path, dtype=torch.float32, tokenizer=tok) for path in args.students]
    context = min(m.config.max_seq_len for m in students)
    fits = [c for c in taught if max(len(encode_chat(c, tok)[0]), len(encode_chat(originals[asked(c)], tok)[0]))
            <= context]
    if len(fits) < len(taught):
        print(f"left out {len(taught) - len(fits)} of {len(taught)} conversations longer than the students' "
              f"{context}-token context")
    left_out, taught = len(taught) - len(fits), fits
    prompts = [c[:-1] for c in taught]  # up to the last (teacher's) reply
    per_student, replies = {}, {}
    for label, model in zip(labels, students):
        replies[label] = greedy_replies(model, tok, prompts, args.max_new_tokens)
        per_student[label] = {
            "teacher_bpb": replies_bpb(model, tok, taught),
            "original_bpb": replies_bpb(model, tok, [originals[asked(c)] for c in taught]),
            "judged_bpb": replies_bpb(teacher, teacher_tok, [[*q, {"role": "assistant", "content": r}]
                                                             for q, r in zip(prompts, replies[label])]),
            "reply_bytes": [len(r.encode("utf-8")) for r in replies[label]],
        }
    first = labels[0]
    for label in labels:
        row = {"student": label, "checkpoint": str(Path(args.students[labels.index(label)])), "left_out": left_out,
               **{m: interval(per_student[label][m]) for m in METRICS}}
        if label != first:
            row["minus_" + first] = {m: interval([a - b for a, b in zip(per_student[label][m], per_student[first][m])])
                                     for m in METRICS}
        emit(row, args.dest)
    print(f"\n{len(taught)} held-out conversations; means with 95% intervals\n")
    print("| student | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS))
    for label in labels:
        cells = [f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
                 for v in (interval(per_student[label][m]) for m in METRICS)]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for i, (q, c) in enumerate(zip(prompts[:args.examples], taught)):
        print(f"\n> {q[-1]['content']}\n  teacher: {c[-1]['content'][:300]!r}")
        for label in labels:
            print(f"  {label}: {replies[label][i][:300]!r}")


if __name__ == "__main__":
    main()
