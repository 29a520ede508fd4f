"""What an engine does on held-out rows, shared by calibration and certification.

:func:`measure_rows` runs an engine over batches and keeps each row's prediction and MACs
(:class:`RowResults`); :meth:`RowResults.relative_cost` is the one definition of relative cost
(total MACs over total full-depth MACs of the same rows). :func:`record_rows` runs the engine
once with no exit, and :func:`replay_rows` gives from that record the :class:`RowResults` of any
exit threshold without running the model again (:mod:`adaptive_depth.replay`).
:func:`threshold_at_fraction` and :func:`patience_grid` order each criterion's thresholds from
the safest (never exits early) to the most aggressive (exits at the first head that runs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adaptive_depth.engine import AdaptiveInferenceEngine, EngineOutput
from adaptive_depth.exits import ExitCriterion, predictions_from_logits
from adaptive_depth.head_trace import HeadTrace
from adaptive_depth.replay import replay_exits

__all__ = ["RowResults", "batch_labels", "check_budget", "check_convention", "measure_rows", "patience_grid",
           "record_rows", "reference_predictions", "replay_rows", "threshold_at_fraction"]


@dataclass
class RowResults:
    """What the engine did for each of ``R`` rows, in the order of the batches.

    Attributes:
        predictions: ``[R]`` class indices (long) or scores (float), from
            :func:`~adaptive_depth.exits.predictions_from_logits`.
        macs_exact, macs_paper: ``[R]`` int64 MACs of what ran, in each FLOPs convention.
        full_macs_exact, full_macs_paper: ``[R]`` int64 MACs of the same rows at full depth.
        layers_run: ``[R]`` layers that ran per row.
    """

    predictions: Tensor
    macs_exact: Tensor
    macs_paper: Tensor
    full_macs_exact: Tensor
    full_macs_paper: Tensor
    layers_run: Tensor

    def relative_cost(self, convention: str = "exact", rows: Tensor | None = None) -> float:
        """Total MACs over total full-depth MACs of the rows (all, or the ``rows`` indices / mask):
        the one definition of relative cost (a ratio of sums, not a mean of per-row ratios)."""
        macs, full = (self.macs_exact, self.full_macs_exact) if convention == "exact" else (
            self.macs_paper, self.full_macs_paper)
        if rows is not None:
            macs, full = macs[rows], full[rows]
        return float(macs.double().sum() / full.double().sum())

    @classmethod
    def from_outputs(cls, outputs: Sequence[EngineOutput]) -> RowResults:
        """The rows of engine outputs (or replays of them), in order, on the CPU."""
        columns = [(out.predictions, out.macs_exact, out.macs_paper, out.full_macs_exact, out.full_macs_paper,
                    out.layers_run.sum(dim=-1)) for out in outputs]
        return cls(*(torch.cat([value.cpu() for value in column]) for column in zip(*columns)))


def _inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model inputs of a batch (``labels`` left out)."""
    return {key: value for key, value in batch.items() if key != "labels"}


def measure_rows(engine: AdaptiveInferenceEngine, batches: Sequence[Mapping[str, Tensor]]) -> RowResults:
    """Run ``engine`` on every batch (``labels`` and other non-inputs are left out) and keep
    each row's prediction and MACs (:class:`RowResults`)."""
    return RowResults.from_outputs([engine(**_inputs(batch)) for batch in batches])


def record_rows(engine: AdaptiveInferenceEngine, batches: Sequence[Mapping[str, Tensor]]) -> HeadTrace:
    """One pass of ``engine`` over every batch with no row exiting
    (:meth:`~adaptive_depth.engine.AdaptiveInferenceEngine.trace_heads`), as one :class:`HeadTrace`
    (on the engine's device) that :func:`replay_rows` turns into any threshold's results."""
    return HeadTrace.cat([engine.trace_heads(**_inputs(batch)) for batch in batches])


def replay_rows(trace: HeadTrace, criterion: ExitCriterion) -> RowResults:
    """What :func:`measure_rows` gives for an engine of ``criterion`` (the recorded engine's mode,
    gate threshold and padded length), replayed from ``trace`` (see :mod:`adaptive_depth.replay`)."""
    return RowResults.from_outputs([replay_exits(trace, criterion)])


