"""The text side of a pipeline, shared by :class:`~adaptive_depth.AdaptivePipeline` and the exported
model's :class:`~adaptive_depth.export_pipeline.ExportedPipeline`: checking texts and pairs,
tokenizing (right padding, truncation at the model's trained length), length-sorted batches, and
one :class:`Prediction` per text, in input order.

Relative cost, everywhere: total MACs over total full-depth MACs of the same rows
(:func:`relative_cost` over many predictions), exact convention unless said otherwise.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adaptive_depth.config import AdaptiveEncoderConfig, label_ids

__all__ = ["TOKENIZER_FILES", "Prediction", "TextPipeline", "folder_tokenizer", "has_tokenizer", "relative_cost",
           "truncation_length"]

# A saved model folder holds a tokenizer when one of these is there.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def has_tokenizer(folder: Path) -> bool:
    """Whether a model folder holds tokenizer files (one of :data:`TOKENIZER_FILES`)."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def folder_tokenizer(folder: Path) -> Any | None:
    """The tokenizer saved in a model folder (``AutoTokenizer``), or ``None`` when it holds none.

    Args:
        folder: a local folder (resolve a Hub id or ``~`` first, e.g. with
            :func:`adaptive_depth.pretrained.resolve_model_dir`).

    Raises:
        ModelFolderError: the tokenizer files are there but cannot be loaded (damaged or edited).
    """
    if not has_tokenizer(folder):
        return None
    from transformers import AutoTokenizer

    from adaptive_depth.model_folder import ModelFolderError

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:  # tokenizers raises its own types for a damaged tokenizer.json
        raise ModelFolderError(f"the tokenizer files in {folder} cannot be loaded: "
                               f"{' '.join(str(error).split())}") from error


@dataclass
class Prediction:
    """What the model answered for one input, and what it cost.

    Attributes:
        label: the label name (``adaptive_config.label_names``), or the class index as a string
            when the model has no names; for regression, ``None``.
        label_id: the class index (``None`` for regression).
        score: the probability of ``label`` (classification) or the predicted value (regression).
        probabilities: every class's probability (``None`` for regression).
        exit_layer: 1-based layer whose head answered.
        layers_run: layers that ran (the others were skipped by a gate or after the exit).
        layers_skipped: layers a gate skipped.
        relative_cost: MACs of what ran over the MACs of the same input at full depth
            (``exact`` convention: every matmul at the input's real length). Over many inputs,
            use :func:`relative_cost` (a ratio of sums), not the mean of these.
        macs_exact, full_macs_exact: the two MACs of that ratio (exact convention).
    """

    label: str | None
    label_id: int | None
    score: float
    probabilities: list[float] | None
    exit_layer: int
    layers_run: int
    layers_skipped: int
    relative_cost: float
    macs_exact: int
    full_macs_exact: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return dataclasses.asdict(self)


def relative_cost(predictions: Sequence[Prediction]) -> float:
    """Total MACs over total full-depth MACs of ``predictions`` (exact convention): the relative
    cost of a set of rows, as the recipes, calibration and certification report it."""
    if not predictions:
        raise ValueError("no predictions to total.")
    return sum(p.macs_exact for p in predictions) / sum(p.full_macs_exact for p in predictions)


def truncation_length(trained_length: int | None, position_limit: int | None, tokenizer: Any) -> int:
    """The length in tokens raw text is truncated to: the length the model was trained at when known,
    else the tokenizer's limit capped by the model's position table (and by 512). Never more than the
    position table holds (a saved length above it would make every long text an error).

    Args:
        trained_length: ``adaptive_config.max_length`` (``None``: unknown).
        position_limit: the longest input the position table embeds,
            :meth:`BackboneAdapter.max_tokens <adaptive_depth.backbones.BackboneAdapter.max_tokens>`
            (``None``: no absolute positions).
        tokenizer: its ``model_max_length`` is the tokenizer's limit.

    Example:
        >>> from types import SimpleNamespace
        >>> truncation_length(None, 510, SimpleNamespace(model_max_length=10**30))
        510
        >>> truncation_length(128, 510, SimpleNamespace(model_max_length=512))
        128
        >>> truncation_length(256, 128, SimpleNamespace(model_max_length=512))
        128
    """
    if trained_length:
        return int(trained_length) if position_limit is None else min(int(trained_length), int(position_limit))
    limit = int(min(tokenizer.model_max_length, 10**9))
    if position_limit is not None:
        limit = min(limit, int(position_limit))
    return min(limit, 512)


