"""The files of an export folder: the manifest's format and records (criterion, MACs), the
output-folder checks and the one-line storage errors, and the exporters' messages."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from adaptive_depth.config import criterion_from_name, criterion_spec
from adaptive_depth.exits import ExitCriterion
from adaptive_depth.files import file_in_the_way
from adaptive_depth.storage import storage_errno

if TYPE_CHECKING:
    from adaptive_depth.encoder import AdaptiveEncoder

__all__ = ["LOG_NAME", "MANIFEST_VERSION", "ExportStorageError", "check_output_dir", "cost_record",
           "criterion_from_record", "criterion_record", "quadratic_at", "quiet_exporters", "storage_error"]

# 2: criterion as config.criterion_spec's {"name", "threshold", "options"}; labels, lengths, MACs, tokenizer.
MANIFEST_VERSION = 2
LOG_NAME = "export.log"
# The lengths whose MACs the manifest stores: every count here is a polynomial of degree <= 2 in the length.
COST_LENGTHS = (1, 2, 3)
# What a storage failure of the environment means for the user (adaptive_depth.storage recognises it).
_STORAGE_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                    errno.EACCES: "no permission to write there", errno.EPERM: "no permission to write there",
                    errno.EROFS: "the file system is read-only"}


class ExportStorageError(OSError):
    """The output folder cannot be written (read-only, no permission, disk full, under a file)."""


def storage_error(error: BaseException, target: Path) -> ExportStorageError | None:
    """A one-line :class:`ExportStorageError` for a write that failed for the environment's reasons
    (:func:`adaptive_depth.storage.storage_errno`: the error, its message or what it was raised
    from), else ``None`` (a bug: re-raise it as it is)."""
    number = storage_errno(error)
    if number is None:
        return None
    cause = next((item for item in (error, error.__cause__, error.__context__) if isinstance(item, OSError)), None)
    where = f" ({cause.filename})" if cause is not None and cause.filename else ""
    converted = ExportStorageError(f"cannot write the export to {target}: {_STORAGE_REASONS[number]}{where}; "
                                   "free some space or choose a writable folder.")
    converted.errno = number  # the message stays one line, without "[Errno N]"
    return converted


def check_output_dir(out_dir: str | Path) -> Path:
    """Check, before any work, that ``out_dir`` can be created; creates its missing parent folders.

    Raises:
        FileExistsError: ``out_dir`` exists.
        ExportStorageError: a parent is a file, or the parent folder cannot be written to
            (read-only, no permission, disk full).

    Example:
        >>> import tempfile; check_output_dir(Path(tempfile.mkdtemp()) / "new" / "exported").name
        'exported'
    """
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() or out_dir.is_symlink():
        raise FileExistsError(f"{out_dir} already exists; choose a new folder or delete it first.")
    blocking = file_in_the_way(out_dir)
    if blocking is not None:
        raise ExportStorageError(f"cannot create {out_dir}: {blocking} is a file, not a folder; choose another path.")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)  # missing parents are created, as by mkdir -p
        Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-check-", dir=out_dir.parent)).rmdir()
    except OSError as error:
        converted = storage_error(error, out_dir)
        if converted is None:
            raise
        raise converted from None
    return out_dir


def quadratic_at(values: Sequence[int], length: int | Tensor) -> int | Tensor:
    """The value at ``length`` of the polynomial of degree <= 2 through ``values`` at lengths 1, 2, 3.

    Exact in integers (Lagrange form; ``(n-2)(n-3)`` and ``(n-1)(n-2)`` are even). ``length`` may be
    a tensor of lengths (then ``values`` may be tensors too, broadcast against it).

    Example:
        >>> quadratic_at([1, 4, 9], 7)  # n ** 2
        49
    """
    first, second, third = values
    n = length
    return first * ((n - 2) * (n - 3) // 2) - second * ((n - 1) * (n - 3)) + third * ((n - 1) * (n - 2) // 2)


def cost_record(encoder: AdaptiveEncoder, max_length: int) -> dict[str, Any]:
    """Exact-convention MACs of each step at lengths 1, 2, 3 (:func:`quadratic_at` gives any length).

    Checked against :func:`adaptive_depth.flops.encoder_cost` at two more lengths, so a count that
    stopped being quadratic in the length fails the export instead of the runtime's costs.
    """
    from adaptive_depth.flops import encoder_cost

    costs = [encoder_cost(encoder, length, "exact", fused=False) for length in COST_LENGTHS]  # export traces unfused
    record = {
        "convention": "exact", "lengths": list(COST_LENGTHS),
        "embedding": [cost.embedding for cost in costs],
        **{part: [[getattr(cost, part)[step] for cost in costs] for step in range(encoder.num_steps)]
           for part in ("layers", "gates", "heads")},
    }
    for length in {7, max(max_length, 4)}:
        expected = encoder_cost(encoder, length, "exact", fused=False)
        parts = (record["embedding"], *record["layers"], *record["gates"], *record["heads"])
        if [quadratic_at(values, length) for values in parts] != [expected.embedding, *expected.layers,
                                                                  *expected.gates, *expected.heads]:
            raise RuntimeError(f"the exact MACs at length {length} are not quadratic in the length; the "
                               "exported cost record would be wrong (a bug in adaptive_depth: please report it).")
    return record


_EXPORTER_PACKAGES = ("torch", "onnxscript", "onnx_ir", "onnx")


class _ListHandler(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.WARNING)  # what the exporters show by default (torch.__trace logs at DEBUG)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@contextlib.contextmanager
def quiet_exporters(verbose: bool) -> Iterator[list[str]]:
    """Collect what torch.export / torch.onnx / onnxscript print (warnings, log records, stdout and
    stderr) into the yielded list, unless ``verbose``. On an error they are printed to stderr."""
    messages: list[str] = []
    if verbose:
        yield messages
        return
    # torch._logging gives some child loggers ("torch.onnx"...) handlers of their own and stops their
    # propagation: take over every logger of the exporters' packages that has handlers, and the roots.
    names = {name for name, logger in logging.root.manager.loggerDict.items()
             if name.split(".")[0] in _EXPORTER_PACKAGES and isinstance(logger, logging.Logger) and logger.handlers}
    loggers = [logging.getLogger(name) for name in sorted(names | set(_EXPORTER_PACKAGES))]
    saved = [(logger.handlers[:], logger.propagate) for logger in loggers]
    handler = _ListHandler(messages)
    for logger in loggers:
        logger.handlers, logger.propagate = [handler], False
    out, err = io.StringIO(), io.StringIO()
    failed = False
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            try:
                yield messages
            finally:
                messages.extend(f"{warning.category.__name__}: {warning.message}" for warning in caught)
    except BaseException:
        failed = True
        raise
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved):
            logger.handlers, logger.propagate = handlers, propagate
        messages.extend(line for line in (out.getvalue() + err.getvalue()).splitlines() if line.strip())
        if failed and messages:
            print("\n".join(["export messages before the error:", *messages]), file=sys.stderr)


def criterion_record(criterion: ExitCriterion) -> dict[str, Any]:
    """``{"name", "threshold", "options"}`` (:func:`adaptive_depth.config.criterion_spec`)."""
    try:
        name, threshold, options = criterion_spec(criterion)
    except TypeError as error:
        raise ValueError(f"cannot export the exit criterion: {error}") from None
    return {"name": name, "threshold": threshold, "options": options}


def criterion_from_record(record: dict[str, Any]) -> ExitCriterion:
    """The criterion a manifest's ``"criterion"`` names (:func:`adaptive_depth.config.criterion_from_name`)."""
    return criterion_from_name(record["name"], record["threshold"], record.get("options"))
