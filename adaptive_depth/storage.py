"""Recognising a storage failure of the user's environment (a full disk, an exceeded quota, no
permission, a read-only file system) in whatever error a writer raised.

Python raises ``OSError`` with an ``errno``; the other writers a model save goes through do not:
safetensors raises ``SafetensorError("... No space left on device (os error 28)")``, and
``torch.save`` raises ``RuntimeError`` ("unexpected pos ...") from the ``OSError`` its file object
raised (given a path instead of a file object it loses the cause entirely, so write through a
Python file object). :func:`storage_errno` finds the errno in the error, its message or the
errors it was raised from; :func:`as_storage_error` turns such an error into a plain ``OSError``,
which callers report as one line.

Example:
    >>> import errno
    >>> storage_errno(RuntimeError("I/O error: No space left on device (os error 28)")) == errno.ENOSPC
    True
    >>> storage_errno(RuntimeError("size mismatch")) is None
    True
"""

from __future__ import annotations

import errno
import hashlib
import os
import re

__all__ = ["ENVIRONMENT_ERRNOS", "as_storage_error", "file_sha256", "storage_errno"]

# The errnos that are the user's environment, not a bug.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})

# Messages that name one of them without an errno attribute ("(os error 28)": Rust's io::Error).
_MESSAGE_ERRNOS = {os.strerror(number).lower(): number for number in ENVIRONMENT_ERRNOS}
_NUMBERED = re.compile(r"(?:os error|errno)\s*(\d+)", re.IGNORECASE)


def _own_errno(error: BaseException) -> int | None:
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno if error.errno in ENVIRONMENT_ERRNOS else None
    message = str(error).lower()
    for number in (int(found) for found in _NUMBERED.findall(message)):
        if number in ENVIRONMENT_ERRNOS:
            return number
    return next((number for text, number in _MESSAGE_ERRNOS.items() if text in message), None)


def storage_errno(error: BaseException) -> int | None:
    """The errno of a storage failure of the environment that ``error`` is or was raised from
    (:data:`ENVIRONMENT_ERRNOS`: ``ENOSPC``, ``EDQUOT``, ``EACCES``, ``EPERM``, ``EROFS``), else ``None``.

    Looks at ``error`` (its ``errno``, or its message: ``"No space left on device"``,
    ``"os error 28"``) and then along ``__cause__`` / ``__context__``.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        number = _own_errno(current)
        if number is not None:
            return number
        current = current.__cause__ or current.__context__
    return None


def as_storage_error(error: BaseException, filename: str | os.PathLike[str] | None = None) -> OSError | None:
    """``error`` as an ``OSError`` with the errno of the storage failure it holds (``error`` itself
    when it is one already), or ``None`` when it is not such a failure (a bug: re-raise it).

    Example:
        >>> as_storage_error(RuntimeError("No space left on device"), "model/x.safetensors")
        OSError(28, 'No space left on device')
    """
    number = storage_errno(error)
    if number is None:
        return None
    if isinstance(error, OSError) and error.errno == number:
        return error
    converted = OSError(number, os.strerror(number), None if filename is None else os.fspath(filename))
    converted.__cause__ = error
    return converted


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
