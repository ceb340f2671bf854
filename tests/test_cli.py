"""Flags generated from a stage's config: unset flags keep the preset's value, given ones replace it; text that is
not UTF-8 is read with its undecodable bytes replaced, said once; each stage's settings resolve defaults -> preset ->
flags, the run name and the preset are separate."""
import argparse
import dataclasses
import io
from pathlib import Path

import pytest
import torch

from babyllama import cli
from babyllama.cli import add_dataclass_flags, apply_overrides
from babyllama.errors import UserError
from babyllama.train.run_config import (
    PRESETS,
    STAGE_CONFIGS,
    PretrainConfig,
    RewardConfig,
    RunPaths,
    TrainConfig,
    preset_for,
    resolve_compile,
    resolve_precision,
    stage_config,
)


def parse(*argv: str) -> PretrainConfig:
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, PretrainConfig())
    return apply_overrides(PretrainConfig(), parser.parse_args(list(argv)))


def test_unset_flags_keep_the_preset():
    assert parse() == PretrainConfig()


def test_given_flags_are_typed_and_replace_the_preset():
    run = parse("--batch-size", "4", "--lr", "1e-4", "--fsdp", "true", "--corpus", "a.txt", "b.jsonl")
    assert (run.batch_size, run.lr, run.fsdp, run.corpus) == (4, 1e-4, True, ["a.txt", "b.jsonl"])
    assert parse("--fsdp").fsdp is True and parse("--fsdp", "off").fsdp is False  # a bool flag alone means true


def test_none_is_a_value_for_plain_string_fields():
    # --mixed-precision none must mean fp32, not "flag not given" (which would leave the preset's auto)
    assert parse("--mixed-precision", "none").mixed_precision == "none"
    assert parse("--tokenizer", "none").tokenizer is None


