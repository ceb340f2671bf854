"""Supervised fine-tuning: pretrain checkpoint -> chat data (assistant-only loss) -> compile -> fit(callbacks).

    babyllama sft --name baby                      # shipped data/sft/ and data/skills/, CPU minutes
    torchrun --nproc_per_node=2 -m babyllama sft --name baby
    babyllama sft --name baby --resume             # continue from the newest SFT checkpoint
    babyllama sft --name baby --train-data my_train.json --valid-data my_valid.json --data-format alpaca
    babyllama sft --name baby --train-data data/sft/sft_train.jsonl my_chats.jsonl   # several files, one dataset
    babyllama sft --name baby --pretrain-mix 0.25  # 4 of 16 rows a batch: windows of out/baby/data (pretraining)
    babyllama sft --name baby --init out/baby/pretrain/step_00001000.pt --system "You are a poet."
    babyllama sft --name baby --lora-rank 8        # LoRA adapters on the frozen pretrained weights

Starts from the newest out/<name>/pretrain checkpoint (or --init) and the tokenizer pretraining wrote; a
checkpoint of another model config is refused. The --train-data files are each read in --data-format (auto: told
per file) and learned as one dataset. Every conversation is rendered with the ChatML template and only the
assistant's replies are learned (see babyllama/data/chat_template.py). --pretrain-mix m makes m x --batch-size
rows of every batch (rounded) windows of the run's pretraining token data, learned on every token
(babyllama/data/mix.py). Logs training loss, `val_loss` on --valid-data and `choice_acc` (held-out multiple
choice, see babyllama/eval/choice.py) to out/<name>/sft/log.jsonl and TensorBoard (runs/<name>/sft); prints
validation loss, choice accuracy before and after SFT, and the padding share of batches.
"""
from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch

from babyllama.data.mix import MixedLoader, build_mixed_loader, pretrain_rows
from babyllama.data.sft import SFTDataset, SFTLoader, build_sft_loader, padding_fraction, read_conversations
from babyllama.data.tokenizer import Tokenizer
from babyllama.errors import UserError
from babyllama.eval.choice import ChoiceAccuracy, load_choice_items
from babyllama.eval.skills import SkillAccuracy, describe_skills, load_skill_items
from babyllama.train import callbacks as cb
from babyllama.train.distill import stage_loss
from babyllama.train.distributed import shutdown
from babyllama.train.run_config import SFTConfig, model_config_for
from babyllama.train.run_record import flatten
from babyllama.train.stage import (
    StartPoint,
    compile_from_run,
    init_checkpoint,
    load_stage_tokenizer,
    parse_stage_args,
    record_stage,
    resume_if_asked,
    standard_callbacks,
)
from babyllama.train.trainer import Trainer, causal_lm_loss


def load_dataset(paths: str | list[str], fmt: str, tok: Tokenizer, max_len: int, system: str | None) -> SFTDataset:
    """The conversations of one file or of several, each read in `fmt` (auto: detected per file), as one dataset."""
    paths = [paths] if isinstance(paths, str) else paths
    conversations = [c for path in paths for c in read_conversations(path, fmt)]
    return SFTDataset(conversations, tok, max_len, system, source=" + ".join(paths))


def training_batches(run: SFTConfig, train: SFTDataset, pretrain_data: str | Path, tok: Tokenizer, rank: int,
                     world_size: int) -> SFTLoader | MixedLoader:
    """The training loader: with --pretrain-mix (when it gives a batch at least one window), windows of
    `pretrain_data` in every batch; without, the plain SFT loader, bit for bit the batches of runs before the mix."""
    loader_args = dict(batch_size=run.batch_size, seed=run.seed, rank=rank, world_size=world_size)
    if pretrain_rows(run.pretrain_mix, run.batch_size):
        return build_mixed_loader(train, pretrain_data, run.pretrain_mix, tokenizer=tok, **loader_args)
    return build_sft_loader(train, **loader_args)


