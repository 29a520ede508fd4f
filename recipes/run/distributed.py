"""Seeding and the (optional) process group: one process, or ``torchrun`` with DDP (gloo on the
CPU, NCCL with one GPU per process)."""

from __future__ import annotations

import os
import random

import torch

from recipes.run.device import resolve_device

__all__ = ["barrier", "distributed_setup", "is_main_process", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's, and torch's generators (CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def distributed_setup(device: str = "cpu") -> tuple[int, int, torch.device]:
    """This process's device, made current (CUDA), and the process group when launched with
    ``WORLD_SIZE > 1`` (torchrun): gloo for ``device=cpu``, NCCL for ``device=cuda`` (each process
    on ``cuda:LOCAL_RANK``).

    Args:
        device: the config's ``device`` (:func:`recipes.run.device.resolve_device` checks it).

    Returns:
        ``(rank, world_size, device)``; ``(0, 1, device)`` for a single process.

    Raises:
        ConfigError: the device does not exist here, or does not fit torchrun (``cuda:N``).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = resolve_device(device, world_size)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size <= 1:
        return 0, 1, resolved
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, resolved


def is_main_process() -> bool:
    """Whether this process writes files and logs (rank 0, or no process group)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
