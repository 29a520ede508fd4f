"""Saving and loading a trained :class:`~adaptive_depth.AdaptiveEncoder` as one folder.

Layout of a saved model (the backbone files are plain Hugging Face files, so
``AutoModel.from_pretrained(folder)`` still loads the backbone alone)::

    folder/
      config.json, model.safetensors     the backbone (base model), HF format
      adaptive_config.json               AdaptiveEncoderConfig: wrapper + operating point
      adaptive_heads.safetensors         gates and exit heads
      tokenizer.json, vocab.txt, ...     the tokenizer, when one was given

The folder is written beside its destination and renamed into place, so a crash never leaves
a half-written model under the destination's name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adaptive_depth.config import AdaptiveEncoderConfig
from adaptive_depth.storage import as_storage_error

if TYPE_CHECKING:
    from adaptive_depth.encoder import AdaptiveEncoder

__all__ = ["ADAPTIVE_CONFIG_NAME", "ADAPTIVE_WEIGHTS_NAME", "load_pretrained", "resolve_model_dir", "save_pretrained"]

ADAPTIVE_CONFIG_NAME = "adaptive_config.json"
ADAPTIVE_WEIGHTS_NAME = "adaptive_heads.safetensors"


def _wrapper_state(encoder: AdaptiveEncoder) -> dict[str, torch.Tensor]:
    """The gates' and heads' weights (everything but the backbone), contiguous, on the CPU."""
    return {
        key: value.detach().to("cpu").contiguous()
        for key, value in encoder.state_dict().items()
        if not key.startswith("backbone.")
    }


def save_pretrained(encoder: AdaptiveEncoder, save_directory: str | os.PathLike[str], tokenizer: Any = None,
                    overwrite: bool = True) -> Path:
    """Write ``encoder`` (and ``tokenizer``) to ``save_directory``, atomically.

    Args:
        encoder: the model to save; its :attr:`~adaptive_depth.AdaptiveEncoder.adaptive_config`
            (operating point included) is saved with it.
        save_directory: destination folder; created with its parents.
        tokenizer: saved beside the model when given (``AdaptivePipeline`` needs one).
        overwrite: replace an existing saved model there (never a folder that is not one).

    Returns:
        The destination folder.

    Raises:
        FileExistsError: the destination exists and is not an empty folder or a saved model,
            or is a saved model and ``overwrite`` is False.
        OSError: the disk is full or not writable (``errno`` ``ENOSPC``, ``EROFS``..., also when
            safetensors or torch raised it); the destination is left as it was.
    """
    from safetensors.torch import save_file

    target = Path(save_directory)
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is a file; choose a folder name for the model.")
        is_model = (target / ADAPTIVE_CONFIG_NAME).is_file()
        if any(target.iterdir()) and not is_model:
            raise FileExistsError(
                f"{target} exists and holds files that are not a saved adaptive model; choose another folder."
            )
        if is_model and not overwrite:
            raise FileExistsError(f"{target} already holds a saved model; pass overwrite=True to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        config = encoder.adaptive_config
        config.attn_implementation = getattr(encoder.config, "_attn_implementation", None)
        encoder.backbone.save_pretrained(staging)
        save_file(_wrapper_state(encoder), str(staging / ADAPTIVE_WEIGHTS_NAME), metadata={"format": "pt"})
        config.save(staging / ADAPTIVE_CONFIG_NAME)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _replace_folder(staging, target)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        storage = as_storage_error(error, target) if isinstance(error, Exception) else None
        if storage is None or storage is error:
            raise
        raise storage from error
    return target


def _replace_folder(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an old ``target`` is moved aside first and removed last."""
    if not target.exists():
        staging.rename(target)
        return
    retired = target.parent / f".{target.name}.old-{os.getpid()}"
    target.rename(retired)
    try:
        staging.rename(target)
    except BaseException:
        retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def resolve_model_dir(name_or_path: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local folder holding a saved model: ``name_or_path`` itself, or a Hub snapshot of it.

    Raises:
        FileNotFoundError: neither a folder with ``adaptive_config.json`` nor a downloadable Hub id.
    """
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / ADAPTIVE_CONFIG_NAME).is_file():
            hint = " (it looks like a plain Hugging Face model: wrap it with AdaptiveEncoder(model))" if (
                path / "config.json").is_file() else ""
            raise FileNotFoundError(
                f"{path} has no {ADAPTIVE_CONFIG_NAME}; it is not a model saved by "
                f"AdaptiveEncoder.save_pretrained{hint}."
            )
        return path
    text = str(name_or_path)
    looks_like_hub_id = text.count("/") <= 1 and not text.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_hub_id:
        raise FileNotFoundError(f"{text} is not a folder holding a saved adaptive model.")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id=str(name_or_path), revision=revision))
    except Exception as error:  # offline, unknown repo, no access: all mean "cannot get it"
        raise FileNotFoundError(
            f"{name_or_path!r} is not a local folder, and downloading it from the Hugging Face Hub failed "
            f"({type(error).__name__}: {error})."
        ) from error
    return resolve_model_dir(folder)


def load_pretrained(
    encoder_class: type[AdaptiveEncoder],
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
) -> AdaptiveEncoder:
    """Rebuild a model saved by :func:`save_pretrained`, in eval mode (what
    :meth:`AdaptiveEncoder.from_pretrained <adaptive_depth.AdaptiveEncoder.from_pretrained>` calls).

    Args:
        encoder_class: the class to build (:class:`~adaptive_depth.AdaptiveEncoder` or a subclass).
        name_or_path: the saved folder, or a Hugging Face Hub id of one.
        dtype: load the backbone (and so the gates and heads) in this dtype; default: as saved.
        device: where to put the model (default: the CPU).
        attn_implementation: ``"sdpa"``, ``"eager"``...; default: the one it was saved with.
        revision: Hub revision, for Hub ids.

    Raises:
        FileNotFoundError: no saved model there.
        ValueError: the gate/head weights do not match the saved config.
    """
    from safetensors.torch import load_file
    from transformers import AutoModel

    folder = resolve_model_dir(name_or_path, revision)
    config = AdaptiveEncoderConfig.load(folder / ADAPTIVE_CONFIG_NAME)
    weights_path = folder / ADAPTIVE_WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{folder} has no {ADAPTIVE_WEIGHTS_NAME}; the saved model is incomplete.")
    options: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto"}
    implementation = attn_implementation or config.attn_implementation
    if implementation:
        options["attn_implementation"] = implementation
    backbone = AutoModel.from_pretrained(str(folder), **options)
    encoder = encoder_class(backbone, **config.architecture_kwargs())
    encoder.adaptive_config = config
    state = load_file(str(weights_path))
    expected = set(_wrapper_state(encoder))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not fit the model its config describes: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; the saved model is damaged or from another version."
        )
    encoder.load_state_dict(state, strict=False)
    if device is not None:
        encoder.to(device)
    return encoder.eval()
