"""Raw text in, labels and their cost out: :class:`AdaptivePipeline`.

It tokenizes (right padding, truncation at the model's trained length), batches rows of
similar length together, runs the :class:`~adaptive_depth.engine.AdaptiveInferenceEngine` at the
saved operating point and returns one :class:`Prediction` per input, in input order.
:meth:`AdaptivePipeline.calibrate` (a cost budget) and :meth:`AdaptivePipeline.certify` (a
certified bound on the answers that change) choose the operating point from raw texts.

Relative cost, everywhere: total MACs over total full-depth MACs of the same rows
(:func:`relative_cost` over many predictions), exact convention unless said otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adaptive_depth.calibration import Calibration, calibrate_operating_point, calibrate_threshold
from adaptive_depth.certificate import Certificate
from adaptive_depth.certify import certify_threshold
from adaptive_depth.config import criterion_spec, label_ids
from adaptive_depth.encoder import AdaptiveEncoder
from adaptive_depth.engine import AdaptiveInferenceEngine, EngineMode
from adaptive_depth.exits import ExitCriterion

__all__ = ["AdaptivePipeline", "Prediction", "relative_cost"]


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


class AdaptivePipeline:
    """Tokenize, batch and classify raw texts (or text pairs) with an :class:`AdaptiveEncoder`.

    Args:
        encoder: the model (its ``adaptive_config`` gives the defaults below).
        tokenizer: its Hugging Face tokenizer.
        criterion: exit criterion; default the saved operating point's.
        gate_threshold: default the saved one.
        mode: engine mode; default the saved one.
        max_length: truncation length in tokens; default the saved one, else the
            tokenizer's limit capped by the model's position table.
        batch_size: rows per engine call.
        allow_single_texts: run a pair model (``adaptive_config.text_pair``) on single texts
            anyway; by default that is refused, as its answers would be meaningless.

    Example:
        >>> pipeline = AdaptivePipeline.from_pretrained("runs/smartbert-mrpc/model")  # doctest: +SKIP
        >>> pipeline(["The cat sat."], ["A cat was sitting."])[0].label  # doctest: +SKIP
        '1'
    """

    def __init__(
        self,
        encoder: AdaptiveEncoder,
        tokenizer: Any,
        *,
        criterion: ExitCriterion | None = None,
        gate_threshold: float | None = None,
        mode: EngineMode | None = None,
        max_length: int | None = None,
        batch_size: int = 32,
        allow_single_texts: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        config = encoder.adaptive_config
        self.encoder = encoder.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.allow_single_texts = allow_single_texts
        positions = getattr(encoder.config, "max_position_embeddings", None)
        limit = min(int(tokenizer.model_max_length), int(positions)) if positions else int(tokenizer.model_max_length)
        self.max_length = max_length or config.max_length or min(limit, 512)
        self.engine = AdaptiveInferenceEngine(
            encoder,
            criterion if criterion is not None else config.make_criterion(),
            gate_threshold,
            mode or config.mode,  # type: ignore[arg-type]
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        verify: bool = True,
        **options: Any,
    ) -> AdaptivePipeline:
        """Load a model saved with its tokenizer by :meth:`AdaptiveEncoder.save_pretrained`.

        Args:
            name_or_path: the folder (or a Hub id).
            dtype, device, verify: as in :meth:`AdaptiveEncoder.from_pretrained` (``verify``
                covers the tokenizer files too).
            **options: :class:`AdaptivePipeline` keyword arguments.

        Raises:
            FileNotFoundError: no saved model there, or one saved without its tokenizer.
            ModelFolderError: a damaged or edited file (see :meth:`AdaptiveEncoder.from_pretrained`).
        """
        from transformers import AutoTokenizer

        from adaptive_depth.pretrained import ModelFolderError, resolve_model_dir

        folder = resolve_model_dir(name_or_path)
        if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
            raise FileNotFoundError(
                f"{folder} holds no tokenizer; save the model with encoder.save_pretrained(folder, tokenizer=...)."
            )
        encoder = AdaptiveEncoder.from_pretrained(folder, dtype=dtype, device=device, verify=verify)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except Exception as error:  # tokenizers raises its own types for a damaged tokenizer.json
            raise ModelFolderError(f"the tokenizer files in {folder} cannot be loaded: "
                                   f"{' '.join(str(error).split())}") from error
        return cls(encoder, tokenizer, **options)

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return next(self.encoder.parameters()).device

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
            labels = label_ids(self.encoder.adaptive_config, labels)
        lengths = self.tokenizer(texts, text_pairs, truncation=True, max_length=self.max_length,
                                 return_length=True)["length"]
        order = sorted(range(len(texts)), key=lambda index: lengths[index])
        size = batch_size or self.batch_size
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            batch = self.tokenizer(
                [texts[i] for i in rows], [text_pairs[i] for i in rows] if text_pairs is not None else None,
                padding=True, padding_side="right", truncation=True, max_length=self.max_length, return_tensors="pt",
            )
            inputs = {key: value.to(self.device) for key, value in batch.items()
                      if key in ("input_ids", "attention_mask", "token_type_ids")}
            if labels is not None:
                dtype = torch.float32 if self.encoder.num_labels == 1 else torch.long
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

        A single string counts as a list of one. The batches run through
        :meth:`AdaptiveInferenceEngine.stream <adaptive_depth.engine.AdaptiveInferenceEngine.stream>`:
        every layer runs on ``batch_size`` rows however many rows have exited, with the same
        results as one engine call per batch.
        """
        texts, text_pairs = self.check_texts(texts, text_pairs)
        results: list[Prediction | None] = [None] * len(texts)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="predicting", unit="row")
        names = self.encoder.adaptive_config.label_names
        size = batch_size or self.batch_size
        batch_rows: deque[list[int]] = deque()

        def inputs() -> Iterator[dict[str, Tensor]]:
            for rows, batch in self.batches(texts, text_pairs, batch_size=size):
                batch_rows.append(rows)
                yield batch

        # Streamed: every layer runs on full groups of rows whatever exits early, with the same
        # results, row by row, as one engine call per batch; outputs come in input order.
        for out in self.engine.stream(inputs(), max_rows=size):
            rows = batch_rows.popleft()
            macs, full_macs = out.macs_exact.tolist(), out.full_macs_exact.tolist()
            if self.encoder.num_labels == 1:
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

    def calibrate(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None = None,
        *,
        labels: Sequence[Any] | None = None,
        max_relative_cost: float = 0.5,
        gate_thresholds: Sequence[float] | None = None,
        **options: Any,
    ) -> Calibration:
        """Choose the exit threshold on held-out texts for a cost budget (see
        :func:`~adaptive_depth.calibration.calibrate_threshold`) and use it.

        The arguments come in the order of ``pipeline(texts, text_pairs)``; ``labels`` (names or
        indices, see :func:`~adaptive_depth.config.label_ids`) is keyword-only. With
        ``gate_thresholds`` (a model with gates; needs ``labels``), the gate threshold is chosen
        too, among these, by the metric on the texts (see :func:`~adaptive_depth.calibration.calibrate_operating_point`). The chosen
        operating point is also written into ``encoder.adaptive_config`` (and any certificate
        there removed: it covered another point), so a later ``save_pretrained`` keeps it.
        """
        data = [inputs for _, inputs in self.batches(texts, text_pairs, labels)]
        if gate_thresholds is None:
            calibration = calibrate_threshold(self.engine, data, max_relative_cost, **options)
        else:
            calibration = calibrate_operating_point(self.engine, data, max_relative_cost,
                                                    gate_thresholds=gate_thresholds, **options)
        gate_threshold = calibration.gate_threshold if gate_thresholds is not None else None
        self._use(calibration.make_criterion(), gate_threshold)
        self.encoder.adaptive_config.calibration = calibration.to_dict()
        return calibration

    def certify(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None = None,
        *,
        labels: Sequence[Any] | None = None,
        max_risk: float = 0.01,
        delta: float = 0.05,
        risk: str = "disagreement",
        **options: Any,
    ) -> Certificate:
        """Certify an exit threshold on held-out texts (see
        :func:`~adaptive_depth.certify.certify_threshold`) and use it.

        Same argument order as :meth:`calibrate`; ``labels`` only for ``risk="error_gap"``;
        ``options``: ``max_relative_cost``, ``tolerance``, ``thresholds``, ``convention``,
        ``progress``. The certified operating point and its certificate are written into
        ``encoder.adaptive_config`` (its ``calibration`` is cleared: the certificate says how
        the threshold was chosen), so a later ``save_pretrained`` keeps them.
        """
        data = [inputs for _, inputs in self.batches(texts, text_pairs, labels)]
        certificate = certify_threshold(self.engine, data, max_risk, delta, risk, **options)
        self._use(certificate.make_criterion(), certificate.gate_threshold)
        config = self.encoder.adaptive_config
        config.mode = certificate.mode  # the saved operating point is the certified one, all of it
        config.calibration, config.certificate = None, certificate.to_dict()
        return certificate

    def _use(self, criterion: ExitCriterion, gate_threshold: float | None) -> None:
        """Run at ``criterion`` (and ``gate_threshold`` when given), in the engine and the saved config."""
        config = self.encoder.adaptive_config
        self.engine.criterion = criterion
        config.set_criterion(criterion)
        if gate_threshold is not None:
            self.engine.gate_threshold = config.gate_threshold = gate_threshold
        config.certificate = None

    def check_texts(self, texts: str | Sequence[str], text_pairs: str | Sequence[str] | None
                    ) -> tuple[list[str], list[str] | None]:
        """``(texts, text_pairs)`` as lists, checked: strings, as many pairs as texts, and pairs
        exactly when the model reads pairs (``adaptive_config.text_pair``; ``None``: no check).

        Raises:
            ValueError, TypeError: what is wrong and how to fix it.
        """
        texts, text_pairs = _check_texts(texts, text_pairs)
        reads_pairs = self.encoder.adaptive_config.text_pair
        if reads_pairs and text_pairs is None and not self.allow_single_texts:
            raise ValueError("this model reads text pairs (adaptive_config.text_pair), but no second texts were "
                             "given: its answers on single texts are meaningless. Give text_pairs, or build the "
                             "pipeline with allow_single_texts=True (predict: --allow-single-texts) if you mean it.")
        if reads_pairs is False and text_pairs is not None:
            raise ValueError("this model reads single texts (adaptive_config.text_pair is false), but text pairs "
                             "were given; leave text_pairs out.")
        return texts, text_pairs

    def __repr__(self) -> str:
        criterion = self.engine.criterion
        try:
            name, threshold, _ = criterion_spec(criterion)
            shown = f"{name}={threshold:g}"
        except TypeError:  # a criterion class of the user's own
            shown = repr(criterion)
        return (f"AdaptivePipeline({self.encoder.config.model_type}, {self.encoder.num_steps} layers, mode="
                f"{self.engine.mode!r}, {shown}, gate_threshold={self.engine.gate_threshold})")


def _check_texts(texts: str | Sequence[str], text_pairs: str | Sequence[str] | None
                 ) -> tuple[list[str], list[str] | None]:
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
