"""Every training stage's settings, and the on-disk layout every stage shares.

The settings story: each stage has one dataclass here (PretrainConfig, SFTConfig, RewardConfig, DPOConfig,
PPOConfig, GRPOConfig). Its fields are the stage's flags (`lr` is `--lr`), its defaults are the `baby` preset's
values for that stage, and its PRESETS table lists what the larger presets (0.2b, 1.1b) change. A run takes the stage's
defaults, then its preset's changes (--preset, or the --name when it names a preset), then the flags given;
`--help` shows the value each flag will take and `--print-config` the resolved settings with where each came from.
A flag of another stage is an error naming that stage. Groups that several stages share (the optimizer and loop
of TrainConfig, the preference data, the held-out evaluation, LoRA) are dataclasses the stage configs inherit.

out/<name>/tokenizer    tokenizer.model + tokenizer.json
out/<name>/data         pretraining .bin shards + meta.json
out/<name>/<stage>      checkpoints (step_*.pt) and log.jsonl of a stage (pretrain, sft, reward, dpo, ppo, grpo)
runs/<name>/<stage>     TensorBoard event files
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from babyllama.cli import Rule, check_ranges
from babyllama.data.corpus import FORMATS as CORPUS_FORMATS
from babyllama.data.mix import pretrain_rows
from babyllama.data.preference import FORMATS as PREFERENCE_FORMATS
from babyllama.data.sft import FORMATS as SFT_FORMATS
from babyllama.errors import UserError
from babyllama.hardware import cpu_has_native_bf16, cxx_compiler
from babyllama.model.config import ModelConfig, load_bert4torch_config, padded_vocab, preset, read_json
from babyllama.model.lora import LORA_TARGETS, LoRASpec
from babyllama.shipped import (
    CHAT_CHOICES,
    HELDOUT_PROMPTS,
    PREFERENCE,
    SFT,
    SKILLS_HELDOUT,
    SKILLS_TRAIN,
    TRAIN_CORPUS,
)
from babyllama.train.checkpoint import latest_checkpoint, load_checkpoint

_CONFIG_FILES = ("config.json", "bert4torch_config.json")  # looked for in a --model directory, in this order
_NO_AUTOCAST = ("fp32", "none", "no")
_PRECISIONS = ("auto", "bf16", "fp16", *_NO_AUTOCAST)
PRESETS = ("baby", "0.2b", "1.1b")  # --preset; baby is every stage's defaults
DPO_LOSSES = ("sigmoid", "ipo")
_COMPILE = ("auto", "on", "off", "true", "false", "yes", "no", "1", "0")


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its --help text; a list default is copied per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _existing_file(v: str) -> bool:
    return Path(v).is_file()


def _file_or_none(v: str) -> bool:
    return v.lower() == "none" or Path(v).is_file()


@dataclass(kw_only=True)
class TrainConfig:
    """The optimizer, schedule, loop and outputs of every training stage. The fields without a default here
    are set by each stage's config: they are what differs between stages."""

    batch_size: int = setting(None, "samples per rank and micro-batch: sequences (pretrain, sft), preference pairs "
                                    "(reward, dpo), replies per minibatch (ppo)")
    lr: float = setting(None, "peak learning rate (after warmup; cosine decay to --min-lr-ratio of it)")
    min_lr_ratio: float = setting(None, "the learning rate at the last step, as a share of --lr")
    warmup_steps: int = setting(None, "linear warmup steps")
    max_steps: int = setting(None, "optimizer steps of the run (the schedule's length)")
    weight_decay: float = setting(None, "AdamW weight decay (not on norms and biases)")
    eval_every: int = setting(None, "evaluate every this many steps")
    ckpt_every: int = setting(None, "checkpoint every this many steps (and at the end)")
    model: str = setting("baby", "model preset (babyllama.model.config.PRESETS), or the path of a checkpoint or "
                                 "config.json whose architecture to use")
    init: str | None = setting(None, "checkpoint (file or directory) to start from; later stages default to the "
                                     "previous stage's newest")
    tokenizer: str | None = setting(None, "an existing tokenizer (.model, tokenizer.json or their directory); "
                                          "default: the run's own, out/<name>/tokenizer")
    seq_len: int | None = setting(None, "context length; default: the model preset's max_seq_len")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    fsdp: bool = setting(False, "under torchrun: shard parameters, gradients and optimizer state (FSDP2) "
                                "instead of replicating them (DDP)")
    stop_at: int | None = setting(None, "end this invocation after this step; the schedule still runs to "
                                        "--max-steps (continue with --resume)")
    clip_grad_norm: float = setting(1.0, "clip the gradient norm to this (0 = off)")
    on_nonfinite: str = setting("stop", "a NaN/inf loss or gradient: stop (naming the last good checkpoint) or "
                                        "skip the step")
    loss_spike_factor: float = setting(0.0, "stop when a loss exceeds this times the recent mean (0 = off)")
    mixed_precision: str = setting("auto", "auto, bf16, fp16 or fp32: auto = bf16 on GPUs that have it (else "
                                           "fp16), and on CPUs with native bf16 for pretraining; else fp32")
    torch_compile: str = setting("auto", "auto, on or off: auto = on for CUDA, and on a CPU for pretraining runs "
                                         "long enough to pay for it")
    keep_checkpoints: int = setting(3, "checkpoints kept (0 = all)")
    log_every: int = setting(1, "log the training loss every this many steps")
    seed: int = setting(1337, "seed of the initialisation and the data order")
    out: str = setting("out", "output root: checkpoints and logs go to <out>/<name>/<stage>")
    runs: str = setting("runs", "TensorBoard root: <runs>/<name>/<stage>")

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}  # preset -> the fields it changes (each stage's own)
    RULES: ClassVar[tuple[Rule, ...]] = (  # (field, test, what it must be): checked before any work starts
        ("batch_size", lambda v: v >= 1, "at least 1"), ("grad_accum", lambda v: v >= 1, "at least 1"),
        ("lr", lambda v: 0 < v < math.inf, "a positive number"), ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("warmup_steps", lambda v: v >= 0, "0 or more"), ("max_steps", lambda v: v >= 1, "at least 1"),
        ("stop_at", lambda v: v is None or v >= 1, "at least 1"), ("weight_decay", lambda v: v >= 0, "0 or more"),
        ("clip_grad_norm", lambda v: v >= 0, "0 (off) or more"),
        ("on_nonfinite", lambda v: v in ("stop", "skip"), "stop or skip"),
        ("loss_spike_factor", lambda v: v == 0 or v > 1, "0 (off) or above 1"),
        ("eval_every", lambda v: v >= 1, "at least 1"),
        ("mixed_precision", lambda v: v.lower() in _PRECISIONS, "auto, bf16, fp16 or fp32 (none)"),
        ("torch_compile", lambda v: v.lower() in _COMPILE, "auto, on or off"),
        ("ckpt_every", lambda v: v >= 1, "at least 1"), ("keep_checkpoints", lambda v: v >= 0, "0 (keep all) or more"),
        ("log_every", lambda v: v >= 1, "at least 1"), ("seq_len", lambda v: v is None or v >= 2, "at least 2"))

    @classmethod
    def for_preset(cls, name: str = "baby") -> "TrainConfig":
        """This stage's settings for preset `name`: its defaults with the preset's changes."""
        if name not in PRESETS:
            raise UserError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)} (--preset)")
        return replace(cls(), **cls.PRESETS.get(name, {}))

    def check(self) -> None:
        """One line naming the first flag out of range (the rules of every group this config inherits)."""
        for group in type(self).__mro__:
            check_ranges(self, vars(group).get("RULES", ()))


