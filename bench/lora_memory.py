"""Peak memory and step time of full fine-tuning vs LoRA adapters (--lora-rank), same model and batches, one run.

    babyllama bench lora_memory                               # 0.2b preset (random init) on the CPU: full, rank 8, 16
    babyllama bench lora_memory --reference                   # + the frozen reference DPO, PPO and GRPO keep resident
    babyllama bench lora_memory --ckpt imported_smol          # an imported model (docs/convert.md: SmolLM2-135M)
    babyllama bench lora_memory --threads 1 --steps 9         # steadier step times on a CPU other jobs share
    babyllama bench lora_memory --smoke                       # tiny config (CI keeps this working)

Each configuration runs in a fresh process, since peak memory is a process's: on a CPU the peak resident set size
(getrusage ru_maxrss), on a GPU torch.cuda.max_memory_allocated; `above_start_mb` is the peak minus what the process
held before the model was built (Python, torch and their libraries). The step is the SFT stage's: the Trainer's
fp32 step (later stages on a CPU run fp32; `--precision bf16` for autocast), chunked loss, AdamW with weight decay,
clipping, on the same random token batches; its time is the median and range of --steps steps after --warmup, of
every round (--rounds: the configurations run in turn, each in a fresh process).
With --reference a frozen reference scores each batch without gradients first (as DPO's does): a frozen copy of the
model for full fine-tuning, the adapters' own frozen base (the very same tensors, `lora.sharing_copy`) for LoRA.
`ckpt_mb` is the size of what a checkpoint holds of the model and optimizer: every weight and its AdamW moments, or
the adapters and theirs. Prints one JSON object per configuration, then a table with the ratios to full fine-tuning.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from jsonl import emit  # bench/ is on sys.path as the script's folder
from train_throughput import random_batches

from babyllama.cli import ArgumentParser
from babyllama.model.config import preset
from babyllama.model.llama import Llama, frozen, frozen_copy
from babyllama.model.lora import LoRASpec, add_lora, sharing_copy
from babyllama.train.checkpoint import load_model
from babyllama.train.distributed import pick_device
from babyllama.train.optim import build_adamw
from babyllama.train.trainer import Callback, Trainer, causal_lm_loss


class StepTimes(Callback):
    """Wall time of every step (device synchronised), from the end of the previous one."""

    def __init__(self, device: torch.device):
        self.device, self.times, self.last, self.loss = device, [], None, None

    def on_train_begin(self, trainer: Trainer) -> None:
        self.last = time.perf_counter()

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last, self.loss = now, logs.get("loss", self.loss)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def tensor_mb(tree) -> float:
    """MiB of the distinct tensors in a nest of dicts and lists: a tied matrix, listed twice in a state dict, counts
    once, as `torch.save` stores it once."""
    seen: dict[tuple, int] = {}

    def visit(node) -> None:
        if isinstance(node, torch.Tensor):
            seen[(node.untyped_storage().data_ptr(), node.storage_offset(), tuple(node.shape))] = \
                node.numel() * node.element_size()
        elif isinstance(node, dict):
            for v in node.values():
                visit(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                visit(v)

    visit(tree)
    return sum(seen.values()) / 2**20


def measure(args: argparse.Namespace, rank: int) -> dict:
    """One configuration in this process: rank 0 = full fine-tuning."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    start = peak_mb(device)
    torch.manual_seed(0)
    # 4,096 ids (the shipped tokenizer's) for the presets that take their vocabulary from the tokenizer
    model = load_model(args.ckpt) if args.ckpt else Llama(preset(args.model, vocab_size=4096))
    model = model.to(device)
    if rank:
        policy = add_lora(sharing_copy(model), LoRASpec(rank, args.alpha))
        reference = frozen(model) if args.reference else None
    else:
        policy, reference = model.train(), frozen_copy(model) if args.reference else None
    policy.train()

    def loss(net, batch):
        if reference is not None:
            with torch.no_grad():
                reference(batch[0], batch[1])
        return causal_lm_loss(net, batch)

    trainer = Trainer(policy)
    trainer.compile(loss=loss, optimizer=build_adamw(policy, 1e-4, weight_decay=0.1), clip_grad_norm=1.0,
                    mixed_precision=args.precision, save_frozen=not rank)
    timer = StepTimes(device)
    trainer.fit(random_batches(policy.config, args.batch, args.seq, device), max_steps=args.warmup + args.steps,
                callbacks=[timer])
    times = timer.times[args.warmup:]
    state = trainer.state_dict()
    peak = peak_mb(device)
    return {"config": f"LoRA r={rank}" if rank else "full", "model": args.ckpt or args.model,
            "params": policy.num_params(), "trainable": sum(p.numel() for p in policy.parameters() if p.requires_grad),
            "reference": args.reference, "device": str(device), "threads": torch.get_num_threads(),
            "batch": args.batch, "seq": args.seq, "precision": args.precision or "fp32",
            "peak_mb": round(peak), "above_start_mb": round(peak - start),
            "ckpt_mb": round(tensor_mb([state["model"], state["optimizer"]["state"]]), 2),
            "step_s": [round(t, 3) for t in times], "last_loss": round(timer.loss, 4)}


