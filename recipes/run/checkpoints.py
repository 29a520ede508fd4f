"""Checkpoints: safetensors weights, a ``torch.save`` optimizer and random-generator file and a
JSON state with every file's SHA-256, written to a temporary folder and swapped in as a whole;
the previous checkpoint is kept as a fallback."""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from adaptive_depth.storage import file_sha256 as file_digest
from recipes.errors import CheckpointError
from recipes.logs import logger

__all__ = [
    "OPTIMIZER_FILE",
    "STATE_FILE",
    "WEIGHTS_FILE",
    "RecordedFile",
    "atomic_write",
    "capture_rng_state",
    "copy_verified",
    "file_digest",
    "has_checkpoint",
    "load_checkpoint",
    "load_state_dict_strict",
    "load_weights",
    "previous_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "save_weights",
]


WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
PREVIOUS_SUFFIX = ".prev"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _write_safetensors(path: Path, tensors: Mapping[str, Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path))


def save_weights(path: Path, state_dict: Mapping[str, Tensor]) -> None:
    """Write a state dict as safetensors, atomically (tensors copied, so shared storage is fine)."""
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state_dict.items()}
    atomic_write(path, lambda temporary: _write_safetensors(temporary, tensors))


def load_weights(path: Path, sha256: str | None = None) -> dict[str, Tensor]:
    """Read a safetensors state dict; :class:`CheckpointError` if missing, unreadable, or (given
    ``sha256``) not the file that was recorded."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint weights {path} do not exist")
    if sha256 is not None and file_digest(path) != sha256:
        raise CheckpointError(f"weights {path} differ from the ones the run recorded (checksum differs): the file "
                              "is corrupt or was replaced")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"checkpoint weights {path} are corrupt or unreadable: {error}") from error


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator training draws from: torch's CPU (dropout, the
    DataLoader's base seed) and CUDA generators and Python's ``random``. (numpy is not used.)"""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put the generators back where :func:`capture_rng_state` found them, so a resumed run draws
    the same dropout masks as an uninterrupted one."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk (a folder: its entries), where the platform allows it."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


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
    import shutil

    shutil.copyfile(source.path, target)
    if file_digest(target) != source.sha256:
        raise CheckpointError(f"{source.path} differs from the file the checkpoint recorded (checksum differs): it "
                              "was damaged or replaced; resume falls back to the previous checkpoint, or start a new "
                              "run (--overwrite)")


def previous_checkpoint(folder: str | os.PathLike[str]) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint before the last one (``<folder>.prev``)."""
    folder = Path(folder)
    return folder.with_name(folder.name + PREVIOUS_SUFFIX)


def has_checkpoint(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` or its previous generation holds a checkpoint state."""
    return any((path / STATE_FILE).is_file() for path in (Path(folder), previous_checkpoint(folder)))


