"""Pick an exit threshold for a compute budget, on held-out data.

The exit criteria are monotone in their threshold: a larger entropy threshold (or a smaller
max-probability threshold, a smaller patience, or a larger regression tolerance) lets every
row leave at the same layer or earlier, and the gates' decisions do not depend on the threshold,
so the cost only falls.
:func:`calibrate_threshold` therefore bisects: it measures the engine on the data at each
candidate and returns the least aggressive threshold whose measured relative cost (total MACs
over total full-depth MACs of the same rows) is within the budget. The engine runs once, with
no row exiting, and every candidate is replayed from that record (:mod:`adaptive_depth.replay`:
the same exits, answers and MACs as the engine at that threshold, up to float rounding). It is
a point estimate on those rows; :func:`adaptive_depth.certify.certify_threshold` instead bounds,
with a stated probability, how often the early answers differ from the full-depth ones on new
rows. Calibrate on data held out from training, never on the set you report.

With skip gates there is a second knob: the gate threshold (skip a layer when
``p_skip >= gate_threshold``). :func:`calibrate_operating_point` calibrates the exit threshold at
each of several gate thresholds (1.0: the gates never skip) and keeps the pair that scores best
on the held-out labels, so the gates are used at a budget only where they help there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from adaptive_depth.config import check_gate_threshold, criterion_from_name, criterion_spec, criterion_with_threshold
from adaptive_depth.encoder import AdaptiveEncoder
from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.exits import ExitCriterion
from adaptive_depth.head_trace import HeadTrace
from adaptive_depth.measure import (
    RowResults,
    batch_labels,
    check_budget,
    check_convention,
    patience_grid,
    record_rows,
    replay_rows,
    threshold_at_fraction,
)

__all__ = ["Calibration", "calibrate_operating_point", "calibrate_threshold", "criterion_name", "operating_engine"]

Metric = Callable[[Tensor, Tensor], float]


def criterion_name(criterion: ExitCriterion) -> str:
    """The :func:`~adaptive_depth.config.criterion_from_name` name of a built-in criterion
    (:func:`~adaptive_depth.config.criterion_spec` gives its threshold and options too)."""
    return criterion_spec(criterion)[0]


@dataclass
class Calibration:
    """The chosen operating point and what it measured on the calibration data.

    Attributes:
        criterion: criterion name (``"entropy"``...), see :func:`criterion_name`.
        threshold: the chosen threshold.
        max_relative_cost: the budget asked for.
        convention: ``"exact"`` or ``"paper"``, the FLOPs convention the budget is in.
        relative_cost: total MACs over total full-depth MACs of the calibration rows at
            ``threshold``, in ``convention``.
        relative_cost_exact, relative_cost_paper: the same in both conventions.
        mean_layers_run: layers run per row at ``threshold``.
        metric_name, metric: the task metric at ``threshold`` (``None`` without labels).
        num_rows: rows of calibration data.
        evaluations: every ``(threshold, relative_cost)`` the search measured, in order.
        gate_threshold: the engine's gate threshold at this point (a layer is skipped when
            ``p_skip >= gate_threshold``; 1.0 never skips).
        criterion_options: the criterion's other fields, kept from the engine calibrated (e.g.
            ``{"regression_tolerance": 0.1}`` for patience), see
            :func:`~adaptive_depth.config.criterion_spec`.
        candidates: from :func:`calibrate_operating_point` only: for every gate threshold tried,
            ``{"gate_threshold", "threshold", "relative_cost", "mean_layers_run", "metric"}``, or
            ``{"gate_threshold", "error"}`` when no exit threshold met the budget with it.
    """

    criterion: str
    threshold: float
    max_relative_cost: float
    convention: str
    relative_cost: float
    relative_cost_exact: float
    relative_cost_paper: float
    mean_layers_run: float
    metric_name: str | None
    metric: float | None
    num_rows: int
    evaluations: list[tuple[float, float]] = field(default_factory=list)
    gate_threshold: float | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    criterion_options: dict[str, float] = field(default_factory=dict)

    def make_criterion(self) -> ExitCriterion:
        """The exit criterion at the chosen threshold, with the calibrated engine's other fields."""
        return criterion_from_name(self.criterion, self.threshold, self.criterion_options)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return dataclasses.asdict(self)


