"""Training throughput of babyllama's trainer vs HF transformers (and bert4torch when installed), same run.

    babyllama bench train_throughput                          # 0.2B config, batch 16 x 1024, bf16, on the GPU:
                                                              # ours vs HF vs bert4torch (when installed)
    babyllama bench train_throughput --levers                 # our trainer with each speed lever on/off
    babyllama bench train_throughput --smoke                  # tiny config on CPU (CI keeps this working)
    babyllama bench train_throughput --systems ours,ours-ddp  # DDP overhead at world size 1 vs plain

Prints one JSON object per system (tokens/s, MFU against the detected GPU's peak, peak memory, loss) and a table.
Every system sees the same random token batches, steps and optimizer settings; timing excludes warm-up steps.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from jsonl import emit  # bench/ is on sys.path as the script's folder

import babyllama.model.fused_cross_entropy as loss_module
from babyllama.cli import ArgumentParser
from babyllama.convert.bert4torch import B4T_CONFIG, bert4torch_builder, bert4torch_config
from babyllama.data.token_bins import build_pretrain_loader, prepare_token_bins
from babyllama.model.config import ModelConfig, preset
from babyllama.model.llama import Llama
from babyllama.train.distributed import DistEnv, pick_device
from babyllama.train.flops import peak_flops
from babyllama.train.optim import build_adamw
from babyllama.train.run_config import CPU_COMPILE_MIN_STEPS, resolve_compile, resolve_precision
from babyllama.train.trainer import Callback, Trainer


def random_batches(cfg: ModelConfig, batch: int, seq: int, device: torch.device, n: int = 4):
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g) for _ in range(n)]
    i = 0
    while True:
        w = data[i % n].to(device, non_blocking=True)
        yield w[:, :-1], w[:, 1:]
        i += 1


class RandomTokenizer:
    """What prepare_token_bins needs of a tokenizer: each document becomes `tokens` seeded random ids."""

    def __init__(self, vocab_size: int, tokens: int):
        self.vocab_size, self.eos_id, self.tokens = vocab_size, 0, tokens

    def encode(self, text: str) -> list[int]:
        g = torch.Generator().manual_seed(int(text.split()[-1]))
        return torch.randint(1, self.vocab_size, (self.tokens,), generator=g).tolist()


def token_bin_batches(cfg: ModelConfig, args, device: torch.device, out_dir: Path):
    """Pretraining's data path: random tokens written as token bins, read by its memmap loader (pinned on a GPU),
    copied to the device by the trainer."""
    windows = (args.warmup + args.steps + 2) * args.batch * args.accum
    per_doc = 1 << 16
    docs = (f"document {i}" for i in range(windows * (args.seq + 1) // per_doc + 2))
    prepare_token_bins(docs, RandomTokenizer(cfg.vocab_size, per_doc), out_dir, val_fraction=0.0, num_workers=1)
    return build_pretrain_loader(out_dir, "train", args.seq, args.batch, drop_last=True,
                                 pin_memory=device.type == "cuda")


class StepTimer(Callback):
    """Wall time of the steps after `warmup`, with the device synchronised at both ends."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device, self.t0, self.t1, self.loss = warmup, device, None, None, None

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        if trainer.step == self.warmup:
            _sync(self.device)
            self.t0 = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        self.loss = logs.get("loss", self.loss)

    def on_train_end(self, trainer: Trainer) -> None:
        _sync(self.device)
        self.t1 = time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Levers:
    """How our trainer is run; the defaults are `babyllama pretrain`'s on a GPU."""
    compile: bool = True
    chunked_loss: bool = True
    checkpointing: bool = False
    fused_adamw: bool = True
    ddp: bool = False
    loss_chunk_elements: int | None = None  # None = babyllama.model.fused_cross_entropy.CHUNK_ELEMENTS
    attention: str | None = None  # an SDPA backend to prefer (e.g. "CUDNN_ATTENTION"); None = PyTorch's choice
    loader: bool = False  # batches through pretraining's token-bin loader instead of tensors already on the device
    precision: str | None = "bf16"  # autocast dtype name; None = fp32


