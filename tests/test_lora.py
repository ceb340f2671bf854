"""LoRA (babyllama/model/lora.py and the --lora-* flags of sft, dpo, ppo, grpo): peft's outputs and gradients for
the same weights; only the adapters train; small adapter files; merging gives the adapted model's logits, also in
fused decoding; `babyllama sft --lora-rank` end to end (adapter-only checkpoints that every consumer loads, exact
resume, `babyllama lora merge` and its one-line errors); the frozen base as the reference; `babyllama grpo
--lora-rank` on the SFT adapters."""
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from pref_fixtures import make_tokenizer, write_jsonl
from tiny import tiny_config

import babyllama.model.fused_cross_entropy as loss_module
from babyllama.commands import grpo as grpo_command
from babyllama.commands import lora as lora_command
from babyllama.commands import sft as sft_command
from babyllama.errors import UserError
from babyllama.model.config import preset
from babyllama.model.generate import Generator, SamplingConfig
from babyllama.model.llama import Llama
from babyllama.model.lora import (
    LORA_TARGETS,
    LoRALinear,
    LoRASpec,
    add_lora,
    has_lora,
    lora_state_dict,
    merge_lora,
    sharing_copy,
)
from babyllama.train.checkpoint import adapter_record, latest_checkpoint, load_model, save_checkpoint
from babyllama.train.optim import build_adamw
from babyllama.train.stage import StartPoint
from babyllama.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def adapted(spec: LoRASpec, seed: int = 0, **config) -> tuple[Llama, Llama]:
    """(a tiny Llama, a LoRA policy on its very weights) with random, non-zero adapters."""
    torch.manual_seed(seed)
    base = Llama(tiny_config(**config))
    policy = add_lora(sharing_copy(base), spec)
    with torch.no_grad():
        for w in lora_state_dict(policy).values():
            w.normal_(std=0.1)
    return base, policy


def lm_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (3, 12), generator=g), torch.randint(0, 64, (3, 12), generator=g)


# ---------------------------------------------------------------- the adapters
def test_outputs_and_gradients_are_peft_s_for_the_same_weights():
    try:
        import peft
    except ImportError:
        missing = "peft is not installed (pip install -e .[test])"
        pytest.fail(missing) if os.environ.get("CI") else pytest.skip(missing)
    spec = LoRASpec(rank=4, alpha=32, targets=("q_proj", "v_proj", "down_proj"))
    base, ours = adapted(spec)
    theirs = Llama(base.config)
    theirs.load_state_dict(base.state_dict())
    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets))
    theirs = peft.inject_adapter_in_model(config, theirs)
    # peft names the one adapter `default`: ...q_proj.lora_A.default.weight for our ...q_proj.lora_A.weight
    named = {k.replace(".weight", ".default.weight"): v for k, v in lora_state_dict(ours).items()}
    assert theirs.load_state_dict(named, strict=False).unexpected_keys == []
    ids, targets = lm_batch()
    out_ours, out_theirs = ours(ids, targets, return_logits=True), theirs(ids, targets, return_logits=True)
    assert torch.equal(out_ours.logits, out_theirs.logits)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    their_grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads.keys() == their_grads.keys() and len(grads) == 2 * 3 * 2  # layers x targets x (A, B)
    for name, grad in grads.items():
        assert torch.equal(grad, their_grads[name]), name


