"""Run by test_trainer under torchrun (2 ranks, batch 8 each) and alone (batch 16): same global batches."""
import sys

import torch
from torch.utils.data import DataLoader

from babyllama.distributed import init_distributed, shutdown
from babyllama.data import ResumableSampler
from babyllama.model import Llama
from babyllama.optim import build_adamw
from babyllama.trainer import Trainer
from test_trainer import CFG, pattern_data

env = init_distributed("cpu")
torch.manual_seed(0)
trainer = Trainer(Llama(CFG), env)
trainer.compile(optimizer=build_adamw(trainer.module, lr=3e-3))
data = pattern_data(256)
sampler = ResumableSampler(len(data), seed=1, rank=env.rank, world_size=env.world_size)
trainer.fit(DataLoader(data, batch_size=16 // env.world_size, sampler=sampler), max_steps=5)
torch.save(trainer.module.state_dict(), f"{sys.argv[1]}_rank{env.rank}.pt")
shutdown()