def merged(runs: list[dict]) -> dict:
    """One configuration's processes (one per round) as one row: the largest peak, every timed step."""
    times = [t for run in runs for t in run["step_s"]]
    row = {**runs[0], "peak_mb": max(r["peak_mb"] for r in runs),
           "above_start_mb": max(r["above_start_mb"] for r in runs), "rounds": len(runs)}
    row.pop("step_s")
    return {**row, "step_s_median": round(statistics.median(times), 3), "step_s_min": min(times),
            "step_s_max": max(times), "steps": len(times)}


def table(rows: list[dict]) -> str:
    full = next((r for r in rows if r["config"] == "full"), None)
    lines = [f"{'config':<12} {'trainable':>12} {'ckpt MB':>9} {'peak MB':>9} {'above start':>12} "
             f"{'step s (median [min-max])':>27} {'mem ratio':>9} {'time ratio':>10}"]
    for r in rows:
        mem = f"{r['above_start_mb'] / full['above_start_mb']:.2f}" if full else "-"
        step = f"{r['step_s_median'] / full['step_s_median']:.2f}" if full else "-"
        spread = f"{r['step_s_median']:.3f} [{r['step_s_min']:.3f}-{r['step_s_max']:.3f}]"
        lines.append(f"{r['config']:<12} {r['trainable']:>12,} {r['ckpt_mb']:>9,.2f} {r['peak_mb']:>9,} "
                     f"{r['above_start_mb']:>12,} {spread:>27} {mem:>9} {step:>10}")
    return "\n".join(lines)


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="0.2b", help="model preset, randomly initialised (default: 0.2b)")
    ap.add_argument("--ckpt", help="a checkpoint (file or directory) to fine-tune instead of --model, e.g. an import")
    ap.add_argument("--ranks", default="0,8,16", help="LoRA ranks, comma-separated; 0 = full fine-tuning")
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=1, help="run the configurations in turn this many times (a "
                                                          "burst of another job's load then hits each alike)")
    ap.add_argument("--precision", choices=("bf16", "fp16"), help="autocast dtype (default: fp32)")
    ap.add_argument("--reference", action="store_true", help="keep a frozen reference resident and score each batch")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is steadier on a shared CPU)")
    ap.add_argument("--smoke", action="store_true", help="tiny preset, 2 steps (CI keeps this working)")
    ap.add_argument("--dest", help="append results as JSON lines to this file")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process: measure this rank, print JSON
    args = ap.parse_args()
    if args.smoke:
        args.model, args.ckpt, args.batch, args.seq, args.steps, args.ranks = "tiny", None, 2, 16, 2, "0,4"
    if args.one is not None:
        print(json.dumps(measure(args, args.one)))
        return
    ranks = [int(r) for r in args.ranks.split(",")]
    runs: dict[int, list[dict]] = {rank: [] for rank in ranks}
    for _ in range(args.rounds):
        for rank in ranks:
            child = subprocess.run([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--one", str(rank)],
                                   capture_output=True, text=True, check=True)
            runs[rank].append(json.loads(child.stdout.strip().splitlines()[-1]))
    rows = [merged(runs[rank]) for rank in ranks]
    for row in rows:
        emit(row, args.dest)
    print(table(rows))


if __name__ == "__main__":
    main()