def test_new_adapters_start_at_the_base_with_peft_s_initialisation():
    torch.manual_seed(0)
    base = Llama(tiny_config())
    policy = add_lora(sharing_copy(base), LoRASpec(rank=8))
    ids, _ = lm_batch()
    assert torch.equal(policy(ids).logits, base(ids).logits)  # B = 0
    wrapped = [m for m in policy.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * len(LORA_TARGETS)
    for m in wrapped:  # A: Kaiming-uniform with a = sqrt(5), bound 1 / sqrt(in_features); B: zeros
        assert 0 < m.lora_A.weight.abs().max() <= m.base_layer.in_features ** -0.5
        assert m.lora_B.weight.eq(0).all()


def test_only_the_adapters_train_and_the_shared_base_stays_bit_identical():
    base, policy = adapted(LoRASpec(rank=4, dropout=0.1))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    adapters = {k: v.clone() for k, v in lora_state_dict(policy).items()}
    optimizer = build_adamw(policy, 1e-2, weight_decay=0.1)
    assert [p for g in optimizer.param_groups for p in g["params"]] == \
        [p for p in policy.parameters() if p.requires_grad] and len(adapters) == 2 * 7 * 2
    trainer = Trainer(policy)
    trainer.compile(optimizer=optimizer)
    trainer.fit([lm_batch(s) for s in range(3)], max_steps=3)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert all(not torch.equal(v, adapters[k]) for k, v in lora_state_dict(policy).items())
    shared = {p.data_ptr() for p in base.parameters()}
    assert {p.data_ptr() for n, p in policy.named_parameters() if ".lora_" not in n} == shared  # no copy


def test_the_chunked_loss_under_a_frozen_head_gives_full_cross_entropy_s_gradients(monkeypatch):
    """The chunked loss skips the gradient of a frozen head (adapters train the blocks only)."""
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 7 * 64)  # several chunks
    _, policy = adapted(LoRASpec(rank=4))
    ids, targets = lm_batch()
    chunked = policy(ids, targets).loss
    chunked.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    policy.zero_grad()
    policy.chunked_loss = False
    full = policy(ids, targets).loss
    full.backward()
    torch.testing.assert_close(chunked, full)
    for n, p in policy.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6)


def test_adapter_files_are_small(tmp_path):
    torch.manual_seed(0)
    model = add_lora(Llama(tiny_config(dim=256, ffn_dim=1024, n_heads=8, n_kv_heads=8)), LoRASpec(rank=2))
    torch.save(lora_state_dict(model), tmp_path / "adapters.pt")
    torch.save(merge_lora(model).state_dict(), tmp_path / "full.pt")
    # rank x (in + out) numbers per projection of in x out: 1.1% of this model's weights (+ a zip entry per tensor)
    assert (tmp_path / "adapters.pt").stat().st_size / (tmp_path / "full.pt").stat().st_size < 0.013


