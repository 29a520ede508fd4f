"""Where a run computes: the ``device`` config key, checked, and batches moved there.

A recipe trains and evaluates on one torch device, the config's ``device`` (``"cpu"``, the
default, ``"cuda"`` or ``"cuda:N"``), in fp32. :func:`check_device_name` checks the spelling (the
config does, so a typo fails before any work); :func:`resolve_device` checks, when the run starts,
that the device exists (on a machine without CUDA, ``device=cuda`` is refused and the message says
``device=cpu``) and, under ``torchrun``, gives each process its own GPU (``cuda:LOCAL_RANK``). The
model is moved there once, after it is built (and before a checkpoint's weights are loaded into
it); every batch the run reads goes through :class:`DeviceLoader` (:func:`move_batch`).
Checkpoints and the saved model are written from CPU copies and read onto the CPU (``safetensors``
and ``map_location="cpu"``), so they do not depend on the device that wrote them.

Resuming (``--resume``, ``--stage1-from``) on another device is allowed, with a warning
(:func:`device_change_warning`): the model, data and schedule are the same, but CUDA kernels round
differently from CPU ones and dropout draws from the CUDA generator instead of the CPU one, so the
continuation is a valid run but not bit-identical to an uninterrupted one; refusing would strand a
run whose GPU is gone.

Example:
    >>> batch = move_batch({"input_ids": torch.ones(2, 3, dtype=torch.long), "name": "row"}, torch.device("cpu"))
    >>> batch["input_ids"].device.type, batch["name"]
    ('cpu', 'row')
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from recipes.run.errors import ConfigError

__all__ = ["DeviceLoader", "check_device_name", "device_change_warning", "move_batch", "resolve_device"]

_DEVICE_NAME = re.compile(r"cpu|cuda(:(0|[1-9][0-9]*))?")


def check_device_name(name: str) -> str:
    """``name`` if it is ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (N >= 0), else :class:`ConfigError`.

    Only the spelling is checked (a config may be read on a machine without the device, e.g. to
    compare a finished GPU run); :func:`resolve_device` checks the device exists.

    >>> check_device_name("cuda:1")
    'cuda:1'
    """
    if not isinstance(name, str) or not _DEVICE_NAME.fullmatch(name):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N' (N a GPU index, 0, 1...), got {name!r}")
    return name


def resolve_device(name: str, world_size: int = 1) -> torch.device:
    """The torch device a run with ``device=name`` computes on, checked to exist.

    Args:
        name: the config's ``device`` (:func:`check_device_name`).
        world_size: processes in the run (``torchrun``'s ``WORLD_SIZE``). With more than one and
            ``device=cuda``, each process takes ``cuda:LOCAL_RANK`` (the process group then uses
            NCCL); an explicit ``cuda:N`` would put every process on the same GPU and is refused.

    Raises:
        ConfigError: a bad spelling, CUDA asked where ``torch.cuda.is_available()`` is false, a GPU
            index the machine does not have, or ``cuda:N`` under ``torchrun``.
    """
    check_device_name(name)
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name}, but this machine has no CUDA device (torch.cuda.is_available() is False; "
                          "is the installed torch a CPU build?): train on the CPU with device=cpu")
    count = torch.cuda.device_count()
    if world_size > 1:
        if name != "cuda":
            raise ConfigError(f"device={name} under torchrun ({world_size} processes) would put every process on one "
                              "GPU; give device=cuda, and each process uses cuda:LOCAL_RANK")
        index = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        index = int(name.partition(":")[2] or torch.cuda.current_device())
    if index >= count:
        raise ConfigError(f"device={name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}, so there "
                          f"is no cuda:{index}" + (" (LOCAL_RANK is larger than the GPUs of this node: start fewer "
                                                   "processes per node)" if world_size > 1 else ""))
    return torch.device("cuda", index)


def move_batch(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A copy of ``batch`` with every tensor on ``device`` (dtypes kept); other values as they are.

    Args:
        batch: ``{name: tensor or other value}``, e.g. ``input_ids``, ``attention_mask``, ``labels``.
        device: where the tensors go (a tensor already there is returned as it is, not copied).
    """
    return {key: value.to(device) if isinstance(value, Tensor) else value for key, value in batch.items()}


class DeviceLoader:
    """Batches of ``loader`` moved to ``device`` as they are read (:func:`move_batch`); ``len`` is
    the loader's, so learning-rate schedules count the same steps.

    Args:
        loader: an iterable of batch dicts (a ``DataLoader``).
        device: where the batches go.

    >>> [batch["labels"].device.type for batch in DeviceLoader([{"labels": torch.zeros(2)}], torch.device("cpu"))]
    ['cpu']
    """

    def __init__(self, loader: Iterable[Mapping[str, Any]], device: torch.device) -> None:
        self.loader = loader
        self.device = device

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (move_batch(batch, self.device) for batch in self.loader)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


def device_change_warning(saved: Mapping[str, Any], current: Mapping[str, Any], what: str) -> str | None:
    """The warning for a run continued on another device than the one ``what`` was trained on
    (``None`` when the devices agree; a record without ``device`` was trained on the CPU).

    Args:
        saved, current: the saved record's config and this run's (as dicts).
        what: the saved run in the message (``"the checkpoint in runs/x/checkpoint"``).

    >>> device_change_warning({"device": "cuda"}, {"device": "cuda"}, "it") is None
    True
    >>> device_change_warning({}, {"device": "cuda"}, "the checkpoint").split(";")[0]
    'the checkpoint was trained with device=cpu, this run uses device=cuda'
    """
    before, after = saved.get("device", "cpu"), current.get("device", "cpu")
    if before.partition(":")[0] == after.partition(":")[0]:
        return None  # only CPU <-> CUDA is told: the config does not record which GPU model ran
    return (f"{what} was trained with device={before}, this run uses device={after}; it continues, but not "
            "bit-identically to an uninterrupted run (other kernels round differently and dropout draws from "
            "another generator)")
