"""Process-group setup for plain `python` (one process) and `torchrun` (NCCL on GPUs, gloo on CPU)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from babyllama.cli import DEVICES
from babyllama.errors import UserError


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def mps_available() -> bool:
    """Apple silicon's GPU through Metal (macOS 12.3+, an arm64 build of torch)."""
    return torch.backends.mps.is_available()


def check_device_name(name: str) -> str:
    """The device kind of --device `name` ("cuda" of "cuda:1"); a name that is none is a one-line error."""
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise UserError(f"--device {name}: choose one of {', '.join(DEVICES)}")
    return kind


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' = Apple silicon's GPU (MPS) where there is one, else this rank's CUDA GPU, else the CPU; a device
    this machine does not have is a one-line error rather than a failure at the first tensor."""
    kind = check_device_name(name)
    if name == "auto":
        name = "mps" if mps_available() else "cuda" if torch.cuda.is_available() else "cpu"
    elif kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU (or torch is a CPU build); use --device cpu")
    elif kind == "mps" and not mps_available():
        raise UserError(f"--device {name}: MPS needs Apple silicon with macOS 12.3+ and an arm64 torch; "
                        "use --device cpu")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single-process env."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and dev.type == "mps":
        raise UserError("torchrun with several processes is not supported on MPS (no process-group backend for "
                        "it); run one process, or --device cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank=rank, local_rank=local, world_size=world, device=dev)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def main_rank_first(fn: Callable[[], Any]) -> None:
    """Run `fn` on rank 0 while the other ranks wait (e.g. building the tokenizer); a UserError there is raised
    on every rank, so a bad corpus stops the whole job with one message instead of leaving ranks at a barrier."""
    error = None
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            fn()
        except UserError as e:
            error = str(e)
    if dist.is_available() and dist.is_initialized():
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise UserError(error)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group together: a rank tearing down gloo while another still works (e.g. rank 0
    writing samples) intermittently hung or aborted the job at exit. After the barrier, gloo is left to the
    process exit: its `destroy_process_group` itself hung now and then on the last rank out."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if dist.get_backend() == "nccl":
            dist.destroy_process_group()


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2: each transformer block is one shard unit (gathered just in time), the rest goes in the root unit."""
    for block in getattr(getattr(model, "model", model), "layers", []):
        fully_shard(block)
    fully_shard(model)


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state of an FSDP model, on CPU (complete on rank 0); call on every rank."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                          optim_state: dict) -> None:
    """Inverse of `full_state_dicts`: every rank passes the full state it read from the checkpoint file."""
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