def test_merge_gives_the_adapted_logits_as_a_plain_llama_and_leaves_the_shared_base():
    base, policy = adapted(LoRASpec(rank=4, alpha=8))
    ids, _ = lm_batch()
    with torch.no_grad():
        adapted_logits, base_logits = policy(ids).logits, base(ids).logits
        assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)
        merged = merge_lora(policy)
        torch.testing.assert_close(merged(ids).logits, adapted_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(base(ids).logits, base_logits)  # merged weights are new tensors
    assert not has_lora(merged) and merged.state_dict().keys() == base.state_dict().keys()


def test_decoding_with_fused_projections_keeps_the_adapters():
    """PPO and GRPO sample with `Generator`; a compiled one decodes with `Llama.fuse_projections`, whose copies read
    each projection's `.weight`: the effective weight of a wrapped one."""
    base, policy = adapted(LoRASpec(rank=4, alpha=64))
    greedy = SamplingConfig(max_new_tokens=10, temperature=0)
    prompts = [[1, 5, 9], [3, 4]]
    separate = Generator(policy.eval()).generate(prompts, greedy)
    assert Generator(policy, fuse_projections=True).generate(prompts, greedy) == separate
    assert Generator(merge_lora(policy)).generate(prompts, greedy) == separate
    assert Generator(base.eval()).generate(prompts, greedy) != separate  # the adapters change what is decoded


# ---------------------------------------------------------------- `babyllama sft --lora-rank`
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tokenizer, an (untrained) tiny pretraining checkpoint and a few conversations."""
    root = tmp_path_factory.mktemp("lora")
    with warnings.catch_warnings():  # "little text for the vocabulary": enough here
        warnings.simplefilter("ignore")
        tok = make_tokenizer(root / "tok")
    torch.manual_seed(0)
    model = Llama(preset("tiny", vocab_size=tok.vocab_size))
    init = save_checkpoint(root / "pretrain", 1, {"model": model.state_dict(), "model_config": model.config.to_dict()})
    convs = [{"messages": [{"role": "user", "content": f"how are you {i}?"},
                           {"role": "assistant", "content": "fine thanks" if i % 2 else "doing well today"}]}
             for i in range(40)]
    return {"root": root, "tok": tok, "tok_dir": root / "tok", "init": init,
            "train": write_jsonl(root / "train.jsonl", convs), "valid": write_jsonl(root / "valid.jsonl", convs[:8])}


def sft_argv(ws, out, *extra: str) -> list[str]:
    return ["--name", "baby", "--model", "tiny", "--out", str(out / "out"), "--runs", str(out / "runs"),
            "--tokenizer", str(ws["tok_dir"]), "--device", "cpu", "--init", str(ws["init"]), "--train-data",
            ws["train"], "--valid-data", ws["valid"], "--choice-data", "none", "--skill-data", "none",
            "--pretrain-mix", "0", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1", "--ckpt-every", "2",
            "--warmup-steps", "1", "--lr", "1e-2", "--max-steps", "4", "--lora-rank", "4", "--lora-dropout", "0.1",
            *extra]


@pytest.fixture(scope="module")
def sft_run(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    sft_command.main(sft_argv(workspace, out))
    return out / "out" / "baby" / "sft"


def test_sft_checkpoints_hold_the_adapters_and_name_their_base(workspace, sft_run):
    state = torch.load(latest_checkpoint(sft_run), weights_only=False)
    assert state["step"] == 4 and len(state["model"]) == 2 * 7 * 2
    assert all(".lora_A." in k or ".lora_B." in k for k in state["model"])
    record = adapter_record(state)
    assert {k: record[k] for k in ("rank", "alpha", "dropout", "targets")} == \
        {"rank": 4, "alpha": 16.0, "dropout": 0.1, "targets": list(LORA_TARGETS)}
    assert (sft_run / record["base"]).resolve() == workspace["init"].resolve()
    assert latest_checkpoint(sft_run).stat().st_size < workspace["init"].stat().st_size
    rows = [json.loads(line) for line in (sft_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "val_loss" in rows[-1]


def test_every_consumer_loads_the_adapters_merged_onto_their_base(workspace, sft_run, tmp_path):
    model = load_model(sft_run, tokenizer=workspace["tok"])  # chat, serve, evaluate, export: all load this way
    base = load_model(workspace["init"])
    assert not has_lora(model) and model.state_dict().keys() == base.state_dict().keys()
    trained = add_lora(base, LoRASpec(rank=4, dropout=0.1))
    state = torch.load(latest_checkpoint(sft_run), weights_only=False)
    trained.load_state_dict(state["model"], strict=False)
    ids = torch.tensor([[1, 7, 9, 11, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trained.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    assert load_model(sft_run, strict=True).state_dict().keys() == model.state_dict().keys()  # a stage's --init
    chat = subprocess.run([sys.executable, "-m", "babyllama", "chat", "--ckpt", str(sft_run), "--tokenizer",
                           str(workspace["tok_dir"]), "--prompt", "how are you 3?", "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    from transformers import LlamaForCausalLM

    from babyllama.convert.hf import export_hf

    hf = LlamaForCausalLM.from_pretrained(export_hf(sft_run, workspace["tok_dir"], tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_merge_writes_a_checkpoint_of_every_weight(workspace, sft_run, tmp_path, capsys):
    lora_command.main_merge(["--ckpt", str(sft_run), "--dest", str(tmp_path / "merged")])
    merged = tmp_path / "merged" / "step_00000004.pt"
    assert capsys.readouterr().out == f"wrote {merged}\n"
    state = torch.load(merged, weights_only=False)
    assert adapter_record(state) is None and state["extra"]["tokenizer"] == workspace["tok"].fingerprint
    expected = load_model(sft_run).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in load_model(merged).state_dict().items())
    with pytest.raises(UserError, match="holds every weight already"):
        lora_command.main_merge(["--ckpt", str(merged), "--dest", str(tmp_path / "again")])


def test_a_missing_or_other_base_is_one_line(workspace, sft_run, tmp_path):
    moved = tmp_path / "elsewhere" / "adapters"
    moved.mkdir(parents=True)
    shutil.copy(latest_checkpoint(sft_run), moved / "step_00000004.pt")
    proc = subprocess.run([sys.executable, "-m", "babyllama", "chat", "--ckpt", str(moved), "--tokenizer",
                           str(workspace["tok_dir"]), "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {moved / 'step_00000004.pt'}: its LoRA adapters sit on ")
    assert "which is missing; restore that checkpoint, or merge them onto a copy of it" in proc.stderr
    dest = tmp_path / "merged"
    lora_command.main_merge(["--ckpt", str(moved), "--base", str(workspace["init"]), "--dest", str(dest)])
    assert latest_checkpoint(dest).name == "step_00000004.pt"
    other = tmp_path / "other"
    save_checkpoint(other, 1, {"model": Llama(preset("tiny", vocab_size=workspace["tok"].vocab_size)).state_dict(),
                               "model_config": load_model(workspace["init"]).config.to_dict()})
    with pytest.raises(UserError, match=r"trained on other weights than those of .*other.*pass the checkpoint"):
        lora_command.main_merge(["--ckpt", str(moved), "--base", str(other), "--dest", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_sft_lora_resumes_exactly(workspace, sft_run, tmp_path):
    sft_command.main(sft_argv(workspace, tmp_path, "--stop-at", "2"))
    sft_command.main(sft_argv(workspace, tmp_path, "--resume"))
    straight = torch.load(latest_checkpoint(sft_run), weights_only=False)
    parts = torch.load(latest_checkpoint(tmp_path / "out" / "baby" / "sft"), weights_only=False)
    assert parts["step"] == 4 and straight["model"].keys() == parts["model"].keys()
    for key, value in straight["model"].items():  # dropout included: the RNG state is restored too
        assert torch.equal(value, parts["model"][key]), key
    for a, b in zip(straight["optimizer"]["state"].values(), parts["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


@pytest.mark.parametrize("flags,message", [
    (["--lora-rank", "8"], r"--lora-rank 4 at save, 8 now; resume with the same values"),
    (["--lora-rank", "0"], r"holds LoRA adapters \(--lora-rank 4\); resume it with the --lora-\* settings"),
])
def test_resume_refuses_other_adapters(workspace, tmp_path, flags, message):
    sft_command.main(sft_argv(workspace, tmp_path, "--max-steps", "2"))
    with pytest.raises(UserError, match=message):
        sft_command.main([*sft_argv(workspace, tmp_path, "--resume"), *flags])


def test_resume_refuses_a_base_with_other_weights(workspace, tmp_path):
    init = tmp_path / "init" / "step_00000001.pt"
    init.parent.mkdir()
    shutil.copy(workspace["init"], init)
    argv = [*sft_argv(workspace, tmp_path, "--max-steps", "2"), "--init", str(init)]  # the later --init wins
    sft_command.main(argv)
    state = torch.load(init, weights_only=False)
    state["model"]["model.norm.weight"] = state["model"]["model.norm.weight"] * 2  # --init's file, retrained
    torch.save(state, init)
    with pytest.raises(UserError, match=r"its adapters were trained on other weights than --init's now; resume from "
                                        r"the checkpoint it started from"):
        sft_command.main([*argv, "--resume", "--max-steps", "4"])


def test_two_gloo_processes_train_the_adapters_as_one_process_with_the_global_batch(workspace, tmp_path):
    """LoRA SFT under torchrun (2 gloo processes of 2 rows) ends where 1 process of 4 rows does. Every conversation
    is the same: SFT's length-bucketed batches are split over the ranks differently from one process's, so with
    varied data the two runs see other batches (full fine-tuning as well)."""
    from test_pretrain_cli import free_port, run_process_group

    same = write_jsonl(tmp_path / "same.jsonl", [{"messages": [{"role": "user", "content": "how are you?"},
                                                               {"role": "assistant", "content": "fine thanks"}]}] * 16)
    flags = ["--lora-dropout", "0", "--train-data", same]  # dropout draws differ per rank
    sft_command.main([*sft_argv(workspace, tmp_path / "one"), *flags])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                f"--master-port={free_port()}", "-m", "babyllama", "sft"]
    returncode, stderr = run_process_group([*launcher, *sft_argv(workspace, tmp_path / "two"), *flags,
                                            "--batch-size", "2"], timeout=300)
    assert returncode == 0, stderr[-3000:]
    one, two = (torch.load(latest_checkpoint(tmp_path / run / "out" / "baby" / "sft"), weights_only=False)
                for run in ("one", "two"))
    assert two["model"].keys() == one["model"].keys() and adapter_record(two)["rank"] == 4
    for key, value in one["model"].items():
        assert torch.allclose(two["model"][key], value, atol=1e-5), key
    assert any(v.abs().sum() > 0 for k, v in two["model"].items() if ".lora_B." in k)  # the adapters trained


# ---------------------------------------------------------------- the reference, and GRPO with adapters
def test_the_reference_is_the_frozen_base_itself(workspace, tmp_path):
    tok = workspace["tok"]
    start = StartPoint(workspace["init"], load_model(workspace["init"]).config, tok, torch.device("cpu"),
                       tmp_path / "dpo", LoRASpec(rank=4))
    assert start.reference() is start.base and not any(p.requires_grad for p in start.base.parameters())
    assert start.adapters["base"] == os.path.relpath(workspace["init"], tmp_path / "dpo")
    full = StartPoint(workspace["init"], start.base.config, tok, torch.device("cpu"), tmp_path / "dpo")
    assert full.adapters is None and full.base is None and not has_lora(full.policy)
    assert full.reference() is not full.policy and all(p.requires_grad for p in full.policy.parameters())


def test_grpo_adapters_on_sft_adapters_train_and_load(workspace, sft_run, tmp_path):
    """GRPO with --lora-rank from the LoRA SFT stage: its adapters sit on SFT's, which sit on pretraining's; loading
    merges them down the chain."""
    items = [{"skill": f"w{n}", "lang": "en", "prompt": f"say {n} words", "answer": "x", "check": f"words:{n}"}
             for n in (1, 2)]
    prompts, heldout = write_jsonl(tmp_path / "train.jsonl", items), write_jsonl(tmp_path / "heldout.jsonl", items)
    grpo_command.main(["--name", "baby", "--model", "tiny", "--out", str(tmp_path / "out"), "--runs",
                       str(tmp_path / "runs"), "--tokenizer", str(workspace["tok_dir"]), "--device", "cpu", "--init",
                       str(sft_run), "--prompts", prompts, "--skill-data", heldout, "--eval-skill-items",
                       "1", "--group-size", "4", "--prompts-per-rollout", "2", "--batch-size", "8",
                       "--max-new-tokens", "6", "--max-prompt-len", "40", "--eval-every", "2", "--ckpt-every", "2",
                       "--warmup-steps", "1", "--lr", "5e-2", "--max-steps", "2", "--lora-rank", "4"])
    stage = tmp_path / "out" / "baby" / "grpo"
    rows = [json.loads(line) for line in (stage / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["kl"] >= 0
    state = torch.load(latest_checkpoint(stage), weights_only=False)
    assert len(state["model"]) == 2 * 7 * 2 and adapter_record(state)["rank"] == 4
    assert (stage / adapter_record(state)["base"]).resolve() == latest_checkpoint(sft_run).resolve()
    chat_model, sft_model = load_model(stage, tokenizer=workspace["tok"]), load_model(sft_run)
    assert not all(torch.equal(a, b) for a, b in zip(chat_model.state_dict().values(),
                                                     sft_model.state_dict().values()))
