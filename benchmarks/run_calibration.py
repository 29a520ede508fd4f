"""One finished run calibrated to every cost budget (:func:`calibrate_run`), for :mod:`benchmarks.calibrated`.

For each budget, :func:`adaptive_depth.calibrate_threshold` (or, over gate thresholds too,
:func:`adaptive_depth.calibrate_operating_point`) picks the least aggressive exit threshold whose
mean cost on the calibration rows is within the budget, and the reported rows are scored once
there. Which rows calibrate and which report is :func:`calibration_rows`: the run's held-out part
of train and all of dev, or two seeded halves of dev. The run, its rows and its batches are
:func:`recipes.run.trained.load_trained_run`'s; the model runs at its own gate threshold unless
gate thresholds are calibrated too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from recipes.run.errors import ConfigError
from recipes.run.logs import logger
from recipes.run.trained import load_trained_run

__all__ = ["CALIBRATE_ON", "calibrate_run", "calibration_rows", "heldout_and_dev", "joint_skipping"]

CALIBRATE_ON = ("heldout", "dev-half")  # what ``--calibrate-on`` may name (calibration_rows)


def calibration_rows(examples: tuple[list[Any], list[Any]], config: Any, calibrate_on: str = "heldout"
                     ) -> tuple[list[Any], list[Any]]:
    """``(rows to calibrate on, rows to report on)`` of a run.

    Args:
        examples: the run's train and dev rows (:func:`recipes.run.data.run_examples`).
        calibrate_on: ``"heldout"``: the run's held-out part of train (the seeded
            ``holdout_fraction`` split, the rows model selection used), reported on the whole dev
            set; ``"dev-half"``: a seeded, label-stratified half of dev, reported on the other half
            (for a task whose train rows differ from dev, like SST-2's phrases).
    """
    from recipes.glue import holdout_split

    train, dev = examples
    if calibrate_on == "heldout":
        return holdout_split(train, config.holdout_fraction, config.seed)[1], dev
    if calibrate_on == "dev-half":
        report, calibrate = holdout_split(dev, 0.5, config.seed)
        return calibrate, report
    raise ValueError(f"calibrate_on must be one of {CALIBRATE_ON}, got {calibrate_on!r}")


def heldout_and_dev(examples: tuple[list[Any], list[Any]], config: Any, tokenizer: Any, calibrate_on: str = "heldout"
                    ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """The batches to calibrate on and to report on (:func:`calibration_rows`), as the run made
    batches (:func:`recipes.run.data.eval_batches`: its tokenizer and ``max_length``,
    ``eval_batch_size`` rows per batch)."""
    from recipes.run.data import eval_batches

    calibrate, report = calibration_rows(examples, config, calibrate_on)
    return eval_batches(calibrate, tokenizer, config), eval_batches(report, tokenizer, config)


def calibrate_run(method_name: str, run_dir: Path, data_dir: Path, budgets: Sequence[float],
                  reference: float | None, *, convention: str = "paper", tolerance: float = 1e-3, progress: bool = True,
                  calibrate_on: str = "heldout", gates_off: bool = False,
                  gate_thresholds: Sequence[float] | None = None, criterion: str | None = None
                  ) -> dict[str, dict[str, Any]]:
    """Calibrate one finished run to every budget on its held-out rows; evaluate dev there.

    Args:
        method_name: the recipe that made ``run_dir`` (``"smartbert"``, ``"fastbert"``...).
        run_dir: a finished run folder (``results.json``, ``model/``).
        data_dir: the ``glue_data`` folder it was trained on (checked by fingerprint).
        budgets: mean cost per row, as fractions of ``reference`` MACs.
        reference: the denominator, paper-convention MACs per row (``benchmarks.tradeoff``'s
            fine-tuned full depth); ``None``: each budget is a fraction of this run's own
            full depth, in ``convention``, as the run's own calibration reads it.
        convention: ``"paper"`` (every row at the padded length) or, with ``reference=None``,
            ``"exact"`` (every row at its real length).
        tolerance: of the threshold bisection (:func:`adaptive_depth.calibrate_threshold`).
        progress: a progress bar per calibration.
        calibrate_on: which rows to calibrate on and which to report on (:func:`calibration_rows`;
            ``"dev-half"``: every "dev" below is the reported half of dev).
        gates_off: run the engine with the skip gates off (mode ``"exit_only"``) instead of the
            method's own exit mode, to measure what the gates add at each budget.
        criterion: the exit criterion to calibrate (a :func:`adaptive_depth.config.criterion_from_name`
            name, e.g. ``"tolerance"`` for a regression task); ``None``: the method's own.
        gate_thresholds: choose the gate threshold too, among these, by the held-out metric
            (:func:`adaptive_depth.calibrate_operating_point`); ``None``: the method's own.

    Returns:
        ``{str(budget): cell}`` where a cell is ``{"error": ...}`` when no threshold meets the
        budget on held-out, else has ``setting``, ``main_metric`` and
        ``relative_cost`` (dev, over ``reference``) as in ``benchmarks.tradeoff``'s ``at_cost``, plus
        ``criterion``, ``threshold``, ``heldout_relative_cost``, ``heldout_metric``, ``metrics``
        (dev), ``mean_layers_run`` (dev) and ``budget_own_full_depth`` (the budget over this run's
        own full depth, as calibrated). With ``gate_thresholds`` a cell also has
        ``gate_threshold`` (chosen), ``skip_rate_per_layer`` (dev, there), ``candidates``
        (held-out, per gate threshold) and ``dev_candidates`` (dev metric, cost and mean layers
        at every gate threshold's calibrated exit threshold: for the record, not for choosing).

    Raises:
        CheckpointError: ``run_dir`` is not a finished run of ``method_name``.
        ResumeMismatchError: ``data_dir`` holds other rows than the run's.
        ConfigError: the method has no exit threshold to calibrate, or (``gates_off``,
            ``gate_thresholds``) no skip gates; both given.
    """
    from functools import partial

    from adaptive_depth.calibration import calibrate_operating_point, calibrate_threshold, criterion_name
    from adaptive_depth.config import criterion_from_name, criterion_with_threshold
    from adaptive_depth.engine import AdaptiveInferenceEngine
    from recipes.glue import GlueMetrics
    from recipes.run.operating_point import first_exit_setting, main_metric_function
    from recipes.run.sweep import SweepSetting, run_sweep

    if reference is not None and convention != "paper":
        raise ValueError("a shared reference is in paper-convention MACs; use convention='paper' or reference=None")
    run = load_trained_run(method_name, run_dir, data_dir)
    encoder, config, task = run.encoder, run.config, run.task
    settings = run.method.sweep_settings(config, task, encoder.num_steps)
    exit_setting = first_exit_setting(settings)
    if exit_setting is None:
        raise ConfigError(f"{method_name} has no early exit, so no threshold trades accuracy for cost; leave it out "
                          "(benchmarks.tradeoff shows its full depth)")
    mode = exit_setting.mode
    if gates_off and gate_thresholds is not None:
        raise ConfigError("calibrate either with the gates off or over gate thresholds, not both")
    if (gates_off or gate_thresholds is not None) and (mode != "adaptive" or not encoder.has_gates):
        option = "--gates-off" if gates_off else "--joint"
        raise ConfigError(f"{option} {method_name}: its runs have no skip gates (it exits with mode {mode!r}); "
                          "name a method with gates, e.g. smartbert")
    if gates_off:
        mode = "exit_only"
    heldout, dev = heldout_and_dev(run.examples, config, run.tokenizer, calibrate_on)
    own_full = float(encoder.full_depth_macs(config.padded_length, "paper"))
    scale = 1.0 if reference is None else own_full / reference  # own relative cost -> relative to reference
    # Any valid threshold: calibration replaces it.
    exit_criterion = exit_setting.criterion if criterion is None else criterion_from_name(criterion, 1.0)
    # The gates skip at the encoder's own threshold, unless calibrate_operating_point tries others.
    template = AdaptiveInferenceEngine(encoder, exit_criterion, mode=mode,  # type: ignore[arg-type]
                                       padded_length=config.padded_length)
    make_metrics = lambda: GlueMetrics(task)  # noqa: E731
    calibrate = (calibrate_threshold if gate_thresholds is None
                 else partial(calibrate_operating_point, gate_thresholds=gate_thresholds))
    own_cost_of = lambda row: row.relative_cost_paper if convention == "paper" else row.relative_cost_exact  # noqa: E731

    def dev_row(gate_threshold: float | None, threshold: float, name: str) -> Any:
        """Dev scored once at an operating point: a :class:`~recipes.run.results.SweepRow`."""
        setting = SweepSetting(name, mode, criterion_with_threshold(template.criterion, threshold), threshold)
        return run_sweep(encoder, dev, [setting], make_metrics, gate_threshold, config.padded_length)[0]

    cells: dict[str, dict[str, Any]] = {}
    for budget in budgets:
        own_budget = min(1.0, budget / scale)
        try:
            calibration = calibrate(template, heldout, own_budget, convention=convention,
                                    metric=main_metric_function(make_metrics), tolerance=tolerance, progress=progress)
        except ValueError as error:  # even the first head that runs costs more
            logger.info("%s at %.0f%%: %s", method_name, 100 * budget, error)
            cells[str(budget)] = {"error": str(error), "budget_own_full_depth": own_budget}
            continue
        name = f"{criterion_name(template.criterion)}={calibration.threshold:.4g}"
        if gate_thresholds is not None:
            name += f", gate={calibration.gate_threshold:g}"
        row = dev_row(calibration.gate_threshold, calibration.threshold, f"calibrated {name}")
        own_cost = own_cost_of(row)
        cells[str(budget)] = {
            "setting": name, "main_metric": row.metrics[task.main_metric], "relative_cost": own_cost * scale,
            "criterion": calibration.criterion, "threshold": calibration.threshold,
            "heldout_relative_cost": calibration.relative_cost * scale,
            "heldout_metric": calibration.metric, "heldout_rows": calibration.num_rows,
            "metrics": row.metrics, "mean_layers_run": row.mean_layers_run,
            "budget_own_full_depth": own_budget, "engine_passes": len(calibration.evaluations),
        }
        if gate_thresholds is not None:
            cells[str(budget)].update(gate_threshold=calibration.gate_threshold,
                                      skip_rate_per_layer=row.skip_rate_per_layer, candidates=[
                {**candidate, **({} if "error" in candidate else {"relative_cost": candidate["relative_cost"] * scale})}
                for candidate in calibration.candidates])
            rows = {calibration.gate_threshold: row}  # dev at every candidate, for the record: the chosen one is scored
            for candidate in calibration.candidates:
                if "error" not in candidate and candidate["gate_threshold"] not in rows:
                    rows[candidate["gate_threshold"]] = dev_row(candidate["gate_threshold"], candidate["threshold"],
                                                                f"candidate gate={candidate['gate_threshold']:g}")
            cells[str(budget)]["dev_candidates"] = [
                {"gate_threshold": gate, "main_metric": rows[gate].metrics[task.main_metric],
                 "relative_cost": own_cost_of(rows[gate]) * scale, "mean_layers_run": rows[gate].mean_layers_run}
                for gate in (candidate["gate_threshold"] for candidate in calibration.candidates if "error" not in candidate)]
        logger.info("%s at %.0f%%: %s (held-out cost %.3f), dev %s %.4f at cost %.3f", method_name, 100 * budget, name,
                    cells[str(budget)]["heldout_relative_cost"], task.main_metric, cells[str(budget)]["main_metric"],
                    cells[str(budget)]["relative_cost"])
    return cells


def joint_skipping(method_name: str, run_dir: Path, data_dir: Path, gate_thresholds: Sequence[float],
                   calibrate_on: str = "heldout") -> dict[str, dict[str, Any]]:
    """How per-sample the skipping is on the reported rows at each gate threshold (``--joint``):
    :func:`recipes.run.sweep.skipping_statistics` (distinct skip patterns, skip rate per layer,
    Spearman and mutual information between a row's skip count and its full-depth loss).

    Returns:
        ``{str(gate_threshold): statistics}``.
    """
    from recipes.run.sweep import skipping_statistics

    run = load_trained_run(method_name, run_dir, data_dir)
    _, dev = heldout_and_dev(run.examples, run.config, run.tokenizer, calibrate_on)
    return {str(gate): skipping_statistics(run.encoder, dev, gate, run.task.is_regression) for gate in gate_thresholds}
