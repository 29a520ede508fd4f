"""Saving and loading a trained :class:`~adaptive_depth.AdaptiveEncoder` as one folder.

Layout of a saved model (the backbone files are plain Hugging Face files, so
``AutoModel.from_pretrained(folder)`` still loads the backbone alone)::

    folder/
      config.json, model.safetensors     the backbone (base model), HF format; for a model attached to
                                         its own classifier (``from_classifier``), the whole
                                         ``*ForSequenceClassification``
      adaptive_config.json               AdaptiveEncoderConfig: wrapper + operating point
      adaptive_heads.safetensors         gates and exit heads
      tokenizer.json, vocab.txt, ...     the tokenizer, when one was given
      adaptive_manifest.json             the SHA-256 of every file above (adaptive_depth.model_folder)

The folder is written beside its destination and renamed into place, so a crash never leaves
a half-written model under the destination's name; a full disk is reported as an ``OSError``
(``ENOSPC``) whichever writer hit it (adaptive_depth.storage). Loading checks the manifest
(``verify=False`` skips it) and turns a damaged file into one :class:`ModelFolderError` naming
the file and the field or tensor.
"""

from __future__ import annotations

import os
import shlex
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adaptive_depth.classifiers import is_attached
from adaptive_depth.config import AdaptiveEncoderConfig
from adaptive_depth.files import leftovers, replace_folder, staging_folder
from adaptive_depth.hub import HubTimeoutError, OFFLINE_HINT, download_snapshot, looks_like_hub_id
from adaptive_depth.model_folder import ModelFolderError, verify_model_folder, write_manifest
from adaptive_depth.storage import as_storage_error
from adaptive_depth.text_pipeline import has_tokenizer

if TYPE_CHECKING:
    from adaptive_depth.encoder import AdaptiveEncoder

__all__ = ["ADAPTIVE_CONFIG_NAME", "ADAPTIVE_WEIGHTS_NAME", "ModelFolderError", "load_pretrained", "resolve_model_dir",
           "save_pretrained"]

ADAPTIVE_CONFIG_NAME = "adaptive_config.json"
ADAPTIVE_WEIGHTS_NAME = "adaptive_heads.safetensors"


def _wrapper_state(encoder: AdaptiveEncoder) -> dict[str, torch.Tensor]:
    """The gates' and heads' weights (all but the Hugging Face model's, see :func:`_hf_model`), on the CPU."""
    hf_owned = ("backbone.", f"exit_heads.{encoder.num_steps - 1}.") if _attached(encoder) else ("backbone.",)
    return {
        key: value.detach().to("cpu").contiguous()
        for key, value in encoder.state_dict().items()
        if not key.startswith(hf_owned)
    }


def _attached(encoder: AdaptiveEncoder) -> bool:
    return is_attached(encoder.adaptive_config.last_head)


def _hf_model(encoder: AdaptiveEncoder) -> torch.nn.Module:
    """What is saved in Hugging Face format: the base model, or the classifier the encoder is attached to."""
    return encoder.unwrap() if _attached(encoder) else encoder.backbone


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

    target = Path(save_directory).expanduser()
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
        if is_model and tokenizer is None and has_tokenizer(target):
            warnings.warn(f"{target} holds a tokenizer, and the model saved over it gets none: pass tokenizer= to "
                          "keep one (AdaptivePipeline and predict need it).", stacklevel=3)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target)
    try:
        config = encoder.adaptive_config
        config.attn_implementation = getattr(encoder.config, "_attn_implementation", None)
        _hf_model(encoder).save_pretrained(staging)
        save_file(_wrapper_state(encoder), str(staging / ADAPTIVE_WEIGHTS_NAME), metadata={"format": "pt"})
        config.save(staging / ADAPTIVE_CONFIG_NAME)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_manifest(staging)
        replace_folder(staging, target)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        storage = as_storage_error(error, target) if isinstance(error, Exception) else None
        if storage is None or storage is error:
            raise
        raise storage from error
    return target


def _retired_models(path: Path) -> list[Path]:
    """Saved models that :func:`~adaptive_depth.files.replace_folder` moved aside from ``path`` and a killed
    save left there, newest first."""
    found = [folder for folder in leftovers(path, ("old",)) if (folder / ADAPTIVE_CONFIG_NAME).is_file()]
    return sorted(found, key=lambda folder: folder.stat().st_mtime, reverse=True)


