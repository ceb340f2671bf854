"""The `babyllama` command: one job per subcommand, each with --help; the stages' settings shown as the run will
take them (--help, --print-config with their sources); a flag of another stage is one line; the card's scripts are
the same jobs; the run record names the command as typed; `chain` runs, skips and resumes stages in order."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from babyllama import commands
from babyllama.commands import chain
from babyllama.errors import UserError
from babyllama.eval import compare as compare_module
from babyllama.train import run_record
from babyllama.train.run_record import command_line
from babyllama.train.stage import parse_stage_args

ROOT = Path(__file__).resolve().parents[1]


def babyllama(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "babyllama", *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def leaf_jobs(table: dict = commands.COMMANDS, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    jobs = []
    for job, entry in table.items():
        jobs += leaf_jobs(entry, (*path, job)) if isinstance(entry, dict) else [(*path, job)]
    return jobs


def test_the_console_command_is_installed_and_lists_every_job():
    assert shutil.which("babyllama"), "pip install -e . puts `babyllama` on PATH ([project.scripts])"
    shown = subprocess.run(["babyllama", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(f"  {job} " in shown for job in commands.COMMANDS)
    assert "prepare" in babyllama("data", "--help").stdout and "corpus" in babyllama("data", "build", "--help").stdout


@pytest.mark.parametrize("job", leaf_jobs(), ids=" ".join)
def test_every_job_answers_help(job, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the dispatcher renames argv[0] after the job
    try:
        commands.main([*job, "--help"])
    except SystemExit as e:  # argparse exits after --help; `bench` lists its scripts and returns (exit status None)
        assert e.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("usage: babyllama " + " ".join(job)), out[:200]


def test_an_unknown_job_is_one_line():
    proc = babyllama("pretrian", "--name", "baby")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: babyllama: unknown job 'pretrian'; choose one of chain, pretrain")
    proc = babyllama("data", "build", "nope")
    assert proc.returncode == 2 and "unknown job 'nope'; choose one of corpus, sft, preference, idioms" in proc.stderr


def test_help_shows_the_value_each_flag_takes_for_the_chosen_preset():
    baby = babyllama("sft", "--help").stdout
    small = babyllama("sft", "--help", "--name", "0.2b").stdout
    assert "from the preset" not in baby
    assert "--lr LR" in baby and "(default: 0.0005)" in baby and "(default: 2e-05)" in small
    assert "(default: 600)" in baby and "(default: 5000)" in small  # --max-steps
    ppo = babyllama("ppo", "--help").stdout
    assert "(default: 0.05)" in ppo and "--kl-coef" in ppo  # the algorithm's settings are the stage's


def test_print_config_resolves_defaults_preset_and_flags_and_starts_nothing(tmp_path):
    proc = babyllama("sft", "--name", "0.2b", "--lr", "1e-4", "--out", str(tmp_path / "out"), "--print-config")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[1:]}
    assert rows["--lr"] == ["0.0001", "--lr"]
    assert rows["--warmup-steps"] == ["100", "preset", "0.2b"] and rows["--model"] == ["0.2b", "preset", "0.2b"]
    assert rows["--batch-size"] == ["20", "default"]
    assert rows["--train-data"] == ["data/sft/sft_train.jsonl", "data/skills/skills_train.jsonl", "default"]
    assert "--corpus" not in rows and "SFTConfig" in proc.stdout.splitlines()[0]
    assert not (tmp_path / "out").exists()  # no lock, no directory: nothing started


def test_a_flag_of_another_stage_is_one_line_naming_that_stage():
    proc = babyllama("sft", "--workers", "2")  # the whole way: one line on stderr, exit 2
    assert proc.returncode == 2 and proc.stderr == ("error: --workers is a setting of pretrain; sft does not use it "
                                                    "(its settings: babyllama sft --help)\n"), proc.stderr
    for stage, flag, owner in (("sft", "--corpus", "pretrain"), ("reward", "--vocab-size", "pretrain"),
                               ("ppo", "--val-fraction", "pretrain"), ("pretrain", "--kl-coef", "ppo and grpo"),
                               ("sft", "--beta", "dpo"), ("dpo", "--rollout-size", "ppo")):
        with pytest.raises(UserError, match=f"^{flag} is a setting of {owner}; {stage} does not use it"):
            parse_stage_args("", stage, [flag, "1"])
    with pytest.raises(UserError, match="^--train-data is a setting of sft and reward and dpo; pretrain does not"):
        parse_stage_args("", "pretrain", ["--train-data", "x"])
    with pytest.raises(UserError, match="^unrecognized argument --bogus; .* --help lists the flags"):
        parse_stage_args("", "dpo", ["--bogus"])
    with pytest.raises(UserError, match="^--eval-batches is a setting of pretrain and sft and reward and dpo; ppo"):
        parse_stage_args("", "ppo", ["--eval-batches", "5"])  # PPO evaluates on held-out prompts, not batches


def test_settings_a_run_cannot_use_are_refused_before_any_work(tmp_path):
    for flags, message in ((["--mixed-precision", "fp8"], "--mixed-precision fp8: must be auto, bf16, fp16 or fp32"),
                           (["--torch-compile", "maybe"], "--torch-compile maybe: must be auto, on or off"),
                           (["--device", "tpu"], "--device tpu: choose one of auto, cpu, cuda, mps"),
                           (["--resume"], "--resume: no checkpoint in")):
        with pytest.raises(UserError, match=f"^{message}"):
            parse_stage_args("", "sft", [*flags, "--out", str(tmp_path / "out")])


def test_a_run_of_another_name_is_compared_with_its_presets_published_run(tmp_path):
    (tmp_path / "my-run").mkdir()
    with pytest.raises(UserError, match="none of the reference's stages .* has a log; run babyllama pretrain first"):
        compare_module.main(["--name", "my-run", "--out", str(tmp_path)])  # the published baby run is the reference
    with pytest.raises(UserError, match="no published run of preset '0.2b'"):
        compare_module.main(["--name", "my-run", "--preset", "0.2b", "--out", str(tmp_path)])


def test_the_cards_scripts_are_the_same_jobs():
    shim = subprocess.run([sys.executable, "rlhf/ppo.py", "--name", "0.2b", "--print-config"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert shim.returncode == 0 and shim.stdout == babyllama("ppo", "--name", "0.2b", "--print-config").stdout
    shims = {"pretrain/pretrain.py": "pretrain", "sft/sft.py": "sft", "reward/reward.py": "reward",
             "rlhf/dpo.py": "dpo", "rlhf/ppo.py": "ppo", "pretrain/infer.py": "generate", "sft/infer.py": "chat",
             "rlhf/infer.py": "chat", "serve/server.py": "serve"}
    for script, job in shims.items():  # each runs its job's main (the runs themselves: the stage tests)
        text = (ROOT / script).read_text(encoding="utf-8")
        assert f"from babyllama.commands.{job} import main" in text or "babyllama.chat.session" in text, script


def test_the_run_record_names_the_command_as_typed(monkeypatch):
    from babyllama.commands import sft

    seen = []
    monkeypatch.setattr(sys, "argv", ["/usr/bin/babyllama", "sft", "--name", "x"])  # as the console script starts
    monkeypatch.setattr(sft, "main", lambda argv: seen.append((argv, command_line(1))))
    with pytest.raises(SystemExit):
        commands.main()
    assert seen == [(["--name", "x"], "babyllama sft --name x")]
    monkeypatch.setattr(sys, "argv", ["babyllama pretrain", "--name", "baby", "--corpus", str(ROOT / "x.txt")])
    assert command_line(1) == "babyllama pretrain --name baby --corpus x.txt"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert command_line(2) == "torchrun --nnodes=1 --nproc_per_node=2 -m babyllama pretrain --name baby --corpus x.txt"
    monkeypatch.setattr(sys, "argv", [str(ROOT / "sft" / "sft.py"), "--name", "baby"])
    assert command_line(1) == "python sft/sft.py --name baby"
    assert run_record.PROCESS_STARTED > 0


def test_chain_runs_the_stages_in_order_skips_finished_ones_and_resumes_an_interrupted_one(tmp_path, monkeypatch,
                                                                                         capsys):
    out = tmp_path / "out"
    (out / "demo" / "pretrain").mkdir(parents=True)
    (out / "demo" / "pretrain" / "run.json").write_text(json.dumps({"steps": 12, "wall_s": 60,
                                                                    "metrics": {"val_loss": 4.5}}))
    (out / "demo" / "sft").mkdir()
    (out / "demo" / "sft" / "step_00000004.pt").write_bytes(b"")  # interrupted: a checkpoint, no run.json
    ran = []

    def fake_run(cmd):
        ran.append(cmd)
        stage = cmd[cmd.index("babyllama") + 1]
        (out / "demo" / stage).mkdir(exist_ok=True)
        (out / "demo" / stage / "run.json").write_text(json.dumps({"steps": 3, "wall_s": 6, "metrics": {}}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(chain.subprocess, "run", fake_run)
    chain.main(["--name", "demo", "--out", str(out), "--runs", str(tmp_path / "runs"), "--stages", "pretrain",
                "sft", "reward", "--no-compare"])
    stages = [cmd[cmd.index("babyllama") + 1] for cmd in ran]
    assert stages == ["sft", "reward"]  # pretrain finished: skipped
    assert "--resume" in ran[0] and "--resume" not in ran[1]
    text = capsys.readouterr().out
    assert "already done (12 steps in 1.0 min; val_loss 4.5)" in text and "$ babyllama sft --name demo" in text

    monkeypatch.setattr(chain.subprocess, "run", lambda cmd: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(Exception, match="the dpo stage failed"):
        chain.main(["--name", "demo", "--out", str(out), "--stages", "dpo", "--no-compare"])


def test_torchrun_runs_the_command_as_a_module():
    """`torchrun -m babyllama <job>` is how several processes run a job: the package is runnable with -m."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "babyllama",
                           "pretrain", "--print-config"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("# pretrain settings")


def test_a_jobs_returned_status_is_the_exit_status(monkeypatch):
    """`babyllama compare` exits 1 when a stage diverged: the dispatcher passes a job's int on."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(compare_module, "main", lambda argv: 1)
    with pytest.raises(SystemExit) as e:
        commands.main(["compare", "--name", "baby"])
    assert e.value.code == 1


def test_argparse_errors_are_one_line_naming_the_job():
    proc = babyllama("sft", "--lr", "abc")
    assert proc.returncode == 2 and proc.stderr == (
        "error: argument --lr: invalid float value: 'abc' (babyllama sft --help lists the flags)\n"), proc.stderr
    proc = babyllama("chat", "--batch-size", "3")
    assert proc.returncode == 2 and proc.stderr == (
        "error: unrecognized arguments: --batch-size 3 (babyllama chat --help lists the flags)\n"), proc.stderr
