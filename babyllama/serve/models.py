"""The stages of a run that the server can answer with, each model loaded once, on first use."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from babyllama.chat.session import STAGES
from babyllama.data.chat_template import stop_ids
from babyllama.data.tokenizer import Tokenizer
from babyllama.model.generate import Generator
from babyllama.model.llama import Llama
from babyllama.model.prefix_cache import PrefixCache
from babyllama.train.checkpoint import latest_checkpoint, load_model
from babyllama.train.run_config import RunPaths

SERVED_STAGES = STAGES  # the reward model scores, it does not write


@dataclass
class Served:
    """A loaded stage: the model, its decoder and what requests are checked against."""

    stage: str
    checkpoint: Path
    model: Llama
    tokenizer: Tokenizer
    generator: Generator
    chat_stops: list[int]  # <|im_end|> and </s>: the end of an assistant reply
    created: int  # checkpoint time, for /v1/models

    @property
    def context(self) -> int:
        return self.model.config.max_seq_len

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device


class ModelRegistry:
    """`available()` lists the stages with a checkpoint now; `get(stage)` loads the newest checkpoint of a stage
    the first time it is asked for and keeps it (a checkpoint trained later is picked up by a restart).
    Each loaded stage's generator keeps a prefix cache of `prefix_cache_mb` MiB (0: none): a conversation's next
    turn, or a batch restarted with the same rows, copies the KV of what was already computed."""

    def __init__(self, paths: RunPaths, tokenizer: Tokenizer, device: torch.device, dtype: torch.dtype | None,
                 prefix_cache_mb: int = 0):
        self.paths, self.tokenizer, self.device, self.dtype = paths, tokenizer, device, dtype
        self.prefix_cache_mb = prefix_cache_mb
        self._loaded: dict[str, Served] = {}
        self._lock = threading.Lock()

    def available(self) -> dict[str, Path]:
        """Stage -> newest checkpoint file, for the stages that have one."""
        found = {s: latest_checkpoint(self.paths.stage(s)) for s in SERVED_STAGES}
        return {s: p for s, p in found.items() if p is not None}

    def get(self, stage: str) -> Served | None:
        """The loaded stage, or None when it has no checkpoint (a `UserError` when the checkpoint is unusable)."""
        with self._lock:  # two first requests for one stage load it once
            if stage not in self._loaded:
                checkpoint = self.available().get(stage)
                if checkpoint is None:
                    return None
                model = load_model(checkpoint, self.device, self.dtype, tokenizer=self.tokenizer)
                cache = PrefixCache(self.prefix_cache_mb << 20) if self.prefix_cache_mb else None
                self._loaded[stage] = Served(stage, checkpoint, model, self.tokenizer,
                                             Generator(model, prefix_cache=cache), stop_ids(self.tokenizer),
                                             int(checkpoint.stat().st_mtime))
            return self._loaded[stage]