def test_input_that_is_not_utf8_is_read_with_replacement_characters_said_once(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_noted", set())
    strict = io.TextIOWrapper(io.BytesIO(b"caf\xe9\n\xff\xfeok\nfine\n"), encoding="utf-8", errors="strict")
    assert list(cli.read_lines(strict, "> ")) == ["caf\ufffd", "\ufffd\ufffdok", "fine"]
    assert cli.valid_text("a\udcffb", "--prompt") == "a\ufffdb"  # as Python passes argv bytes that are not UTF-8
    assert cli.valid_text("plain", "--prompt") == "plain"
    assert capsys.readouterr().err.splitlines() == [
        "note: the input is not valid UTF-8; undecodable bytes were replaced by U+FFFD",
        "note: --prompt is not valid UTF-8; undecodable bytes were replaced by U+FFFD"]


def test_an_interrupted_command_says_how_to_continue(capsys):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        cli.main_guard(interrupted)
    assert e.value.code == 130
    assert capsys.readouterr().err == "interrupted (a training stage continues with --resume, a chain when run again)\n"


def test_add_flag_accepts_old_spellings_without_showing_them():
    parser = argparse.ArgumentParser()
    cli.add_flag(parser, "--out", "--root", default="out", help="output root")
    cli.add_flag(parser, "--corpus", "--input", nargs="+", default=["a"])
    assert parser.parse_args([]).out == "out" and parser.parse_args([]).corpus == ["a"]
    args = parser.parse_args(["--root", "x", "--input", "f1", "f2"])
    assert args.out == "x" and args.corpus == ["f1", "f2"]
    assert parser.parse_args(["--out", "y"]).out == "y"
    shown = parser.format_help()
    assert "--out" in shown and "--corpus" in shown and "--root" not in shown and "--input" not in shown


def test_each_stage_defines_its_defaults_once_and_presets_change_only_what_they_name():
    small = stage_config("reward", "0.2b")
    assert small.lr == 1e-5 and small.eval_batches == 50  # the preset's own values
    assert small.weight_decay == RewardConfig().weight_decay == 0.0 and small.batch_size == RewardConfig().batch_size
    assert stage_config("reward", "baby") == RewardConfig()  # baby is every stage's defaults
    assert stage_config("ppo", "1.1b").min_lr_ratio == 1.0  # PPO's own default, kept by a preset that does not name it
    for stage, config in STAGE_CONFIGS.items():
        for name in PRESETS:
            unknown = set(config.PRESETS.get(name, {})) - {f.name for f in dataclasses.fields(config)}
            assert not unknown, f"{stage} preset {name} names fields the stage does not have: {unknown}"
        # the settings every stage must state are stated by each (TrainConfig leaves them unset)
        assert None not in (config().lr, config().batch_size, config().max_steps, config().warmup_steps), stage
    with pytest.raises(UserError, match=r"unknown preset 'nope'.*--preset"):
        stage_config("sft", "nope")


def test_pretraining_only_settings_belong_to_pretraining_alone():
    only_pretrain = {"corpus", "corpus_format", "corpus_field", "vocab_size", "val_fraction", "workers"}
    assert only_pretrain <= {f.name for f in dataclasses.fields(PretrainConfig)}
    for stage, config in STAGE_CONFIGS.items():
        if stage != "pretrain":
            assert not only_pretrain & {f.name for f in dataclasses.fields(config)}, stage
    assert issubclass(STAGE_CONFIGS["dpo"], TrainConfig) and STAGE_CONFIGS["dpo"] is not STAGE_CONFIGS["ppo"]


def test_a_setting_out_of_range_is_one_line_naming_its_flag():
    with pytest.raises(UserError, match=r"^--lr -1.0: must be a positive number$"):
        dataclasses.replace(PretrainConfig(), lr=-1.0).check()
    with pytest.raises(UserError, match=r"^--label-smoothing 0.1: applies to --loss sigmoid only"):
        dataclasses.replace(STAGE_CONFIGS["dpo"](), loss="ipo", label_smoothing=0.1).check()
    with pytest.raises(UserError, match=r"^--kl-horizon 0: must be at least 1$"):
        dataclasses.replace(STAGE_CONFIGS["ppo"](), kl_horizon=0).check()


def test_run_name_and_preset_are_separate():
    assert preset_for("baby", None) == "baby" and preset_for("0.2b", None) == "0.2b"
    assert preset_for("my-run", None) == "baby" and preset_for("my-run", "1.1b") == "1.1b"
    paths = RunPaths.of("my-run", "/tmp/o", "/tmp/r")
    assert paths.stage("sft") == Path("/tmp/o/my-run/sft") and paths.tensorboard("sft") == Path("/tmp/r/my-run/sft")


def test_cpu_auto_picks_bf16_only_with_native_bf16_and_compiles_long_runs(monkeypatch):
    from babyllama import hardware
    from babyllama.train import run_config

    cpu = torch.device("cpu")
    for bf16, amx, want in ((True, False, "bf16"), (False, True, "bf16"), (False, False, None)):
        monkeypatch.setattr(run_config.torch.cpu, "_is_avx512_bf16_supported", lambda bf16=bf16: bf16)
        monkeypatch.setattr(run_config.torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert resolve_precision("auto", cpu, fixed_shapes=True) == want
        assert resolve_precision("auto", cpu, fixed_shapes=False) is None  # padded later stages: fp32 is faster
        assert resolve_precision("fp32", cpu) is None and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_compile("auto", cpu, run_config.CPU_COMPILE_MIN_STEPS, fixed_shapes=True) is True
    assert resolve_compile("auto", cpu, run_config.CPU_COMPILE_MIN_STEPS - 1, fixed_shapes=True) is False
    assert resolve_compile("auto", cpu, 10**6, fixed_shapes=False) is False  # padded batches recompile
    assert resolve_compile("off", cpu, 10**6, True) is False and resolve_compile("on", cpu, 1) is True
    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)  # inductor needs a C++ compiler on a CPU
    assert resolve_compile("auto", cpu, 10**6, fixed_shapes=True) is False


def test_device_auto_prefers_mps_then_cuda_then_cpu_and_a_missing_device_is_one_line(monkeypatch):
    from babyllama.train import distributed

    for mps, cuda, want in ((True, False, "mps"), (False, True, "cuda"), (False, False, "cpu")):
        monkeypatch.setattr(distributed, "mps_available", lambda mps=mps: mps)
        monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert distributed.pick_device("auto").type == want
    with pytest.raises(UserError, match="--device mps: MPS needs Apple silicon"):
        distributed.pick_device("mps")
    with pytest.raises(UserError, match="--device cuda: this machine has no CUDA GPU"):
        distributed.pick_device("cuda")
    with pytest.raises(UserError, match="--device tpu: choose one of auto, cpu, cuda, mps"):
        distributed.pick_device("tpu")
    monkeypatch.setattr(distributed, "mps_available", lambda: True)
    monkeypatch.setattr(distributed.os, "environ", {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(UserError, match="torchrun with several processes is not supported on MPS"):
        distributed.init_distributed("auto")
    assert resolve_compile("auto", torch.device("mps"), 10**6) is False
    assert resolve_precision("auto", torch.device("mps")) is None
