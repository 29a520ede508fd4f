"""Writing a file so that a crash, a kill or a full disk never leaves half of it under its name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["OutputPathError", "check_output_path", "file_in_the_way", "write_atomically"]


def write_atomically(path: str | os.PathLike[str], chunks: Iterable[str]) -> None:
    """Write ``chunks`` (text) to a temporary file beside ``path``, flush it to disk, then rename
    it over ``path`` (``os.replace``, atomic on POSIX and Windows within one file system).

    On any error the temporary file is removed and ``path`` is left as it was.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> write_atomically(folder / "rows.jsonl", ['{"a": 1}\\n', '{"a": 2}\\n'])
        >>> (folder / "rows.jsonl").read_text().count("\\n")
        2
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def file_in_the_way(path: str | os.PathLike[str]) -> Path | None:
    """The nearest existing folder above ``path`` when it is a file (no folder can be made under it), else ``None``."""
    parent = next((parent for parent in Path(path).parents if parent.exists()), None)
    return parent if parent is not None and not parent.is_dir() else None


class OutputPathError(ValueError):
    """An output file cannot be written where it was asked for (the message says why and what to do)."""


def check_output_path(path: str | os.PathLike[str], *, create_parents: bool = False) -> Path:
    """``path`` if a file can be written there; call it before any work, so that a bad path costs nothing.

    Refuses a folder, a parent that is a file, a missing parent folder (unless ``create_parents``:
    then it is created, as by ``mkdir -p``), a folder where no file can be created (read-only, no
    permission, full: a probe file is created and removed) and an existing read-only file. The one
    check of predict's, calibrate's and the benchmarks' output files.

    Raises:
        OutputPathError: what is wrong with ``path``, in one line.

    Example:
        >>> import tempfile
        >>> check_output_path(Path(tempfile.mkdtemp()) / "new" / "table.json", create_parents=True).name
        'table.json'
        >>> check_output_path(tempfile.gettempdir())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        adaptive_depth.files.OutputPathError: output ... is a folder; give a file name, e.g. .../results.json.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"output {path} is a folder; give a file name, e.g. {path / 'results.json'}.")
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise OutputPathError(f"output {path}: {blocking} is a file, not a folder.")
    parent = path.parent
    if not parent.exists():
        if not create_parents:
            raise OutputPathError(f"output folder {parent} does not exist; create it first.")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputPathError(f"output {path}: cannot create {parent} ({error.strerror or error}); "
                                  "choose another place.") from None
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as error:
        raise OutputPathError(f"cannot write in {parent} ({error.strerror or error}); choose another output "
                              "place.") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"output {path} exists and is read-only; choose another output place.")
    return path
