"""Raw text in, labels and their cost out: :class:`AdaptivePipeline`.

It tokenizes (right padding, truncation at the model's trained length), batches rows of
similar length together, runs the :class:`~adaptive_depth.engine.AdaptiveInferenceEngine` at the
saved operating point and returns one :class:`Prediction` per input, in input order (the text
side, shared with the exported model's pipeline, is :class:`~adaptive_depth.text_pipeline.TextPipeline`).
:meth:`AdaptivePipeline.calibrate` (a cost budget) and :meth:`AdaptivePipeline.certify` (a
certified bound on the answers that change) choose the operating point from raw texts.

Relative cost, everywhere: total MACs over total full-depth MACs of the same rows
(:func:`relative_cost` over many predictions), exact convention unless said otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from adaptive_depth.calibration import Calibration, calibrate_operating_point, calibrate_threshold
from adaptive_depth.certificate import Certificate
from adaptive_depth.certify import certify_threshold
from adaptive_depth.config import AdaptiveEncoderConfig, criterion_spec
from adaptive_depth.encoder import AdaptiveEncoder
from adaptive_depth.engine import AdaptiveInferenceEngine, EngineMode
from adaptive_depth.exits import ExitCriterion
from adaptive_depth.text_pipeline import (Prediction, TextPipeline, folder_tokenizer, has_tokenizer, relative_cost,
                                          truncation_length)

__all__ = ["AdaptivePipeline", "Prediction", "relative_cost"]  # Prediction, relative_cost: from text_pipeline


class AdaptivePipeline(TextPipeline):
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
        self.max_length = max_length or truncation_length(config.max_length, encoder.adapter.max_tokens(encoder.config),
                                                          tokenizer)
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
        """Load a model saved with its tokenizer by :meth:`AdaptiveEncoder.save_pretrained`, its gates and
        heads fused for inference (:meth:`AdaptiveEncoder.fuse_for_inference`).

        Args:
            name_or_path: the folder (or a Hub id).
            dtype, device, verify: as in :meth:`AdaptiveEncoder.from_pretrained` (``verify``
                covers the tokenizer files too).
            **options: :class:`AdaptivePipeline` keyword arguments.

        Raises:
            FileNotFoundError: no saved model there, or one saved without its tokenizer.
            ModelFolderError: a damaged or edited file (see :meth:`AdaptiveEncoder.from_pretrained`).
        """
        from adaptive_depth.pretrained import resolve_model_dir

        folder = resolve_model_dir(name_or_path)
        if not has_tokenizer(folder):
            raise FileNotFoundError(
                f"{folder} holds no tokenizer; save the model with encoder.save_pretrained(folder, tokenizer=...)."
            )
        encoder = AdaptiveEncoder.from_pretrained(folder, dtype=dtype, device=device, verify=verify)
        encoder.fuse_for_inference()  # a loaded model is not trained further: derive the fused weights once
        return cls(encoder, folder_tokenizer(folder), **options)

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return next(self.encoder.parameters()).device

    @property
    def adaptive_config(self) -> AdaptiveEncoderConfig:
        """``encoder.adaptive_config``."""
        return self.encoder.adaptive_config

    def _outputs(self, batches: Iterator[dict[str, Tensor]], batch_size: int) -> Iterator[Any]:
        """Streamed (:meth:`AdaptiveInferenceEngine.stream <adaptive_depth.engine.AdaptiveInferenceEngine.stream>`):
        every layer runs on ``batch_size`` rows however many rows have exited, with the same results,
        row by row, as one engine call per batch; outputs come in input order."""
        return self.engine.stream(batches, max_rows=batch_size)

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

    def __repr__(self) -> str:
        criterion = self.engine.criterion
        try:
            name, threshold, _ = criterion_spec(criterion)
            shown = f"{name}={threshold:g}"
        except TypeError:  # a criterion class of the user's own
            shown = repr(criterion)
        return (f"AdaptivePipeline({self.encoder.config.model_type}, {self.encoder.num_steps} layers, mode="
                f"{self.engine.mode!r}, {shown}, gate_threshold={self.engine.gate_threshold})")