@dataclass(kw_only=True)
class BatchedEvaluation:
    """Periodic evaluation on held-out batches (pretrain, sft, reward, dpo; PPO evaluates on held-out prompts)."""

    eval_batches: int = setting(None, "batches per periodic evaluation")

    RULES: ClassVar[tuple[Rule, ...]] = (("eval_batches", lambda v: v >= 1, "at least 1"),)


@dataclass(kw_only=True)
class DistillSettings:
    """Logit distillation from a teacher with the same tokenizer (--teacher; babyllama/train/distill.py)."""

    teacher: str | None = setting(None, "checkpoint (file or stage directory) of a teacher with this run's "
                                        "tokenizer: the loss adds the KL to its next-token distribution")
    distill_alpha: float = setting(0.5, "the distillation term's share of the loss (the rest: cross-entropy)")
    distill_temperature: float = setting(1.0, "softens both distributions before the KL (scaled back by T^2)")

    RULES: ClassVar[tuple[Rule, ...]] = (
        ("distill_alpha", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("distill_temperature", lambda v: 0 < v < math.inf, "a positive number"))


@dataclass(kw_only=True)
class LoRASettings:
    """LoRA: low-rank adapters trained on the frozen start weights instead of every weight (--lora-rank above 0).
    The stage's checkpoints then hold the adapters only and name the checkpoint they sit on (babyllama/model/lora.py,
    `train.checkpoint.load_model` merges them). Adapters usually take a larger --lr than full fine-tuning: the
    stages' and presets' values are full fine-tuning's, not tuned for LoRA."""

    lora_rank: int = setting(0, "rank of the adapters; 0 = off (full fine-tuning)")
    lora_alpha: float = setting(16.0, "adapter scale: the update is --lora-alpha / --lora-rank x B A")
    lora_dropout: float = setting(0.0, "dropout on the adapters' input while training")
    lora_targets: list[str] = setting(list(LORA_TARGETS), "the projections of every block that get adapters")

    RULES: ClassVar[tuple[Rule, ...]] = (
        ("lora_rank", lambda v: v >= 0, "0 (off) or more"),
        ("lora_alpha", lambda v: 0 < v < math.inf, "a positive number"),
        ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("lora_targets", lambda v: len(v) >= 1 and set(v) <= set(LORA_TARGETS),
         f"one or more of {', '.join(LORA_TARGETS)}"))

    def check(self) -> None:
        super().check()  # a mixin: TrainConfig.check, after it in every stage config's MRO
        if self.lora_rank and getattr(self, "fsdp", False):
            raise UserError("--fsdp with --lora-rank: adapters are not sharded; train them with DDP (leave --fsdp "
                            "off) or fine-tune every weight (--lora-rank 0)")

    @property
    def lora(self) -> LoRASpec | None:
        """The adapters the run trains, or None for full fine-tuning."""
        if not self.lora_rank:
            return None
        return LoRASpec(self.lora_rank, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets))


