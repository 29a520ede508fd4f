"""One run per folder: its layout, the ownership checks, the lock and ``run.json``.

A run folder (``--output-dir``) belongs to one run:

* the layout: :data:`CHECKPOINT_DIR` (and its previous generation), :data:`BEST_STAGE1_FILE`,
  :data:`BACKBONE_DIR` (the backbone's config and tokenizer, which make the folder
  self-contained), :data:`MODEL_DIR` (the saved model), :data:`RESULTS_FILE`, :data:`PLOT_FILE`,
  :data:`RUN_FILE` and :data:`LOCK_FILE`;
* :func:`check_run_folder` (no side effects, before anything is loaded) refuses a folder that
  holds a run unless ``--resume`` (continue it) or ``--overwrite`` (replace it) is given, and a
  folder that cannot be written;
* :class:`RunLock` (``run.lock``, created with ``O_EXCL``) keeps a second process out while a
  run is in progress; a lock whose process is gone (same host, pid no longer alive) is stale and
  taken over;
* :func:`lock_run_folder` takes the lock (and clears the folder on ``--overwrite``);
  :func:`record_run` writes ``run.json``: what the run is (recipe, task, model, config and the
  fingerprint of its data rows), which ``--resume``, ``--stage1-from`` and the benchmarks compare
  with what they are asked to run (:mod:`recipes.run.compat`).

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp()) / "run"
    >>> check_run_folder(folder, resume=False, overwrite=False)  # a new folder is fine
    >>> with RunLock(folder):
    ...     (folder / LOCK_FILE).is_file()
    True
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adaptive_depth.files import leftovers, replace_folder, staging_folder, write_atomically
from recipes.run import errors
from recipes.run.checkpoints import has_checkpoint, previous_checkpoint
from recipes.run.errors import RunFolderError
from recipes.run.logs import logger

__all__ = [
    "BACKBONE_DIR",
    "BEST_STAGE1_FILE",
    "CHECKPOINT_DIR",
    "HELDOUT_FILE",
    "LOCK_FILE",
    "MODEL_DIR",
    "PLOT_FILE",
    "RESULTS_FILE",
    "RUN_FILE",
    "RunLock",
    "check_run_folder",
    "clear_run",
    "lock_run_folder",
    "read_run_record",
    "record_run",
    "run_contents",
]

CHECKPOINT_DIR = "checkpoint"  # the last checkpoint (recipes.run.checkpoints); the one before: checkpoint.prev
BEST_STAGE1_FILE = "stage1_best.safetensors"  # the best stage-1 weights, published from the checkpoint
BACKBONE_DIR = "backbone"  # the backbone's config and tokenizer (weights: the checkpoint or the model)
MODEL_DIR = "model"  # the trained model at its calibrated operating point (AdaptiveEncoder.save_pretrained)
RESULTS_FILE = "results.json"
PLOT_FILE = "plot.png"
RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
HELDOUT_FILE = "heldout.jsonl"  # python -m recipes.heldout's default output: rows of this run's held-out split
# What a run writes into its folder; anything else there is left alone.
RUN_ENTRIES = (CHECKPOINT_DIR, previous_checkpoint(CHECKPOINT_DIR).name, BEST_STAGE1_FILE, BACKBONE_DIR, MODEL_DIR,
               RESULTS_FILE, PLOT_FILE, RUN_FILE)


def run_contents(run_dir: Path) -> list[str]:
    """The run entries present in ``run_dir`` (``[]``: it holds no run)."""
    return [name for name in RUN_ENTRIES if (run_dir / name).exists()]


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is loaded or written, a run folder this run may not use.

    Args:
        run_dir: the ``--output-dir``.
        resume: ``--resume`` was given (the folder must hold a checkpoint).
        overwrite: ``--overwrite`` was given (a run there is replaced).

    Raises:
        RunFolderError: both flags, a folder holding a run without either flag, ``--resume``
            without a checkpoint, a path that is a file, a folder that cannot be written, or a
            folder locked by a running process.
    """
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: continue the run or replace it, not both")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--output-dir {run_dir} is a file, not a folder; pass a folder")
    present = run_contents(run_dir) if run_dir.is_dir() else []
    if resume and not has_checkpoint(run_dir / CHECKPOINT_DIR):
        raise RunFolderError(
            f"--resume: no checkpoint in {run_dir / CHECKPOINT_DIR} (no epoch of that run finished); run without "
            "--resume (add --overwrite if the folder holds the rest of a run)"
        )
    if present and not (resume or overwrite):
        raise RunFolderError(
            f"{run_dir} already holds a run ({', '.join(present)}); pass --resume to continue it, --overwrite to "
            "replace it, or another --output-dir"
        )
    existing = _nearest_existing(run_dir)
    if not existing.is_dir():
        raise RunFolderError(f"--output-dir {run_dir}: {existing} is a file, not a folder; pass a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"cannot write into {existing} (no permission); pass a writable --output-dir")
    holder = RunLock(run_dir).holder()
    if holder is not None:
        raise RunFolderError(_locked_message(run_dir, holder))


def _locked_message(run_dir: Path, holder: Mapping[str, Any]) -> str:
    return (
        f"{run_dir} is in use by another run (process {holder.get('pid')} on {holder.get('host')}, since "
        f"{holder.get('since', '?')}); wait for it to end or pass another --output-dir (if that process is gone, "
        f"delete {run_dir / LOCK_FILE})"
    )


class RunLock:
    """``<run_dir>/run.lock``, created atomically (``O_CREAT | O_EXCL``) with this process's pid.

    Args:
        run_dir: the run folder (created with its parents on :meth:`acquire`).

    Raises:
        RunFolderError: on :meth:`acquire`, when a live process holds the lock.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock (``pid``, ``host``, ``since``), or ``None`` if free or stale."""
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # Half-written by a process that died between creating and writing it, or unreadable.
            return None if self._is_old() else {"pid": "?", "host": "?"}
        if not isinstance(record, dict):
            return None
        if record.get("host") == socket.gethostname() and not _pid_alive(record.get("pid")):
            return None
        return record

    def _is_old(self, seconds: float = 60.0) -> bool:
        import time

        try:
            return time.time() - self.path.stat().st_mtime > seconds
        except OSError:
            return True

    def acquire(self) -> RunLock:
        import datetime as _dt

        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is not None:
                    raise RunFolderError(_locked_message(self.path.parent, holder)) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(record, handle)
            self.held = True
            return self
        raise RunFolderError(f"could not take {self.path}: another process keeps re-creating it")

    def release(self) -> None:
        """Remove the lock if this object holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_run(run_dir: Path) -> list[str]:
    """Delete the run entries of ``run_dir`` (``--overwrite``), the :data:`HELDOUT_FILE` written from
    the run (another run holds out other rows: certifying the new one on the old file would use rows it
    trained on), and the hidden temporary folders an interrupted write of any of them left; other
    files are kept. Returns the removed names."""
    removed = []
    names = [*run_contents(run_dir), *([HELDOUT_FILE] if (run_dir / HELDOUT_FILE).exists() else [])]
    for entry in (*RUN_ENTRIES, HELDOUT_FILE):
        names += [path.name for path in leftovers(run_dir / entry)]
    for name in names:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(name)
    return removed


def lock_run_folder(run_dir: Path, overwrite: bool) -> RunLock:
    """Take the run folder: lock it and clear it on ``--overwrite``.

    Returns:
        The held :class:`RunLock` (release it when the run ends).

    Raises:
        RunFolderError: a live process holds the lock.
    """
    lock = RunLock(run_dir)
    with errors.deferred_signals():  # an interrupt here must not leave a lock without an owner
        lock.acquire()
    if overwrite:
        removed = clear_run(run_dir)
        if removed:
            logger.info("--overwrite: removed %s from %s", ", ".join(removed), run_dir)
    return lock


def record_run(run_dir: Path, record: Mapping[str, Any], backbone_config: Any, tokenizer: Any) -> None:
    """Save the backbone's config and tokenizer (:data:`BACKBONE_DIR`, which make the folder
    self-contained for :func:`recipes.run.trained.load_run`) and write ``run.json`` (``record``:
    recipe, task, model, config, data fingerprint, command). A run calls it once its inputs, and
    a resumed checkpoint, are checked.

    Raises:
        StorageError: the folder cannot be written (disk full, no permission).
    """
    try:
        staging = staging_folder(run_dir / BACKBONE_DIR)  # swapped in whole: a killed write leaves the old one
        try:
            backbone_config.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            replace_folder(staging, run_dir / BACKBONE_DIR)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed
        text = json.dumps(dict(record), indent=2)
        write_atomically(run_dir / RUN_FILE, [text])
    except OSError as error:
        raise errors.storage_error(error, f"writing into the run folder {run_dir}") from error


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """The ``run.json`` of a run folder: what :func:`claim_run_folder` recorded.

    Raises:
        ResumeMismatchError: the folder has no readable ``run.json`` (it is not a run folder), so
            nothing about the run can be checked.
    """
    path = run_dir / RUN_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise errors.ResumeMismatchError(f"{run_dir} has no {RUN_FILE}: what the run was made with cannot be "
                                         "checked; is it a run folder?") from None
    except (OSError, json.JSONDecodeError) as error:
        raise errors.ResumeMismatchError(f"{path} is unreadable ({error}); what the run was made with cannot be "
                                         "checked") from None
    return record
