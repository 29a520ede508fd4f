"""The saved model folder's manifest: the SHA-256 of every file :func:`~adaptive_depth.pretrained.save_pretrained`
wrote, checked before the model is loaded.

``adaptive_manifest.json`` lists each file by its path inside the folder. Loading refuses a
folder where a listed file is missing, differs from its digest (one flipped bit in
``adaptive_heads.safetensors`` included), or where a file that is not listed was added (an extra
``added_tokens.json`` or ``pytorch_model.bin`` would change what loads). Hidden files (``.cache/``,
``.gitattributes``) and a ``README.md`` model card are not checked: the Hub adds them. Load with
``verify=False`` (``--no-verify`` on the command lines) after a deliberate edit. A folder saved
before manifests existed loads with a warning (save it again to add one).

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "config.json").write_text("{}")
    >>> write_manifest(folder)
    >>> verify_model_folder(folder)
    >>> _ = (folder / "config.json").write_text("{ }")
    >>> verify_model_folder(folder)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    adaptive_depth.model_folder.ModelFolderError: ...config.json differs from the file save_pretrained wrote ...
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from adaptive_depth.files import write_atomically
from adaptive_depth.storage import file_sha256

__all__ = ["MANIFEST_NAME", "ModelFolderError", "verify_model_folder", "write_manifest"]

MANIFEST_NAME = "adaptive_manifest.json"
MANIFEST_FORMAT_VERSION = 1
_NOT_CHECKED = ("README.md",)
_OPT_OUT = "pass verify=False (--no-verify) if the change was deliberate"


class ModelFolderError(ValueError):
    """A saved model folder is damaged: a file is missing, truncated, edited or of the wrong form.
    The message names the file (and the field or tensor) and says how to fix it."""


def _checked_files(folder: Path) -> set[str]:
    """Paths (``/``-separated, relative to ``folder``) of the files the manifest covers."""
    names = set()
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if relative.parts[0].startswith(".") or relative.as_posix() in (*_NOT_CHECKED, MANIFEST_NAME):
            continue
        if path.is_file():
            names.add(relative.as_posix())
    return names


def write_manifest(folder: str | Path) -> None:
    """Write ``adaptive_manifest.json`` into ``folder``: the SHA-256 of every file already there."""
    folder = Path(folder)
    digests = {name: file_sha256(folder / name) for name in sorted(_checked_files(folder))}
    record = {"format_version": MANIFEST_FORMAT_VERSION, "sha256": digests}
    write_atomically(folder / MANIFEST_NAME, [json.dumps(record, indent=2) + "\n"])  # never half-written


def _read_manifest(folder: Path) -> dict[str, str] | None:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"{path} is damaged ({error}); save the model again, or {_OPT_OUT}") from error
    if not isinstance(record, dict) or record.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise ModelFolderError(f"{path}: field 'format_version' must be {MANIFEST_FORMAT_VERSION}; save the model "
                               f"again, or {_OPT_OUT}")
    digests = record.get("sha256")
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise ModelFolderError(f"{path}: field 'sha256' must map file names to hex digests; save the model again, "
                               f"or {_OPT_OUT}")
    return digests


def verify_model_folder(folder: str | Path) -> None:
    """Check every file of a saved model against ``adaptive_manifest.json``.

    A folder without a manifest (saved before adaptive_depth wrote one) loads with a warning.

    Raises:
        ModelFolderError: an unreadable manifest, a listed file missing or with another digest, or
            a file the manifest does not list (the message names the first such file).
    """
    folder = Path(folder)
    recorded = _read_manifest(folder)
    if recorded is None:
        warnings.warn(f"{folder} has no {MANIFEST_NAME} (saved by an older adaptive_depth): its files are loaded "
                      "unchecked; save the model again to add one", UserWarning, stacklevel=3)
        return
    present = _checked_files(folder)
    for name in sorted(recorded):
        if name not in present:
            raise ModelFolderError(f"{folder / name} is missing ({MANIFEST_NAME} lists it): the saved model is "
                                   f"incomplete; copy or save it again, or {_OPT_OUT}")
    extra = sorted(present - set(recorded))
    if extra:
        raise ModelFolderError(f"{folder / extra[0]} is not a file save_pretrained wrote ({MANIFEST_NAME} does not list "
                               f"it) and could change what loads; remove it, or {_OPT_OUT}")
    for name, digest in sorted(recorded.items()):
        if file_sha256(folder / name) != digest:
            raise ModelFolderError(f"{folder / name} differs from the file save_pretrained wrote (its SHA-256 is not "
                                   f"the one in {MANIFEST_NAME}): it is damaged or was edited; save or copy the model "
                                   f"again, or {_OPT_OUT}")
