"""Sequence-level distillation data: a teacher model's own replies to the conversations of chat files.

    babyllama data build replies --teacher imported_smol --tokenizer imported_smol/tokenizer \\
        --data data/sft/sft_train.jsonl data/sft/sft_valid.jsonl --lang en --source chatterbot \\
        --dest data/sft_smollm2 --licence "SmolLM2-135M-Instruct: Apache-2.0"
    babyllama sft --name baby --train-data data/sft_smollm2/sft_train.jsonl other.jsonl

Every assistant message of the chosen conversations (--lang / --source match the records' `lang` / `source` keys;
without them every conversation) is replaced by what the teacher writes at that point of the conversation, its
own earlier replies included (Kim & Rush, 2016: train the student on the teacher's outputs instead of its
distribution). --system gives the teacher an instruction the student never sees (e.g. to be brief), so the student
learns the instructed behaviour as its default. The teacher may have any tokenizer: it reads the messages as text,
with its own tokenizer and the ChatML template, and a student learns the replies as text with its own. A
conversation some reply of which the teacher does not finish within --max-new-tokens, or leaves empty, is left out
(counted): a cut reply would teach the student to stop mid-sentence.

Writes, for each --data file, a file of the same name in --dest with the chosen conversations in the OpenAI
`messages` format (their `lang` and `source` kept, `teacher` added), and a README.md with the counts, the command,
and --licence (the terms of the teacher's outputs, e.g. its model licence; say them before sharing the data).
Greedy by default (--temperature 0), so a rebuild on the same machine gives the same replies; batches are formed
from prompts of similar length.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from babyllama.cli import ArgumentParser
from babyllama.data.chat_template import Message, render_prompt, stop_ids
from babyllama.data.jsonl import json_objects
from babyllama.data.sft import detect_format, record_to_messages
from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.files import write_atomic
from babyllama.model.generate import (
    Generator,
    SamplingConfig,
    add_runtime_flags,
    add_sampling_flags,
    decode_dtype,
    sampling_from_args,
    within_context,
)
from babyllama.train.checkpoint import load_model
from babyllama.train.distributed import pick_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="checkpoint file or directory of the model that writes the replies")
    p.add_argument("--teacher-name", default=None,
                   help="what the records' `teacher` key and README.md call it (default: the --teacher path)")
    p.add_argument("--tokenizer", required=True, help="the teacher's tokenizer")
    p.add_argument("--data", nargs="+", required=True, help="chat files whose conversations are answered (any SFT "
                                                           "format; each gives a file of the same name in --dest)")
    p.add_argument("--dest", type=Path, required=True, help="folder to write the files and README.md to")
    p.add_argument("--lang", default=None, help="answer only records whose `lang` is this")
    p.add_argument("--source", default=None, help="answer only records whose `source` is this")
    p.add_argument("--system", default=None,
                   help="a system message the teacher reads where a conversation has none (e.g. \"Answer in one or "
                        "two sentences.\"); the written conversations do not hold it")
    p.add_argument("--limit", type=int, default=None, help="answer at most this many conversations per file")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (default: 16)")
    p.add_argument("--licence", default=None,
                   help="the terms the replies come under (the teacher's licence), written into README.md")
    add_runtime_flags(p)
    add_sampling_flags(p)
    p.set_defaults(temperature=0.0, max_new_tokens=256)
    return p.parse_args(argv)


def read_chosen(path: str, lang: str | None, source: str | None, limit: int | None) -> list[dict]:
    """The records of `path` that match `lang` and `source`, each as {lang?, source?, messages}."""
    rows, fmt = [], None
    for loc, record in json_objects(path):
        fmt = fmt or detect_format(record, loc)
        if (lang is not None and record.get("lang") != lang) or (source is not None and record.get("source") != source):
            continue
        rows.append({**{k: record[k] for k in ("source", "lang") if k in record},
                     "messages": record_to_messages(record, fmt, loc)})  # refuses one without an assistant reply
        if limit is not None and len(rows) == limit:
            break
    return rows


class ReplyWriter:
    """A teacher model and its tokenizer, answering conversations in batches of similar prompt length."""

    def __init__(self, model, tokenizer: Tokenizer, sampling: SamplingConfig, batch_size: int, seed: int = 0,
                 system: str | None = None):
        self.tokenizer, self.sampling, self.batch_size = tokenizer, sampling, batch_size
        self.system = system  # what the teacher is told where a conversation has no system message
        self.generator = Generator(model)
        self.stops = stop_ids(tokenizer)
        self.rng = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
        self.context = model.config.max_seq_len

    def answer(self, conversations: Sequence[list[Message]], progress: bool = True) -> list[list[Message] | None]:
        """Each conversation with every assistant message replaced by the teacher's reply at that point (system
        and user messages kept); None where a reply was cut by the budget or the context, or came out empty."""
        out: list[list[Message] | None] = [[] for _ in conversations]
        remaining = [list(c) for c in conversations]
        bar = tqdm(total=sum(m["role"] == "assistant" for c in conversations for m in c), unit="reply",
                   disable=not progress, file=sys.stderr)
        while True:
            # the messages up to each conversation's next assistant message: one round of replies
            todo = []
            for i, rest in enumerate(remaining):
                if out[i] is None:
                    continue
                k = next((j for j, m in enumerate(rest) if m["role"] == "assistant"), None)
                if k is None:
                    out[i] += rest
                    remaining[i] = []
                    continue
                out[i] += rest[:k]
                remaining[i] = rest[k + 1:]
                todo.append(i)
            if not todo:
                break
            prompts = {i: render_prompt(out[i], self.tokenizer, self.system) for i in todo}
            for i in [i for i in todo if len(prompts[i]) >= self.context]:  # no room left for a reply
                out[i] = None
                todo.remove(i)
                bar.update(1)
            todo.sort(key=lambda i: len(prompts[i]))
            for start in range(0, len(todo), self.batch_size):
                batch = todo[start:start + self.batch_size]
                for i, reply in zip(batch, self._replies([prompts[i] for i in batch])):
                    out[i] = None if reply is None else out[i] + [{"role": "assistant", "content": reply}]
                bar.update(len(batch))
        bar.close()
        return out

    def _replies(self, prompts: list[list[int]]) -> list[str | None]:
        cfg = within_context(self.sampling, max(map(len, prompts)), self.context)
        rows = self.generator.generate(prompts, cfg, self.stops, generator=self.rng)
        replies = []
        for row in rows:
            text = self.tokenizer.decode(row, skip_special=True).strip()
            finished = len(row) < cfg.max_new_tokens  # `generate` cut the stop token: a full row never stopped
            replies.append(text if finished and text else None)
        return replies


def readme(args: argparse.Namespace, argv: Sequence[str], counts: list[tuple[str, int, int]], seconds: float) -> str:
    command = " ".join(["babyllama data build replies", *map(shlex.quote, argv)])
    rows = "\n".join(f"| `{name}` | {read:,} | {kept:,} | {read - kept:,} |" for name, read, kept in counts)
    chosen = ", ".join(f"`{k}` = {v}" for k, v in (("lang", args.lang), ("source", args.source)) if v) or "every record"
    sampling = ("greedy" if args.temperature == 0 else
                f"sampled at temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}")
    if args.repetition_penalty != 1:
        sampling += f", repetition penalty {args.repetition_penalty}"
    facts = [f"Every assistant message of the conversations chosen from the input files ({chosen}) was replaced by "
             f"the reply of the teacher `{args.teacher_name}` at that point of the conversation, its own earlier "
             "replies included; system and user messages are the input's.",
             f"Replies: {sampling}, at most {args.max_new_tokens} new tokens. A conversation with a reply the teacher "
             "did not finish, or left empty, is left out."]
    if args.system:
        facts.append("Where a conversation had no system message, the teacher read one that is not written here: "
                     f"{json.dumps(args.system, ensure_ascii=False)}")
    bullets = "\n".join(f"- {fact}" for fact in facts)
    return f"""# Replies written by a teacher model

