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

One run's calibration is :func:`benchmarks.run_calibration.calibrate_run`; this module builds the
table over runs and is the command line.

The JSON has the shape of a ``benchmarks.tradeoff`` table where it matters (``task``, ``model``,
``seed``, ``main_metric``, ``reference``, ``at_cost``, ``skipping``), so ``benchmarks.seeds``
summarises several seeds of it as it does the grid tables; ``calibration`` holds every
operating point in full (threshold, held-out cost and metric, dev metrics and cost).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import torch

from adaptive_depth.config import CriterionName, check_gate_threshold
from benchmarks.comparison import REFERENCE, check_alike, parse_run, reference_macs
from benchmarks.run_calibration import CALIBRATE_ON, calibrate_run, calibration_rows, joint_skipping
from benchmarks.seeds import VERDICT_BUDGETS
from recipes.run import errors
from recipes.run.data import run_examples
from recipes.run.errors import ConfigError
from recipes.run.folder import BACKBONE_DIR, RESULTS_FILE
from recipes.run.logs import setup_logging
from recipes.run.method import get_method
from recipes.run.results import RunResults, read_results

SELECTION = "threshold calibrated to each budget on held-out rows"
GATES_OFF = "_gates_off"  # suffix of a method calibrated with its skip gates off (--gates-off)
JOINT = "_joint"  # suffix of a method calibrated over gate and exit thresholds together (--joint)
GATE_THRESHOLDS = (0.5, 0.6, 1.0)  # --joint's default gate thresholds
# What --criterion may name, by the task's outputs (adaptive_depth.config.criterion_from_name).
REGRESSION_CRITERIA = ("patience", "tolerance")
CLASSIFICATION_CRITERIA = tuple(name for name in get_args(CriterionName) if name != "tolerance")
# The selection each ``--calibrate-on`` gives (``benchmarks.seeds`` keeps kinds apart).
SELECTIONS = {"heldout": SELECTION,
              "dev-half": "threshold calibrated to each budget on half of dev, scored on the other half"}

__all__ = ["build_calibrated_table", "format_calibrated", "main"]


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
        path = run_dir / RESULTS_FILE
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
    reference = float(reference_macs(next(iter(runs.values())) / BACKBONE_DIR, get_task(task).num_labels,
                                     padded_length))
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
    for value in args.gate_thresholds:
        try:
            check_gate_threshold(value)
        except ValueError as error:
            raise ConfigError(f"--gate-thresholds {value}: {error}") from error
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
