"""Distributed set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

One process per device. Without those variables this is a single process and nothing is initialised.
Only rank 0 logs, evaluates and saves; the others only train.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0  # global rank of this process
    world_size: int = 1  # number of processes in the whole job
    local_rank: int = 0  # index of this process on its node: picks the GPU
    device: torch.device = torch.device("cpu")  # this process's device (trainer.placement decides)
    backend: str | None = None  # None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the process group described by torchrun's variables (gloo on CPU, nccl on CUDA).

    ``device`` as :func:`trainer.placement.resolve_device` reads it (default: the best available).
    """
    from trainer.placement import resolve_device

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1:
        return DistEnv(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def shutdown(env: DistEnv) -> None:
    """Leave the process group (a no-op for a single process)."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: float, env: DistEnv) -> float:
    """Sum a Python number over all ranks (used for skipped-sample and NaN counts)."""
    if not env.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if env.backend == "nccl":
        t = t.to(env.device)
    dist.all_reduce(t)
    return float(t.item())


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