def validation_batches(valid: SFTDataset, path: str, max_batches: int, batch_size: int, seed: int, rank: int,
                       world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `max_batches` batches of `valid`, fixed so every evaluation sees the same ones. None at all would
    log a val_loss of 0, so that is an error."""
    batches = list(islice(build_sft_loader(valid, batch_size, seed, False, rank, world_size), max_batches))
    if not batches:
        raise UserError(f"--valid-data {path}: no validation batch ({len(valid)} conversations in batches of "
                        f"{batch_size} for {world_size} ranks, --eval-batches {max_batches}); add conversations, "
                        f"lower --batch-size or raise --eval-batches")
    return batches


def choice_evaluator(run: SFTConfig, tok: Tokenizer) -> ChoiceAccuracy | None:
    if run.choice_data.lower() == "none":
        return None
    return ChoiceAccuracy(load_choice_items(run.choice_data), tok, run.eval_every, system=run.system)


def skill_evaluator(run: SFTConfig, tok: Tokenizer) -> SkillAccuracy | None:
    if run.skill_data.lower() == "none":
        return None
    return SkillAccuracy(load_skill_items(run.skill_data), tok, run.eval_every, run.eval_skill_items,
                         system=run.system)


def describe(acc: dict[str, float]) -> str:
    langs = ", ".join(f"{k.removeprefix('choice_acc_')} {v:.1%}" for k, v in acc.items() if k != "choice_acc")
    return f"{acc['choice_acc']:.1%}" + (f" ({langs})" if langs else "")


def main(argv: list[str] | None = None) -> None:
    args, run, paths, env = parse_stage_args(__doc__, "sft", argv)
    tok = load_stage_tokenizer(run, paths)
    cfg = model_config_for(run, tok.vocab_size)
    init = init_checkpoint(run.init, paths, "pretrain")
    start = StartPoint(init, cfg, tok, env.device, paths.stage("sft"), run.lora, run.seed)
    max_len = cfg.max_seq_len + 1  # a batch row is a sample minus its last token
    train = load_dataset(run.train_data, run.data_format, tok, max_len, run.system)
    valid = load_dataset(run.valid_data, run.data_format, tok, max_len, run.system)
    loader_args = dict(batch_size=run.batch_size, seed=run.seed, rank=env.rank, world_size=env.world_size)
    mix_rows, mix_data = pretrain_rows(run.pretrain_mix, run.batch_size), run.pretrain_data or paths.data
    train_loader = training_batches(run, train, mix_data, tok, env.rank, env.world_size)
    val_batches = validation_batches(valid, run.valid_data, run.eval_batches, **loader_args)
    choice = choice_evaluator(run, tok)
    skills = skill_evaluator(run, tok)

    torch.manual_seed(run.seed)
    mean_len = sum(train.lengths) / len(train)
    trainer = compile_from_run(Trainer(start.policy, env), run,
                               loss=stage_loss(run, tok, start.policy, env.device, causal_lm_loss),
                               eval_loss=causal_lm_loss,
                               flops_per_token=cfg.flops_per_token(int(mean_len)), tokenizer=tok,
                               adapters=start.adapters)
    before = choice.compute(trainer) if choice else None
    before_skills = skills.compute_all(trainer) if skills else {}
    resume_if_asked(trainer, args, paths.stage("sft"))
    if env.is_main:
        sft_rows = run.batch_size - mix_rows  # the windows' rows have no padding
        pad = padding_fraction(train.lengths, sft_rows, seed=run.seed) * sft_rows / run.batch_size
        rows = (f"rows (a batch: {sft_rows} conversations + {mix_rows} windows of {mix_data}, pretrain mix "
                f"{run.pretrain_mix:g})" if mix_rows else "conversations" + (
                    f" (--pretrain-mix {run.pretrain_mix:g} of {run.batch_size} rows rounds to no window)"
                    if run.pretrain_mix else ""))
        print(f"init {init}; {len(train)} train / {len(valid)} valid conversations ({train.dropped} dropped: no "
              f"answer within {max_len} tokens), {train.supervised_tokens():,} supervised tokens, mean length "
              f"{mean_len:.0f}; padding {pad:.1%} of batch positions; {run.max_steps} steps of "
              f"{run.batch_size * run.grad_accum * env.world_size} {rows} on {env.world_size} x {env.device}")
        if choice:
            print(f"choice accuracy before SFT: {describe(before)}")
        if skills:
            print(f"skill accuracy before SFT: {describe_skills(before_skills)}")
    evaluators = [cb.Evaluator(val_batches, every=run.eval_every, max_batches=None),
                  *[e for e in (choice, skills) if e]]
    trainer.fit(train_loader, max_steps=run.max_steps,
                callbacks=standard_callbacks(run, paths, "sft", evaluators))
    val = trainer.evaluate(val_batches)
    after = choice.compute(trainer) if choice else None
    after_skills = skills.compute_all(trainer) if skills else {}
    record_stage(args, run, paths, "sft", trainer,
                 {"val_loss": val, **flatten("before_", {**(before or {}), **before_skills}), **(after or {}),
                  **after_skills})
    if env.is_main:
        print(f"final SFT validation loss {val:.4f}")
        if choice:
            print(f"choice accuracy on {len(choice.items)} held-out items: before SFT {describe(before)}, "
                  f"after SFT {describe(after)}")
        if skills:
            print(f"skill accuracy on {len(skills.items)} held-out items: before SFT {describe_skills(before_skills)}"
                  f"; after SFT {describe_skills(after_skills)}")
    shutdown()

