"""Each method calibrated to each cost budget on held-out rows, then scored on dev.

``benchmarks.tradeoff`` reads its at-cost comparison off each method's fixed threshold grid:
the best dev metric among the grid points that cost at most the budget. Two things make that
comparison coarse. A method whose grid has no point just under a budget is scored at a much
cheaper point (or not at all), so the cell depends on the grid as much as on the method. And the
setting is picked by its dev metric, on the set it is reported on.

This benchmark compares methods the way a user deploys them: for every trained run and every
budget, :func:`adaptive_depth.calibrate_threshold` picks the least aggressive exit threshold
whose mean cost on the run's held-out part of train (the rows model selection used, never dev)
is within the budget; dev is then evaluated once at that threshold. Costs are in the paper
convention, relative to the fine-tuned model's full depth (the same denominator as
``benchmarks.tradeoff``), so a budget means the same FLOPs for every method. The dev cost can
differ a little from the budget: held-out and dev rows differ.

    python -m benchmarks.calibrated --data-dir ../shared/data/glue \\
        --run smartbert=runs/i13d/mrpc-s42/smartbert --run fastbert=runs/fb-mrpc-s42/fastbert \\
        --json runs/calibrated-mrpc-seed42.json
    python -m benchmarks.calibrated --table runs/tradeoff-rte/tradeoff-rte.json --json runs/calibrated-rte.json

``--gates-off smartbert`` also calibrates that run with its skip gates turned off (engine mode
``exit_only``: every layer runs until the exit, the gates cost nothing), reported as
``smartbert_gates_off``: at a budget, what do the gates add to the exits of the same model?

``--joint smartbert`` also calibrates that run over both knobs
(:func:`adaptive_depth.calibrate_operating_point`): at each budget, the exit threshold at each of
the ``--gate-thresholds`` (default 0.5 0.6 1.0; 1.0 never skips, and the engine then runs no
gate: that candidate is the gates-off calibration), keeping the pair with the best held-out
metric, reported as ``smartbert_joint``. Its cells also give the gate threshold chosen, the dev
skip rate per layer there, and dev at every gate threshold tried (for the record, not for
choosing), and ``joint_skipping`` how per-sample the skipping is at each gate threshold.

``--criterion NAME`` calibrates every run with that exit criterion instead of its method's own:
``tolerance`` on a regression task (STS-B) exits once two consecutive heads' scores differ by less
than the threshold, a continuous knob where patience has only a few operating points (often none
between "exit at the first heads" and nearly full depth).

``--calibrate-on dev-half`` calibrates on a seeded, label-stratified half of dev instead and
scores the other half: for a task whose train rows differ from dev (SST-2 trains on phrases and
is evaluated on sentences), where a threshold calibrated on train overshoots the budget on dev.

The JSON has the shape of a ``benchmarks.tradeoff`` table where it matters (``task``, ``model``,
``seed``, ``main_metric``, ``reference``, ``at_cost``, ``skipping``), so ``benchmarks.seeds``
summarises several seeds of it as it does the grid tables; ``calibration`` holds every
operating point in full (threshold, held-out cost and metric, dev metrics and cost).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import torch

from adaptive_depth.config import CriterionName
from benchmarks.seeds import VERDICT_BUDGETS
from benchmarks.tradeoff import REFERENCE, check_alike, reference_macs
from recipes import errors
from recipes.errors import ConfigError, ResumeMismatchError
from recipes.logs import setup_logging
from recipes.methods import get_method
from recipes.results import RunResults, read_results
from recipes.run_folder import RUN_FILE, compare_data, run_examples, split_fingerprint

logger = logging.getLogger("recipes")

SELECTION = "threshold calibrated to each budget on held-out rows"
GATES_OFF = "_gates_off"  # suffix of a method calibrated with its skip gates off (--gates-off)
JOINT = "_joint"  # suffix of a method calibrated over gate and exit thresholds together (--joint)
GATE_THRESHOLDS = (0.5, 0.6, 1.0)  # --joint's default gate thresholds
# What --criterion may name, by the task's outputs (adaptive_depth.config.criterion_from_name).
REGRESSION_CRITERIA = ("patience", "tolerance")
CLASSIFICATION_CRITERIA = tuple(name for name in get_args(CriterionName) if name != "tolerance")
# What ``--calibrate-on`` may name, and the selection each gives (``benchmarks.seeds`` keeps kinds apart).
CALIBRATE_ON = ("heldout", "dev-half")
SELECTIONS = {"heldout": SELECTION,
              "dev-half": "threshold calibrated to each budget on half of dev, scored on the other half"}

__all__ = ["calibrate_run", "calibration_rows", "format_calibrated", "heldout_and_dev", "main"]


def calibration_rows(examples: tuple[list[Any], list[Any]], config: Any, calibrate_on: str = "heldout"
                     ) -> tuple[list[Any], list[Any]]:
    """``(rows to calibrate on, rows to report on)`` of a run.

    Args:
        examples: the run's train and dev rows (:func:`recipes.run_folder.run_examples`).
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
    batches: the same tokenizer and ``max_length``, ``eval_batch_size`` rows per batch."""
    from functools import partial

    from recipes.glue import EncodedDataset, collate, encode_examples

    heldout, dev = calibration_rows(examples, config, calibrate_on)

    def batches(examples: Sequence[Any]) -> list[dict[str, torch.Tensor]]:
        dataset = EncodedDataset(encode_examples(examples, tokenizer, config.max_length))
        loader = torch.utils.data.DataLoader(dataset, batch_size=config.eval_batch_size,
                                             collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id))
        return list(loader)

    return batches(heldout), batches(dev)


def check_data(run_dir: Path, data_dir: Path, config: Any, examples: tuple[list[Any], list[Any]]) -> None:
    """Refuse a data folder whose rows (``examples``, read from ``data_dir``) differ from those the
    run was trained and selected on.

    Raises:
        ResumeMismatchError: other rows, or a run folder without ``run.json``.
    """
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise ResumeMismatchError(f"{run_dir} has no {RUN_FILE}: its data cannot be checked; is it a finished run folder?")
    saved = json.loads(run_file.read_text(encoding="utf-8")).get("data")
    moved = compare_data(saved, split_fingerprint(data_dir, config.task, config, examples), str(run_dir))
    if moved:
        logger.warning("%s", moved)


def load_checked_run(method_name: str, run_dir: Path, data_dir: Path
                     ) -> tuple[Any, Any, Any, tuple[list[Any], list[Any]]]:
    """``(encoder, tokenizer, config, (train rows, dev rows))`` of a finished run, its rows read
    from ``data_dir`` and checked to be those it was trained on (:func:`check_data`)."""
    from recipes.reload import load_run

    encoder, tokenizer, config = load_run(run_dir, method_name)
    examples = run_examples(data_dir, config.task, config)
    check_data(run_dir, data_dir, config, examples)
    return encoder, tokenizer, config, examples


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
    from recipes.glue import GlueMetrics, get_task
    from recipes.operating_point import first_exit_setting, main_metric_function
    from recipes.sweep import SweepSetting, run_sweep

    if reference is not None and convention != "paper":
        raise ValueError("a shared reference is in paper-convention MACs; use convention='paper' or reference=None")
    method = get_method(method_name)
    encoder, tokenizer, config, examples = load_checked_run(method_name, run_dir, data_dir)
    task = get_task(config.task)
    settings = method.sweep_settings(config, task, encoder.num_steps)
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
    gate_threshold = method.gate_threshold(config)
    heldout, dev = heldout_and_dev(examples, config, tokenizer, calibrate_on)
    own_full = float(encoder.full_depth_macs(config.padded_length, "paper"))
    scale = 1.0 if reference is None else own_full / reference  # own relative cost -> relative to reference
    # Any valid threshold: calibration replaces it.
    exit_criterion = exit_setting.criterion if criterion is None else criterion_from_name(criterion, 1.0)
    template = AdaptiveInferenceEngine(encoder, exit_criterion, gate_threshold, mode,  # type: ignore[arg-type]
                                       config.padded_length)
    make_metrics = lambda: GlueMetrics(task)  # noqa: E731
    calibrate = (calibrate_threshold if gate_thresholds is None
                 else partial(calibrate_operating_point, gate_thresholds=gate_thresholds))
    own_cost_of = lambda row: row.relative_cost_paper if convention == "paper" else row.relative_cost_exact  # noqa: E731

    def dev_row(gate_threshold: float | None, threshold: float, name: str) -> Any:
        """Dev scored once at an operating point: a :class:`~recipes.results.SweepRow`."""
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
    :func:`recipes.sweep.skipping_statistics` (distinct skip patterns, skip rate per layer,
    Spearman and mutual information between a row's skip count and its full-depth loss).

    Returns:
        ``{str(gate_threshold): statistics}``.
    """
    from recipes.glue import get_task
    from recipes.reload import load_run
    from recipes.sweep import skipping_statistics

    encoder, tokenizer, config = load_run(run_dir, method_name)
    _, dev = heldout_and_dev(run_examples(data_dir, config.task, config), config, tokenizer, calibrate_on)
    is_regression = get_task(config.task).is_regression
    return {str(gate): skipping_statistics(encoder, dev, gate, is_regression) for gate in gate_thresholds}


