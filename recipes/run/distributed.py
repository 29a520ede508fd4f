"""Seeding and the (optional) process group: one process, or ``torchrun`` with DDP."""

from __future__ import annotations

import os
import random

import torch

__all__ = ["barrier", "distributed_setup", "is_main_process", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's, and torch's generators (CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def distributed_setup() -> tuple[int, int]:
    """Start the process group when launched with ``WORLD_SIZE > 1`` (torchrun); gloo on CPU.

    Returns:
        ``(rank, world_size)``; ``(0, 1)`` for a single process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world_size


def is_main_process() -> bool:
    """Whether this process writes files and logs (rank 0, or no process group)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
