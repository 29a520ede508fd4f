"""One run per folder: the ownership checks, the lock, the run's identity and the resume comparison.

A run folder (``--output-dir``) belongs to one run:

* :func:`check_run_folder` (no side effects, before anything is loaded) refuses a folder that
  holds a run unless ``--resume`` (continue it) or ``--overwrite`` (replace it) is given, and a
  folder that cannot be written;
* :class:`RunLock` (``run.lock``, created with ``O_EXCL``) keeps a second process out while a
  run is in progress; a lock whose process is gone (same host, pid no longer alive) is stale and
  taken over;
* ``run.json`` records what the run is: recipe, task, model, config and the data it trains on
  (folder and a SHA-256 of the rows, :func:`data_fingerprint`); ``--resume`` and
  ``benchmarks.tradeoff`` compare it with what they are asked to run (:func:`config_differences`).

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp()) / "run"
    >>> check_run_folder(folder, resume=False, overwrite=False)  # a new folder is fine
    >>> with RunLock(folder):
    ...     (folder / LOCK_FILE).is_file()
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from recipes.errors import RunFolderError
from recipes.glue import get_task, read_split

__all__ = [
    "LOCK_FILE",
    "RUN_FILE",
    "RunLock",
    "check_epochs_recorded",
    "check_resume_epochs",
    "check_run_folder",
    "clear_run",
    "compare_data",
    "config_differences",
    "data_fingerprint",
    "run_contents",
]

LOCK_FILE = "run.lock"
RUN_FILE = "run.json"
# What a run writes into its folder; anything else there is left alone.
RUN_ENTRIES = ("checkpoint", "checkpoint.prev", "stage1_best.safetensors", "backbone", "model", "results.json",
               "plot.png", RUN_FILE)


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
    from recipes.checkpoint import has_checkpoint

    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: continue the run or replace it, not both")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--output-dir {run_dir} is a file, not a folder; pass a folder")
    present = run_contents(run_dir) if run_dir.is_dir() else []
    if resume and not has_checkpoint(run_dir / "checkpoint"):
        raise RunFolderError(
            f"--resume: no checkpoint in {run_dir / 'checkpoint'} (no epoch of that run finished); run without "
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
    """Delete the run entries of ``run_dir`` (``--overwrite``); other files are kept. Returns the
    removed names."""
    removed = []
    for name in run_contents(run_dir):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(name)
    return removed


def data_fingerprint(splits: Mapping[str, Sequence[Any]], data_dir: Path) -> dict[str, Any]:
    """What a run trains and is evaluated on: the resolved data folder, rows per split and one
    SHA-256 over every row's texts and label (in order).

    Args:
        splits: ``{split name: GlueExample list}`` as used (after ``max_*_rows``).
        data_dir: the GLUE data folder.
    """
    digest = hashlib.sha256()
    for name in sorted(splits):
        digest.update(f"[{name}]\n".encode())
        for example in splits[name]:
            digest.update(json.dumps([example.text_a, example.text_b, example.label]).encode("utf-8") + b"\n")
    return {"data_dir": str(Path(data_dir).expanduser().resolve()),
            "rows": {name: len(rows) for name, rows in sorted(splits.items())}, "sha256": digest.hexdigest()}


def run_examples(data_dir: Path, task: str, config: Any) -> tuple[list[Any], list[Any]]:
    """The train and first dev split rows a run with ``config`` reads, as :meth:`recipes.run.Run.setup`
    reads them (``max_train_rows``, ``max_eval_rows``); the held-out part is ``holdout_split`` of train."""
    glue_task = get_task(task)
    train = read_split(data_dir, glue_task, "train").examples[: config.max_train_rows or None]
    dev = read_split(data_dir, glue_task, glue_task.dev_splits[0]).examples[: config.max_eval_rows or None]
    return list(train), list(dev)


def split_fingerprint(data_dir: Path, task: str, config: Any, examples: tuple[list[Any], list[Any]] | None = None
                      ) -> dict[str, Any]:
    """:func:`data_fingerprint` of the rows a run with ``config`` reads, as
    :meth:`recipes.run.Run.setup` computes it (for ``benchmarks.tradeoff`` to check a run);
    ``examples``: those rows when already read (:func:`run_examples`)."""
    train, dev = examples if examples is not None else run_examples(data_dir, task, config)
    return data_fingerprint({"train": train, get_task(task).dev_splits[0]: dev}, data_dir)


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], allowed: Iterable[str],
                       config_class: type | None = None) -> list[str]:
    """``key: saved -> current`` for every config key that differs, except the ``allowed`` ones.

    With ``config_class`` (a config dataclass), a key that ``saved`` lacks is no difference when
    ``current`` holds that key's default: an option added after the run was made, whose default
    is what the run did.
    """
    allowed = set(allowed)
    defaults = {} if config_class is None else {
        field.name: field.default for field in dataclasses.fields(config_class)
        if field.default is not dataclasses.MISSING}
    keys = sorted((set(saved) | set(current)) - allowed)
    return [f"{key}: {saved.get(key, '(absent)')!r} -> {current.get(key, '(absent)')!r}"
            for key in keys if saved.get(key) != current.get(key)
            and not (key not in saved and key in defaults and current.get(key) == defaults[key])]


def compare_data(saved: Mapping[str, Any] | None, current: Mapping[str, Any], what: str) -> str | None:
    """A warning when only the data folder moved (same rows), ``None`` when all agrees.

    Raises:
        ResumeMismatchError: the rows differ (or ``saved`` is missing).
    """
    from recipes.errors import ResumeMismatchError

    if not saved or "sha256" not in saved:
        raise ResumeMismatchError(f"{what} records no data fingerprint (made by an older version); cannot check that "
                                  "it used the same data: start a new run (--overwrite or another --output-dir)")
    if saved["sha256"] != current["sha256"] or saved.get("rows") != current["rows"]:
        raise ResumeMismatchError(
            f"{what} was made on other data ({saved.get('data_dir')}, rows {saved.get('rows')}) than this run "
            f"({current['data_dir']}, rows {current['rows']}); use the same --data-dir and max_*_rows, or start a "
            "new run (--overwrite or another --output-dir)"
        )
    if saved.get("data_dir") != current["data_dir"]:
        return (f"{what} read its data from {saved.get('data_dir')}, this run from {current['data_dir']}; the rows are "
                "identical, so it continues")
    return None



def check_resume_epochs(saved: Mapping[str, Any], current: Mapping[str, Any], stage: int, epoch: int,
                        run_dir: Path, has_stage2: bool) -> None:
    """Refuse an epoch key (``stage1_epochs``, ``stage2_epochs``) that ``--resume`` changes for a
    stage that has trained an epoch; ``stage2_epochs`` may change while stage 2 has not started.

    A stage's learning rate warms up and decays to 0 over its epoch count, so changing it after
    the stage started would give a run that no uninterrupted run matches: raising it trains
    more epochs on a restarted schedule, lowering it below the epochs done would record epochs
    that were trained as not trained. Resumed runs are bit-identical to uninterrupted ones.

    Args:
        saved, current: the checkpoint's config and this run's (as dicts).
        stage, epoch: the checkpoint's stage (1 or 2) and last completed epoch (0-based).
        run_dir: the run folder (named in the advice).
        has_stage2: whether the method trains a stage 2.

    Raises:
        ResumeMismatchError: an epoch key changed for a started stage (says what to do instead).
    """
    from recipes.errors import ResumeMismatchError

    started = {1: epoch + 1 if stage == 1 else saved.get("stage1_epochs")}
    if has_stage2 and stage == 2:
        started[2] = epoch + 1
    for number, done in started.items():
        key = f"stage{number}_epochs"
        before, after = saved.get(key), current.get(key)
        if before == after or before is None:
            continue
        if after < done:
            what = f"it has trained {done} epoch(s), which {key}={after} cannot take back"
        elif stage > number or done >= before:
            what = (f"it finished its {before} epoch(s), with the learning rate decayed to 0; {key}={after} would "
                    "train more on a restarted schedule")
        else:
            what = (f"it is at epoch {done} of {before}, and its learning-rate schedule spans {key}, so it cannot "
                    "change mid-stage")
        if number == 1:
            fix = f"start a new run with {key}={after} (--overwrite or another --output-dir)"
        else:
            fix = f"train stage 2 again in a new run on this stage 1: --stage1-from {run_dir} --output-dir NEW {key}={after}"
        raise ResumeMismatchError(f"--resume with {key}={after}: stage {number} of the run in {run_dir} was trained "
                                  f"with {key}={before} and {what}. Resume with {key}={before}, or {fix}")


def check_epochs_recorded(history: Mapping[str, Sequence[Any]], config: Any, has_stage2: bool) -> None:
    """A last check before ``results.json`` is written: its history holds every epoch its config
    names, no more and no fewer (``RuntimeError`` otherwise: a bug, results must not claim it)."""
    expected = {"stage1": config.stage1_epochs, "stage2": config.stage2_epochs if has_stage2 else 0}
    for stage, epochs in expected.items():
        recorded = [record.epoch for record in history.get(stage, [])]
        if recorded != list(range(epochs)):
            raise RuntimeError(f"{stage} recorded epochs {recorded} but the config says {epochs}; results.json "
                               "would claim work that was not done")
