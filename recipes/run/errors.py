"""The user-facing failures of the recipes and benchmarks, and the one error boundary of their CLIs.

Every error here is something the user can fix (a wrong option, a used run folder, a diverged
training run, a full disk); :func:`error_boundary` turns it into one line on stderr,
``error: <what was wrong>; <how to fix it>``, and exit status 2. Anything else is a bug and
keeps its traceback.

Interruptions (SIGINT, SIGTERM) are :class:`Interrupted`: a ``BaseException``, like
``KeyboardInterrupt``, so no ``except Exception`` swallows them; the boundary prints how to resume
and exits 130 (SIGINT) or 143 (SIGTERM).

Example:
    >>> from recipes.run.errors import RunFolderError, error_boundary
    >>> def main() -> int:
    ...     with error_boundary() as outcome:
    ...         raise RunFolderError("runs/x holds a run; pass --resume or --overwrite")
    ...     return outcome.status
    >>> main()  # stderr: error: runs/x holds a run; pass --resume or --overwrite
    2
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from adaptive_depth.storage import ENVIRONMENT_ERRNOS, storage_errno

__all__ = [
    "CheckpointError",
    "ConfigError",
    "InputCheckError",
    "ModelLoadError",
    "Interrupted",
    "RecipeError",
    "ResumeMismatchError",
    "RunFolderError",
    "StorageError",
    "TrainingDivergedError",
    "USER_OS_ERRNOS",
    "catch_signals",
    "deferred_signals",
    "error_boundary",
    "one_line",
    "storage_error",
]


class RecipeError(Exception):
    """A failure the user can fix; the message says what was wrong and how to fix it."""


class ConfigError(RecipeError, ValueError):
    """A config file or ``key=value`` override is invalid; the message says which key and why."""


class CheckpointError(RecipeError, RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the current run."""


class ResumeMismatchError(CheckpointError):
    """``--resume`` (or a reused run) with another config, data set or model than the run's own."""


class RunFolderError(RecipeError):
    """The run folder holds another run, is locked by a running process, or is not writable."""


class InputCheckError(RecipeError, ValueError):
    """Inputs that would train silently on something wrong: a model without tokenizer files, a
    tokenizer larger than the model's vocabulary, ``max_length`` beyond the position table."""


class ModelLoadError(RecipeError, FileNotFoundError):
    """A ``--model`` that cannot be loaded: no such folder or id, no config, corrupt weights."""


class StorageError(RecipeError):
    """Writing a run's files failed (disk full, no permission); the previous checkpoint is kept."""


class TrainingDivergedError(RecipeError, FloatingPointError):
    """A non-finite loss or parameter: training diverged (the message says which lr to lower)."""


class Interrupted(BaseException):  # noqa: N818 (named like KeyboardInterrupt)
    """SIGINT or SIGTERM arrived; ``signal_number`` says which."""

    def __init__(self, signal_number: int) -> None:
        self.signal_number = int(signal_number)
        super().__init__(signal.Signals(self.signal_number).name)

    @property
    def exit_status(self) -> int:
        """128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports it."""
        return 128 + self.signal_number


# OSErrors that are the user's environment, not a bug: no space, no permission, read-only.
USER_OS_ERRNOS = ENVIRONMENT_ERRNOS

_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or pass another --output-dir",
    errno.EDQUOT: "the disk quota is exceeded: free some space or pass another --output-dir",
    errno.EACCES: "no permission: pass a writable --output-dir",
    errno.EPERM: "no permission: pass a writable --output-dir",
    errno.EROFS: "the file system is read-only: pass a writable --output-dir",
}


def one_line(text: str) -> str:
    """``text`` with its line breaks folded, for a one-line ``error: ...`` message."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


@dataclass
class Outcome:
    """What :func:`error_boundary` decided: ``status`` 0 (no error), 2, 130 or 143."""

    status: int = 0


@contextmanager
def error_boundary(on_interrupt: Callable[[Interrupted], str] | None = None,
                   handled: tuple[type[BaseException], ...] = ()) -> Iterator[Outcome]:
    """Turn the known user-facing failures into ``error: ...`` on stderr and an exit status.

    Args:
        on_interrupt: ``(Interrupted) -> message`` printed on SIGINT/SIGTERM (how to resume).
        handled: further exception types to report as user errors (e.g. ``GlueDataError``).

    Yields:
        an :class:`Outcome` whose ``status`` is set on the way out (2 for a user error,
        130/143 for an interruption).
    """
    outcome = Outcome()
    try:
        yield outcome
    except (RecipeError, *handled) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        outcome.status = 2
    except FloatingPointError as error:  # the engine met NaN/inf logits: the weights it runs diverged
        print(f"error: {one_line(error).rstrip('.')}; training diverged: lower the learning rates (stage1_lr, "
              "stage2_lr) and start again with --overwrite", file=sys.stderr)
        outcome.status = 2
    except Exception as error:  # a full or read-only disk, whichever writer (torch, safetensors) met it
        number = storage_errno(error)
        if number is None:
            raise
        filename = getattr(error, "filename", None)
        where = f" ({filename})" if filename else ""
        print(f"error: {os.strerror(number)}{where}; {_OS_HINTS[number]}", file=sys.stderr)
        outcome.status = 2
    except (Interrupted, KeyboardInterrupt) as error:
        interrupt = error if isinstance(error, Interrupted) else Interrupted(signal.SIGINT)
        message = on_interrupt(interrupt) if on_interrupt is not None else ""
        print(f"interrupted ({signal.Signals(interrupt.signal_number).name}){'; ' + message if message else ''}",
              file=sys.stderr)
        outcome.status = interrupt.exit_status


def storage_error(error: BaseException, action: str) -> BaseException:
    """A :class:`StorageError` naming ``action`` for a failure of the user's storage (a full disk,
    no permission, read-only), whichever writer raised it: Python's ``OSError``, torch's
    ``RuntimeError`` or safetensors' ``SafetensorError`` (:func:`adaptive_depth.storage.storage_errno`);
    any other error (a bug) is returned unchanged for re-raising."""
    number = storage_errno(error)
    if number is None:
        return error
    filename = getattr(error, "filename", None)
    where = f" {filename}" if filename else ""
    return StorageError(f"{action} failed:{where} {os.strerror(number)}; {_OS_HINTS[number]}")


_deferred: list[int] = []
_deferring = [0]


def _raise_interrupted(signal_number: int, frame: object) -> None:
    if _deferring[0]:
        _deferred.append(signal_number)
        return
    raise Interrupted(signal_number)


@contextmanager
def catch_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` (the current step is
    abandoned; a checkpoint being written is finished first, see :func:`deferred_signals`).

    Outside the main thread (where Python cannot install handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferred.clear()
    previous = {number: signal.signal(number, _raise_interrupted) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _deferred.clear()


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Within the block a SIGINT/SIGTERM is held back and raised as :class:`Interrupted` at its
    end, so that a checkpoint is written whole before the run stops."""
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1
    if not _deferring[0] and _deferred:
        number = _deferred[0]
        _deferred.clear()
        raise Interrupted(number)
