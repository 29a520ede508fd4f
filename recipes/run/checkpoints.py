"""Checkpoints: a run's state at the end of an epoch, written as a whole, and the best stage-1 weights.

* The format (:func:`save_checkpoint`, :func:`load_checkpoint`): safetensors weights, a
  ``torch.save`` file of the optimizer, scheduler and random-generator states, and a JSON state
  recording every file's SHA-256; written to a temporary folder and swapped in, the previous
  checkpoint kept as ``<folder>.prev`` (one generation back) for when the newest is damaged.
* :class:`RunCheckpoints`: a run's checkpoint after every epoch, with the best stage-1 weights
  (published as ``<run>/stage1_best.safetensors``), checked and restored on ``--resume``.

Files are written with :mod:`recipes.run.files`; where they lie in a run folder is
:mod:`recipes.run.folder`'s.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adaptive_depth.files import atomic_write, fsync, leftovers
from adaptive_depth.storage import file_sha256
from recipes.run import errors
from recipes.run.errors import CheckpointError
from recipes.run.files import RecordedFile, copy_verified, detached, load_state_dict_strict, load_weights, write_weights
from recipes.run.logs import logger

__all__ = [
    "OPTIMIZER_FILE",
    "STATE_FILE",
    "WEIGHTS_FILE",
    "RunCheckpoints",
    "capture_rng_state",
    "has_checkpoint",
    "load_checkpoint",
    "previous_checkpoint",
    "read_state",
    "restore_rng_state",
    "save_checkpoint",
]


WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
PREVIOUS_SUFFIX = ".prev"


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
            :class:`~recipes.run.files.RecordedFile` to copy (checked against its digest)}``, e.g.
            the best stage-1 weights. No file is shared (hard-linked) between two checkpoints.

    Raises:
        StorageError: the disk is full or not writable (the previous checkpoint is kept).
        CheckpointError: a :class:`~recipes.run.files.RecordedFile` no longer has its recorded bytes.
    """
    folder = Path(folder)
    temporary = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    previous = previous_checkpoint(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Left by a process that died while saving (the run folder's lock keeps out live ones).
        for leftover in leftovers(folder, ("tmp",)):
            shutil.rmtree(leftover, ignore_errors=True)
        temporary.mkdir()
        write_weights(temporary / WEIGHTS_FILE, detached(state_dict))
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
                write_weights(temporary / name, detached(source))
        files = {path.name: file_sha256(path) for path in sorted(temporary.iterdir())}
        record = dict(state)
        record["files"] = files
        record["saved_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        (temporary / STATE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        for path in temporary.iterdir():
            fsync(path)
        fsync(temporary)
        if folder.exists():
            if previous.exists():
                shutil.rmtree(previous)
            os.replace(folder, previous)
        os.replace(temporary, folder)
        fsync(folder.parent)
    except Exception as error:  # OSError, or torch's / safetensors' error for a full disk
        converted = errors.storage_error(error, f"saving the checkpoint {folder}")
        if converted is error:
            raise
        raise converted from error
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return folder


def read_state(folder: Path) -> dict[str, Any]:
    """The JSON state of the checkpoint in ``folder`` (not checked against its files).

    Raises:
        CheckpointError: no ``state.json`` there, or not a readable JSON object.
    """
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"no checkpoint in {folder} (missing {STATE_FILE}); nothing to resume")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint state {state_path} is corrupt: {error}") from error
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict):
        raise CheckpointError(f"checkpoint state {state_path} is not a JSON object with the files' checksums")
    return state


def _load_one_checkpoint(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    state = read_state(folder)
    for name, digest in state["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} lacks {name}, which {STATE_FILE} records")
        if file_sha256(path) != digest:
            raise CheckpointError(
                f"checkpoint file {path} does not match {folder / STATE_FILE} (checksum differs): the "
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


class RunCheckpoints:
    """The checkpoint folder of one run and the best stage-1 weights it holds.

    Args:
        folder: the checkpoint folder (``<run>/checkpoint``; its previous generation beside it).
        best_path: where the best stage-1 weights are published (``<run>/stage1_best.safetensors``);
            the checkpoint holds them under the same file name.
        is_main: whether this process writes (rank 0).
    """

    def __init__(self, folder: Path, best_path: Path, is_main: bool = True) -> None:
        self.folder = folder
        self.best_path = best_path
        self.best_name = best_path.name
        self.is_main = is_main
        self.best_sha256: str | None = None  # of the best stage-1 weights the last checkpoint holds
        self.checkpointed: tuple[int, int] | None = None  # (stage, epoch) of the last checkpoint

    def save(self, stage: int, epoch: int, model: nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any],
             new_best: Mapping[str, Tensor] | None = None) -> None:
        """Checkpoint the end of ``epoch`` of ``stage``: weights, optimizer, random generators and
        the best stage-1 weights (``new_best`` when this epoch is the best, else those of the last
        checkpoint), all or nothing; then publish the best weights."""
        if not self.is_main:
            return
        extra: dict[str, Any] = {}
        source = self.best_source()
        if new_best is not None:
            extra[self.best_name] = new_best
        elif source is not None:
            extra[self.best_name] = source
        with errors.deferred_signals():  # a SIGINT/SIGTERM now stops the run after the save
            save_checkpoint(self.folder, model.state_dict(), optimizer, state, scheduler,
                            rng_state=capture_rng_state(), extra_files=extra)
            saved = json.loads((self.folder / STATE_FILE).read_text(encoding="utf-8"))
            self.best_sha256 = saved["files"].get(self.best_name)
            self.checkpointed = (stage, epoch)
            self.publish_best()

    def best_source(self) -> RecordedFile | None:
        """The best stage-1 weights of the last checkpoint and their recorded digest, if it holds them."""
        path = self.folder / self.best_name
        return RecordedFile(path, self.best_sha256) if self.best_sha256 is not None and path.is_file() else None

    def publish_best(self) -> None:
        """``<run>/stage1_best.safetensors``: a copy of the checkpoint's best weights, checked against
        the digest the checkpoint recorded and renamed into place. Never a hard link: a write into
        the published file (``cp`` over it, a truncation) must not reach the checkpoints."""
        source = self.best_source()
        if source is None:
            return
        published = self.best_path
        if (published.is_file() and not os.path.samefile(source.path, published)
                and file_sha256(published) == source.sha256):
            return  # already published
        try:
            atomic_write(published, lambda temporary: copy_verified(source, temporary))
        except Exception as error:
            converted = errors.storage_error(error, f"writing {published}")
            if converted is error:
                raise
            raise converted from error

    def restore_optimizer(self, optimizer: Any, scheduler: Any, payload: dict[str, Any] | None) -> None:
        """Load the optimizer and scheduler state of a resumed checkpoint into fresh ones."""
        if payload is None or payload.get("optimizer") is None:
            return
        try:
            optimizer.load_state_dict(payload["optimizer"])
            if payload.get("scheduler") is not None:
                scheduler.load_state_dict(payload["scheduler"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"optimizer state in {self.folder} does not match: {error}") from error

    def load_for_resume(self) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
        """``(weights, state, payload)`` of the newest readable checkpoint, made the newest one,
        its best weights published and the random generators restored.

        The caller checks ``state`` against the run before using the weights (recipe, task,
        model, config, data).
        """
        state_dict, state, payload = load_checkpoint(self.folder)
        loaded_from = Path(state["loaded_from"])
        if state.get("stage") not in (1, 2) or not isinstance(state.get("epoch"), int):
            raise CheckpointError(f"checkpoint state in {loaded_from} has no valid stage/epoch")
        self.best_sha256 = state.get("files", {}).get(self.best_name)
        if state.get("best_stage1") is not None and self.best_sha256 is None:
            raise CheckpointError(f"the checkpoint in {loaded_from} records a best stage-1 epoch but holds no "
                                  f"{self.best_name}: the checkpoint is incomplete; start a new run (--overwrite)")
        return state_dict, state, payload

    def adopt(self, state: dict[str, Any], payload: dict[str, Any]) -> None:
        """Make the checkpoint just loaded the newest one (it may be the fallback), publish its best
        weights and restore the random generators: the run continues exactly from there."""
        loaded_from = Path(state["loaded_from"])
        if loaded_from != self.folder and self.is_main:
            # The newest checkpoint was damaged: continue from the previous one, as if it were the newest.
            with errors.deferred_signals():
                if self.folder.exists():
                    shutil.rmtree(self.folder)
                os.replace(loaded_from, self.folder)
        if self.is_main:
            self.publish_best()  # a crash may have cut off the last publication
        self.checkpointed = (state["stage"], state["epoch"])
        if payload.get("rng") is not None:
            restore_rng_state(payload["rng"])
        logger.info("resuming from %s: stage %d, epoch %d completed", loaded_from, state["stage"], state["epoch"])

    def reload_best(self, model: nn.Module, keep: Callable[[str], bool], best_epoch: int) -> None:
        """Load the best stage-1 weights of the last checkpoint into ``model``, checked against the
        checksum it recorded; keys for which ``keep(key)`` is true keep their current values."""
        if not self.is_main:  # rank 0 wrote the checkpoint (stage 1 ends with a barrier)
            state = json.loads((self.folder / STATE_FILE).read_text(encoding="utf-8"))
            self.best_sha256 = state.get("files", {}).get(self.best_name)
        source = self.folder / self.best_name
        if self.best_sha256 is None or not source.is_file():
            raise CheckpointError(
                f"the best stage-1 weights (epoch {best_epoch + 1}) are missing from {self.folder}; "
                "the run folder was changed while it ran: start a new run (--overwrite)"
            )
        best = load_weights(source, sha256=self.best_sha256)
        best.update({key: value for key, value in model.state_dict().items() if keep(key)})
        load_state_dict_strict(model, best, str(self.best_path))
