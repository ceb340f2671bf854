"""Run presets (`--name`) and the on-disk layout every stage shares.

out/<name>/tokenizer    tokenizer.model + tokenizer.json
out/<name>/data         pretraining .bin shards + meta.json
out/<name>/<stage>      checkpoints (step_*.pt) and log.jsonl of a stage (pretrain, sft, reward, ppo, dpo)
runs/<name>/<stage>     TensorBoard event files
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from babyllama.cli import check_ranges
from babyllama.errors import UserError
from babyllama.hardware import cpu_has_native_bf16, cxx_compiler
from babyllama.model.config import ModelConfig, load_bert4torch_config, padded_vocab, preset, read_json
from babyllama.shipped import TRAIN_CORPUS
from babyllama.train.checkpoint import latest_checkpoint, load_checkpoint

_CONFIG_FILES = ("config.json", "bert4torch_config.json")  # looked for in a --model directory, in this order
_NO_AUTOCAST = ("fp32", "none", "no")
_PRECISIONS = ("auto", "bf16", "fp16", *_NO_AUTOCAST)


@dataclass
class RunConfig:
    """Everything a pretraining run needs; every field is also a command-line flag (`--batch-size 8`)."""

    model: str = "baby"  # model preset in babyllama.model.config.PRESETS
    init: str | None = None  # checkpoint (file or dir) a later stage starts from; None = previous stage's newest
    corpus: list[str] = field(default_factory=lambda: [str(p) for p in TRAIN_CORPUS])  # files, dirs or globs
    corpus_format: str = "auto"
    corpus_field: str = "text"
    tokenizer: str | None = None  # existing tokenizer (.model / tokenizer.json / dir); None = train one
    vocab_size: int = 4096  # when training the tokenizer
    seq_len: int | None = None  # None = the model preset's max_seq_len
    batch_size: int = 16  # per rank, per micro-batch
    grad_accum: int = 1
    fsdp: bool = False  # under torchrun: shard params/grads/optimizer state (FSDP2) instead of replicating (DDP)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    max_steps: int = 600
    stop_at: int | None = None  # end this invocation after this step; the schedule still runs to max_steps
    weight_decay: float = 0.1
    clip_grad_norm: float = 1.0
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: "stop" (naming the last good checkpoint) or "skip" the step
    loss_spike_factor: float = 0.0  # stop when a loss exceeds this x the recent mean (0 = off)
    mixed_precision: str = "auto"  # auto = bf16 on GPUs that have it (else fp16); on CPUs with it, for pretraining
    torch_compile: str = "auto"  # auto = on for CUDA; on a CPU for pretraining runs long enough to pay for it
    eval_every: int = 100
    eval_batches: int = 20
    ckpt_every: int = 200
    keep_checkpoints: int = 3
    log_every: int = 1
    val_fraction: float = 0.02
    workers: int = 2  # data preparation processes
    seed: int = 1337
    out: str = "out"
    runs: str = "runs"


RUN_PRESETS: dict[str, RunConfig] = {
    # Minutes on 2 CPU cores with the shipped corpus. Batch 8 x 1200 steps: the best held-out bits per byte of the
    # sweep in docs/baseline.md for the time 16 x 600 takes (2.329 vs 2.376; batch 4 and lr 6e-4 / 2e-3 were worse).
    "baby": RunConfig(batch_size=8, warmup_steps=60, max_steps=1200),
    # The seed's 0.2B: bring your own corpus (--corpus) and tokenizer (--tokenizer, any size: the model's vocabulary
    # follows it, padded to a multiple of 64; ChatGLM2's 64,793 gives the seed's model; see model_config_for).
    "0.2b": RunConfig(model="0.2b", vocab_size=64793, batch_size=16, grad_accum=4, lr=3e-4, warmup_steps=1000,
                      max_steps=100_000, eval_every=1000, eval_batches=50, ckpt_every=2000, log_every=10),
    "1.1b": RunConfig(model="1.1b", vocab_size=64793, batch_size=8, grad_accum=8, lr=2e-4, warmup_steps=2000,
                      max_steps=200_000, eval_every=1000, eval_batches=50, ckpt_every=2000, log_every=10),
}


# Per-stage changes to a preset (stages after pretraining fine-tune: lower lr, fewer steps). Keyed by stage,
# then by preset name; a preset's entry is merged over the "*" entry (every preset).
STAGE_OVERRIDES: dict[str, dict[str, dict]] = {
    "pretrain": {},
    "sft": {"*": dict(lr=3e-4, warmup_steps=20, max_steps=300, eval_every=50, ckpt_every=100),
            # ~0.9 epoch of the shipped 10.8k conversations; choice_acc (~10 s on 2 cores) every 100 steps
            "baby": dict(lr=5e-4, batch_size=16, warmup_steps=30, max_steps=600, eval_every=100, ckpt_every=200),
            "0.2b": dict(lr=2e-5, warmup_steps=100, max_steps=5000, eval_every=500, ckpt_every=1000)},
    # batch_size counts preference pairs (two sequences each)
    "reward": {"*": dict(lr=1e-4, batch_size=8, warmup_steps=10, max_steps=150, eval_every=50, eval_batches=10,
                         ckpt_every=50, weight_decay=0.0),
               "0.2b": dict(lr=1e-5, grad_accum=4, warmup_steps=50, max_steps=2000, eval_every=200, eval_batches=50,
                            ckpt_every=500)},
    # lr and steps measured on the baby chain (docs/rlhf.md "DPO and PPO side by side"): 120 steps at 5e-5 drift
    # 15 nats/reply from SFT and lower the reward model's score; 40 at 3e-5 raise it at PPO's KL
    "dpo": {"*": dict(lr=3e-5, batch_size=8, warmup_steps=10, max_steps=40, eval_every=20, eval_batches=10,
                      ckpt_every=20, weight_decay=0.0),
            "0.2b": dict(lr=1e-6, grad_accum=4, warmup_steps=50, max_steps=2000, eval_every=200, eval_batches=50,
                         ckpt_every=500)},
    # batch_size = replies per PPO minibatch (one optimizer step); rollouts are --rollout-size prompts
    "ppo": {"*": dict(lr=2e-5, batch_size=8, warmup_steps=5, max_steps=80, eval_every=40, ckpt_every=40,
                      weight_decay=0.0, min_lr_ratio=1.0),
            "0.2b": dict(lr=1e-6, grad_accum=2, warmup_steps=20, max_steps=1000, eval_every=100, ckpt_every=200)},
}


# (field, test, what it must be): checked before any work starts, so a typo costs nothing
_RULES = (
    ("batch_size", lambda v: v >= 1, "at least 1"), ("grad_accum", lambda v: v >= 1, "at least 1"),
    ("lr", lambda v: 0 < v < float("inf"), "a positive number"), ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("warmup_steps", lambda v: v >= 0, "0 or more"), ("max_steps", lambda v: v >= 1, "at least 1"),
    ("stop_at", lambda v: v is None or v >= 1, "at least 1"), ("weight_decay", lambda v: v >= 0, "0 or more"),
    ("clip_grad_norm", lambda v: v >= 0, "0 (off) or more"), ("on_nonfinite", lambda v: v in ("stop", "skip"),
                                                               "stop or skip"),
    ("loss_spike_factor", lambda v: v == 0 or v > 1, "0 (off) or above 1"),
    ("eval_every", lambda v: v >= 1, "at least 1"), ("eval_batches", lambda v: v >= 1, "at least 1"),
    ("ckpt_every", lambda v: v >= 1, "at least 1"), ("keep_checkpoints", lambda v: v >= 0, "0 (keep all) or more"),
    ("log_every", lambda v: v >= 1, "at least 1"), ("seq_len", lambda v: v is None or v >= 2, "at least 2"),
    ("val_fraction", lambda v: 0 < v < 1, "between 0 and 1"), ("workers", lambda v: v >= 1, "at least 1"),
    ("vocab_size", lambda v: v >= 16, "at least 16"),
)


def check_run(run: RunConfig) -> None:
    """One line naming the first flag out of range."""
    check_ranges(run, _RULES)


def run_preset(name: str, stage: str = "pretrain") -> RunConfig:
    """Preset `name` for `stage`: the RunConfig defaults, the preset's values over them, then the stage's changes
    for every preset ("*") and for this one, each over the one before."""
    if name not in RUN_PRESETS:
        raise UserError(f"unknown preset '{name}'; choose one of {sorted(RUN_PRESETS)} (--preset)")
    by_name = STAGE_OVERRIDES.get(stage, {})
    return replace(RUN_PRESETS[name], **{**by_name.get("*", {}), **by_name.get(name, {})})


def preset_for(name: str, preset: str | None) -> str:
    """The preset a run uses: --preset, else the run's --name when it names a preset, else `baby`."""
    return preset or (name if name in RUN_PRESETS else "baby")