def save_checkpoint(
    folder: str | os.PathLike[str],
    state_dict: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer | None,
    state: Mapping[str, Any],
    scheduler: Any = None,
    rng_state: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Mapping[str, Tensor] | RecordedFile] | None = None,
) -> Path:
    """Write a resumable checkpoint as a whole: every file or none.

    The files are written into a temporary folder beside ``folder``; then the current
    checkpoint becomes ``<folder>.prev`` and the temporary folder becomes ``folder`` (two
    renames). A failure or a crash at any point leaves the last complete checkpoint in
    ``folder`` or, between the renames, in ``<folder>.prev``, which :func:`load_checkpoint`
    falls back to. ``state.json`` records the SHA-256 of every other file.

    Args:
        folder: the checkpoint folder (its parent is created if needed).
        state_dict: model weights (``model.safetensors``).
        optimizer: its ``state_dict()`` goes to ``optimizer.pt`` (with the scheduler's and the
            random generators' states).
        state: JSON-ready metadata: config, stage, epoch, history...
        scheduler: optional learning-rate scheduler.
        rng_state: :func:`capture_rng_state` at the moment of saving.
        extra_files: more weights files: ``{file name: state dict to write, or a
            :class:`RecordedFile` to copy (checked against its digest)}``, e.g. the best stage-1
            weights. No file is shared (hard-linked) between two checkpoints.

    Raises:
        StorageError: the disk is full or not writable (the previous checkpoint is kept).
        CheckpointError: a :class:`RecordedFile` no longer has its recorded bytes.
    """
    from recipes.errors import storage_error

    folder = Path(folder)
    temporary = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    previous = previous_checkpoint(folder)
    import shutil

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Left by a process that died while saving (the run folder's lock keeps out live ones).
        for leftover in folder.parent.glob(f".{folder.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        temporary.mkdir()
        _write_safetensors(temporary / WEIGHTS_FILE, _detached(state_dict))
        payload = {
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": None if rng_state is None else dict(rng_state),
        }
        with (temporary / OPTIMIZER_FILE).open("wb") as handle:  # a file object: a full disk stays an OSError cause
            torch.save(payload, handle)
        for name, source in (extra_files or {}).items():
            if isinstance(source, RecordedFile):
                copy_verified(source, temporary / name)
            else:
                _write_safetensors(temporary / name, _detached(source))
        files = {path.name: file_digest(path) for path in sorted(temporary.iterdir())}
        record = dict(state)
        record["files"] = files
        record["weights_sha256"] = files[WEIGHTS_FILE]
        record["saved_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        (temporary / STATE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        for path in temporary.iterdir():
            _fsync(path)
        _fsync(temporary)
        if folder.exists():
            if previous.exists():
                shutil.rmtree(previous)
            os.replace(folder, previous)
        os.replace(temporary, folder)
        _fsync(folder.parent)
    except Exception as error:  # OSError, or torch's / safetensors' error for a full disk
        converted = storage_error(error, f"saving the checkpoint {folder}")
        if converted is error:
            raise
        raise converted from error
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return folder


def _detached(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.detach().cpu().contiguous().clone() for key, value in state_dict.items()}


def _load_one_checkpoint(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"no checkpoint in {folder} (missing {STATE_FILE}); nothing to resume")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint state {state_path} is corrupt: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint state {state_path} is not a JSON object")
    recorded = state.get("files") or {WEIGHTS_FILE: state.get("weights_sha256")}
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} lacks {name}, which {STATE_FILE} records")
        if digest is not None and file_digest(path) != digest:
            raise CheckpointError(
                f"checkpoint file {path} does not match {state_path} (checksum differs): the "
                "checkpoint is corrupt or was partly overwritten"
            )
    state_dict = load_weights(folder / WEIGHTS_FILE)
    try:
        payload = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {folder} has no {OPTIMIZER_FILE}") from error
    except Exception as error:
        raise CheckpointError(f"checkpoint optimizer state {folder / OPTIMIZER_FILE} is corrupt: {error}") from error
    state["loaded_from"] = str(folder)
    return state_dict, state, payload


def load_checkpoint(folder: str | os.PathLike[str], fallback: bool = True,
                    ) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`, verifying every file's checksum.

    With ``fallback``, reads the previous checkpoint (``<folder>.prev``, with a warning) when
    ``folder`` is missing or damaged: a save that failed or was cut off midway loses at most one
    epoch. (Resuming wants that; reloading a finished run for inference does not.)

    Returns:
        ``(state_dict, state, optimizer_payload)``; ``state["loaded_from"]`` is the folder
        read; the payload has ``optimizer``, ``scheduler`` and ``rng`` states (or ``None``).

    Raises:
        CheckpointError: neither folder holds a complete checkpoint whose files match the
            checksums recorded in its ``state.json``.
    """
    folder = Path(folder)
    try:
        return _load_one_checkpoint(folder)
    except CheckpointError as error:
        previous = previous_checkpoint(folder)
        if not fallback or not (previous / STATE_FILE).is_file():
            raise
        try:
            loaded = _load_one_checkpoint(previous)
        except CheckpointError:
            raise error from None
        logger.warning("%s; using the previous checkpoint %s (one epoch older)", error, previous)
        return loaded


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