def bench_ours(cfg: ModelConfig, args, device: torch.device, levers: Levers) -> dict:
    with contextlib.ExitStack() as stack:
        if levers.attention:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            preferred = [getattr(SDPBackend, levers.attention), SDPBackend.FLASH_ATTENTION,
                         SDPBackend.EFFICIENT_ATTENTION]
            stack.enter_context(sdpa_kernel(preferred, set_priority=True))  # the compile's trace picks it
        if levers.loss_chunk_elements:
            stack.callback(setattr, loss_module, "CHUNK_ELEMENTS", loss_module.CHUNK_ELEMENTS)
            loss_module.CHUNK_ELEMENTS = levers.loss_chunk_elements
        if levers.loader:
            batches = token_bin_batches(cfg, args, device, Path(stack.enter_context(tempfile.TemporaryDirectory())))
        else:
            batches = random_batches(cfg, args.batch, args.seq, device)
        torch.manual_seed(0)
        model = Llama(cfg)
        model.chunked_loss, model.gradient_checkpointing = levers.chunked_loss, levers.checkpointing
        trainer = Trainer(model, DistEnv(device=device))
        opt = build_adamw(trainer.network, lr=3e-4)
        if not levers.fused_adamw:
            opt = torch.optim.AdamW(opt.param_groups, lr=3e-4, betas=(0.9, 0.95), fused=False, foreach=False)
        trainer.compile(optimizer=opt, clip_grad_norm=1.0, mixed_precision=levers.precision,
                        torch_compile=levers.compile,
                        grad_accumulation_steps=args.accum, log_every=args.warmup + args.steps, ddp=levers.ddp)
        timer = StepTimer(args.warmup, device)
        trainer.fit(batches, max_steps=args.warmup + args.steps, callbacks=[timer])
    return _result(cfg, args, device, timer.t1 - timer.t0, timer.loss)


def bench_hf(cfg: ModelConfig, args, device: torch.device) -> dict:
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf(), attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_cfg).to(device).train()
    return plain_loop(model, lambda x, y: model(input_ids=x, labels=x).loss, cfg, args, device)  # HF shifts itself


def bench_bert4torch(cfg: ModelConfig, args, device: torch.device) -> dict:
    """bert4torch 0.6.2's LLaMA (the seed project's stack), built from the config verified against HF."""
    build = bert4torch_builder()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / B4T_CONFIG
        config.write_text(json.dumps(bert4torch_config(cfg)))
        torch.manual_seed(0)
        model = build(config_path=str(config)).to(device).train()
    return plain_loop(model, lambda x, y: F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()),
                      cfg, args, device)