class TextPipeline:
    """Tokenize and batch raw texts (or text pairs), run an engine, return one :class:`Prediction` per text.

    A subclass sets ``tokenizer``, ``max_length`` (truncation, tokens), ``batch_size``,
    ``allow_single_texts`` and ``engine`` (called with the tokenizer's ``input_ids``,
    ``attention_mask`` and ``token_type_ids``; its output has the
    :class:`~adaptive_depth.engine.ExitTrace` fields and ``macs_exact`` / ``full_macs_exact``), and
    gives the ``adaptive_config`` (labels, label names, whether it reads pairs) and the ``device``
    the inputs go to.
    """

    tokenizer: Any
    max_length: int
    batch_size: int
    allow_single_texts: bool
    engine: Any

    @property
    def adaptive_config(self) -> AdaptiveEncoderConfig:
        """The model's labels, label names and text pairing."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where the inputs go."""
        raise NotImplementedError

    def _outputs(self, batches: Iterator[dict[str, Tensor]], batch_size: int) -> Iterator[Any]:
        """One engine output per input batch, in order (one engine call per batch)."""
        for batch in batches:
            yield self.engine(**batch)

    def batches(
        self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, labels: Sequence[Any] | None = None,
        batch_size: int | None = None,
    ) -> Iterator[tuple[list[int], dict[str, Tensor]]]:
        """``(row indices, model inputs)`` per batch; rows of similar length share a batch.

        With ``labels`` (the model's label names, class indices or scores: see
        :func:`~adaptive_depth.config.label_ids`), each batch also holds ``labels``.
        """
        texts, text_pairs = self.check_texts(texts, text_pairs)
        if labels is not None:
            if len(labels) != len(texts):
                raise ValueError(f"got {len(labels)} labels for {len(texts)} texts.")
            labels = label_ids(self.adaptive_config, labels)
        size = _batch_size(batch_size, self.batch_size)
        lengths = self.tokenizer(texts, text_pairs, truncation=True, max_length=self.max_length,
                                 return_length=True)["length"]
        order = sorted(range(len(texts)), key=lambda index: lengths[index])
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            batch = self.tokenizer(
                [texts[i] for i in rows], [text_pairs[i] for i in rows] if text_pairs is not None else None,
                padding=True, padding_side="right", truncation=True, max_length=self.max_length, return_tensors="pt",
            )
            inputs = {key: value.to(self.device) for key, value in batch.items()
                      if key in ("input_ids", "attention_mask", "token_type_ids")}
            if labels is not None:
                dtype = torch.float32 if self.adaptive_config.num_labels == 1 else torch.long
                inputs["labels"] = torch.tensor([labels[i] for i in rows], dtype=dtype)
            yield rows, inputs

    def __call__(
        self,
        texts: str | Sequence[str],
        text_pairs: str | Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> list[Prediction]:
        """Classify ``texts`` (with ``text_pairs`` for pair tasks); one :class:`Prediction` per text.

        A single string counts as a list of one. :class:`~adaptive_depth.AdaptivePipeline`
        streams the batches through the engine (every layer on full groups of rows, the same results
        as batch by batch).
        """
        texts, text_pairs = self.check_texts(texts, text_pairs)
        size = _batch_size(batch_size, self.batch_size)
        results: list[Prediction | None] = [None] * len(texts)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="predicting", unit="row")
        names = self.adaptive_config.label_names
        batch_rows: deque[list[int]] = deque()

        def inputs() -> Iterator[dict[str, Tensor]]:
            for rows, batch in self.batches(texts, text_pairs, batch_size=size):
                batch_rows.append(rows)
                yield batch

        for out in self._outputs(inputs(), size):
            rows = batch_rows.popleft()
            macs, full_macs = out.macs_exact.tolist(), out.full_macs_exact.tolist()
            if self.adaptive_config.num_labels == 1:
                probabilities = None
                scores = out.logits[:, 0].float().tolist()
            else:
                probabilities = out.logits.float().softmax(dim=-1)
                scores = probabilities.amax(dim=-1).tolist()
                probabilities = probabilities.tolist()
            predictions = out.predictions.tolist()
            for position, row in enumerate(rows):
                label_id = None if probabilities is None else int(predictions[position])
                label = None if label_id is None else (names[label_id] if names else str(label_id))
                results[row] = Prediction(
                    label=label, label_id=label_id, score=float(scores[position]),
                    probabilities=None if probabilities is None else probabilities[position],
                    exit_layer=int(out.exit_layer[position]), layers_run=int(out.layers_run[position].sum()),
                    layers_skipped=int(out.layers_skipped[position].sum()),
                    relative_cost=macs[position] / full_macs[position], macs_exact=int(macs[position]),
                    full_macs_exact=int(full_macs[position]),
                )
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
        return results  # type: ignore[return-value]

    def check_texts(self, texts: str | Sequence[str], text_pairs: str | Sequence[str] | None
                    ) -> tuple[list[str], list[str] | None]:
        """``(texts, text_pairs)`` as lists, checked: strings, as many pairs as texts, and pairs
        exactly when the model reads pairs (``adaptive_config.text_pair``; ``None``: no check).

        Raises:
            ValueError, TypeError: what is wrong and how to fix it.
        """
        texts, text_pairs = _check_texts(texts, text_pairs)
        reads_pairs = self.adaptive_config.text_pair
        if reads_pairs and text_pairs is None and not self.allow_single_texts:
            raise ValueError("this model reads text pairs (adaptive_config.text_pair), but no second texts were "
                             "given: its answers on single texts are meaningless. Give text_pairs, or build the "
                             "pipeline with allow_single_texts=True (predict: --allow-single-texts) if you mean it.")
        if reads_pairs is False and text_pairs is not None:
            raise ValueError("this model reads single texts (adaptive_config.text_pair is false), but text pairs "
                             "were given; leave text_pairs out.")
        return texts, text_pairs


