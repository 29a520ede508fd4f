"""Writing a file so that a crash, a kill or a full disk never leaves half of it under its name."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["OutputPathError", "atomic_write", "check_output_path", "file_in_the_way", "fsync", "leftovers",
           "replace_folder", "staging_folder", "write_atomically"]


def fsync(path: str | os.PathLike[str]) -> None:
    """Flush a file or a folder (its entries) to disk, where the platform allows it; never raises."""
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


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(temporary)`` on a path beside ``path``, flush that file to disk, then rename it
    over ``path`` (``os.replace``, atomic on POSIX and Windows within one file system): readers see
    the old file or the new one, never a part of it.

    ``write`` creates the file itself (text, a figure, a copy...), so it gets the usual permissions.
    On any error the temporary file is removed and ``path`` is left as it was. The one atomic write
    of the library, the recipes and the benchmarks.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "note.txt"
        >>> atomic_write(path, lambda temporary: temporary.write_text("done", encoding="utf-8"))
        >>> path.read_text(encoding="utf-8")
        'done'
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(temporary)
        fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomically(path: str | os.PathLike[str], chunks: Iterable[str]) -> None:
    """Write ``chunks`` (text, UTF-8) to ``path`` with :func:`atomic_write`.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> write_atomically(folder / "rows.jsonl", ['{"a": 1}\\n', '{"a": 2}\\n'])
        >>> (folder / "rows.jsonl").read_text().count("\\n")
        2
    """
    def write(temporary: Path) -> None:
        with temporary.open("w", encoding="utf-8") as handle:
            for chunk in chunks:
                handle.write(chunk)

    atomic_write(path, write)


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


def staging_folder(target: Path) -> Path:
    """A new hidden folder beside ``target`` to write it in before a rename, with the permissions a plain
    ``mkdir`` would give (``tempfile.mkdtemp`` makes it 0700, which a renamed model folder would keep: other
    users and serving containers could not read it)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


def leftovers(target: Path, kinds: tuple[str, ...] = ("tmp", "old")) -> list[Path]:
    """What interrupted writes of ``target`` left beside it, sorted: its staging folders and temporary files
    (``"tmp"``: ``.<name>.tmp-*``, :func:`staging_folder`, :func:`atomic_write`) and old versions that
    :func:`replace_folder` had moved aside (``"old"``: ``.<name>.old-*``)."""
    if not target.parent.is_dir():
        return []
    name = glob.escape(target.name)
    return sorted(path for kind in kinds for path in target.parent.glob(f".{name}.{kind}-*"))


def replace_folder(staging: Path, target: Path) -> None:
    """Rename ``staging`` (e.g. a :func:`staging_folder`) to ``target``; an old ``target`` is moved aside
    first, as ``.<name>.old-<pid>-<random>``, and removed last. A process killed between the two renames
    leaves no ``target``, only that folder (``AdaptiveEncoder.from_pretrained`` names it)."""
    if not target.exists():
        staging.rename(target)
        return
    # A name no other save uses: a process killed mid-swap leaves its folder, and PIDs repeat (containers).
    retired = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    target.rename(retired)
    try:
        staging.rename(target)
    except BaseException:
        retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
