"""The `babyllama` command: one subcommand per job, each a module of this package with a `main(argv)`.

    babyllama chain --name baby            # the whole shipped chain, each stage narrated, then `compare`
    babyllama pretrain --name baby         # or: torchrun --nproc_per_node=4 -m babyllama pretrain --name baby
    babyllama sft --help                   # every flag with the value it takes for the chosen preset
    babyllama sft --print-config           # the resolved settings and where each came from, then exit

A job's module is imported only when that job runs, so `babyllama --help` answers at once.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from babyllama.cli import main_guard, set_program

# job -> (module with `main(argv)`, or module:function, and one line of help); a dict value is a group of jobs
# (`babyllama data prepare`)
Table = dict[str, "tuple[str, str] | Table"]
COMMANDS: Table = {
    "chain": ("babyllama.commands.chain", "run the shipped chain end to end (pretrain → sft → reward → dpo → ppo → "
                                          "grpo), then compare it with the published run"),
    "pretrain": ("babyllama.commands.pretrain", "train a model on raw text (tokenizer and token data on first use)"),
    "sft": ("babyllama.commands.sft", "supervised fine-tuning on conversations"),
    "reward": ("babyllama.commands.reward", "train a reward model on preference pairs"),
    "dpo": ("babyllama.commands.dpo", "direct preference optimization of the SFT model"),
    "ppo": ("babyllama.commands.ppo", "RLHF with PPO against the reward model"),
    "grpo": ("babyllama.commands.grpo", "RL with verifiable rewards (GRPO) on the skill suite"),
    "generate": ("babyllama.commands.generate", "continue text with a pretrained checkpoint"),
    "chat": ("babyllama.commands.chat", "chat with a fine-tuned checkpoint in the terminal"),
    "serve": ("babyllama.commands.serve", "OpenAI-compatible API and chat page"),
    "evaluate": ("babyllama.eval.evaluate", "held-out bits per byte, PPMd baseline, multiple choice"),
    "baseline": ("babyllama.eval.compressors", "a checkpoint's held-out bits per byte beside PPMd's and xz's given the "
                                               "same training text"),
    "compare": ("babyllama.eval.compare", "judge a run against the published one: reproduced, drifted or diverged"),
    "export": {
        "hf": ("babyllama.commands.convert:main_export_hf", "checkpoint -> transformers LlamaForCausalLM directory"),
        "gguf": ("babyllama.commands.convert:main_export_gguf", "checkpoint -> one GGUF file for llama.cpp / ollama"),
        "bert4torch": ("babyllama.commands.convert:main_export_bert4torch",
                       "checkpoint -> bert4torch config and weights"),
    },
    "import": {
        "hf": ("babyllama.commands.convert:main_import_hf",
               "Hugging Face LLaMA directory (or a GGUF file in it) -> checkpoint"),
        "bert4torch": ("babyllama.commands.convert:main_import_bert4torch", "bert4torch LLaMA -> checkpoint"),
    },
    "lora": {
        "merge": ("babyllama.commands.lora:main_merge", "LoRA adapter checkpoint -> checkpoint of every weight "
                                                        "(adapters merged onto their base)"),
    },
    "report": ("babyllama.commands.report", "the evaluation report of a run: tables and plots"),
    "publish": ("babyllama.commands.publish", "make, collect and check the published reference runs"),
    "screenshot": ("babyllama.commands.screenshot", "screenshot of the chat page answering a run (docs)"),
    "data": {
        "tokenizer": ("babyllama.commands.tokenizer", "train a tokenizer on a corpus"),
        "prepare": ("babyllama.commands.prepare", "tokenize a corpus into pretraining shards"),
        "build": {
            "corpus": ("babyllama.build.corpus", "rebuild the shipped pretraining corpus (data/corpus)"),
            "sft": ("babyllama.build.sft", "rebuild the shipped SFT conversations and choice items (data/sft)"),
            "preference": ("babyllama.build.preference", "rebuild the shipped preference pairs (data/preference)"),
            "idioms": ("babyllama.build.idioms", "rebuild the shipped idiom cloze items (data/eval)"),
            "skills": ("babyllama.build.skills", "rebuild the shipped verifiable skill suite (data/skills)"),
            "replies": ("babyllama.build.replies", "a teacher model's replies to chat files: sequence-level "
                                                   "distillation data"),
        },
    },
    "bench": ("babyllama.commands.bench", "run a benchmark script of bench/ (speed and memory)"),
}


def usage(path: Sequence[str], table: Table) -> str:
    width = max(map(len, table))
    lines = [f"usage: {' '.join(['babyllama', *path])} <job> [flags]   (<job> --help for its flags)", "", "jobs:"]
    for job, entry in table.items():
        text = entry[1] if isinstance(entry, tuple) else f"{', '.join(entry)}"
        lines.append(f"  {job:<{width}}  {text}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args, path, table = list(sys.argv[1:] if argv is None else argv), [], COMMANDS
    while True:
        if not args or args[0] in ("-h", "--help"):
            print(usage(path, table))
            sys.exit(0 if args else 2)
        job = args.pop(0)
        entry = table.get(job)
        if entry is None:
            where = " ".join(["babyllama", *path])
            print(f"error: {where}: unknown job {job!r}; choose one of {', '.join(table)} ({where} --help)",
                  file=sys.stderr)
            sys.exit(2)
        path.append(job)
        if isinstance(entry, tuple):
            break
        table = entry
    module, _, function = entry[0].partition(":")
    job_main = getattr(importlib.import_module(module), function or "main")
    set_program(["babyllama", *path], args)  # argparse's usage lines and the run record name the command as typed
    main_guard(lambda: sys.exit(job_main(args)))  # a job's int is its exit status (compare: 1 = diverged)