@dataclass
class RunPaths:
    name: str
    out: Path
    runs: Path

    @classmethod
    def of(cls, name: str, out: str | Path = "out", runs: str | Path = "runs") -> "RunPaths":
        """The paths of run `name` under the output root `out` (and TensorBoard root `runs`)."""
        return cls(name, Path(out) / name, Path(runs) / name)

    @property
    def tokenizer(self) -> Path:
        return self.out / "tokenizer"

    @property
    def data(self) -> Path:
        return self.out / "data"

    def stage(self, stage: str) -> Path:
        return self.out / stage

    def tensorboard(self, stage: str) -> Path:
        return self.runs / stage


def model_config_for(run: RunConfig, vocab_size: int) -> ModelConfig:
    """The preset named by --model, or the architecture stored at that path (a babyllama checkpoint or its
    directory, an HF config.json or its directory, a bert4torch_config.json): e.g. an imported HF model.

    A preset's vocabulary follows the tokenizer (`vocab_size` ids): presets without a size of their own take it
    exactly; the seed-scale presets keep their 64,793 for a tokenizer of that size, and for any other pad it to a
    multiple of 64 (`config.padded_vocab`), the rows past the tokenizer masked (`ModelConfig.tokenizer_vocab_size`).
    An architecture read from a path is used as stored."""
    overrides = {"max_seq_len": run.seq_len} if run.seq_len else {}
    if Path(run.model).exists():
        cfg = replace(config_at(Path(run.model)), **overrides)
        if vocab_size > cfg.vocab_size:
            raise UserError(f"the tokenizer has {vocab_size:,} tokens but the model at --model {run.model} has "
                            f"{cfg.vocab_size:,} embedding rows; pass the tokenizer it was trained with")
        return cfg
    cfg = preset(run.model, vocab_size=vocab_size, **overrides)
    if cfg.vocab_size != vocab_size:  # a seed-scale preset's own size, for another tokenizer
        cfg = replace(cfg, vocab_size=padded_vocab(vocab_size))
    return cfg.for_tokenizer(vocab_size)