def _check_tolerance(tolerance: float) -> None:
    if not 0.0 < tolerance < 1.0:  # also refuses NaN; 0 would bisect forever
        raise ValueError(f"tolerance is the width (a fraction of the threshold range, in (0, 1)) at which the "
                         f"bisection stops, e.g. 1e-3; got {tolerance}.")


def _accuracy(predictions: Tensor, labels: Tensor) -> float:
    return float((predictions.long() == labels.long()).double().mean())


def calibrate_threshold(
    engine_or_model: AdaptiveInferenceEngine | AdaptiveEncoder,
    data: Iterable[Mapping[str, Tensor]],
    max_relative_cost: float = 0.5,
    *,
    convention: str = "exact",
    metric: Metric | None = None,
    tolerance: float = 1e-3,
    progress: bool = False,
) -> Calibration:
    """The least aggressive exit threshold whose relative cost on ``data`` is within budget.

    Relative cost is total MACs over total full-depth MACs of the same rows (a ratio of sums).

    Args:
        engine_or_model: an engine (its criterion type, mode, gate threshold and padded length
            are kept; only the threshold changes) or an encoder (its ``adaptive_config``
            operating point says which criterion, mode and gate threshold).
        data: batches (dicts of model inputs: ``input_ids``, ``attention_mask``, ... and
            optionally ``labels``), right-padded; iterated once and kept in memory.
        max_relative_cost: budget, a fraction of the full-depth MACs in ``(0, 1]``.
        convention: ``"exact"`` (every matmul at the real length) or ``"paper"``.
        metric: ``(predictions [R], labels [R]) -> float`` reported at the chosen point;
            default accuracy for classification with labels, none for regression.
        tolerance: stop bisecting a continuous threshold when the bracket is this narrow (a
            fraction of the threshold's range, in ``(0, 1)``).
        progress: show a progress bar over the thresholds measured (needs tqdm).

    Returns:
        :class:`Calibration`.

    Raises:
        ValueError: a budget outside ``(0, 1]``, a tolerance outside ``(0, 1)``, an unknown
            convention, a mode whose cost the threshold does not change (``"full"``,
            ``"skip_only"``), empty data, labels in only some batches, a ``metric`` without
            labels, or a budget that even the most aggressive threshold cannot meet (the message
            gives the cheapest cost reachable).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4,
        ...                             num_attention_heads=4, intermediate_size=37))
        >>> encoder = AdaptiveEncoder(bert, num_labels=2, with_gates=False, head_inner_size=16).eval()
        >>> data = [{"input_ids": torch.randint(0, 99, (8, 6))}]
        >>> calibration = calibrate_threshold(encoder, data, max_relative_cost=0.6)
        >>> calibration.relative_cost <= 0.6
        True
    """
    max_relative_cost = check_budget(max_relative_cost)
    check_convention(convention)
    _check_tolerance(tolerance)
    template = operating_engine(engine_or_model)
    if template.mode not in ("adaptive", "exit_only"):
        raise ValueError(f"mode {template.mode!r} never exits early, so no threshold changes its cost; "
                         "use 'adaptive' or 'exit_only'.")
    name, _, options = criterion_spec(template.criterion)
    batches = list(data)
    if not batches:
        raise ValueError("calibration data is empty.")
    labels = batch_labels(batches)
    regression = template.encoder.num_labels == 1
    if metric is not None and labels is None:
        raise ValueError("a metric needs labels: give every batch 'labels' (held-out rows), or no metric.")
    if metric is None and labels is not None and not regression:
        metric, metric_name = _accuracy, "accuracy"
    else:
        metric_name = getattr(metric, "__name__", "metric") if metric is not None else None

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"calibrating {name} to {max_relative_cost:.0%} cost", unit="threshold")
    evaluations: list[tuple[float, float]] = []
    cache: dict[float, RowResults] = {}
    recorded: HeadTrace | None = None  # the one engine pass, made at the first candidate

    def measure(threshold: float) -> RowResults:
        nonlocal recorded
        if threshold not in cache:
            if recorded is None:
                recorded = record_rows(template, batches)
            cache[threshold] = replay_rows(recorded, criterion_with_threshold(template.criterion, threshold))
            cost = cache[threshold].relative_cost(convention)
            evaluations.append((threshold, cost))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(threshold=f"{threshold:.4g}", cost=f"{cost:.3f}")
        return cache[threshold]

    try:
        threshold = _search(name, template, measure, convention, max_relative_cost, tolerance)
    finally:
        if bar is not None:
            bar.close()
    chosen = measure(threshold)
    value = None
    if metric is not None and labels is not None:
        value = float(metric(chosen.predictions.float(), labels.float()))
    return Calibration(
        criterion=name, threshold=threshold, max_relative_cost=max_relative_cost, convention=convention,
        relative_cost=chosen.relative_cost(convention), relative_cost_exact=chosen.relative_cost("exact"),
        relative_cost_paper=chosen.relative_cost("paper"),
        mean_layers_run=float(chosen.layers_run.double().sum()) / len(chosen.layers_run),
        metric_name=metric_name, metric=value, num_rows=len(chosen.predictions), evaluations=evaluations,
        gate_threshold=template.gate_threshold, criterion_options=options,
    )