def resolve_model_dir(name_or_path: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local folder holding a saved model: ``name_or_path`` itself, or a Hub snapshot of it.

    A Hub id is fetched within :func:`adaptive_depth.hub.hub_timeout_s` seconds.

    Raises:
        FileNotFoundError: neither a folder with ``adaptive_config.json`` nor a downloadable Hub id
            (no such path, unknown repository, offline and not cached, or the Hub did not answer
            in time; the message says how to work offline).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / ADAPTIVE_CONFIG_NAME).is_file():
            hint = " (it looks like a plain Hugging Face model: wrap it with AdaptiveEncoder(model))" if (
                path / "config.json").is_file() else ""
            if hint and "ForSequenceClassification" in (path / "config.json").read_text(encoding="utf-8", errors="replace"):
                hint = f" (it looks like a fine-tuned classifier: python -m recipes.attach --model {path} --texts ROWS)"
            raise FileNotFoundError(
                f"{path} has no {ADAPTIVE_CONFIG_NAME}; it is not a model saved by "
                f"AdaptiveEncoder.save_pretrained{hint}."
            )
        return path
    text = str(name_or_path)
    retired = [] if path.exists() else _retired_models(path)
    if retired:  # a save into `path` was killed between moving the old model aside and moving the new one in
        newest = f" (the newest of {len(retired)})" if len(retired) > 1 else ""
        raise FileNotFoundError(
            f"{text} does not exist: a save into it was interrupted, and the model it held before is in "
            f"{retired[0]}{newest}. To get it back: mv {shlex.quote(str(retired[0]))} {shlex.quote(str(path))}"
        )
    if not looks_like_hub_id(text):
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"{text} {what}: it is not a folder holding a saved adaptive model "
                                "(AdaptiveEncoder.save_pretrained).")
    try:
        folder = download_snapshot(text, revision)
    except HubTimeoutError as error:
        raise FileNotFoundError(f"there is no folder {text}, and as a Hugging Face Hub id: {error}") from error
    except Exception as error:  # offline, unknown repo, no access: all mean "cannot get it"
        from huggingface_hub import is_offline_mode

        if is_offline_mode():
            reason = ("it is not in the local cache, and HF_HUB_OFFLINE=1 forbids downloading it: pass a local "
                      "folder, or unset HF_HUB_OFFLINE to download it")
        else:
            reason = f"fetching it failed ({type(error).__name__}: {_one_line(error)}); {OFFLINE_HINT}"
        raise FileNotFoundError(f"there is no folder {text}, and as a Hugging Face Hub id {reason}.") from error
    return resolve_model_dir(folder)


