"""Several seeds of :mod:`benchmarks.tradeoff`, side by side: mean and spread at each cost budget.

Each ``benchmarks.tradeoff`` run writes one table (``tradeoff-<task>.json``) for one seed. This
reads any number of them, groups them by task and backbone, and reports, for every method and
cost budget, the best dev metric of each seed (the table's ``at_cost`` cell), their mean,
standard deviation, minimum and maximum; then a paired comparison of two methods (by default
SmartBERT against FastBERT) over the seeds both have, with the 95% confidence interval of the
mean difference (Student's t over seeds: how large a difference these seeds can resolve), and
how per-sample each method's skipping is (the tables' ``skipping`` statistics, averaged over seeds).

    python -m benchmarks.seeds runs/i13/mrpc-s4*/tradeoff-mrpc.json \\
        benchmarks/results/tradeoff-mrpc.json:fastbert --json runs/seeds-mrpc.json

A path may end in ``:method[,method...]`` to take only those methods from that table (e.g. an
older five-method table whose SmartBERT was trained another way), and a method may be renamed
with ``method=label``, so that two variants of one method can be compared
(``old/tradeoff-mrpc.json:smartbert=smartbert_paper --compare smartbert smartbert_paper``). The same method, task,
backbone and seed given twice is an error, as are tables of one task and backbone whose
cost denominators differ (another padded length): their relative costs are not comparable.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptive_depth.files import OutputPathError, check_output_path, write_atomically
from recipes.run.models import model_label

VERDICT_BUDGETS = (0.75, 0.5, 0.33)
# How a table picked each method's setting per budget (its "selection"; tradeoff tables have none).
GRID = "best dev setting of the threshold grid within each cost budget"


class SeedsError(ValueError):
    """A table that cannot be read or combined; the message says which and why."""


@dataclass
class Group:
    """Every seed of every method on one task and backbone.

    ``cells[method][seed][budget]`` is the table's ``at_cost`` cell (or ``None``);
    ``skipping[method][seed]`` the run's skipping statistics where it has gates.
    """

    task: str
    model: str
    main_metric: str
    reference_macs: float
    majority: float | None
    selection: str = GRID
    cells: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    skipping: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    sources: dict[str, dict[int, str]] = field(default_factory=dict)


def split_source(argument: str) -> tuple[Path, dict[str, str] | None]:
    """``path[:method[=label],method...]`` -> (path, {method: label} or None for all, under their own names)."""
    path, _, methods = argument.partition(":") if not Path(argument).is_file() else (argument, "", "")
    wanted: dict[str, str] = {}
    for item in (item for item in methods.split(",") if item):
        method, separator, label = item.partition("=")
        if not method or (separator and not label):
            raise SeedsError(f"{argument}: {item!r} is not a method name or method=label")
        wanted[method] = label or method
    return Path(path), (wanted or None)


def load_tables(arguments: list[str]) -> dict[tuple[str, str], Group]:
    """Read ``tradeoff-<task>.json`` tables into one :class:`Group` per (task, backbone).

    Raises:
        SeedsError: a missing or foreign file, a method not in its table, a seed given twice, or
            two tables of one group with different cost denominators.
    """
    groups: dict[tuple[str, str], Group] = {}
    for argument in arguments:
        path, wanted = split_source(argument)
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SeedsError(f"{path}: no such file (give tradeoff-<task>.json tables written by "
                             "python -m benchmarks.tradeoff)") from None
        except json.JSONDecodeError as error:
            raise SeedsError(f"{path}: not JSON ({error})") from None
        missing = [key for key in ("task", "model", "seed", "main_metric", "reference", "at_cost") if key not in table]
        if missing:
            raise SeedsError(f"{path}: not a benchmarks.tradeoff table (no {', '.join(missing)})")
        methods = wanted or {method: method for method in table["at_cost"]}
        unknown = [method for method in methods if method not in table["at_cost"]]
        if unknown:
            raise SeedsError(f"{path}: has no method {unknown}; it has {list(table['at_cost'])}")
        key = (table["task"], model_label(table["model"]))
        majority = (table.get("majority_class_baseline") or {}).get(table["main_metric"])
        selection = table.get("selection", GRID)
        group = groups.setdefault(key, Group(*key, table["main_metric"], float(table["reference"]["mean_macs_paper"]),
                                             majority, selection))
        if group.selection != selection:
            raise SeedsError(f"{path}: its settings are picked as '{selection}', the other {key[0]} tables' as "
                             f"'{group.selection}'; summarise the two kinds of table separately")
        if not math.isclose(group.reference_macs, float(table["reference"]["mean_macs_paper"]), rel_tol=1e-6):
            raise SeedsError(f"{path}: its cost denominator ({table['reference']['mean_macs_paper']:.4g} MACs) differs "
                             f"from the other {key[0]} tables' ({group.reference_macs:.4g}); compare runs made alike "
                             "(same padded length and backbone)")
        seed = int(table["seed"])
        for method, label in methods.items():
            seen = group.sources.setdefault(label, {})
            if seed in seen:
                raise SeedsError(f"{label} seed {seed} on {key[0]} ({key[1]}) is given twice: {seen[seed]} and {path}; "
                                 "pick one with path:method, or rename one with path:method=label")
            seen[seed] = str(path)
            group.cells.setdefault(label, {})[seed] = table["at_cost"][method]
            stats = (table.get("skipping") or {}).get(method)
            if stats:
                group.skipping.setdefault(label, {})[seed] = stats
    return groups


# Student's t, two-sided 95% (the 0.975 quantile), for 1..30 degrees of freedom (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(degrees_of_freedom: int) -> float:
    """Student's t 0.975 quantile: the table up to 30 degrees of freedom, then the Cornish-Fisher
    expansion around the normal 1.95996 (within 1e-3 of the exact value there)."""
    if degrees_of_freedom < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {degrees_of_freedom}")
    if degrees_of_freedom <= len(_T975):
        return _T975[degrees_of_freedom - 1]
    z, df = 1.959964, float(degrees_of_freedom)
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_interval(differences: list[float]) -> list[float] | None:
    """95% confidence interval of the mean paired difference (Student's t over seeds), or
    ``None`` for fewer than two pairs. It says how large a difference these seeds can resolve:
    with three seeds the half-width is 2.48 standard deviations of the differences."""
    if len(differences) < 2:
        return None
    stats = spread(differences)
    half = t_quantile_975(len(differences) - 1) * stats["std"] / math.sqrt(len(differences))
    return [stats["mean"] - half, stats["mean"] + half]


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max and count."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


def summarize(group: Group, compare: tuple[str, str], verdict_budgets: tuple[float, ...] = VERDICT_BUDGETS) -> dict[str, Any]:
    """One group's JSON-ready summary: per method and budget, every seed's value and their spread
    (``None`` where some seed has no setting that cheap); the paired comparison of
    ``compare = (a, b)``; the skipping statistics averaged over seeds."""
    budgets = list(dict.fromkeys(budget for seeds in group.cells.values() for cells in seeds.values() for budget in cells))
    methods: dict[str, Any] = {}
    for method, seeds in group.cells.items():
        methods[method] = {}
        for budget in budgets:
            per_seed = {seed: (None if cells.get(budget) is None else cells[budget]["main_metric"])
                        for seed, cells in sorted(seeds.items())}
            values = [value for value in per_seed.values() if value is not None]
            methods[method][budget] = {"per_seed": per_seed,
                                       "spread": spread(values) if values and len(values) == len(per_seed) else None}
    a, b = compare
    comparison: dict[str, Any] = {"a": a, "b": b, "budgets": {}}
    if a in group.cells and b in group.cells:
        for budget in budgets:
            seeds = sorted(set(group.cells[a]) & set(group.cells[b]))
            pairs = [(methods[a][budget]["per_seed"][seed], methods[b][budget]["per_seed"][seed]) for seed in seeds]
            both = [(value_a, value_b) for value_a, value_b in pairs if value_a is not None and value_b is not None]
            differences = [value_a - value_b for value_a, value_b in both]
            comparison["budgets"][budget] = {
                "seeds": seeds,
                "mean_difference": (sum(differences) / len(differences)) if differences else None,
                "difference_ci95": paired_interval(differences),
                # A seed where only b has no setting that cheap counts for a; one where neither has does not.
                "a_at_or_above": sum(difference >= -1e-12 for difference in differences)
                + sum(value_a is not None and value_b is None for value_a, value_b in pairs),
                "only_a_missing": sum(value_a is None and value_b is not None for value_a, value_b in pairs),
                "both_missing": sum(value_a is None and value_b is None for value_a, value_b in pairs),
                "n": len(pairs),
            }
        comparison["verdict_budgets"] = list(verdict_budgets)
        comparison["a_at_or_above_on_mean_at"] = [
            budget for budget in verdict_budgets
            if (cell := comparison["budgets"].get(str(budget))) is not None and cell["n"] and not cell["only_a_missing"]
            and not cell["both_missing"] and (cell["mean_difference"] is None or cell["mean_difference"] >= -1e-12)]
        comparison["a_at_or_above_at_every_verdict_budget"] = \
            len(comparison["a_at_or_above_on_mean_at"]) == len(verdict_budgets)
    skipping = {}
    for method, seeds in group.skipping.items():
        keys = ("num_patterns", "mean_skipped", "spearman", "pearson", "mutual_information")
        skipping[method] = {key: spread([float(stats[key]) for stats in seeds.values() if stats.get(key) is not None])
                            for key in keys if any(stats.get(key) is not None for stats in seeds.values())}
        rates = [stats["skip_rate_per_layer"] for stats in seeds.values()]
        skipping[method]["skip_rate_per_layer"] = [sum(layer) / len(layer) for layer in zip(*rates)]
        skipping[method]["seeds"] = sorted(seeds)
    return {"task": group.task, "model": group.model, "main_metric": group.main_metric, "selection": group.selection,
            "majority_class_baseline": group.majority, "reference_mean_macs_paper": group.reference_macs,
            "sources": group.sources, "methods": methods, "comparison": comparison, "skipping": skipping}


def format_summary(summary: dict[str, Any]) -> str:
    """Markdown: per method and budget ``mean +- std`` over seeds with each seed's value, then the
    comparison and the skipping statistics."""
    metric = summary["main_metric"]
    methods = summary["methods"]
    budgets = list(next(iter(methods.values())))
    selection = summary.get("selection", GRID)
    what = "best setting within each cost budget" if selection == GRID else selection
    column = "cost <= {:.0f}%" if selection == GRID else "budget {:.0f}%"
    lines = [f"### {summary['task']} ({summary['model']}): dev {metric} (%), {what}",
             "", "| method | seeds | " + " | ".join(column.format(100 * float(budget)) for budget in budgets) + " |",
             "|" + "---|" * (len(budgets) + 2)]
    for method, cells in methods.items():
        seeds = list(next(iter(cells.values()))["per_seed"])
        values = []
        for budget in budgets:
            cell = cells[budget]
            each = ", ".join("-" if value is None else f"{100 * value:.2f}" for value in cell["per_seed"].values())
            stats = cell["spread"]
            values.append(f"- [{each}]" if stats is None else
                          f"{100 * stats['mean']:.2f} +- {100 * stats['std']:.2f} [{each}]")
        lines.append(f"| {method} | {', '.join(map(str, seeds))} | " + " | ".join(values) + " |")
    if summary["majority_class_baseline"] is not None:
        lines.append(f"\nmajority class: {metric} {100 * summary['majority_class_baseline']:.2f}")
    comparison = summary["comparison"]
    if comparison["budgets"]:
        parts = []
        for budget, cell in comparison["budgets"].items():
            if cell["n"]:
                difference = "n/a" if cell["mean_difference"] is None else f"{100 * cell['mean_difference']:+.2f}"
                if cell.get("difference_ci95") is not None:
                    low, high = cell["difference_ci95"]
                    difference += f" [95% CI {100 * low:+.2f}..{100 * high:+.2f}]"
                parts.append(f"{'<=' if selection == GRID else 'at'} {100 * float(budget):.0f}%: {difference} "
                             f"({cell['a_at_or_above']}/{cell['n']} seeds at or above)")
        lines.append(f"\n{comparison['a']} minus {comparison['b']}, paired by seed: " + "; ".join(parts))
        lines.append(f"{comparison['a']} at or above {comparison['b']} on the mean at every budget of "
                     f"{comparison['verdict_budgets']}: {'yes' if comparison['a_at_or_above_at_every_verdict_budget'] else 'no'}")
    for method, stats in summary["skipping"].items():
        rates = ", ".join(f"{rate:.2f}" for rate in stats["skip_rate_per_layer"])
        described = "; ".join(f"{key} {value['mean']:.2f} ({value['min']:.2f}..{value['max']:.2f})"
                              for key, value in stats.items() if isinstance(value, dict))
        lines.append(f"\n{method} skipping on dev, seeds {stats['seeds']}: {described}; skip rate per layer {rates}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.seeds", description=__doc__.split("\n")[0])
    parser.add_argument("tables", nargs="+", help="tradeoff-<task>.json tables, each optionally path:method[=label][,method...]")
    parser.add_argument("--compare", nargs=2, default=["smartbert", "fastbert"], metavar=("A", "B"),
                        help="the two methods to compare paired by seed (default: smartbert fastbert)")
    parser.add_argument("--json", default=None, help="write the summaries here (a JSON list, one per task and backbone)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.seeds``; returns 0, or 2 with a one-line error on bad input."""
    args = parse_args(argv)
    try:
        path = check_output_path(args.json, create_parents=True) if args.json else None  # before any work
        groups = load_tables(args.tables)
    except (SeedsError, OutputPathError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summaries = [summarize(group, tuple(args.compare)) for group in groups.values()]
    for summary in summaries:
        print(format_summary(summary))
        print()
    if path is not None:
        write_atomically(path, [json.dumps(summaries, indent=2)])
        print(f"summary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
