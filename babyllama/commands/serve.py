"""Serve a trained run: an OpenAI-compatible API and a chat page, on http://127.0.0.1:8000/ by default.

    babyllama serve --name baby --stage sft             # the chat page at http://127.0.0.1:8000/
    BABYLLAMA_API_KEY=secret babyllama serve --name baby  # every API route then needs the key
    babyllama serve --name baby --host 0.0.0.0 --api-key secret --cors-origin https://my.site

From Python (`pip install openai`):

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")   # any api_key when none is set
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "你好"}], temperature=0)

`model` picks a stage of the run (GET /v1/models lists those with a checkpoint: pretrain, sft, dpo, ppo); each is
loaded on its first request (--stage is loaded at start). Requests that arrive together are decoded in the same
batched steps, up to --max-batch rows; up to --max-waiting more wait (then 429). See docs/serve.md.
"""
from __future__ import annotations

import argparse
import ipaddress
import sys

from babyllama.chat.session import positive_int
from babyllama.cli import ArgumentParser, add_device_flag
from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.model.generate import add_dtype_flag, decode_dtype
from babyllama.serve.models import SERVED_STAGES, ModelRegistry
from babyllama.train.distributed import pick_device
from babyllama.train.run_config import RunPaths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="baby", help="run name whose <out>/<name>/ holds tokenizer and checkpoints")
    parser.add_argument("--out", default="out", help="output root of the training runs")
    parser.add_argument("--stage", choices=SERVED_STAGES, default="sft",
                        help="stage loaded at start and picked by the chat page first (others load on first use)")
    parser.add_argument("--tokenizer", help="tokenizer path (default: out/<name>/tokenizer)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: this machine only; 0.0.0.0 = every interface, then "
                             "set --api-key)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every API route (default: $BABYLLAMA_API_KEY, "
                             "else no key)")
    parser.add_argument("--cors-origin", action="append", default=[],
                        help="allow browser pages from this origin to call the API (repeatable; default: none)")
    parser.add_argument("--max-batch", type=positive_int, default=16, help="rows decoded together at most")
    parser.add_argument("--max-waiting", type=positive_int, default=64,
                        help="requests waiting for a row at most; more are answered 429")
    parser.add_argument("--max-tokens", type=positive_int, default=None,
                        help="largest max_tokens a request may ask for (default: the model's context)")
    parser.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="larger request bodies get 413")
    parser.add_argument("--prefix-cache-mb", type=int, default=256,
                        help="MiB of keys and values kept per loaded stage, so that a conversation's next turn "
                             "computes only its new tokens (least recently used first out; 0 = off; default: 256)")
    add_device_flag(parser)
    add_dtype_flag(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must be between 0 and 65535")
    if args.prefix_cache_mb < 0:
        raise UserError(f"--prefix-cache-mb {args.prefix_cache_mb}: must be 0 (off) or more")
    import uvicorn  # after the flags: --help and flag errors do not wait for the web stack

    from babyllama.serve.app import Settings, create_app, key_from_env
    from babyllama.serve.batcher import Batcher

    paths = RunPaths.of(args.name, args.out)
    device = pick_device(args.device)
    tokenizer = Tokenizer.load(args.tokenizer or paths.tokenizer)
    registry = ModelRegistry(paths, tokenizer, device, decode_dtype(args.dtype, device), args.prefix_cache_mb)
    if registry.get(args.stage) is None:
        have = ", ".join(registry.available()) or "none"
        raise UserError(f"no checkpoint in {paths.stage(args.stage)} (stages with one: {have}); train it first or "
                        "pass another --stage / --out")
    loopback = _is_loopback(args.host)
    api_key = key_from_env(args.api_key)
    if not loopback and api_key is None:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach it can use it "
              "(set --api-key or BABYLLAMA_API_KEY)", file=sys.stderr)
    settings = Settings(api_key=api_key, max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes,
                        cors_origins=args.cors_origin, loopback_only=loopback, default_model=args.stage)
    app = create_app(registry, Batcher(args.max_batch, args.max_waiting), settings)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {', '.join(registry.available())} of {paths.out} at http://{shown}:{args.port}/ "
          f"(OpenAI API: http://{shown}:{args.port}/v1{', API key required' if api_key else ''})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

