"""The files of a checkpoint: checked copies and safetensors weights.

:func:`copy_verified` copies a file whose SHA-256 a checkpoint recorded (:class:`RecordedFile`) and
checks the copy; weights are safetensors files read back with :func:`load_weights` (checked against a
recorded SHA-256, :func:`adaptive_depth.storage.file_sha256`) and loaded into a module with
:func:`load_state_dict_strict` (a :class:`~recipes.run.errors.CheckpointError` naming the keys that do
not fit). The checkpoint format built on them is :mod:`recipes.run.checkpoints`; atomic writes are
:func:`adaptive_depth.files.atomic_write`.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from torch import Tensor, nn

from adaptive_depth.storage import file_sha256
from recipes.run.errors import CheckpointError

__all__ = ["RecordedFile", "copy_verified", "detached", "load_state_dict_strict", "load_weights", "write_weights"]


def detached(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU copies of every tensor (so tensors sharing storage can be saved)."""
    return {key: value.detach().cpu().contiguous().clone() for key, value in state_dict.items()}


def write_weights(path: Path, tensors: Mapping[str, Tensor]) -> None:
    """Write ``tensors`` (CPU, contiguous, no shared storage: see :func:`detached`) as safetensors."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path))


def load_weights(path: Path, sha256: str | None = None) -> dict[str, Tensor]:
    """Read a safetensors state dict; :class:`CheckpointError` if missing, unreadable, or (given
    ``sha256``) not the file that was recorded."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint weights {path} do not exist")
    if sha256 is not None and file_sha256(path) != sha256:
        raise CheckpointError(f"weights {path} differ from the ones the run recorded (checksum differs): the file "
                              "is corrupt or was replaced")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"checkpoint weights {path} are corrupt or unreadable: {error}") from error


class RecordedFile(NamedTuple):
    """An existing file and the SHA-256 a checkpoint recorded for it (e.g. the best stage-1 weights)."""

    path: Path
    sha256: str


def copy_verified(source: RecordedFile, target: Path) -> None:
    """Copy ``source.path`` to ``target`` (a new file, never a hard link: a later write to one must
    not change the other) and check the copy against ``source.sha256``.

    Raises:
        CheckpointError: the copy's bytes are not the recorded ones (the source was damaged or replaced).
    """
    shutil.copyfile(source.path, target)
    if file_sha256(target) != source.sha256:
        raise CheckpointError(f"{source.path} differs from the file the checkpoint recorded (checksum differs): it "
                              "was damaged or replaced; resume falls back to the previous checkpoint, or start a new "
                              "run (--overwrite)")


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """``module.load_state_dict`` with a :class:`CheckpointError` naming missing, unexpected or
    mis-shaped keys (a checkpoint of another model or config)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}"
        for key in set(own) & set(state_dict)
        if tuple(own[key].shape) != tuple(state_dict[key].shape)
    )
    if missing or unexpected or shapes:
        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        problems = []
        if missing:
            problems.append(f"missing keys: {head(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {head(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches: {head(shapes)}")
        raise CheckpointError(
            f"checkpoint {source} does not match this model ({'; '.join(problems)}); was it written "
            "with another --model or config?"
        )
    module.load_state_dict(state_dict, strict=True)
