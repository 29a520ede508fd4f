"""A fine-tuned ``*ForSequenceClassification``'s own classifier as the last exit head.

Each family applies its classifier to the last hidden states in its own way; :data:`CLASSIFIER_HEADS`
(keyed by ``config.model_type``, as :data:`adaptive_depth.backbones.BACKBONES` is) lists the
model's modules in the order its forward applies them, so that :class:`~adaptive_depth.exits.ClassifierExitHead`
reproduces the model's logits exactly from the same hidden states:

- bert: the base model's pooler (``dense`` + ``tanh`` on ``[CLS]``), dropout, ``classifier``;
- albert: ``[CLS]``, the base model's ``pooler`` and ``pooler_activation`` (tanh), dropout, ``classifier``;
- distilbert: ``[CLS]``, ``pre_classifier``, ReLU, dropout, ``classifier``;
- roberta, xlm-roberta, camembert, mpnet (tanh) and electra (gelu): the ``classifier`` module
  (``dense``, activation, ``out_proj`` on the first token).

Modules are shared with the model, never copied: the attached encoder's full depth is the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor, nn

from adaptive_depth.backbones import BACKBONES, UnsupportedModelError
from adaptive_depth.exits import ClassifierExitHead

__all__ = ["CLASSIFIER_HEADS", "EXIT_HEAD", "FirstToken", "check_last_head", "classifier_exit_head",
           "classifier_label_names", "classifier_name", "is_attached", "load_classifier"]

# The last head of a model not attached to a classifier: a new exit head (``head_type``).
EXIT_HEAD = "exit_head"
_PREFIX = "classifier:"
_FIRST_TOKEN, _RELU = "<first token>", "<relu>"  # parameter-free steps between the model's modules

CLASSIFIER_HEADS: Mapping[str, tuple[str, ...]] = {
    "bert": ("bert.pooler", "dropout", "classifier"),
    "albert": (_FIRST_TOKEN, "albert.pooler", "albert.pooler_activation", "dropout", "classifier"),
    "distilbert": (_FIRST_TOKEN, "pre_classifier", _RELU, "dropout", "classifier"),  # ReLU as a function there
    "roberta": ("classifier",),
    "xlm-roberta": ("classifier",),
    "camembert": ("classifier",),
    "electra": ("classifier",),
    "mpnet": ("classifier",),
}


class FirstToken(nn.Module):
    """``[B, N, H] -> [B, H]``: the first position (``[CLS]`` / ``<s>``)."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        return hidden_states[:, 0]


def is_attached(last_head: str) -> bool:
    """Whether ``last_head`` (:attr:`AdaptiveEncoderConfig.last_head
    <adaptive_depth.AdaptiveEncoderConfig.last_head>`) is a fine-tuned model's own classifier."""
    return last_head != EXIT_HEAD


def check_last_head(last_head: str) -> str:
    """``last_head`` if it is ``"exit_head"`` or ``"classifier:<family>"`` of :data:`CLASSIFIER_HEADS`.

    Raises:
        ValueError: any other value.
    """
    family = last_head[len(_PREFIX):] if isinstance(last_head, str) and last_head.startswith(_PREFIX) else None
    if last_head != EXIT_HEAD and family not in CLASSIFIER_HEADS:
        choices = ", ".join(f"{_PREFIX}{name}" for name in sorted(CLASSIFIER_HEADS))
        raise ValueError(f"last_head must be {EXIT_HEAD!r} or one of {choices}; got {last_head!r}.")
    return last_head


