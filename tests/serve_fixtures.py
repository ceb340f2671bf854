"""Shared by the server tests: a tiny run on disk (tokenizer + stage checkpoints); `server` starts
`babyllama serve` on it as a real process on 127.0.0.1 (`babyllama.serve.process`)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from test_chat import make_tokenizer

from babyllama.model.config import preset
from babyllama.model.llama import Llama
from babyllama.serve.process import serve_in_background as server  # noqa: F401  (the tests' name for it)
from babyllama.train.checkpoint import atomic_save


def tiny_run(out: Path, context: int = 512, ending: bool = True) -> Path:
    """out/baby/{tokenizer,pretrain,sft[,dpo]}: random tiny models (seeded, untied head) on a trained 512-token
    tokenizer.

    With `ending`, the dpo stage is a model that always answers `<|im_end|>` at once (every token's hidden state
    gets a large constant component that only that row of the head reads), for the model-ended replies."""
    run = out / "baby"
    with warnings.catch_warnings():  # "little text for the vocabulary": enough for these tests
        warnings.simplefilter("ignore")
        tok = make_tokenizer(run / "tokenizer")
    for seed, stage in enumerate(("pretrain", "sft", "dpo") if ending else ("pretrain", "sft")):
        torch.manual_seed(seed)
        # untied: a tied random model's greedy reply repeats its last prompt token ("\n" of the header) forever
        model = Llama(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=context, tie_embeddings=False))
        if stage == "dpo":
            with torch.no_grad():
                model.model.embed_tokens.weight[:, 0] = 100.0
                model.lm_head.weight[tok.token_to_id("<|im_end|>"), 0] = 10.0
        atomic_save({"model": model.state_dict(), "model_config": model.config.to_dict(),
                     "extra": {"tokenizer": tok.fingerprint}}, run / stage / "step_00000001.pt")
    return run