def calibrate_operating_point(
    engine_or_model: AdaptiveInferenceEngine | AdaptiveEncoder,
    data: Iterable[Mapping[str, Tensor]],
    max_relative_cost: float = 0.5,
    *,
    gate_thresholds: Sequence[float] = (0.5, 0.6, 1.0),
    convention: str = "exact",
    metric: Metric | None = None,
    tolerance: float = 1e-3,
    progress: bool = False,
) -> Calibration:
    """The gate threshold and exit threshold that score best on ``data`` within the budget.

    The gate threshold is a second knob on cost: a lower one skips more layers, a higher one
    fewer (1.0 never skips, so the engine runs no gate there and the exits alone meet the
    budget, as in ``exit_only`` mode). For each gate threshold
    in ``gate_thresholds``, :func:`calibrate_threshold` finds the least aggressive exit threshold
    within ``max_relative_cost``; the pair with the best (highest) metric on ``data`` wins (ties: the
    cheaper, then the earlier in ``gate_thresholds``; a pair whose metric is NaN is listed, not chosen).
    ``data`` must hold labels: the choice is made by the metric, so calibrate on held-out rows and
    report on others. The metric must grow with quality (accuracy, F1, a correlation; not an error).

    Args:
        engine_or_model, max_relative_cost, convention, metric, tolerance, progress: as in
            :func:`calibrate_threshold`; the engine (or the encoder's operating point) must run
            with skip gates (mode ``"adaptive"``).
        data: batches with ``labels``, iterated once and kept in memory.
        gate_thresholds: the gate thresholds to try, each in ``[0, 1]``.

    Returns:
        the winning :class:`Calibration`, with ``gate_threshold`` set and ``candidates`` listing
        every gate threshold tried.

    Raises:
        ValueError: no gate thresholds or one outside ``[0, 1]``, a model without gates or a
            mode without them, data without labels, a regression model without a ``metric``, or
            a budget that no gate threshold meets (as :func:`calibrate_threshold`).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4,
        ...                             num_attention_heads=4, intermediate_size=37))
        >>> encoder = AdaptiveEncoder(bert, num_labels=2, head_inner_size=16, gate_inner_size=16).eval()
        >>> data = [{"input_ids": torch.randint(0, 99, (8, 6)), "labels": torch.randint(0, 2, (8,))}]
        >>> point = calibrate_operating_point(encoder, data, max_relative_cost=0.8, gate_thresholds=(0.5, 1.0))
        >>> point.gate_threshold in (0.5, 1.0), len(point.candidates)
        (True, 2)
    """
    template = operating_engine(engine_or_model)
    max_relative_cost = check_budget(max_relative_cost)
    check_convention(convention)
    _check_tolerance(tolerance)
    gate_thresholds = [check_gate_threshold(value) for value in gate_thresholds]
    if not gate_thresholds:
        raise ValueError("gate_thresholds is empty; give at least one, e.g. (0.5, 1.0).")
    if template.mode != "adaptive" or not template.encoder.has_gates:
        raise ValueError(f"calibrate_operating_point chooses a gate threshold, but this engine runs no gates (mode "
                         f"{template.mode!r}, gates: {template.encoder.has_gates}); use calibrate_threshold.")
    batches = list(data)
    if not batches or any(batch.get("labels") is None for batch in batches):
        raise ValueError("calibrate_operating_point picks the pair with the best metric, so every batch needs "
                         "'labels' (held-out rows, never the rows you report on).")
    if template.encoder.num_labels == 1 and metric is None:
        raise ValueError("a regression model has no default metric; pass metric=(predictions, labels) -> float.")
    best: Calibration | None = None
    candidates: list[dict[str, Any]] = []
    errors: list[str] = []
    nan_metric = False  # some gate threshold met the budget but its metric was not finite
    for gate_threshold in gate_thresholds:
        engine = AdaptiveInferenceEngine(template.encoder, template.criterion, gate_threshold, template.mode,
                                         template.padded_length)
        try:
            calibration = calibrate_threshold(engine, batches, max_relative_cost, convention=convention, metric=metric,
                                              tolerance=tolerance, progress=progress)
        except ValueError as error:  # no exit threshold meets the budget at this gate threshold
            candidates.append({"gate_threshold": gate_threshold, "error": str(error)})
            errors.append(f"gate_threshold={gate_threshold:g}: {error}")
            continue
        candidates.append({"gate_threshold": gate_threshold, "threshold": calibration.threshold,
                           "relative_cost": calibration.relative_cost, "mean_layers_run": calibration.mean_layers_run,
                           "metric": calibration.metric})
        if calibration.metric is not None and not math.isfinite(calibration.metric):  # NaN compares as neither
            nan_metric = True
            errors.append(f"gate_threshold={gate_threshold:g}: the metric is {calibration.metric} (e.g. a "
                          "correlation of constant predictions)")
            continue
        if best is None or (calibration.metric, -calibration.relative_cost) > (best.metric, -best.relative_cost):
            best = calibration
    if best is None:
        finite = " with a finite metric" if nan_metric else ""
        raise ValueError(f"no gate threshold meets the budget{finite}: " + "; ".join(errors))
    best.candidates = candidates
    return best