def build_calibrated_table(runs: dict[str, Path], data_dir: Path, budgets: Sequence[float], *,
                           tolerance: float = 1e-3, progress: bool = True, calibrate_on: str = "heldout",
                           gates_off: Sequence[str] = (), joint: Sequence[str] = (),
                           gate_thresholds: Sequence[float] = GATE_THRESHOLDS, criterion: str | None = None
                           ) -> dict[str, Any]:
    """Every run calibrated to every budget: a JSON-ready table (see the module docstring);
    ``calibrate_on``: see :func:`calibration_rows`; ``criterion``: calibrate every run with that
    exit criterion instead of its method's own (:func:`calibrate_run`). Each method in
    ``gates_off`` is calibrated a second time with its skip gates off, as ``<method>_gates_off``;
    each in ``joint`` a second time over ``gate_thresholds`` and exit thresholds together, as
    ``<method>_joint``.

    Raises:
        ConfigError: runs of different tasks, seeds, lengths or backbones; a run without exits;
            a ``gates_off`` or ``joint`` method that is not among ``runs`` or has no gates; a
            ``criterion`` the task's outputs cannot use.
        CheckpointError, ResumeMismatchError: see :func:`calibrate_run`.
    """
    from recipes.glue import get_task, holdout_split, majority_class_metrics

    all_results: dict[str, RunResults] = {}
    for method, run_dir in runs.items():
        path = run_dir / "results.json"
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: calibrate finished runs (train them with benchmarks.tradeoff "
                              "or python -m recipes.<method>)")
        results = read_results(path)
        if results.recipe != method:
            raise ConfigError(f"{run_dir} is a {results.recipe!r} run, not {method!r}; give it as "
                              f"--run {results.recipe}={run_dir}")
        all_results[method] = results
    check_alike(all_results)
    first = next(iter(all_results.values()))
    task = first.task
    padded_length = first.config["padded_length"]
    reference = float(reference_macs(next(iter(runs.values())) / "backbone", get_task(task).num_labels, padded_length))
    if criterion is not None:
        usable = REGRESSION_CRITERIA if get_task(task).is_regression else CLASSIFICATION_CRITERIA
        if criterion not in usable:
            kind = "a regression task (one output)" if get_task(task).is_regression else "a classification task"
            raise ConfigError(f"--criterion {criterion}: {task} is {kind}, whose exits can use {', '.join(usable)}")
    for option, methods in (("--gates-off", gates_off), ("--joint", joint)):
        unknown = sorted(set(methods) - set(runs))
        if unknown:
            raise ConfigError(f"{option} {', '.join(unknown)}: not among the runs ({', '.join(runs)}); give its run "
                              "with --run too")
        gateless = [method for method in methods if not all_results[method].skipping]
        if gateless:
            raise ConfigError(f"{option} {', '.join(gateless)}: its run has no skip gates; name a method with gates, "
                              "e.g. smartbert")
    common = {"tolerance": tolerance, "progress": progress, "calibrate_on": calibrate_on, "criterion": criterion}
    calibration = {method: calibrate_run(method, run_dir, data_dir, budgets, reference, **common)
                   for method, run_dir in runs.items()}
    for method in gates_off:
        calibration[f"{method}{GATES_OFF}"] = calibrate_run(method, runs[method], data_dir, budgets, reference,
                                                           gates_off=True, **common)
    for method in joint:
        calibration[f"{method}{JOINT}"] = calibrate_run(method, runs[method], data_dir, budgets, reference,
                                                       gate_thresholds=gate_thresholds, **common)
    skipping_by_gate = {method: joint_skipping(method, runs[method], data_dir, gate_thresholds, calibrate_on)
                        for method in joint}
    majority = first.majority_class_baseline
    rows: dict[str, int] = {}
    if calibrate_on != "heldout":  # scored on part of dev: its majority class and sizes
        config = get_method(first.recipe).config_class(**first.config)
        examples = run_examples(data_dir, task, config)
        calibrate, report = calibration_rows(examples, config, calibrate_on)
        train_part = holdout_split(examples[0], config.holdout_fraction, config.seed)[0]
        majority = majority_class_metrics(task, [row.label for row in train_part], [row.label for row in report])
        rows = {"calibrated_on": len(calibrate), "reported_on": len(report)}
    at_cost = {method: {key: None if "error" in cell else {name: cell[name] for name in
                                                           ("setting", "main_metric", "relative_cost")}
                        for key, cell in cells.items()}
               for method, cells in calibration.items()}
    return {
        "task": task, "model": first.model, "main_metric": first.main_metric, "seed": first.config["seed"],
        "padded_length": padded_length, "convention": "paper", "selection": SELECTIONS[calibrate_on],
        "calibrate_on": calibrate_on, **({"rows": rows} if rows else {}),
        "criterion": criterion,  # None: each method's own
        "reference": {"method": REFERENCE, "mean_macs_paper": reference,
                      "source": "computed (pooler head, every layer)", "analytic_mean_macs_paper": reference},
        "budgets": list(budgets),
        "majority_class_baseline": majority,
        "runs": {method: str(run_dir) for method, run_dir in runs.items()},
        **({"gates_off": list(gates_off)} if gates_off else {}),
        **({"joint": list(joint), "gate_thresholds": list(gate_thresholds),
            "joint_skipping": skipping_by_gate} if joint else {}),
        "skipping": {method: results.skipping for method, results in all_results.items() if results.skipping},
        "calibration": calibration,
        "at_cost": at_cost,
    }


