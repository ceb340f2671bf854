"""Multi-turn chat with a checkpoint of any stage, streaming the reply as it is sampled.

    babyllama chat                                  # interactive, newest out/baby/sft checkpoint
    babyllama chat --stage pretrain --temperature 0
    babyllama chat --ckpt out/baby/sft/step_00000400.pt --system "You are a poet."
    babyllama chat --prompt "你是谁？"              # one reply, then exit (for scripts)
    printf '你好\\n你是谁？\\n/reset\\nWho are you?\\n' | babyllama chat

Commands: `/reset` forgets the conversation, `/exit` (or end of input) quits. The prompt keeps the system
message and as many of the newest turns as fit in --history-tokens (default: the model's context minus the reply
budget), at most --history-turns of them (default: no limit; 1 = answer each message on its own); older turns
are dropped, and a message too long alone keeps its newest tokens (said on stderr). A reply stops at `<|im_end|>`,
at --max-new-tokens, or at the end of the model's context. `--show-prompt` writes each rendered prompt to stderr.
`--json-schema FILE` makes every reply one JSON value valid under the schema in FILE (constrained decoding,
`babyllama.model.grammar`), completed within the reply budget.

`babyllama chat --stage ppo` is the same chat with PPO/DPO checkpoints as the default; both call `main` here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TextIO

import torch
from torch import Tensor

from babyllama.cli import ArgumentParser, read_lines, valid_text
from babyllama.data.chat_template import ChatHistory, stop_ids
from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.model.generate import (
    Generator,
    SamplingConfig,
    add_runtime_flags,
    add_sampling_flags,
    decode_dtype,
    prompt_budget,
    sample_next,
    sampling_from_args,
    within_context,
)
from babyllama.model.grammar import Grammar, GrammarCompiler
from babyllama.model.llama import Llama
from babyllama.train.checkpoint import latest_checkpoint, load_model
from babyllama.train.distributed import pick_device
from babyllama.train.run_config import RunPaths

# the stages whose checkpoint is a language model that writes replies
STAGES = ("pretrain", "sft", "dpo", "ppo", "grpo")
RESET, EXIT = "/reset", ("/exit", "/quit")


class ChatSession:
    """A model, its tokenizer and the conversation so far; `reply` streams one assistant answer (with `grammar`,
    one in that grammar's language: its mask is applied to the logits of every step)."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, sampling: SamplingConfig, system: str | None = None,
                 history_tokens: int | None = None, seed: int = 0, history_turns: int | None = None,
                 compile: bool = False, grammar: Grammar | None = None):
        context = model.config.max_seq_len
        if history_tokens is not None and not 1 <= history_tokens < context:
            raise UserError(f"--history-tokens {history_tokens}: must be between 1 and {context - 1} (the model's "
                            f"context, {context}, less one token for the reply)")
        budget = history_tokens or prompt_budget(context, sampling.max_new_tokens)
        self.model, self.tokenizer, self.sampling, self.context = model, tokenizer, sampling, context
        self.history = ChatHistory(tokenizer, system, max_turns=history_turns, max_tokens=budget)
        self.generator = Generator(model, compile=compile)
        self.stops = stop_ids(tokenizer)
        self.rng = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
        self.grammar = grammar

    def prompt_ids(self, user: str) -> list[int]:
        """Add the user's message and return the prompt for the reply (the message is forgotten again when the
        system message leaves it no room)."""
        self.history.add_user(user)
        try:
            return self.history.prompt_ids()
        except UserError:
            self.history.clear()  # the window already dropped every older turn; only the too-long one is left
            raise

    def reply(self, user: str, out: TextIO, show_prompt: TextIO | None = None) -> str:
        """Stream the answer to `user` to `out` and remember both in the history."""
        prompt = self.prompt_ids(user)
        if self.history.cut:
            print(f"note: the message has {self.history.cut[0]:,} tokens; kept its last {self.history.cut[1]:,} (the "
                  f"prompt budget is {self.history.max_tokens:,} of the model's {self.context:,}-token context)",
                  file=sys.stderr)
        if show_prompt is not None:
            show_prompt.write(f"--- prompt ({len(prompt)} tokens) ---\n{self.tokenizer.decode(prompt)}\n--- end ---\n")
            show_prompt.flush()
        cfg = within_context(self.sampling, len(prompt), self.context)  # later positions were never trained
        stream, ids = self.tokenizer.stream_decoder(skip_special=True), []
        tokens = (self.generator.stream(prompt, cfg, stop_ids=self.stops, generator=self.rng) if self.grammar is None
                  else self._constrained(prompt, cfg))
        for token in tokens:
            ids.append(token)
            out.write(stream.push(token))
            out.flush()
        out.write(stream.flush())
        out.flush()
        text = self.tokenizer.decode(ids, skip_special=True)
        self.history.add_assistant(text)
        return text

    def _constrained(self, prompt: list[int], cfg: SamplingConfig) -> Iterator[int]:
        """`Generator.stream` under the grammar: the sampler masks each step's logits first (the caller's stop ids
        are allowed exactly when the grammar may end), then tells the constraint what it picked."""
        constraint = self.grammar.constraint(self.stops, max_tokens=cfg.max_new_tokens)

        def sample(logits: Tensor) -> Tensor:
            constraint.mask(logits[0])
            picked = sample_next(logits, cfg, self.rng)
            constraint.advance(int(picked[0]))
            return picked

        for step in self.generator.generate_batch([prompt], cfg, stop_ids=self.stops, sample=sample):
            token = int(step[0])
            if token in self.stops:
                break
            yield token
        if not constraint.accepting:  # the shortest valid ending did not fit in what the context left
            print(f"\nnote: the reply's {cfg.max_new_tokens}-token budget ended before its JSON did; raise "
                  "--max-new-tokens or shorten the history (--history-tokens)", file=sys.stderr)

    def reset(self) -> None:
        self.history.clear()


