"""How closely llama.cpp runs our GGUF export of a stage: greedy agreement and held-out loss/bpb per dtype.

    babyllama bench gguf_agreement --out out --name baby --stage sft \\
        --dest bench/results/<date>_cpu_gguf_agreement.jsonl

For each export (f32, f16, q8_0) and each prompt (raw text for any stage, chat prompts too for chat stages):
`agree` = how many greedy tokens llama.cpp produces before its first difference from ours, out of `of` (up to the
model's context, end tokens not honoured), and at that point our top-2 logit margin (small = a near-tie that any
rounding flips). Then `loss`/`bpb` on the first --docs held-out documents per language, scored exactly as
`babyllama evaluate` does (`</s>` + text, windows of the context), from llama.cpp's logits and from ours.
Chat stages: `same_reply` compares llama-cpp-python's `create_chat_completion` (the file's own template, greedy,
stops at <|im_end|>) with our chat session's greedy reply (`babyllama chat --temperature 0`) to each question.
"""
from __future__ import annotations

import argparse
import io
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from gguf_decode import export_all, llama_cpp_greedy, llama_cpp_model, load_run, our_greedy, source_flags
from jsonl import emit

from babyllama.chat.session import ChatSession
from babyllama.cli import ArgumentParser
from babyllama.data.chat_template import render_prompt
from babyllama.data.corpus import iter_records
from babyllama.eval.evaluate import document_ids, windows
from babyllama.model.generate import SamplingConfig
from babyllama.model.scoring import row_logprobs
from babyllama.shipped import HELDOUT

TEXTS = ["床前明月光，", "白日依山尽，", "To be, or not to be", "ROMEO:\nBut, soft! what light", "李白 and Shakespeare"]
CHATS = ["床前明月光的下一句是什么？", "写一首关于春天的诗", "Who wrote Hamlet?", "你是谁？"]


def llama_cpp_logprobs(llm, rows: list[list[int]]) -> list[np.ndarray]:
    """log p(row[t] | row[:t]) for t >= 1, from llama.cpp's logits (float64 log-softmax)."""
    out = []
    for row in rows:
        llm.reset()
        llm.eval(row[:-1])
        logits = np.asarray(llm.scores[: len(row) - 1], dtype=np.float64)
        top = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        out.append(logits[np.arange(len(row) - 1), row[1:]] - logz)
    return out


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def margin_at(model, ids: list[int]) -> float:
    """Our top-1 minus top-2 logit for the token after `ids`."""
    with torch.no_grad():
        top = model(torch.tensor([ids])).logits[0, -1].topk(2).values
    return round(float(top[0] - top[1]), 4)


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source_flags(ap)
    ap.add_argument("--docs", type=int, default=100, help="held-out documents per language")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, tok_dir = load_run(args.out, args.name, args.stage)
    context = model.config.max_seq_len
    prompts = {t: tok.encode(t, bos=True) for t in TEXTS}
    if args.stage != "pretrain":
        prompts.update({f"chat: {c}": render_prompt([{"role": "user", "content": c}], tok) for c in CHATS})
    ours = {name: our_greedy(model, p, context - len(p))() for name, p in prompts.items()}
    texts = [r["text"] for path in HELDOUT.values() for r in list(iter_records(path))[: args.docs]]
    rows = [w for t in texts for w in windows(document_ids(tok, t), context)]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)

    def lm_row(system: str, logps: list) -> None:
        nats, tokens = -sum(float(np.sum(lp)) for lp in logps), sum(len(lp) for lp in logps)
        emit({"stage": args.stage, "system": system, "kind": "heldout", "docs": len(texts), "tokens": tokens,
              "loss": round(nats / tokens, 5), "bpb": round(nats / math.log(2) / n_bytes, 5)}, args.dest)

    lm_row("babyllama", [lp.double().numpy() for lp in row_logprobs(model, rows)])
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, path in export_all(args.out, args.name, args.stage, tok_dir, Path(tmp)).items():
            llm = llama_cpp_model(path, context, args.threads, logits_all=True)
            for name, p in prompts.items():
                theirs = llama_cpp_greedy(llm, p, len(ours[name]))
                k = first_difference(theirs, ours[name])
                emit({"stage": args.stage, "system": f"llama.cpp-{dtype}", "kind": "greedy", "prompt": name,
                      "agree": k, "of": len(ours[name]),
                      "our_margin_there": margin_at(model, p + ours[name][:k]) if k < len(ours[name]) else None},
                     args.dest)
            lm_row(f"llama.cpp-{dtype}", llama_cpp_logprobs(llm, rows))
            for question in CHATS if args.stage != "pretrain" else []:
                ours_reply = ChatSession(model, tok, SamplingConfig(max_new_tokens=context, temperature=0)).reply(
                    question, io.StringIO())
                done = llm.create_chat_completion([{"role": "user", "content": question}], temperature=0.0,
                                                  max_tokens=context)
                theirs_reply = done["choices"][0]["message"]["content"]
                emit({"stage": args.stage, "system": f"llama.cpp-{dtype}", "kind": "chat", "prompt": question,
                      "same_reply": theirs_reply == ours_reply, "reply": theirs_reply}, args.dest)


if __name__ == "__main__":
    main()
