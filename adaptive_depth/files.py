"""Writing a file so that a crash, a kill or a full disk never leaves half of it under its name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["write_atomically"]


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
