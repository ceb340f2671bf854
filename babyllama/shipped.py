"""Where the repository keeps what it ships: the corpus, the fine-tuning and evaluation sets,
the published reference run. Named once here; a library module that reads shipped data imports the path."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
_ROOT_PREFIX = str(REPO_ROOT) + os.sep

CORPUS = REPO_ROOT / "data" / "corpus"
TRAIN_CORPUS = [CORPUS / "poetry_zh_train.jsonl", CORPUS / "shakespeare_en_train.jsonl"]
HELDOUT = {"zh": CORPUS / "poetry_zh_heldout.jsonl", "en": CORPUS / "shakespeare_en_heldout.jsonl"}
SFT = REPO_ROOT / "data" / "sft"
CHAT_CHOICES = SFT / "choice_eval.jsonl"  # held-out multiple choice asked as chat
PREFERENCE = REPO_ROOT / "data" / "preference"
PREF_VALID = PREFERENCE / "pref_valid.jsonl"
HELDOUT_PROMPTS = PREFERENCE / "prompts_heldout.jsonl"
IDIOMS = REPO_ROOT / "data" / "eval" / "idiom_cloze.jsonl"
SKILLS = REPO_ROOT / "data" / "skills"  # the verifiable skill suite
SKILLS_TRAIN = SKILLS / "skills_train.jsonl"
SKILLS_HELDOUT = SKILLS / "skills_heldout.jsonl"
PUBLISHED = REPO_ROOT / "docs" / "published"


def portable(value: Any) -> Any:
    """Paths inside the repository written relative to its root, so a record reads the same on every machine."""
    if isinstance(value, str) and value.startswith(_ROOT_PREFIX):
        return value[len(_ROOT_PREFIX):]
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    return value