def config_at(path: Path) -> ModelConfig:
    if path.is_dir():
        path = next((path / n for n in _CONFIG_FILES if (path / n).exists()), path)
    if path.name == "bert4torch_config.json":
        return load_bert4torch_config(path)
    if path.suffix == ".json":
        return ModelConfig.from_hf(read_json(path), str(path))
    found = path if path.is_file() else latest_checkpoint(path)
    if found is None:
        raise UserError(f"--model {path}: no checkpoint, config.json or bert4torch_config.json there")
    state = load_checkpoint(found)
    if state.get("model_config") is None:
        raise UserError(f"--model {found}: checkpoint has no model_config; it was not written by babyllama")
    return ModelConfig.from_dict(state["model_config"], str(found))


def resolve_precision(run_value: str, device: torch.device, fixed_shapes: bool = False) -> str | None:
    """The trainer's autocast dtype name (None = fp32) for --mixed-precision; a typo is a UserError here, not a
    ValueError from the trainer. auto: bf16 on GPUs that have it (else fp16); on a CPU with native bf16, bf16 for
    runs whose batches all have one shape (`fixed_shapes`: pretraining, 1.9x fp32 eager on the 2-core AVX-512 BF16
    dev machine) and fp32 for the later stages' small padded batches, where autocast's casts cost more than bf16
    saves (docs/performance.md); fp32 on other CPUs and on MPS, the only precision verified there (none was)."""
    value = run_value.lower()
    if value not in _PRECISIONS:
        raise UserError(f"--mixed-precision {run_value!r}: choose auto, bf16, fp16 or fp32 (none)")
    if value != "auto":
        return None if value in _NO_AUTOCAST else value
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and fixed_shapes and cpu_has_native_bf16() else None


# torch.compile on a CPU costs tens of seconds once (docs/performance.md) and saves about a quarter of each step of
# the baby preset: shorter runs (the later stages' tens of steps, tests) do not earn it back.
CPU_COMPILE_MIN_STEPS = 200


def resolve_compile(run_value: str, device: torch.device, steps: int | None = None,
                    fixed_shapes: bool = False) -> bool:
    """--torch-compile: `auto` compiles on CUDA, and on a CPU for a run of at least CPU_COMPILE_MIN_STEPS `steps`
    whose batches all have one shape (`fixed_shapes`: SFT's padded batches of varying length took 7.7 s a step
    compiled vs 1.1 eager, recompiling) when a C++ compiler is there for inductor; MPS never (inductor's Metal
    backend is experimental). `steps` is the run's length, not what is left of it after a resume, so a resumed run
    keeps its numerics."""
    if run_value != "auto":
        return run_value.lower() in ("1", "true", "yes", "on")
    if device.type == "cpu":
        return fixed_shapes and (steps or 0) >= CPU_COMPILE_MIN_STEPS and cxx_compiler() is not None
    return device.type == "cuda"