def _batch_size(asked: int | None, default: int) -> int:
    """``asked`` rows per batch, checked (``None``: ``default``)."""
    if asked is None:
        return default
    if isinstance(asked, bool) or not hasattr(asked, "__index__") or operator.index(asked) < 1:
        raise ValueError(f"batch_size must be an int >= 1 (rows per engine call), got {asked!r}.")
    return operator.index(asked)


def _check_texts(texts: str | Sequence[str], text_pairs: str | Sequence[str] | None
                 ) -> tuple[list[str], list[str] | None]:
    for name, value in (("texts", texts), ("text_pairs", text_pairs)):
        if isinstance(value, (Mapping, bytes, bytearray)):
            raise TypeError(f"{name} must be a string or a sequence of strings, got a {type(value).__name__}; for "
                            "a pair task pass pipeline(texts, text_pairs), each a list of strings.")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if text_pairs is not None:
        text_pairs = [text_pairs] if isinstance(text_pairs, str) else list(text_pairs)
        if len(text_pairs) != len(texts):
            raise ValueError(f"got {len(texts)} texts and {len(text_pairs)} text pairs; give one pair per text.")
    if not texts:
        raise ValueError("no texts to classify.")
    for index, text in enumerate(texts + (text_pairs or [])):
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings; item {index % len(texts)} is a {type(text).__name__}.")
    return texts, text_pairs