@dataclass(kw_only=True)
class PretrainConfig(DistillSettings, BatchedEvaluation, TrainConfig):
    """Pretraining's own settings: the corpus and the tokenizer it trains. The baby values take minutes on 2 CPU
    cores with the shipped corpus: batch 8 x 1200 steps gave the best held-out bits per byte of the sweep in
    docs/baseline.md for the time 16 x 600 takes (2.329 vs 2.376; batch 4 and lr 6e-4 / 2e-3 were worse)."""

    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    max_steps: int = 1200
    weight_decay: float = 0.1
    eval_every: int = 100
    eval_batches: int = 20
    ckpt_every: int = 200
    corpus: list[str] = setting([str(p) for p in TRAIN_CORPUS],
                                "corpus files, directories or globs")
    corpus_format: str = setting("auto", f"corpus format: {', '.join(CORPUS_FORMATS)} (auto: by extension)")
    corpus_field: str = setting("text", "JSON/parquet field holding the text")
    vocab_size: int = setting(4096, "tokenizer size, when the run trains its tokenizer")
    val_fraction: float = setting(0.02, "share of documents held out for validation")
    workers: int = setting(2, "data preparation processes")

    # The seed's 0.2B and 1.1B: bring your own corpus (--corpus) and tokenizer (--tokenizer, any size: the model's
    # vocabulary follows it, padded to a multiple of 64; ChatGLM2's 64,793 gives the seed's model).
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "0.2b": dict(model="0.2b", vocab_size=64793, batch_size=16, grad_accum=4, lr=3e-4, warmup_steps=1000,
                     max_steps=100_000, eval_every=1000, eval_batches=50, ckpt_every=2000, log_every=10),
        "1.1b": dict(model="1.1b", vocab_size=64793, grad_accum=8, lr=2e-4, warmup_steps=2000, max_steps=200_000,
                     eval_every=1000, eval_batches=50, ckpt_every=2000, log_every=10)}
    RULES: ClassVar[tuple[Rule, ...]] = (
        ("corpus_format", lambda v: v in CORPUS_FORMATS, f"one of {', '.join(CORPUS_FORMATS)}"),
        ("val_fraction", lambda v: 0 < v < 1, "between 0 and 1"), ("workers", lambda v: v >= 1, "at least 1"),
        ("vocab_size", lambda v: v >= 16, "at least 16"))