def operating_engine(engine_or_model: AdaptiveInferenceEngine | AdaptiveEncoder) -> AdaptiveInferenceEngine:
    """The engine to calibrate: the one given, or the encoder's saved operating point."""
    if isinstance(engine_or_model, AdaptiveInferenceEngine):
        return engine_or_model
    if isinstance(engine_or_model, AdaptiveEncoder):
        config = engine_or_model.adaptive_config
        return AdaptiveInferenceEngine(engine_or_model, config.make_criterion(), config.gate_threshold, config.mode)
    raise TypeError(f"calibrate an AdaptiveInferenceEngine or an AdaptiveEncoder, got {type(engine_or_model).__name__}.")


def _search(name: str, template: AdaptiveInferenceEngine, measure: Callable[[float], RowResults],
            convention: str, budget: float, tolerance: float) -> float:
    """Bisect (or scan, for patience) from the most accurate threshold towards the cheapest."""
    if name == "patience":
        candidates = patience_grid(template.encoder.num_steps)
        for candidate in candidates:
            if measure(candidate).relative_cost(convention) <= budget:
                return candidate
        return _impossible(name, candidates[-1], measure(candidates[-1]).relative_cost(convention), budget, template)
    threshold_at = threshold_at_fraction(name, template.encoder.num_labels)
    if measure(threshold_at(0.0)).relative_cost(convention) <= budget:
        return threshold_at(0.0)
    if measure(threshold_at(1.0)).relative_cost(convention) > budget:
        return _impossible(name, threshold_at(1.0), measure(threshold_at(1.0)).relative_cost(convention), budget,
                           template)
    low, high = 0.0, 1.0  # cost(low) > budget >= cost(high)
    while high - low > tolerance:
        middle = (low + high) / 2
        if measure(threshold_at(middle)).relative_cost(convention) <= budget:
            high = middle
        else:
            low = middle
    return threshold_at(high)


def _impossible(name: str, threshold: float, cost: float, budget: float, template: AdaptiveInferenceEngine) -> float:
    earliest = "the first head that runs"
    if name == "tolerance":  # it needs `patience` heads after the first to agree
        earliest = f"head {getattr(template.criterion, 'patience', 1) + 1} of those that run"
    raise ValueError(
        f"no {name} threshold meets max_relative_cost={budget:g}: even {name}={threshold:.4g}, which exits "
        f"at {earliest}, costs {cost:.3f} of full depth on this data (the first layer, the gates "
        "and the heads cost that much); raise the budget or train gates that skip more."
    )
