"""The end of every recipe run: an operating point chosen on held-out data, the model saved.

After the dev sweep, :func:`calibrate_and_save` picks the exit threshold on the held-out part
of train (never looking at dev): with ``operating_point=budget`` (the default) the least
aggressive one whose relative cost there (total MACs over total full-depth MACs) is at most
``calibration_budget``; with ``operating_point=certified`` the cheapest one whose disagreement
with full depth is certified at most ``certify_max_risk`` with probability
``1 - certify_delta`` (:func:`adaptive_depth.certify.certify_threshold`). It evaluates dev at
that threshold and saves the model with its tokenizer, that operating point, the task's metric
and whether it reads text pairs to ``<run>/model/`` (:meth:`AdaptiveEncoder.save_pretrained`),
ready for ``AdaptivePipeline.from_pretrained`` and ``python -m adaptive_depth.predict``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from adaptive_depth.calibration import calibrate_threshold, criterion_name
from adaptive_depth.certify import certify_threshold
from adaptive_depth.config import criterion_with_threshold
from adaptive_depth.encoder import AdaptiveEncoder
from adaptive_depth.engine import AdaptiveInferenceEngine
from recipes.run.folder import MODEL_DIR
from recipes.run.logs import logger
from recipes.run.results import OperatingPoint
from recipes.run.sweep import SweepSetting, run_sweep

__all__ = ["calibrate_and_save", "describe_operating_point", "first_exit_setting", "main_metric_function"]


def calibrate_and_save(
    encoder: AdaptiveEncoder,
    tokenizer: Any,
    run_dir: Path,
    settings: Sequence[SweepSetting],
    heldout: Iterable[Mapping[str, Tensor]],
    dev: Iterable[Mapping[str, Tensor]],
    make_metrics: Callable[[], Any],
    *,
    budget: float,
    padded_length: int | None,
    label_names: Sequence[str] | None,
    max_length: int,
    rule: str = "budget",
    max_risk: float = 0.05,
    delta: float = 0.05,
) -> OperatingPoint:
    """Calibrate on ``heldout``, evaluate ``dev`` there, save ``<run_dir>/model``.

    Args:
        encoder: the trained model (eval mode is set here).
        tokenizer: saved beside the model.
        run_dir: the run folder.
        settings: the recipe's sweep; its first setting with an exit criterion says which
            criterion and engine mode to calibrate. Without one (plain fine-tuning) the model is
            saved at full depth and nothing is calibrated.
        heldout, dev: batches with ``labels``.
        make_metrics: a fresh task-metrics object (``update`` / ``compute``).
        budget: ``max_relative_cost`` (exact convention), for ``rule="budget"``.
        padded_length: as in the sweep. The gates skip at the encoder's own threshold
            (``encoder.adaptive_config.gate_threshold``), which is saved with the model.
        label_names: class names in label-id order (``None`` for regression).
        max_length: the training truncation length.
        rule: ``"budget"`` (calibrate to ``budget``) or ``"certified"`` (certify the disagreement
            with full depth at ``max_risk`` with probability ``1 - delta``).
        max_risk, delta: the certificate's risk and confidence (``rule="certified"``).

    Returns:
        The :class:`~recipes.run.results.OperatingPoint` of ``results.json``.
    """
    encoder.eval()
    config = encoder.adaptive_config
    task = make_metrics().task
    config.label_names = list(label_names) if label_names is not None else None
    config.max_length = max_length
    config.metric, config.text_pair = task.main_metric, task.is_pair
    exit_setting = first_exit_setting(settings)
    calibrated: dict[str, Any] | None = None
    certificate: dict[str, Any] | None = None
    reason = None
    if exit_setting is None:
        config.mode = "full"
        reason = "this method has no early exit; the model runs at full depth"
        chosen = SweepSetting("full", "full")
    else:
        template = AdaptiveInferenceEngine(encoder, exit_setting.criterion, mode=exit_setting.mode,
                                           padded_length=padded_length)
        config.mode = exit_setting.mode
        try:
            if rule == "certified":
                certified = certify_threshold(template, list(heldout), max_risk, delta)
            else:
                calibration = calibrate_threshold(template, list(heldout), budget,
                                                  metric=main_metric_function(make_metrics))
        except ValueError as error:  # the budget cannot be met (or nothing certified): save at no early exit
            logger.warning("%s: %s", "certification" if rule == "certified" else "calibration", error)
            never = criterion_with_threshold(exit_setting.criterion, _never_exit(exit_setting))
            config.set_criterion(never)
            calibrated = {"error": str(error)}
            chosen = SweepSetting("no early exit", exit_setting.mode, never, config.threshold)
        else:
            if rule == "certified":
                criterion, name, threshold = certified.make_criterion(), certified.criterion, certified.threshold
                config.certificate = certificate = certified.to_dict()
                logger.info("certified on held-out: %s", certified.summary())
                label = f"certified {name}={threshold:.4g}"
            else:
                criterion, name, threshold = calibration.make_criterion(), calibration.criterion, calibration.threshold
                config.calibration = {**calibration.to_dict(), "data": "held-out part of train"}
                calibrated = calibration.to_dict()
                logger.info("calibrated on held-out: %s=%.4g, relative cost (exact) %.3f, %s %.4f", name, threshold,
                            calibration.relative_cost, calibration.metric_name, calibration.metric)
                label = f"calibrated {name}={threshold:.4g}"
            config.set_criterion(criterion)
            chosen = SweepSetting(label, exit_setting.mode, criterion, threshold)
    dev_row = run_sweep(encoder, dev, [chosen], make_metrics, padded_length=padded_length)[0]
    encoder.save_pretrained(run_dir / MODEL_DIR, tokenizer=tokenizer)
    # model_dir is relative to the run folder, which may move.
    return OperatingPoint(budget=budget, convention="exact", calibration=calibrated, dev=dev_row, model_dir=MODEL_DIR,
                          reason=reason, rule=rule, certificate=certificate)


def describe_operating_point(point: OperatingPoint, max_risk: float, delta: float) -> str:
    """One line for the end of a run: how the operating point was chosen (``max_risk``, ``delta``:
    the certificate's, for a certified point) and dev there."""
    chosen_by = (f"disagreement with full depth certified <= {max_risk:g} with probability >= {1 - delta:g}"
                 if point.rule == "certified" else f"budget {point.budget:.0%} of full-depth MACs")
    return (f"operating point ({chosen_by}, chosen on held-out): {point.dev.name}: dev {point.dev.metrics}, "
            f"relative cost (exact) {point.dev.relative_cost_exact:.3f}")


def first_exit_setting(settings: Sequence[SweepSetting]) -> SweepSetting | None:
    """The first sweep setting with an exit criterion in a mode that exits early: the criterion
    and mode a run calibrates (``None`` for a method without early exit)."""
    return next((s for s in settings if s.criterion is not None and s.mode in ("adaptive", "exit_only")), None)


def main_metric_function(make_metrics: Callable[[], Any]) -> Callable[[Tensor, Tensor], float]:
    """The task's main metric as a ``(predictions, labels) -> float`` function."""

    probe = make_metrics()
    regression = probe.task.is_regression

    def main_metric(predictions: Tensor, labels: Tensor) -> float:
        metrics = make_metrics()
        metrics.update(predictions if regression else predictions.long(), labels)
        return float(metrics.compute()[metrics.main_metric])

    main_metric.__name__ = probe.main_metric
    return main_metric


def _never_exit(setting: SweepSetting) -> float:
    name = criterion_name(setting.criterion)
    if name == "max_prob":
        return 1.0
    if name == "patience":
        return 10_000.0
    return 0.0