def chat_loop(session: ChatSession, lines: Iterable[str], out: TextIO, show_prompt: TextIO | None = None) -> None:
    """Answer each line; `/reset` clears the history, `/exit` stops. Errors about one message do not end the chat."""
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text in EXIT:
            return
        if text == RESET:
            session.reset()
            out.write("(history cleared)\n")
            continue
        out.write("assistant> ")
        try:
            session.reply(text, out, show_prompt)
        except UserError as e:
            out.write(f"(error: {e})")
        out.write("\n")
        out.flush()


def add_chat_flags(parser: argparse.ArgumentParser, default_stages: Sequence[str]) -> None:
    parser.add_argument("--name", default="baby", help="run name whose <out>/<name>/ holds tokenizer and checkpoints")
    parser.add_argument("--out", default="out", help="output root of the training runs")
    parser.add_argument("--stage", choices=STAGES, default=None,
                        help=f"load the newest checkpoint of this stage (default: {' or '.join(default_stages)})")
    parser.add_argument("--ckpt", help="checkpoint file or directory (overrides --stage)")
    parser.add_argument("--tokenizer", help="tokenizer path (default: out/<name>/tokenizer)")
    parser.add_argument("--system", default=None, help="system prompt (default: none, as in the shipped SFT data)")
    parser.add_argument("--prompt", help="answer this one message and exit; without it, chat on stdin")
    parser.add_argument("--history-tokens", type=int, default=None,
                        help="prompt budget for system + kept turns (default: the context minus --max-new-tokens, "
                             "at least half the context)")
    parser.add_argument("--history-turns", type=positive_int, default=None,
                        help="keep at most this many turns (a message and its reply), the current one included "
                             "(default: as many as fit in --history-tokens)")
    parser.add_argument("--show-prompt", action="store_true", help="write each rendered prompt to stderr")
    parser.add_argument("--json-schema", metavar="FILE",
                        help="make every reply one JSON value valid under the JSON schema in FILE")
    add_runtime_flags(parser)
    add_sampling_flags(parser)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def checkpoint_for(args: argparse.Namespace, paths: RunPaths, default_stages: Sequence[str]) -> Path:
    """--ckpt, else the newest checkpoint of --stage, else of the first default stage that has one."""
    if args.ckpt:
        return Path(args.ckpt)
    stages = [args.stage] if args.stage else list(default_stages)
    for stage in stages:
        if latest_checkpoint(paths.stage(stage)) is not None:
            return paths.stage(stage)
    tried = " or ".join(str(paths.stage(s)) for s in stages)
    raise UserError(f"no checkpoint in {tried}; train that stage first, or pass --stage / --ckpt")


def load_session(args: argparse.Namespace, default_stages: Sequence[str]) -> ChatSession:
    paths = RunPaths.of(args.name, args.out)
    checkpoint = checkpoint_for(args, paths, default_stages)
    device = pick_device(args.device)
    tok = Tokenizer.load(args.tokenizer or paths.tokenizer)
    grammar = None if args.json_schema is None else GrammarCompiler.of(tok).json_schema(
        read_json_schema(args.json_schema), source=args.json_schema)  # a bad schema is refused before the model loads
    model = load_model(checkpoint, device, decode_dtype(args.dtype, device), tokenizer=tok)
    system = None if args.system is None else valid_text(args.system, "--system")
    sampling = sampling_from_args(args, model.config.max_seq_len)
    return ChatSession(model, tok, sampling, system, args.history_tokens, args.seed,
                       args.history_turns, args.compile, grammar)


def read_json_schema(path: str) -> object:
    """The JSON in `path` (the schema itself is checked when compiled); a file that is missing or not JSON is one
    line naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"{path}: cannot read the JSON schema ({reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); --json-schema takes a "
                        "JSON schema file") from None


def main(description: str = __doc__, default_stages: Sequence[str] = ("sft",), argv: list[str] | None = None) -> None:
    """The chat command line; scripts pass their docstring and the stages whose checkpoints they prefer."""
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_chat_flags(parser, default_stages)
    args = parser.parse_args(argv)
    sampling_from_args(args)  # bad values are refused before the model is loaded
    session = load_session(args, default_stages)
    show = sys.stderr if args.show_prompt else None
    if args.prompt is not None:
        session.reply(valid_text(args.prompt, "--prompt"), sys.stdout, show)
        print()
        return
    chat_loop(session, read_lines(sys.stdin, "user> "), sys.stdout, show)