def reference_predictions(engine: AdaptiveInferenceEngine, batches: Sequence[Mapping[str, Tensor]],
                          trace: HeadTrace) -> Tensor:
    """The ``[R]`` full-depth predictions of the rows ``trace`` recorded from ``batches`` (CPU).

    When every layer ran for every row in the recorded pass (``exit_only``, or gates that never
    skipped), its last head read exactly what full depth reads, computed on the same rows: its
    answers are the full-depth ones, with no second pass. Otherwise one pass of ``engine`` in
    mode ``"full"`` (same padded length) gives them.
    """
    if bool(trace.layers_run.all()):
        return predictions_from_logits(trace.head_logits[:, -1]).cpu()
    full = AdaptiveInferenceEngine(engine.encoder, engine.criterion, engine.gate_threshold, "full",
                                   engine.padded_length)
    return measure_rows(full, batches).predictions


def check_budget(max_relative_cost: float) -> float:
    """``max_relative_cost`` as a float if it is a valid budget (a fraction of the full-depth MACs
    in ``(0, 1]``), else a ``ValueError``: the one range check of a cost budget."""
    value = float(max_relative_cost)
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise ValueError(f"max_relative_cost must be in (0, 1] (total MACs over total full-depth MACs), got {value}.")
    return value


def check_convention(convention: str) -> str:
    """``convention`` if it is a FLOPs convention (``"exact"`` or ``"paper"``), else a ``ValueError``."""
    if convention not in ("exact", "paper"):
        raise ValueError(f"convention must be 'exact' or 'paper', got {convention!r}.")
    return convention


def batch_labels(batches: Sequence[Mapping[str, Tensor]]) -> Tensor | None:
    """The ``[R]`` labels of every batch, concatenated on the CPU; ``None`` when no batch has any.

    Raises:
        ValueError: labels in some batches only (a metric over part of the rows would mislead), or a
            batch whose label count is not its row count (labels would be broadcast or misaligned).
    """
    labelled = [batch.get("labels") is not None for batch in batches]
    if not any(labelled):
        return None
    if not all(labelled):
        raise ValueError(f"{sum(labelled)} of {len(batches)} batches hold 'labels'; give labels in every batch or "
                         "in none.")
    for index, batch in enumerate(batches):
        reference = batch.get("input_ids", batch.get("inputs_embeds"))
        rows = len(reference) if reference is not None else None
        if rows is not None and batch["labels"].numel() != rows:
            raise ValueError(f"batch {index} has {rows} rows but {batch['labels'].numel()} labels; give one label "
                             "per row.")
    return torch.cat([batch["labels"].reshape(-1).cpu() for batch in batches])


def patience_grid(num_steps: int) -> list[float]:
    """The patience values, from the safest (``num_steps``: never exits before the last layer) to the
    most aggressive (0: exits at the first head that runs)."""
    return [float(p) for p in range(num_steps, -1, -1)]


def threshold_at_fraction(name: str, num_labels: int) -> Callable[[float], float]:
    """For a continuous criterion, the map from ``[0, 1]`` to its threshold: 0 never exits early
    (the safest), 1 exits at the earliest head (the most aggressive); cost only falls in between.

    Raises:
        ValueError: ``"patience"`` (use :func:`patience_grid`), or a criterion that does not fit
            the number of outputs (tolerance is for regression, entropy for 2+ classes).
    """
    if name == "tolerance":
        if num_labels != 1:
            raise ValueError("tolerance exits are for regression (one output); calibrate a classifier with "
                             "EntropyExit, MaxProbExit or PatienceExit.")

        def threshold_at(fraction: float) -> float:  # 0 -> 0 (never exits early), 1 -> inf (earliest)
            return math.inf if fraction >= 1.0 else fraction / (1.0 - fraction)
    elif name in ("entropy", "normalized_entropy"):
        if num_labels < 2:
            raise ValueError("entropy exits need at least 2 classes; calibrate a regression model with PatienceExit.")
        top = 1.0 if name == "normalized_entropy" else math.log(num_labels)
        # The most aggressive point must lie above every computed entropy: in float32 a near-uniform row's
        # reaches log C + 1e-6 (and log C itself rounds up to float32), so nextafter(log C) did not exit them.
        beyond = top + 1e-3
        top = math.nextafter(top, math.inf)

        def threshold_at(fraction: float) -> float:
            return beyond if fraction >= 1.0 else fraction * top
    elif name == "max_prob":  # 1.0 exits only on a saturated head, 0.0 at the first head that runs

        def threshold_at(fraction: float) -> float:
            return 1.0 - fraction
    else:
        raise ValueError(f"{name!r} has no continuous threshold; patience takes whole values (patience_grid).")
    return threshold_at