def load_pretrained(
    encoder_class: type[AdaptiveEncoder],
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    verify: bool = True,
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
        verify: check every file against the folder's ``adaptive_manifest.json`` first
            (:func:`~adaptive_depth.model_folder.verify_model_folder`); ``False`` after a deliberate edit.

    Raises:
        FileNotFoundError: no saved model there.
        ModelFolderError: a file of the folder is missing, damaged, edited (``verify``) or of the
            wrong form: the message names the file and the field or tensor.
        ValueError: ``attn_implementation`` cannot be used here (unknown, or its package is not
            installed). The one the model was saved with, when it cannot be used here, gives a
            warning and transformers' default instead: the same attention, computed another way.
    """
    folder = resolve_model_dir(name_or_path, revision)
    if verify:
        verify_model_folder(folder)
    try:
        config = AdaptiveEncoderConfig.load(folder / ADAPTIVE_CONFIG_NAME)
    except (OSError, ValueError) as error:
        raise ModelFolderError(_one_line(error)) from error
    options: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto"}
    attached = is_attached(config.last_head)
    implementation = attn_implementation or config.attn_implementation
    try:
        chosen = {"attn_implementation": implementation} if implementation else {}
        backbone = _load_backbone(folder, options | chosen, attached)
    except _AttentionUnavailable as error:
        if attn_implementation:
            raise ValueError(f"attn_implementation={attn_implementation!r} cannot be used here: {error}") from error
        # The saved one is how it ran where it was saved (flash_attention_2 on a GPU, say): the same attention.
        warnings.warn(f"{folder} was saved with attn_implementation={implementation!r}, which cannot be used here "
                      f"({error}); loading it with transformers' default instead (pass attn_implementation= to "
                      "choose).", stacklevel=3)
        backbone = _load_backbone(folder, options, attached)
    try:
        encoder = encoder_class(backbone, **config.architecture_kwargs())
    except (ValueError, TypeError) as error:
        raise ModelFolderError(f"{folder / ADAPTIVE_CONFIG_NAME} does not describe a model that fits the backbone in "
                               f"{folder}: {_one_line(error)}") from error
    encoder.adaptive_config = config
    encoder.load_state_dict(_read_wrapper_state(folder / ADAPTIVE_WEIGHTS_NAME, encoder), strict=False)
    if device is not None:
        encoder.to(device)
    return encoder.eval()


def _one_line(error: BaseException) -> str:
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


class _AttentionUnavailable(Exception):
    """The attention implementation asked for cannot be used (a package missing, a name unknown)."""


def _load_backbone(folder: Path, options: dict[str, Any], attached: bool) -> torch.nn.Module:
    """The backbone of a saved folder (the whole ``*ForSequenceClassification`` of an ``attached``
    model); :class:`ModelFolderError` naming ``config.json`` or the weights."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    auto_class = AutoModelForSequenceClassification if attached else AutoModel

    config_path = folder / "config.json"
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as error:  # OSError (bad JSON, no file), ValueError / TypeError (a field)
        raise ModelFolderError(f"{config_path} (the backbone's config) cannot be used: {_one_line(error)}") from error
    try:
        return auto_class.from_pretrained(str(folder), **options)
    except ImportError as error:  # e.g. flash_attention_2 without the flash-attn package
        if "attn_implementation" in options:
            raise _AttentionUnavailable(_one_line(error)) from error
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        if "attn_implementation" in options and str(options["attn_implementation"]) in str(error):
            raise _AttentionUnavailable(_one_line(error)) from error  # an implementation transformers does not know
        weights = sorted(path for path in folder.glob("*.safetensors") if path.name != ADAPTIVE_WEIGHTS_NAME)
        reason = _one_line(error)
        if isinstance(error, RuntimeError) and "mismatched" in reason:  # transformers printed the tensors, said not
            reason = _first_shape_mismatch(weights, auto_class.from_config(config).state_dict()) or reason
        shown = ", ".join(path.name for path in weights) or "none found"
        raise ModelFolderError(f"the backbone weights in {folder} ({shown}) do not load with {config_path}: {reason}; "
                               "the file is truncated, damaged or of another model") from error


def _first_shape_mismatch(weights: list[Path], expected: dict[str, torch.Tensor]) -> str | None:
    """``"<file>: tensor 'name' has shape (...), config.json needs (...)"`` for the first tensor whose shape differs."""
    from safetensors import safe_open

    for path in weights:
        with safe_open(str(path), framework="pt") as handle:
            for name in sorted(handle.keys()):
                shape = tuple(handle.get_slice(name).get_shape())
                if name in expected and tuple(expected[name].shape) != shape:
                    return f"{path.name}: tensor {name!r} has shape {shape}, config.json needs {tuple(expected[name].shape)}"
    return None


def _read_wrapper_state(path: Path, encoder: AdaptiveEncoder) -> dict[str, torch.Tensor]:
    """The gates' and heads' tensors of ``path``, checked against ``encoder``: every name present
    and none extra, every shape as the config describes (:class:`ModelFolderError` otherwise)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelFolderError(f"{path} is missing; the saved model is incomplete.")
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise ModelFolderError(f"{path} cannot be read ({_one_line(error)}); it is truncated or damaged: save or "
                               "copy the model again") from error
    expected = _wrapper_state(encoder)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelFolderError(
            f"{path} does not fit the model {ADAPTIVE_CONFIG_NAME} describes: missing tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]}; the saved model is damaged or from another version."
        )
    for name, tensor in sorted(state.items()):
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelFolderError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model {ADAPTIVE_CONFIG_NAME} "
                f"describes needs {tuple(expected[name].shape)}; the config or the weights were changed."
            )
    return state
