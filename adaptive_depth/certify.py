"""Certified operating points: an exit threshold with a distribution-free bound on what it changes.

The guarantee, in plain words: with probability at least ``1 - delta`` over the draw of the
``n`` calibration rows, the rate at which the model's answers at the certified threshold differ
from its full-depth answers on new rows from the same distribution is at most ``max_risk``
(assumes calibration rows and future rows are exchangeable, e.g. drawn i.i.d. from the same
source). The same holds for the other risks: the error-rate gap to full depth (labels needed),
and for regression the rate of scores that move by more than a tolerance.

How (Learn-then-Test, Angelopoulos, Bates, Candes, Jordan, Lei 2021; used for early exit by
CALM, Schuster et al., NeurIPS 2022): the thresholds of a grid fixed before seeing the data are
ordered from the safest (least early exit) to the most aggressive, and the null hypotheses
``H_j: risk(threshold_j) > max_risk`` are tested in that order with valid p-values, rejecting
while ``p_j <= delta`` and stopping at the first non-rejection (fixed-sequence testing). Every
rejected threshold is certified: the probability that any of them has a risk above
``max_risk`` is at most ``delta`` (family-wise error), so any choice among them keeps the
guarantee; :func:`certify_threshold` returns the cheapest (or, with a cost budget, the one
with the lowest upper bound within it).

The p-values (:mod:`adaptive_depth.pvalues`): for the 0/1 losses (``"disagreement"``,
``"moved"``) the exact binomial tail ``P(Binomial(n, max_risk) <= losses)``, the tightest valid
p-value for a 0/1 loss; for ``"error_gap"`` (per row ``1[early wrong] - 1[full wrong]`` in
``[-1, 1]``, rescaled to ``[0, 1]`` by ``(x + 1) / 2`` with the level rescaled alike), the
Hoeffding-Bentkus p-value of Bates et al. 2021, valid for any loss in ``[0, 1]``. The rescaling
costs power: at a few hundred rows an error gap is certifiable only at several percent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adaptive_depth.calibration import operating_engine
from adaptive_depth.certificate import RISKS, Certificate, GridPoint
from adaptive_depth.config import criterion_spec, criterion_with_threshold
from adaptive_depth.encoder import AdaptiveEncoder
from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.measure import (
    RowResults,
    batch_labels,
    check_budget,
    check_convention,
    patience_grid,
    record_rows,
    reference_predictions,
    replay_rows,
    threshold_at_fraction,
)
from adaptive_depth.pvalues import binomial_p_value, check_risk_level, hoeffding_bentkus_p_value, upper_confidence_bound

__all__ = ["GRID_POINTS", "Selection", "certify_threshold", "check_risk", "default_grid", "p_value_method",
           "risk_p_value", "risk_upper_bound", "row_losses", "select_threshold"]

GRID_POINTS = 51  # thresholds of a continuous criterion's default grid (fixed-sequence testing loses no power to more)


def p_value_method(risk: str) -> str:
    """``"binomial"`` for the 0/1 risks, ``"hoeffding_bentkus"`` for ``"error_gap"``."""
    return "hoeffding_bentkus" if risk == "error_gap" else "binomial"


def row_losses(risk: str, predictions: Tensor, full_predictions: Tensor, labels: Tensor | None = None,
               tolerance: float | None = None) -> Tensor:
    """Per-row losses in ``[0, 1]`` (float64 ``[R]``) of the risk ``risk``.

    ``"disagreement"``: ``1[prediction != full-depth prediction]``; ``"moved"``:
    ``1[|score - full-depth score| > tolerance]``; ``"error_gap"``: ``(1[prediction wrong] -
    1[full-depth prediction wrong] + 1) / 2``.

    Example:
        >>> row_losses("disagreement", torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1])).tolist()
        [0.0, 1.0, 0.0]
    """
    if risk == "disagreement":
        return (predictions != full_predictions).double()
    if risk == "moved":
        return ((predictions.double() - full_predictions.double()).abs() > tolerance).double()
    wrong = (predictions != labels).double()
    return (wrong - (full_predictions != labels).double() + 1.0) / 2.0


def risk_p_value(risk: str, loss_sum: float, n: int, max_risk: float) -> tuple[float, float]:
    """``(empirical risk, p-value of "risk > max_risk")`` from the sum of :func:`row_losses` over
    ``n`` rows, the risk in its own units (``error_gap`` in ``[-1, 1]``)."""
    mean = loss_sum / n
    if risk == "error_gap":  # Hoeffding-Bentkus on the [0, 1] rescaling, reported in gap units
        return 2.0 * mean - 1.0, hoeffding_bentkus_p_value(mean, n, (max_risk + 1.0) / 2.0)
    return mean, binomial_p_value(round(loss_sum), n, max_risk)


def risk_upper_bound(risk: str, loss_sum: float, n: int, delta: float) -> float:
    """The ``(1 - delta)`` upper confidence bound of the risk (in its own units), from the same
    p-value family as :func:`risk_p_value`."""
    if risk == "error_gap":
        return 2.0 * upper_confidence_bound(loss_sum / n, n, delta, "hoeffding_bentkus") - 1.0
    return upper_confidence_bound(round(loss_sum) / n, n, delta, "binomial")


@dataclass
class Selection:
    """What :func:`select_threshold` found: ``index`` into the grid (``None``: nothing to certify
    within the request), the tested ``points`` and, when ``index`` is ``None``, ``reason``."""

    index: int | None
    points: list[GridPoint]
    upper_bound: float | None = None
    reason: str | None = None


def select_threshold(thresholds: Sequence[float], loss_sum_at: Callable[[int], float], cost_at: Callable[[int], float],
                     n: int, *, risk: str, max_risk: float, delta: float, max_relative_cost: float | None = None
                     ) -> Selection:
    """Fixed-sequence testing over ``thresholds`` (safest first), then the choice among the certified.

    ``loss_sum_at(j)`` and ``cost_at(j)`` are called only for the points tested (up to the first
    one not certified), so an engine can run lazily behind them. Without ``max_relative_cost``
    the cheapest certified point wins (ties: the safer); with it, among the certified points
    that cost at most the budget, the one with the lowest upper bound (ties: the cheaper).
    """
    points: list[GridPoint] = []
    for index, threshold in enumerate(thresholds):
        empirical, p_value = risk_p_value(risk, loss_sum_at(index), n, max_risk)
        certified = p_value <= delta
        points.append(GridPoint(float(threshold), empirical, p_value, cost_at(index), certified))
        if not certified:
            break
    certified = [index for index, point in enumerate(points) if point.certified]
    if not certified:
        return Selection(None, points, reason="none certified")
    if max_relative_cost is None:
        best = min(certified, key=lambda index: (points[index].relative_cost, index))
        return Selection(best, points, risk_upper_bound(risk, loss_sum_at(best), n, delta))
    within = [index for index in certified if points[index].relative_cost <= max_relative_cost]
    if not within:
        return Selection(None, points, reason="over budget")
    bounds = {index: risk_upper_bound(risk, loss_sum_at(index), n, delta) for index in within}
    best = min(within, key=lambda index: (bounds[index], points[index].relative_cost, index))
    return Selection(best, points, bounds[best])


def default_grid(engine: AdaptiveInferenceEngine, points: int = GRID_POINTS) -> list[float]:
    """The criterion's natural grid, safest first: ``points`` thresholds evenly spaced from
    "never exits early" to "exits at the first head" (entropy 0 to ``log C``, the last point
    ``log C + 0.001``, above float32's rounding of any entropy; max-probability 1 to 0, tolerance 0
    to ``inf`` through ``f / (1 - f)``), or patience from ``L`` down to 0.

    Example:
        >>> from adaptive_depth import AdaptiveEncoder, EntropyExit
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
        ...                             num_attention_heads=4, intermediate_size=37))
        >>> grid = default_grid(AdaptiveInferenceEngine(AdaptiveEncoder(bert, num_labels=2), EntropyExit(0.3)), 5)
        >>> [round(value, 4) for value in grid]
        [0.0, 0.1733, 0.3466, 0.5199, 0.6941]
    """
    if points < 2:
        raise ValueError(f"a grid needs at least 2 points, got {points}.")
    name = criterion_spec(engine.criterion)[0]
    if name == "patience":
        return patience_grid(engine.encoder.num_steps)
    threshold_at = threshold_at_fraction(name, engine.encoder.num_labels)
    return [threshold_at(index / (points - 1)) for index in range(points)]


def _ordered(engine: AdaptiveInferenceEngine, thresholds: Iterable[float]) -> list[float]:
    """User thresholds, safest first, without repeats (entropy and tolerance rise, the others
    fall), each checked by the criterion before any is tested."""
    name = criterion_spec(engine.criterion)[0]
    values = sorted({float(value) for value in thresholds}, reverse=name in ("max_prob", "patience"))
    if not values or any(math.isnan(value) for value in values):
        raise ValueError(f"thresholds must be a non-empty sequence of numbers, got {values}.")
    for value in values:
        criterion_with_threshold(engine.criterion, value)  # raises on a value the criterion refuses
    return values


def certify_threshold(
    engine_or_model: AdaptiveInferenceEngine | AdaptiveEncoder,
    batches: Iterable[Mapping[str, Tensor]],
    max_risk: float = 0.01,
    delta: float = 0.05,
    risk: str = "disagreement",
    *,
    thresholds: Sequence[float] | None = None,
    max_relative_cost: float | None = None,
    convention: str = "exact",
    tolerance: float | None = None,
    progress: bool = False,
) -> Certificate:
    """The cheapest exit threshold whose risk is certified at ``max_risk`` with probability ``1 - delta``.

    See the module docstring for the guarantee and the test. The engine runs once on the rows
    with no row exiting, recording every exit head's logits
    (:meth:`~adaptive_depth.engine.AdaptiveInferenceEngine.trace_heads`); each grid point tested
    is then replayed from that record (:mod:`adaptive_depth.replay`), not run again. A
    second pass at full depth (mode ``"full"``) gives the reference answers, unless every layer
    ran for every row in the first (``exit_only``), whose last head then is full depth.

    The certificate is about the engine's behaviour at the chosen threshold. A replay equals the
    engine at that threshold up to the float rounding of batched matmuls (the record runs each
    layer on more rows than the engine at a threshold does, which may change a logit in its last
    bit): only a row whose exit score lies within that rounding of a threshold can decide
    differently (``tests/test_replay.py`` checks equal decisions, predictions and MACs).

    Args:
        engine_or_model: an engine (its criterion type and options, mode, gate threshold and
            padded length are kept; only the threshold changes) or an encoder (its saved
            operating point).
        batches: calibration batches (model inputs, plus ``labels`` for ``"error_gap"``),
            right-padded; iterated once. Rows must be exchangeable with the future rows, and
            never used to train or choose anything else.
        max_risk: the risk level to certify, in ``(0, 1)``.
        delta: the allowed probability that the certificate is wrong, in ``(0, 1)``.
        risk: ``"disagreement"`` (classification: the answer differs from full depth; no labels
            needed), ``"error_gap"`` (classification: error rate minus the full-depth error
            rate; labels needed) or ``"moved"`` (regression: the score moves by more than
            ``tolerance``).
        thresholds: the grid (any order; tested safest first); default :func:`default_grid`.
            Fix it before looking at the calibration rows.
        max_relative_cost: optional budget in ``(0, 1]``: choose, among the certified thresholds
            that cost at most this, the one with the lowest upper bound.
        convention: FLOPs convention of costs (``"exact"`` or ``"paper"``). Relative cost is total
            MACs over total full-depth MACs of the calibration rows.
        tolerance: for ``"moved"`` only, in score units, ``> 0`` and finite.
        progress: show a progress bar over the engine passes (one or two; needs tqdm).

    Returns:
        :class:`~adaptive_depth.certificate.Certificate`.

    Raises:
        ValueError: an argument out of range, a risk that does not fit the model or the data
            (``error_gap`` without labels, ``moved`` on a classifier...), a mode that never exits
            early, or a request no threshold meets: the message says what is achievable.

    Example:
        >>> from adaptive_depth import EntropyExit
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3,
        ...                             num_attention_heads=4, intermediate_size=37))
        >>> encoder = AdaptiveEncoder(bert, num_labels=2, with_gates=False, head_inner_size=16).eval()
        >>> batches = [{"input_ids": torch.randint(0, 99, (100, 6))} for _ in range(4)]
        >>> engine = AdaptiveInferenceEngine(encoder, EntropyExit(0.3), mode="exit_only")
        >>> certificate = certify_threshold(engine, batches, max_risk=0.05, delta=0.05)
        >>> certificate.n, certificate.upper_bound <= 0.05
        (400, True)
    """
    max_risk, delta = check_risk_level(max_risk, "max_risk"), check_risk_level(delta, "delta")
    check_convention(convention)
    if max_relative_cost is not None:
        max_relative_cost = check_budget(max_relative_cost)
    template = operating_engine(engine_or_model)
    if template.mode not in ("adaptive", "exit_only"):
        raise ValueError(f"mode {template.mode!r} never exits early, so there is no threshold to certify; "
                         "use 'adaptive' or 'exit_only'.")
    name, _, options = criterion_spec(template.criterion)
    grid = _ordered(template, thresholds) if thresholds is not None else default_grid(template)
    batches = list(batches)
    if not batches:
        raise ValueError("calibration data is empty.")
    labels = check_risk(risk, template.encoder.num_labels, batch_labels(batches), tolerance)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2, desc=f"certifying {risk} <= {max_risk:g}", unit="pass")
    cache: dict[int, RowResults] = {}
    try:
        recorded = record_rows(template, batches)  # one pass, no row exits: every threshold replays from it
        if bar is not None:
            bar.update(1)
        reference = reference_predictions(template, batches, recorded)
        if bar is not None:
            bar.update(1)

        def rows_at(index: int) -> RowResults:
            if index not in cache:
                cache[index] = replay_rows(recorded, criterion_with_threshold(template.criterion, grid[index]))
            return cache[index]

        n = len(reference)
        selection = select_threshold(
            grid, lambda index: float(row_losses(risk, rows_at(index).predictions, reference, labels, tolerance).sum()),
            lambda index: rows_at(index).relative_cost(convention), n, risk=risk, max_risk=max_risk, delta=delta,
            max_relative_cost=max_relative_cost)
    finally:
        if bar is not None:
            bar.close()
    if selection.index is None:
        raise ValueError(_refusal(selection, name, risk, n, max_risk, delta, max_relative_cost))
    chosen, rows = selection.points[selection.index], cache[selection.index]
    return Certificate(
        criterion=name, threshold=chosen.threshold, criterion_options=options, gate_threshold=template.gate_threshold,
        mode=template.mode, risk=risk, max_risk=max_risk, delta=delta, n=n, empirical_risk=chosen.empirical_risk,
        upper_bound=selection.upper_bound, p_value=chosen.p_value,  # type: ignore[arg-type]
        p_value_method=p_value_method(risk),
        tolerance=tolerance, convention=convention, relative_cost=chosen.relative_cost,
        relative_cost_exact=rows.relative_cost("exact"), relative_cost_paper=rows.relative_cost("paper"),
        max_relative_cost=max_relative_cost, grid=tuple(selection.points),
    )


def check_risk(risk: str, num_labels: int, labels: Tensor | None, tolerance: float | None) -> Tensor | None:
    """The labels the risk uses (``None`` but for ``"error_gap"``), after refusing a risk that does not
    fit the model (``num_labels``), the ``labels`` (``[R]`` or ``None``) or the ``tolerance``."""
    if risk not in RISKS:
        raise ValueError(f"risk must be one of {', '.join(map(repr, RISKS))}, got {risk!r}.")
    regression = num_labels == 1
    if risk == "moved":
        if not regression:
            raise ValueError("risk 'moved' (scores moving by more than a tolerance) is for regression; certify a "
                             "classifier's 'disagreement' or 'error_gap'.")
        if tolerance is None or not 0.0 < tolerance < math.inf:  # also refuses NaN
            raise ValueError(f"risk 'moved' needs tolerance > 0 and finite (score units), got {tolerance}.")
        return None
    if regression:
        raise ValueError(f"a regression model has no {risk!r} risk (scores are never exactly equal); use "
                         "risk='moved' with tolerance=... (score units).")
    if tolerance is not None:
        raise ValueError(f"tolerance is for risk 'moved' (regression) only; risk {risk!r} takes none.")
    if risk == "error_gap":
        if labels is None:
            raise ValueError("risk 'error_gap' compares error rates, so every batch needs 'labels'; 'disagreement' "
                             "needs none.")
        labels = labels.long()
        if bool(((labels < 0) | (labels >= num_labels)).any()):
            raise ValueError(f"labels must be class indices in [0, {num_labels}), got values "
                             f"{sorted(set(labels.tolist()))[:10]}.")
        return labels
    return None


def _refusal(selection: Selection, name: str, risk: str, n: int, max_risk: float, delta: float,
             max_relative_cost: float | None) -> str:
    """What no threshold achieved, and what is achievable instead."""
    first = selection.points[0]
    if selection.reason == "over budget":
        certified = [point for point in selection.points if point.certified]
        cheapest = min(certified, key=lambda point: point.relative_cost)
        return (f"no {name} threshold certified at max_risk={max_risk:g}, delta={delta:g} with n={n} rows costs at "
                f"most max_relative_cost={max_relative_cost:g}: the cheapest certified one, {name}="
                f"{cheapest.threshold:.4g}, costs {cheapest.relative_cost:.3f} of full depth (total MACs / full-depth "
                "MACs); raise the budget or max_risk, or give more rows.")
    losses = {"disagreement": ("disagreements with full depth", "no disagreement at all"),
              "moved": ("scores moved beyond the tolerance", "no score moved beyond it")}
    if risk == "error_gap":
        seen = f"an error gap of {first.empirical_risk:+.2%} to full depth"
        best_case, best_words = 0.5 * n, "no error gap at all"
    else:
        seen = f"{round(first.empirical_risk * n)}/{n} {losses[risk][0]}"
        best_case, best_words = 0.0, losses[risk][1]
    loss_sum = (first.empirical_risk + 1.0) / 2.0 * n if risk == "error_gap" else first.empirical_risk * n
    bound = risk_upper_bound(risk, loss_sum, n, delta)
    smallest = risk_upper_bound(risk, best_case, n, delta)
    return (f"no threshold is certified at max_risk={max_risk:g}, delta={delta:g} with n={n} rows: the safest "
            f"threshold ({name}={first.threshold:.4g}) has {seen} (upper bound {bound:.2%}, p-value "
            f"{first.p_value:.3g} > delta); the smallest certifiable risk with {n} rows is {smallest:.2%} (with "
            f"{best_words}); give more rows or a larger max_risk (at least {bound:.2%} for these rows).")
