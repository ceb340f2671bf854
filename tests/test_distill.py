"""Logit distillation (`--teacher`): the loss against its formula, a student pulled toward its teacher, and
pretraining end to end with a teacher (its terms logged, another tokenizer refused in one line)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_pretrain_cli import new_run

from babyllama.errors import UserError
from babyllama.model.config import preset
from babyllama.model.llama import Llama
from babyllama.train.distill import distillation_loss, load_teacher
from babyllama.train.trainer import causal_lm_loss


def models(seed_student=0, seed_teacher=1, vocab=50):
    torch.manual_seed(seed_student)
    student = Llama(preset("tiny", vocab_size=vocab))
    torch.manual_seed(seed_teacher)
    teacher = Llama(preset("tiny", vocab_size=vocab)).eval()
    return student, teacher


def batch(vocab=50, rows=3, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length + 1), generator=g)
    targets = ids[:, 1:].clone()
    targets[:, :5] = -100  # unscored positions (a prompt): left out of both terms
    return ids[:, :-1], targets


def test_loss_is_the_weighted_sum_of_its_formula():
    student, teacher = models()
    inputs, targets = batch()
    alpha, t = 0.3, 2.0
    loss, logged = distillation_loss(teacher, alpha, t)(student, (inputs, targets))
    scored = targets != -100
    s = student(inputs, return_logits=True).logits[scored]
    p = F.softmax(teacher(inputs, return_logits=True).logits[scored] / t, -1)
    kd = ((p * (p.log() - F.log_softmax(s / t, -1))).sum(-1).mean() * t * t).detach()
    ce = causal_lm_loss(student, (inputs, targets)).detach()  # the plain (chunked) loss, on the same positions
    assert math.isclose(float(logged["ce"]), float(ce), rel_tol=1e-5)
    assert math.isclose(float(logged["kd"]), float(kd), rel_tol=1e-5)
    assert math.isclose(float(loss.detach()), (1 - alpha) * float(ce) + alpha * float(kd), rel_tol=1e-6)
    assert float(distillation_loss(student, 1.0, 1.0)(student, (inputs, targets))[1]["kd"]) < 1e-6  # itself


def test_a_student_learns_its_teachers_distribution():
    student, teacher = models()
    loss = distillation_loss(teacher, 1.0, 1.0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    first = None
    for step in range(40):
        value, logged = loss(student, batch(seed=step))
        first = first if first is not None else float(logged["kd"])
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    held_out = float(loss(student, batch(seed=999))[1]["kd"])
    assert held_out < 0.5 * first  # the KL to the teacher on batches it never saw
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is only read


def test_pretraining_with_a_teacher(tmp_path):
    teacher_run = new_run(tmp_path / "teacher")
    proc = teacher_run.pretrain()
    assert proc.returncode == 0, proc.stderr
    student = new_run(tmp_path / "student", like=teacher_run)
    proc = student.pretrain("--teacher", str(teacher_run.out / "pretrain"), "--distill-alpha", "0.7",
                            "--distill-temperature", "2")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (student.out / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert all({"ce", "kd"} <= set(r) for r in rows if "loss" in r)
    assert all(math.isclose(r["loss"], 0.3 * r["ce"] + 0.7 * r["kd"], rel_tol=1e-4) for r in rows if "ce" in r)
    record = json.loads((student.out / "pretrain" / "run.json").read_text())
    assert record["config"]["teacher"] == str(teacher_run.out / "pretrain")

    other = new_run(tmp_path / "other")  # its own tokenizer: trained again, another fingerprint
    shutil.rmtree(other.out / "tokenizer", ignore_errors=True)
    proc = other.pretrain("--vocab-size", "280", "--teacher", str(teacher_run.out / "pretrain"), "--max-steps", "2")
    last = proc.stderr.splitlines()[-1]  # (after the small corpus' tokenizer warning)
    assert proc.returncode == 2 and last.startswith("error: --teacher: tokenizer ") and "fingerprint" in last


def test_load_teacher_refuses_another_vocabulary(tmp_path):
    student, teacher = models(vocab=50)
    path = tmp_path / "step_00000001.pt"
    wide = Llama(preset("tiny", vocab_size=64))
    torch.save({"model": wide.state_dict(), "model_config": wide.config.to_dict()}, path)
    with pytest.raises(UserError, match="vocabulary has 64 rows"):
        load_teacher(path, None, student, torch.device("cpu"))
    del teacher


def test_validation_is_the_plain_loss_while_training_distils():
    from babyllama.train.trainer import Trainer

    student, teacher = models()
    trainer = Trainer(student)
    trainer.compile(loss=distillation_loss(teacher, 0.5, 1.0), eval_loss=causal_lm_loss,
                    optimizer=torch.optim.AdamW(student.parameters()))
    batches = [batch(seed=s) for s in range(2)]
    plain = sum(float(causal_lm_loss(student, b).detach()) for b in batches) / 2
    assert math.isclose(trainer.evaluate(batches), plain, rel_tol=1e-5)  # comparable with runs without a teacher