@dataclass(kw_only=True)
class SFTConfig(DistillSettings, LoRASettings, BatchedEvaluation, TrainConfig):
    """SFT's own settings: the conversations it learns and the items it is scored on. The baby values are 600 steps
    of 16 conversations (of the shipped 10.8k and the 4.8k skill items) and 4 windows of pretraining text: the
    held-out skill accuracy of 16 conversations alone, at a fifth of their cost in held-out bits per byte
    (docs/skills.md); choice_acc (~10 s on 2 cores) every 200 steps."""

    batch_size: int = 20
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    max_steps: int = 600
    weight_decay: float = 0.1
    eval_every: int = 200
    eval_batches: int = 20
    ckpt_every: int = 200
    train_data: list[str] = setting([str(SFT / "sft_train.jsonl"), str(SKILLS_TRAIN)],
                                    "conversation files to learn, all in one dataset (JSON lines or a JSON array, "
                                    "any --data-format)")
    valid_data: str = setting(str(SFT / "sft_valid.jsonl"), "conversations for val_loss")
    choice_data: str = setting(str(CHAT_CHOICES), "multiple-choice items for choice_acc (schema in "
                                                  "babyllama/eval/choice.py); none = skip")
    data_format: str = setting("auto", f"conversation format: auto, {', '.join(SFT_FORMATS)}")
    system: str | None = setting(None, "system prompt for conversations that have none")
    skill_data: str = setting(str(SKILLS_HELDOUT), "held-out skill items for skill_acc before/after (all) and "
                                                   "during training (--eval-skill-items per skill); none = skip")
    eval_skill_items: int = setting(30, "skill items per skill in the periodic skill_acc")
    pretrain_mix: float = setting(0.2, "share of each batch's rows that are windows of the run's pretraining token "
                                       "data (--pretrain-data), trained on every token: less forgetting; 0 = off")
    pretrain_data: str | None = setting(None, "token data for --pretrain-mix (its train split); default: "
                                              "out/<name>/data")

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "0.2b": dict(model="0.2b", grad_accum=4, lr=2e-5, warmup_steps=100, max_steps=5000, eval_every=500,
                     eval_batches=50, ckpt_every=1000, log_every=10),
        "1.1b": dict(model="1.1b", batch_size=8, grad_accum=8, lr=3e-4, warmup_steps=20, max_steps=300, eval_every=50,
                     eval_batches=50, ckpt_every=100, log_every=10)}
    RULES: ClassVar[tuple[Rule, ...]] = (
        ("train_data", lambda v: all(map(_existing_file, v)), "existing files"),
        ("valid_data", _existing_file, "an existing file"), ("choice_data", _file_or_none, "an existing file or none"),
        ("data_format", lambda v: v in ("auto", *SFT_FORMATS), f"one of auto, {', '.join(SFT_FORMATS)}"),
        ("pretrain_mix", lambda v: 0 <= v < 1, "in [0, 1)"), ("skill_data", _file_or_none, "an existing file or none"),
        ("eval_skill_items", lambda v: v >= 1, "at least 1"))

    def check(self) -> None:
        super().check()
        pretrain_rows(self.pretrain_mix, self.batch_size)  # refuses a mix that leaves no conversation


@dataclass(kw_only=True)
class PreferenceData:
    """The preference pairs the reward model and DPO learn from."""

    train_data: str = setting(str(PREFERENCE / "pref_train.jsonl"),
                              "preference pairs to train on (JSON lines or a JSON array, see --pref-format)")
    valid_data: str = setting(str(PREFERENCE / "pref_valid.jsonl"), "pairs for validation")
    pref_format: str = setting("auto", "pairs: prompt/chosen/rejected; hh: Anthropic hh-rlhf texts; auto: either")
    system: str | None = setting(None, "system prompt for prompts that have none (as in SFT)")

    RULES: ClassVar[tuple[Rule, ...]] = (
        ("train_data", _existing_file, "an existing file"), ("valid_data", _existing_file, "an existing file"),
        ("pref_format", lambda v: v in ("auto", *PREFERENCE_FORMATS), f"one of auto, {', '.join(PREFERENCE_FORMATS)}"))