def format_calibrated(table: dict[str, Any]) -> str:
    """Markdown: per method and budget, dev metric (%) at the calibrated threshold, dev and held-out cost (%)."""
    main_metric = table["main_metric"]
    on_dev_half = table.get("calibrate_on") == "dev-half"
    costs = "cost on the scored half, on the calibration half" if on_dev_half else "dev cost, held-out cost"
    header = ["method", *(f"{main_metric} at {100 * budget:.0f}% ({costs})" for budget in table["budgets"])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, cells in table["calibration"].items():
        values = [method]
        for budget in table["budgets"]:
            cell = cells[str(budget)]
            if "error" in cell:
                values.append("- (no threshold meets it)")
                continue
            values.append(f"{100 * cell['main_metric']:.2f} ({cell['setting']}; {100 * cell['relative_cost']:.1f}%, "
                          f"{100 * cell['heldout_relative_cost']:.1f}%)")
        lines.append("| " + " | ".join(values) + " |")
    majority = (table.get("majority_class_baseline") or {}).get(main_metric)
    if majority is not None:
        where = "the scored half of dev" if on_dev_half else "dev"
        lines.append(f"\nmajority-class baseline on {where}: {main_metric} {100 * majority:.2f}")
    return "\n".join(lines)


def parse_run(argument: str) -> tuple[str, Path]:
    """``method=folder`` -> ``(method, Path(folder))``."""
    method, separator, folder = argument.partition("=")
    if not separator or not method or not folder:
        raise ConfigError(f"--run {argument!r}: expected method=run_folder, e.g. --run smartbert=runs/tradeoff-mrpc/smartbert")
    return method.strip(), Path(folder)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibrated", description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", default=[], metavar="METHOD=FOLDER",
                        help="a finished run folder of METHOD (repeat for every method)")
    parser.add_argument("--table", default=None,
                        help="a benchmarks.tradeoff table: calibrate every run it names that has exits")
    parser.add_argument("--data-dir", default=None, help="glue_data folder the runs were trained on (default: $GLUE_DIR)")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(VERDICT_BUDGETS),
                        help="relative costs (fractions of the fine-tuned full depth, paper convention); "
                             f"default {' '.join(map(str, VERDICT_BUDGETS))}")
    parser.add_argument("--gates-off", action="append", default=[], metavar="METHOD",
                        help=f"also calibrate METHOD's run with its skip gates off (reported as METHOD{GATES_OFF}): "
                             "what the gates add at each budget (repeatable)")
    parser.add_argument("--joint", action="append", default=[], metavar="METHOD",
                        help=f"also calibrate METHOD's run over gate and exit thresholds together, keeping the pair "
                             f"with the best held-out metric (reported as METHOD{JOINT}; repeatable)")
    parser.add_argument("--gate-thresholds", nargs="+", type=float, default=list(GATE_THRESHOLDS),
                        help="the gate thresholds --joint tries (1.0: the gates never skip); default "
                             f"{' '.join(map(str, GATE_THRESHOLDS))}")
    parser.add_argument("--calibrate-on", choices=CALIBRATE_ON, default="heldout",
                        help="heldout (default): calibrate on each run's held-out part of train, score all of dev; "
                             "dev-half: calibrate on a seeded half of dev, score the other half (for a task whose "
                             "train rows differ from dev, e.g. SST-2's phrases)")
    parser.add_argument("--criterion", choices=sorted({*CLASSIFICATION_CRITERIA, *REGRESSION_CRITERIA}), default=None,
                        help="calibrate every run with this exit criterion instead of its method's own, e.g. "
                             "tolerance (regression: exit once two heads' scores differ by less than it, a "
                             "continuous knob where patience has few operating points)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="threshold bisection tolerance (default 1e-3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", required=True, help="where to write the table")
    return parser.parse_args(argv)


def runs_of(args: argparse.Namespace) -> dict[str, Path]:
    """The ``{method: run folder}`` to calibrate, from ``--table`` and ``--run``."""
    runs: dict[str, Path] = {}
    if args.table is not None:
        try:
            table = json.loads(Path(args.table).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"--table {args.table}: no such file") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"--table {args.table}: not JSON ({error})") from None
        if "runs" not in table:
            raise ConfigError(f"--table {args.table}: not a benchmarks.tradeoff table (no runs)")
        runs.update({method: Path(folder) for method, folder in table["runs"].items() if method != REFERENCE})
    for argument in args.run:
        method, folder = parse_run(argument)
        get_method(method)
        runs[method] = folder
    if not runs:
        raise ConfigError("nothing to calibrate: give --run METHOD=FOLDER (repeatable) or --table")
    bad = [budget for budget in args.budgets if not (0.0 < budget <= 1.0 and math.isfinite(budget))]
    if bad:
        raise ConfigError(f"--budgets {bad}: each budget must be in (0, 1], a fraction of the fine-tuned full depth")
    if not 0.0 < args.tolerance < 1.0:  # 0 would bisect forever
        raise ConfigError(f"--tolerance {args.tolerance}: the bisection's stopping width must be in (0, 1), e.g. 1e-3")
    bad = [value for value in args.gate_thresholds if not 0.0 <= value <= 1.0]
    if bad:
        raise ConfigError(f"--gate-thresholds {bad}: each must be in [0, 1] (a layer is skipped when p_skip >= it; "
                          "1 never skips)")
    return runs


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.calibrated``; returns the exit status (2 on a user error)."""
    from adaptive_depth.backbones import UnsupportedModelError
    from adaptive_depth.files import OutputPathError, check_output_path
    from recipes.glue import GlueDataError, resolve_data_dir

    setup_logging()
    args = parse_args(argv)
    handled = (GlueDataError, UnsupportedModelError, OutputPathError)
    with errors.error_boundary(handled=handled) as outcome, errors.catch_signals():
        path = check_output_path(args.json, create_parents=True)  # before any work
        runs = runs_of(args)
        data_dir = resolve_data_dir(args.data_dir)
        if args.threads:
            torch.set_num_threads(args.threads)
        started = time.perf_counter()
        table = build_calibrated_table(runs, data_dir, args.budgets, tolerance=args.tolerance,
                                       calibrate_on=args.calibrate_on, gates_off=args.gates_off, joint=args.joint,
                                       gate_thresholds=args.gate_thresholds, criterion=args.criterion)
        table["wall_time_s"] = time.perf_counter() - started
        table["threads"] = torch.get_num_threads()
        table["command"] = " ".join(["python", "-m", "benchmarks.calibrated", *(argv if argv is not None else sys.argv[1:])])
        path.write_text(json.dumps(table, indent=2), encoding="utf-8")
        print(format_calibrated(table))
        print(f"table: {path}")
    return outcome.status


if __name__ == "__main__":
    sys.exit(main())
