"""Run by test_trainer under torchrun (2 ranks) and alone (1 rank), always with a global batch of 16.

    python ddp_worker.py OUT_PREFIX [ddp|ddp-accum|fsdp]

ddp-accum mode accumulates 2 micro-batches of 4 per rank (DDP `no_sync` on the first) and writes the step of every
gradient all-reduce to OUT_PREFIX_syncs.json. fsdp mode shards the model (FSDP2), accumulates 2 micro-batches of
4, and checkpoints at step 3 then resumes from that file in a fresh trainer, so sharded save/resume and
gradient-sync skipping are exercised together.
"""
import json
import os
import sys

import torch
from test_trainer import CFG, pattern_data
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from babyllama.data.sampler import ResumableSampler
from babyllama.model.llama import Llama
from babyllama.train import callbacks as cb
from babyllama.train.distributed import init_distributed, shutdown
from babyllama.train.optim import build_adamw
from babyllama.train.trainer import Trainer

prefix, mode = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ddp"
env = init_distributed("cpu")
fsdp = mode == "fsdp"
accum = 1 if mode == "ddp" else 2
data = pattern_data(256)
syncs: list[int] = []


def counting_allreduce(process_group, bucket):
    syncs.append(trainer.step)
    return allreduce_hook(process_group, bucket)


def make_trainer(seed: int) -> tuple[Trainer, DataLoader]:
    torch.manual_seed(seed)
    trainer = Trainer(Llama(CFG), env)
    if fsdp:
        trainer.shard()
    trainer.compile(optimizer=build_adamw(trainer.network, lr=3e-3), grad_accumulation_steps=accum)
    sampler = ResumableSampler(len(data), seed=1, rank=env.rank, world_size=env.world_size)
    return trainer, DataLoader(data, batch_size=16 // env.world_size // accum, sampler=sampler)


trainer, loader = make_trainer(0)
if isinstance(trainer.wrapped, DDP):
    trainer.wrapped.register_comm_hook(None, counting_allreduce)
if fsdp:
    trainer.fit(loader, max_steps=3, callbacks=[cb.Checkpoint(f"{prefix}_ckpt", every=3)])
    trainer, loader = make_trainer(1)  # different init: the weights must come from the checkpoint
    trainer.resume(f"{prefix}_ckpt")
trainer.fit(loader, max_steps=5)
state = trainer.state_dict()["model"] if fsdp else trainer.network.state_dict()
if env.is_main or not fsdp:
    torch.save(state, f"{prefix}_rank{env.rank}.pt")
if env.is_main and mode == "ddp-accum":
    with open(f"{prefix}_syncs.json", "w") as f:
        json.dump(syncs, f)
shutdown()
if fsdp:
    # torch 2.13 (CPU, gloo): about 1 in 10 FSDP2 processes aborts in C++ teardown at interpreter exit
    # ("terminate called without an active exception"), even a 15-line fully_shard script; the work is done
    # and saved by now, so leave without running static destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