@dataclass(kw_only=True)
class HeldOutEvaluation:
    """The before/after numbers of DPO and PPO (babyllama/eval/heldout.py)."""

    eval_prompts: str = setting(str(HELDOUT_PROMPTS), "held-out prompts for the before/after score and KL (none = "
                                                      "skip)")
    eval_prompt_count: int | None = setting(None, "use the first N held-out prompts that fit (default: all)")
    choice_data: str = setting(str(CHAT_CHOICES), "multiple-choice items for accuracy before/after "
                                                  "(babyllama/eval/choice.py); none = skip")
    skill_data: str = setting(str(SKILLS_HELDOUT), "skill items for the greedy skill accuracy before/after "
                                                   "(babyllama/eval/skills.py); none = skip")
    eval_batch_size: int = setting(32, "prompts per batch when evaluating")
    reward: str | None = setting(None, "reward-model checkpoint (file or directory); default: out/<name>/reward",
                                 aliases=("--reward-model",))

    RULES: ClassVar[tuple[Rule, ...]] = (
        ("eval_prompts", _file_or_none, "an existing file or none"),
        ("eval_prompt_count", lambda v: v is None or v >= 1, "at least 1"),
        ("choice_data", _file_or_none, "an existing file or none"),
        ("skill_data", _file_or_none, "an existing file or none"),
        ("eval_batch_size", lambda v: v >= 1, "at least 1"))


@dataclass(kw_only=True)
class RewardConfig(BatchedEvaluation, PreferenceData, TrainConfig):
    """The reward model's settings (a scalar head on the SFT model, Bradley-Terry loss on preference pairs)."""

    batch_size: int = 8
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    max_steps: int = 150
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_batches: int = 10
    ckpt_every: int = 50

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "0.2b": dict(model="0.2b", grad_accum=4, lr=1e-5, warmup_steps=50, max_steps=2000, eval_every=200,
                     eval_batches=50, ckpt_every=500, log_every=10),
        "1.1b": dict(model="1.1b", grad_accum=8, log_every=10)}


@dataclass(kw_only=True)
class DPOConfig(LoRASettings, BatchedEvaluation, HeldOutEvaluation, PreferenceData, TrainConfig):
    """DPO's own settings. The baby lr and steps were measured on the baby chain (docs/rlhf.md "DPO and PPO side by
    side"): 120 steps at 5e-5 drift 15 nats/reply from SFT and lower the reward model's score; 40 at 3e-5 raise it
    at PPO's KL."""

    batch_size: int = 8
    lr: float = 3e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    max_steps: int = 40
    weight_decay: float = 0.0
    eval_every: int = 20
    eval_batches: int = 10
    ckpt_every: int = 20
    beta: float = setting(0.1, "DPO temperature: smaller lets the policy move further")
    label_smoothing: float = setting(0.0, "assumed share of flipped labels (cDPO; --loss sigmoid only)")
    loss: str = setting("sigmoid", "sigmoid: DPO; ipo: squared distance of the log-ratio margin to 1 / (2 beta)")
    precompute_ref: bool = setting(False, "score all pairs with the reference before training, then free it (one "
                                          "model copy resident)")
    # the held-out replies are sampled as PPO samples its rollouts: temperature 1, these budgets
    max_new_tokens: int = setting(48, "held-out reply budget (tokens)")
    max_prompt_len: int = setting(96, "longer held-out prompts are skipped")

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "0.2b": dict(model="0.2b", grad_accum=4, lr=1e-6, warmup_steps=50, max_steps=2000, eval_every=200,
                     eval_batches=50, ckpt_every=500, log_every=10),
        "1.1b": dict(model="1.1b", grad_accum=8, log_every=10)}
    RULES: ClassVar[tuple[Rule, ...]] = (
        ("beta", lambda v: 0 < v < math.inf, "a positive number"),
        ("label_smoothing", lambda v: 0 <= v < 0.5, "in [0, 0.5) (the share of pairs assumed flipped)"),
        ("loss", lambda v: v in DPO_LOSSES, f"one of {', '.join(DPO_LOSSES)}"),
        ("max_new_tokens", lambda v: v >= 1, "at least 1"), ("max_prompt_len", lambda v: v >= 1, "at least 1"))

    def check(self) -> None:
        super().check()
        if self.loss == "ipo" and self.label_smoothing:
            raise UserError(f"--label-smoothing {self.label_smoothing}: applies to --loss sigmoid only; drop it for "
                            "ipo")


