"""Raw text in, predictions out, from an exported folder: :class:`ExportedPipeline`.

The text handling (pairs checked, tokenizing, length-sorted batches, one
:class:`~adaptive_depth.text_pipeline.Prediction` per text) is
:class:`~adaptive_depth.text_pipeline.TextPipeline`'s, the one :class:`~adaptive_depth.AdaptivePipeline`
uses; the model is the exported step graphs run by :class:`~adaptive_depth.export_runtime.ExportedEngine`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from adaptive_depth.config import AdaptiveEncoderConfig
from adaptive_depth.exits import ExitCriterion
from adaptive_depth.export_runtime import ExportedEngine
from adaptive_depth.text_pipeline import TextPipeline

__all__ = ["ExportedPipeline"]


class ExportedPipeline(TextPipeline):
    """Classify raw texts (or text pairs) with an exported model and its tokenizer.

    Build it with :meth:`from_folder`. Calling it returns one
    :class:`~adaptive_depth.text_pipeline.Prediction` per text, as :class:`~adaptive_depth.AdaptivePipeline`
    does (label, score, probabilities, exit layer, layers run and skipped, relative cost).

    Args:
        engine: the exported engine.
        tokenizer: the model's tokenizer.
        max_length: truncation length in tokens (default: the manifest's, the length the model
            was trained at).
        batch_size: rows per engine call.
        allow_single_texts: run a pair model on single texts anyway (refused by default).

    Example:
        >>> pipeline = ExportedPipeline.from_folder("exported-mrpc")  # doctest: +SKIP
        >>> pipeline(["The cat sat."], ["A cat was sitting."])[0].label  # doctest: +SKIP
        'equivalent'
    """

    def __init__(self, engine: ExportedEngine, tokenizer: Any, *, max_length: int | None = None,
                 batch_size: int = 32, allow_single_texts: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.engine = engine
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.allow_single_texts = allow_single_texts
        self.max_length = int(max_length or engine.manifest["max_length"])
        manifest = engine.manifest
        self._config = AdaptiveEncoderConfig(num_labels=manifest["num_labels"], problem_type=manifest["problem_type"],
                                             label_names=manifest["label_names"], text_pair=manifest["text_pair"])

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike[str],
        *,
        num_threads: int | None = None,
        mode: str | None = None,
        criterion: ExitCriterion | None = None,
        gate_threshold: float | None = None,
        **options: Any,
    ) -> ExportedPipeline:
        """Load a folder written by :func:`adaptive_depth.export.export_engine` with a tokenizer.

        Args:
            folder: the export (``python -m adaptive_depth.export MODEL_DIR OUT_DIR --format onnx``).
            num_threads, mode, criterion, gate_threshold: as in :class:`ExportedEngine`.
            **options: ``max_length``, ``batch_size``, ``allow_single_texts``.

        Raises:
            FileNotFoundError: no manifest, or no tokenizer in the folder.
        """
        from transformers import AutoTokenizer

        engine = ExportedEngine(folder, num_threads, mode=mode, criterion=criterion, gate_threshold=gate_threshold)
        if not engine.manifest.get("tokenizer"):
            raise FileNotFoundError(
                f"{folder} holds no tokenizer, so it classifies token ids only (ExportedEngine); export a model "
                "saved with its tokenizer (save_pretrained(folder, tokenizer=...)) or pass tokenizer= to export_engine."
            )
        return cls(engine, AutoTokenizer.from_pretrained(str(folder)), **options)

    @property
    def device(self) -> torch.device:
        """Where the inputs go (ONNX Runtime runs on the CPU; a torch.export program where it was exported)."""
        return torch.device("cpu" if self.engine.format == "onnx" else self.engine.manifest["device"])

    @property
    def adaptive_config(self) -> AdaptiveEncoderConfig:
        """The saved model's labels, label names and text pairing (from the manifest)."""
        return self._config

    def __repr__(self) -> str:
        engine = self.engine
        return (f"ExportedPipeline({engine.model_type}, {engine.format}, {engine.num_steps} layers, mode={engine.mode!r}, "
                f"{engine.criterion!r}, gate_threshold={engine.gate_threshold})")
