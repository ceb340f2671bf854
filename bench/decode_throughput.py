"""Greedy decoding throughput: babyllama's Generator (eager and compiled) vs HF `generate`, same weights.

    babyllama bench decode_throughput                 # 0.2B config in bf16 on the GPU, batch 1 and 8
    babyllama bench decode_throughput --smoke         # tiny config on CPU
    babyllama bench decode_throughput --config baby   # the baby preset (4,096-token vocab), e.g. on a CPU
    babyllama bench decode_throughput --batches 1 --systems ours-compiled,ours-compiled-unfused   # a lever

ours-compiled decodes with fused q|k|v and gate|up weights (`Llama.fuse_projections`); -unfused without.

tokens/s counts generated tokens of all rows. `same_tokens` compares each system's greedy output with our eager
path token for token (random weights make near-ties, so the comparison is also reported in fp32).
"""
from __future__ import annotations

import argparse
import time

import torch
from jsonl import emit  # bench/ is on sys.path as the script's folder

from babyllama.cli import ArgumentParser
from babyllama.model.config import ModelConfig, preset
from babyllama.model.generate import Generator, SamplingConfig, decode_dtype
from babyllama.model.llama import Llama
from babyllama.train.distributed import pick_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> tuple[list[list[int]], float, float]:
    """(output, seconds per call, seconds of the first call: compilation, CUDA graph capture, allocator)."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    _sync(device)
    return out, (time.perf_counter() - t1) / repeats, t1 - t0


def ours(model: Llama, prompts: torch.Tensor, new: int, compile: bool, fuse: bool | None = None):
    gen = Generator(model, max_len=prompts.shape[1] + new, compile=compile, fuse_projections=fuse)
    greedy = SamplingConfig(max_new_tokens=new, temperature=0)
    return lambda: gen.generate(prompts.tolist(), greedy)


def hf(model: Llama, prompts: torch.Tensor, new: int, static: bool):
    import transformers

    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf()))
    hf_model.load_state_dict(model.state_dict(), strict=False)
    hf_model = hf_model.to(device=prompts.device, dtype=model.lm_head.weight.dtype).eval()
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if static:  # on CUDA, transformers compiles the decode step itself for a static cache
        kw["cache_implementation"] = "static"

    def run():
        with torch.inference_mode():
            out = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
        return out[:, prompts.shape[1]:].tolist()
    return run


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="0.2b")
    ap.add_argument("--vocab-size", type=int, default=4096, help="for presets that take it from the tokenizer (baby)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--systems", default="ours-eager,ours-compiled,hf,hf-static")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="weights and KV cache, as `babyllama chat`'s --dtype (auto: what it picks on this device)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--dest", help="append results as JSON lines to this file")
    args = ap.parse_args()
    device = pick_device("cpu" if args.smoke else "auto")
    if args.smoke:
        cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=128)
        args.new_tokens, args.repeats, args.dtype = 16, 1, "fp32"  # fp32: HF and ours agree token for token
    else:
        cfg = preset(args.config, vocab_size=args.vocab_size)
    torch.manual_seed(0)
    base = Llama(cfg).to(device)
    dtype = decode_dtype(args.dtype, device)
    model = Llama(cfg).to(device=device, dtype=dtype).eval()
    model.load_state_dict(base.state_dict())
    systems = {
        "ours-eager": lambda p: ours(model, p, args.new_tokens, compile=False),
        "ours-compiled": lambda p: ours(model, p, args.new_tokens, compile=True),
        "ours-compiled-unfused": lambda p: ours(model, p, args.new_tokens, compile=True, fuse=False),
        "hf": lambda p: hf(model, p, args.new_tokens, static=False),
        "hf-static": lambda p: hf(model, p, args.new_tokens, static=True),
    }
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    for batch in map(int, args.batches.split(",")):
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
        prompts = prompts.to(device)
        reference = None
        for system in args.systems.split(","):
            tokens, seconds, first = timed(systems[system](prompts), device, args.repeats)
            reference = reference or tokens
            same = sum(a == b for ra, rb in zip(tokens, reference) for a, b in zip(ra, rb)) / (batch * args.new_tokens)
            r = {"system": system, "device": name, "batch": batch, "dtype": str(dtype).split(".")[1],
                 "tokens_per_s": round(batch * args.new_tokens / seconds, 1), "same_tokens_as_eager": round(same, 4),
                 "first_call_s": round(first, 1)}
            emit(r, args.dest)


if __name__ == "__main__":
    main()