@dataclass(kw_only=True)
class PPOConfig(LoRASettings, HeldOutEvaluation, TrainConfig):
    """PPO's own settings: its prompts and the algorithm (babyllama/align/ppo.py, docs/rlhf-ppo.md). --batch-size is
    the replies per PPO minibatch (one optimizer step); a rollout is --rollout-size prompts."""

    batch_size: int = 8
    lr: float = 2e-5
    min_lr_ratio: float = 1.0
    warmup_steps: int = 5
    max_steps: int = 80
    weight_decay: float = 0.0
    eval_every: int = 40
    ckpt_every: int = 40
    prompts: list[str] = setting([str(PREFERENCE / "pref_train.jsonl")],
                                 "training prompts: JSON lines with 'messages' or 'prompt' (default: the reward "
                                 "model's training questions)")
    system: str | None = setting(None, "system prompt for prompts that have none (as in SFT)")
    separate_value: bool = setting(False, "a critic with its own backbone (initialised from the reward model) "
                                          "instead of a value head on the policy's: one more model copy")
    rollout_size: int = setting(16, "prompts per rollout (the minibatch is --batch-size)")
    ppo_epochs: int = setting(2, "passes over each rollout")
    max_new_tokens: int = setting(48, "reply budget (tokens)")
    max_prompt_len: int = setting(96, "longer prompts are skipped")
    temperature: float = setting(1.0, "rollout sampling temperature")
    kl_coef: float = setting(0.05, "initial coefficient of the per-token KL penalty")
    kl_target: float = setting(6.0, "adaptive controller's target KL per reply (nats); 0 = a fixed coefficient")
    kl_horizon: int = setting(10000, "adaptive controller's horizon (in replies)")
    gamma: float = setting(1.0, "discount")
    lam: float = setting(0.95, "GAE lambda")
    clip_eps: float = setting(0.2, "policy ratio clip")
    value_clip: float = setting(0.2, "value prediction clip around the rollout's values")
    vf_coef: float = setting(0.1, "value loss coefficient")
    ent_coef: float = setting(0.0, "entropy bonus coefficient")

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "0.2b": dict(model="0.2b", grad_accum=2, lr=1e-6, warmup_steps=20, max_steps=1000, eval_every=100,
                     ckpt_every=200, log_every=10),
        "1.1b": dict(model="1.1b", grad_accum=8, log_every=10)}
    RULES: ClassVar[tuple[Rule, ...]] = (
        ("prompts", lambda v: all(Path(p).is_file() for p in v), "existing files"),
        ("rollout_size", lambda v: v >= 1, "at least 1"), ("ppo_epochs", lambda v: v >= 1, "at least 1"),
        ("max_new_tokens", lambda v: v >= 1, "at least 1"), ("max_prompt_len", lambda v: v >= 1, "at least 1"),
        ("temperature", lambda v: 0 < v < math.inf, "a positive number (rollouts are sampled)"),
        ("kl_coef", lambda v: 0 <= v < math.inf, "0 or a positive number"),
        ("kl_target", lambda v: 0 <= v < math.inf, "0 (a fixed coefficient) or a positive number"),
        ("kl_horizon", lambda v: v >= 1, "at least 1"), ("gamma", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("lam", lambda v: 0 <= v <= 1, "in [0, 1]"), ("clip_eps", lambda v: 0 < v < math.inf, "a positive number"),
        ("value_clip", lambda v: 0 < v < math.inf, "a positive number"),
        ("vf_coef", lambda v: 0 <= v < math.inf, "0 or a positive number"),
        ("ent_coef", lambda v: 0 <= v < math.inf, "0 or a positive number"))


GRPO_LOSS_AGGREGATIONS = ("token", "sequence")


@dataclass(kw_only=True)
class GRPOConfig(LoRASettings, TrainConfig):
    """GRPO's own settings: the skill items it practises and the algorithm (babyllama/align/grpo.py,
    docs/rlhf-grpo.md). A rollout is --prompts-per-rollout items x --group-size sampled replies; --batch-size is the
    replies per minibatch (one optimizer step)."""

    batch_size: int = 64
    lr: float = 1e-4
    min_lr_ratio: float = 1.0
    warmup_steps: int = 5
    max_steps: int = 160
    weight_decay: float = 0.0
    eval_every: int = 40
    ckpt_every: int = 40
    prompts: list[str] = setting([str(SKILLS_TRAIN)], "skill items to practise (JSON lines of "
                                                      "babyllama/eval/skills.py)")
    skills: list[str] | None = setting(None, "practise only these skills (default: every skill of --prompts)")
    skill_data: str = setting(str(SKILLS_HELDOUT), "held-out skill items: eval_skill_acc and the before/after "
                                                   "numbers (as in sft, dpo and ppo)")
    eval_skill_items: int = setting(30, "held-out items per skill in the periodic eval_skill_acc (a seeded sample; "
                                        "the before/after numbers use them all)")
    eval_batch_size: int = setting(64, "prompts per batch when evaluating")
    system: str | None = setting(None, "system prompt of the skill prompts (as in SFT)")
    group_size: int = setting(8, "replies sampled per prompt: a group, whose rewards are compared with each other")
    prompts_per_rollout: int = setting(8, "prompts per rollout (a rollout is this x --group-size replies)")
    grpo_epochs: int = setting(1, "passes over each rollout (in minibatches of --batch-size)")
    max_new_tokens: int = setting(24, "reply budget (tokens)")
    max_prompt_len: int = setting(96, "longer prompts are skipped")
    temperature: float = setting(1.0, "rollout sampling temperature")
    kl_coef: float = setting(0.04, "coefficient of the per-token KL to the SFT model (k3 estimator; 0 = none)")
    clip_eps: float = setting(0.2, "policy ratio clip")
    loss_agg: str = setting("token", "token: mean over all reply tokens of a minibatch (DAPO); sequence: mean over "
                                     "each reply's tokens, then over replies (GRPO)")
    scale_rewards: bool = setting(True, "divide each group's centred rewards by their std (false: only centred, "
                                        "Dr. GRPO)")
    reward_model_coef: float = setting(0.0, "add this times the reward model's score to the 0/1 reward (0 = no "
                                            "reward model)")
    reward: str | None = setting(None, "reward-model checkpoint for --reward-model-coef (file or directory); "
                                       "default: out/<name>/reward", aliases=("--reward-model",))

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "0.2b": dict(model="0.2b", lr=1e-6, warmup_steps=10, max_steps=500, eval_every=50, ckpt_every=100,
                     log_every=10),
        "1.1b": dict(model="1.1b", batch_size=16, grad_accum=4, log_every=10)}
    RULES: ClassVar[tuple[Rule, ...]] = (
        ("prompts", lambda v: all(Path(p).is_file() for p in v), "existing files"),
        ("skills", lambda v: v is None or len(v) >= 1, "one or more skill names"),
        ("skill_data", _existing_file, "an existing file"), ("eval_skill_items", lambda v: v >= 1, "at least 1"),
        ("eval_batch_size", lambda v: v >= 1, "at least 1"),
        ("group_size", lambda v: v >= 2, "at least 2 (rewards are compared within a group)"),
        ("prompts_per_rollout", lambda v: v >= 1, "at least 1"), ("grpo_epochs", lambda v: v >= 1, "at least 1"),
        ("max_new_tokens", lambda v: v >= 1, "at least 1"), ("max_prompt_len", lambda v: v >= 1, "at least 1"),
        ("temperature", lambda v: 0 < v < math.inf, "a positive number (rollouts are sampled)"),
        ("kl_coef", lambda v: 0 <= v < math.inf, "0 or a positive number"),
        ("clip_eps", lambda v: 0 < v < math.inf, "a positive number"),
        ("loss_agg", lambda v: v in GRPO_LOSS_AGGREGATIONS, f"one of {', '.join(GRPO_LOSS_AGGREGATIONS)}"),
        ("reward_model_coef", lambda v: 0 <= v < math.inf, "0 (no reward model) or a positive number"))


STAGE_CONFIGS: dict[str, type[TrainConfig]] = {"pretrain": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig,
                                               "dpo": DPOConfig, "ppo": PPOConfig, "grpo": GRPOConfig}


def stage_config(stage: str, preset_name: str = "baby") -> TrainConfig:
    """`stage`'s settings for preset `preset_name` (defaults, then the preset's changes)."""
    return STAGE_CONFIGS[stage].for_preset(preset_name)


def preset_for(name: str, preset: str | None) -> str:
    """The preset a run uses: --preset, else the run's --name when it names a preset, else `baby`."""
    return preset or (name if name in PRESETS else "baby")


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


def model_config_for(run: TrainConfig, vocab_size: int) -> ModelConfig:
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