def plain_loop(model: torch.nn.Module, loss_of, cfg: ModelConfig, args, device: torch.device) -> dict:
    """The usual eager loop of a model outside our trainer: bf16 autocast on GPU, clipping, fused AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    batches = random_batches(cfg, args.batch, args.seq, device)
    loss = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync(device)
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        for _ in range(args.accum):
            x, y = next(batches)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_of(x, y)
            (loss / args.accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return _result(cfg, args, device, time.perf_counter() - t0, float(loss.detach()))


def _result(cfg: ModelConfig, args, device: torch.device, seconds: float, loss: float | None) -> dict:
    tokens = args.batch * args.seq * args.accum * args.steps
    tps = tokens / seconds
    peak = peak_flops(device)
    return {
        "tokens_per_s": round(tps, 1),
        "mfu": round(cfg.flops_per_token(args.seq) * tps / peak, 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "final_loss": round(loss, 4) if loss is not None else None,
    }


def single_rank_group(device: torch.device) -> None:
    """A one-process group, so that DDP's bucketing and all-reduce run as they would on N GPUs."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="0.2b")
    ap.add_argument("--vocab", type=int, default=4096, help="for presets sized by their tokenizer (baby)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--systems", default="ours,hf,bert4torch",
                    help="comma list of: ours (the precision and compile `auto` picks here), ours-loader (through "
                         "pretraining's token-bin loader), ours-eager, ours-eager-fp32, ours-compiled-fp32, "
                         "ours-ddp, hf, bert4torch (skipped when not installed)")
    ap.add_argument("--levers", action="store_true", help="measure each speed lever of our trainer")
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU, 2 steps: checks the script runs")
    ap.add_argument("--dest", help="append results as JSON lines to this file")
    args = ap.parse_args()
    device = pick_device("cpu" if args.smoke else "auto")
    if "ours-ddp" in args.systems.split(","):
        single_rank_group(device)
    if args.smoke:
        cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=64)
        args.batch, args.seq, args.steps, args.warmup, args.config = 2, 64, 2, 1, "smoke"
    else:
        cfg = preset(args.config, vocab_size=args.vocab)
    # "ours": what `babyllama pretrain`'s --mixed-precision auto / --torch-compile auto choose here for a long run
    # (--smoke checks the script, not inductor: no compile there)
    auto = dict(compile=resolve_compile("auto", device, CPU_COMPILE_MIN_STEPS, fixed_shapes=True) and not args.smoke,
                precision=resolve_precision("auto", device, fixed_shapes=True))
    runs = {
        "ours": lambda: bench_ours(cfg, args, device, Levers(**auto)),
        "ours-loader": lambda: bench_ours(cfg, args, device, Levers(**auto, loader=True)),
        "ours-eager": lambda: bench_ours(cfg, args, device, Levers(compile=False, precision=auto["precision"])),
        "ours-ddp": lambda: bench_ours(cfg, args, device, Levers(**auto, ddp=True)),
        "ours-eager-fp32": lambda: bench_ours(cfg, args, device, Levers(compile=False, precision=None)),
        "ours-compiled-fp32": lambda: bench_ours(cfg, args, device, Levers(compile=True, precision=None)),
        "hf": lambda: bench_hf(cfg, args, device),
        "bert4torch": lambda: bench_bert4torch(cfg, args, device),
    }
    if args.levers:
        levers = {  # the default first (the baseline of this run), then one lever changed at a time
            "compile, chunked loss": Levers(),
            "compile, full logits": Levers(chunked_loss=False),
            "eager, chunked loss": Levers(compile=False),
            "compile, chunked, unfused AdamW": Levers(fused_adamw=False),
            "compile, chunked x4 rows": Levers(loss_chunk_elements=4 * loss_module.CHUNK_ELEMENTS),
            "compile, chunked, act. checkpointing": Levers(checkpointing=True),
            "compile, chunked, cuDNN attention": Levers(attention="CUDNN_ATTENTION"),
            "eager, full logits": Levers(compile=False, chunked_loss=False),
        }
        runs = {name: functools.partial(bench_ours, cfg, args, device, lv) for name, lv in levers.items()}
        if device.type != "cuda":  # cuDNN's attention kernel exists on NVIDIA GPUs only
            del runs["compile, chunked, cuDNN attention"]
    else:
        runs = {k: runs[k] for k in args.systems.split(",")}
        if "bert4torch" in runs and importlib.util.find_spec("bert4torch") is None:
            print("bert4torch is not installed (pip install -r requirements-bert4torch.txt): skipped", flush=True)
            del runs["bert4torch"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results = []
    for system, fn in runs.items():
        r = {"system": system, "device": name, "config": args.config, "batch": args.batch, "seq": args.seq,
             "accum": args.accum, **fn()}
        emit(r, args.dest)
        results.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n| system | tokens/s | MFU | peak GiB |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['system']} | {r['tokens_per_s']:,.0f} | {r['mfu']} | {r['peak_mem_gib']} |")


if __name__ == "__main__":
    main()