Generated by `babyllama data build replies` (sequence-level distillation data); do not edit by hand.

    {command}

{bullets}

| file | conversations chosen | written | left out |
|---|---|---|---|
{rows}

Generation took {seconds:.0f} s.

## Licence

{args.licence or _NO_LICENCE}
"""


_NO_LICENCE = ("Not stated: the replies come under the terms of the teacher model's licence and of the input files; "
               "state them before sharing this data.")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.teacher_name = args.teacher_name or args.teacher
    sampling_from_args(args)  # bad values are refused before the model loads
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    files = [(Path(f).name, read_chosen(f, args.lang, args.source, args.limit)) for f in args.data]
    if len({name for name, _ in files}) < len(files):
        raise UserError("--data: two files have the same name; each gives a file of that name in --dest")
    device = pick_device(args.device)
    tok = Tokenizer.load(args.tokenizer)
    model = load_model(args.teacher, device, decode_dtype(args.dtype, device), tokenizer=tok)
    writer = ReplyWriter(model, tok, sampling_from_args(args, model.config.max_seq_len), args.batch_size, args.seed,
                         args.system)
    args.dest.mkdir(parents=True, exist_ok=True)
    counts, started = [], time.perf_counter()
    for name, rows in files:
        answered = writer.answer([r["messages"] for r in rows])
        kept = [{**r, "teacher": args.teacher_name, "messages": m} for r, m in zip(rows, answered) if m is not None]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
        write_atomic(args.dest / name, text.encode("utf-8"))
        counts.append((name, len(rows), len(kept)))
        print(f"wrote {args.dest / name}: {len(kept):,} of {len(rows):,} conversations "
              f"({len(rows) - len(kept):,} left out: a reply cut or empty)")
    write_atomic(args.dest / "README.md",
                 readme(args, argv, counts, time.perf_counter() - started).encode("utf-8"))