def classifier_name(model: nn.Module) -> str:
    """``"classifier:<model_type>"`` for a supported single-label or regression ``*ForSequenceClassification``.

    Raises:
        UnsupportedModelError: a family without an entry in :data:`CLASSIFIER_HEADS` (naming those).
        TypeError: not a ``*ForSequenceClassification`` (a base model has no classifier to keep).
        ValueError: a multi-label classifier (its sigmoid outputs have no single answer to exit
            with), or a model missing a module its family's classifier needs.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in CLASSIFIER_HEADS or model_type not in BACKBONES:
        supported = ", ".join(sorted(CLASSIFIER_HEADS))
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no classifier layout in adaptive_depth; supported: {supported}.")
    if not type(model).__name__.endswith("ForSequenceClassification"):
        raise TypeError(
            f"from_classifier needs a fine-tuned *ForSequenceClassification, got {type(model).__name__}; to train "
            "new exit heads on a base model use AdaptiveEncoder(model, num_labels=...).")
    if getattr(config, "problem_type", None) == "multi_label_classification":
        raise ValueError(
            "this model is a multi-label classifier (problem_type 'multi_label_classification'): each label is its "
            "own yes/no answer, which one exit criterion cannot certify; only single-label classification and "
            "regression models can be attached.")
    if getattr(config, "problem_type", None) == "regression" and int(config.num_labels) != 1:
        raise ValueError(f"this model regresses {config.num_labels} values at once; only one score (num_labels=1) "
                         "can be attached.")
    for path in CLASSIFIER_HEADS[model_type]:
        if path not in (_FIRST_TOKEN, _RELU) and _submodule(model, path) is None:
            raise ValueError(f"{type(model).__name__} has no module {path!r}, which its family's classifier uses.")
    return f"{_PREFIX}{model_type}"


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def classifier_exit_head(model: nn.Module, last_head: str) -> ClassifierExitHead:
    """The model's own classifier as a :class:`~adaptive_depth.exits.ClassifierExitHead` (modules shared).

    Args:
        model: a supported ``*ForSequenceClassification`` (see :func:`classifier_name`).
        last_head: ``"classifier:<family>"``; must be ``model``'s family (a saved config read
            against another model is refused).
    """
    name = classifier_name(model)
    if check_last_head(last_head) != name:
        raise ValueError(f"last_head {last_head!r} does not fit {type(model).__name__} (its classifier is {name!r}).")
    steps = [FirstToken() if path == _FIRST_TOKEN else nn.ReLU() if path == _RELU else model.get_submodule(path)
             for path in CLASSIFIER_HEADS[model.config.model_type]]
    return ClassifierExitHead(steps, int(model.config.num_labels))


def classifier_label_names(model: nn.Module) -> list[str] | None:
    """The model's class names (``config.id2label``), or ``None`` for regression or transformers'
    placeholders ``LABEL_0``, ``LABEL_1``... (then the class index is the label)."""
    count = int(model.config.num_labels)
    names = [str(model.config.id2label[index]) for index in range(count)]
    return None if count == 1 or names == [f"LABEL_{index}" for index in range(count)] else names


def load_classifier(path: str | os.PathLike[str], attn_implementation: str | None = None) -> nn.Module:
    """``AutoModelForSequenceClassification.from_pretrained(path)`` from a local folder, offline, in
    eval mode, refusing a folder whose weights hold no trained classifier.

    Raises:
        FileNotFoundError: no folder with a ``config.json`` there.
        TypeError: the saved model is not a ``*ForSequenceClassification`` (transformers would
            put a random classifier on it).
    """
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved transformers model folder (no config.json there).")
    architectures = AutoConfig.from_pretrained(str(folder), local_files_only=True).architectures or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise TypeError(
            f"{folder} holds a {', '.join(architectures) or 'model of unknown architecture'}, not a fine-tuned "
            "*ForSequenceClassification; fine-tune it first, or train new exit heads with the recipes.")
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model, info = AutoModelForSequenceClassification.from_pretrained(
        str(folder), local_files_only=True, output_loading_info=True, **options)
    if info["missing_keys"]:
        raise TypeError(f"{folder}: the saved weights lack {sorted(info['missing_keys'])[:4]}; its classifier would be "
                        "random. Save the fine-tuned model with model.save_pretrained(folder).")
    return model.eval()
