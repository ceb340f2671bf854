"""Where a training step's device time goes: torch.profiler over a few steps of our trainer, kernels grouped.

    babyllama bench profile_step                        # 0.2B config, batch 16 x 1024, bf16, on the GPU
    babyllama bench profile_step --smoke                # tiny config on CPU (CI keeps this working)

The trainer is compiled on a GPU; kernels are grouped into matrix products, attention, inductor's fused kernels,
optimizer, communication and other. Prints the share of device time per group, then the top kernels, then both as
one JSON line (`--dest` appends it).
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from jsonl import emit  # bench/ is on sys.path as the script's folder
from torch.profiler import ProfilerActivity, profile
from train_throughput import random_batches

from babyllama.cli import ArgumentParser
from babyllama.model.config import ModelConfig, preset
from babyllama.model.llama import Llama
from babyllama.train.distributed import DistEnv, pick_device
from babyllama.train.optim import build_adamw
from babyllama.train.trainer import Trainer

# First match wins; kernel names of cuBLAS/CUTLASS, FlashAttention/cuDNN/efficient attention, inductor, AdamW.
GROUPS = [
    ("matmul", r"gemm|gemv|cutlass|xmma|nvjet|cublas|aten::mm|aten::addmm|aten::bmm"),
    ("attention", r"flash|fmha|attention|cudnn"),
    ("optimizer", r"adam"),
    ("communication", r"nccl|gloo|allreduce"),
    ("inductor fused", r"^triton_|cpp_fused"),
]


def group_of(name: str) -> str:
    return next((group for group, pattern in GROUPS if re.search(pattern, name, re.IGNORECASE)), "other")


def device_times(prof: profile, cuda: bool) -> dict[str, float]:
    """Microseconds per name: on a GPU the kernels' own device time (operators launching them have none of their
    own); on a CPU each operator's own time."""
    times: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        own = e.self_device_time_total if cuda else e.self_cpu_time_total
        if own > 0:
            times[e.key] += own
    return times


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="0.2b")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps, after as many warm-up steps")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU, eager: checks the script runs")
    ap.add_argument("--dest", help="append the result as a JSON line to this file")
    args = ap.parse_args()
    device = pick_device("cpu" if args.smoke else "auto")
    cuda = device.type == "cuda"
    if args.smoke:
        cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=64)
        args.batch, args.seq = 2, 64
    else:
        cfg = preset(args.config)
    torch.manual_seed(0)
    trainer = Trainer(Llama(cfg), DistEnv(device=device))
    trainer.compile(optimizer=build_adamw(trainer.network, lr=3e-4), mixed_precision="bf16", torch_compile=cuda,
                    log_every=10**9)
    batches = random_batches(cfg, args.batch, args.seq, device)
    trainer.fit(batches, max_steps=args.steps)  # warm-up: compilation, allocator, cuBLAS heuristics
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        trainer.fit(batches, max_steps=2 * args.steps)
        if cuda:
            torch.cuda.synchronize()
    times = device_times(prof, cuda)
    total = sum(times.values()) or 1.0
    groups: dict[str, float] = defaultdict(float)
    for name, us in times.items():
        groups[group_of(name)] += us
    top = sorted(times.items(), key=lambda kv: -kv[1])[:args.top]
    print(f"device time per step: {total / args.steps / 1000:.2f} ms ({'GPU kernels' if cuda else 'CPU ops'})")
    print("| group | share | ms per step |\n|---|---|---|")
    for group, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {us / total:.1%} | {us / args.steps / 1000:.2f} |")
    print("\n| kernel | group | share |\n|---|---|---|")
    for name, us in top:
        print(f"| {name[:90]} | {group_of(name)} | {us / total:.1%} |")
    row = {"device": torch.cuda.get_device_name() if cuda else "cpu", "config": "smoke" if args.smoke else args.config,
           "batch": args.batch, "seq": args.seq, "ms_per_step": round(total / args.steps / 1000, 3),
           "groups": {g: round(us / total, 4) for g, us in groups.items()},
           "top": [[name[:120], round(us / total, 4)] for name, us in top]}
    emit(row, args.dest)


if __name__ == "__main__":
    main()
