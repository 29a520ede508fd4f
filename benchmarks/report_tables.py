"""The generated blocks of the results page (:mod:`benchmarks.report`), as Markdown.

Every number is a percentage of the task's main metric on dev (or of the fine-tuned model's
full-depth FLOPs), a mean over seeds with its 95% interval: Student's t over seeds, from
:func:`benchmarks.seeds.paired_interval` (for one method's values, the interval of their mean;
for paired differences, of the mean difference).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from benchmarks.report_data import COLUMNS, FULL, Cell, Row, TaskData
from benchmarks.seeds import paired_interval, spread

METRIC_NAMES = {"f1": "F1", "mcc": "MCC", "accuracy": "accuracy", "pearson": "Pearson"}
TASK_NAMES = {"mrpc": "MRPC", "cola": "CoLA", "sst2": "SST-2", "rte": "RTE", "stsb": "STS-B", "wnli": "WNLI"}
ABSOLUTE_DATA_DIR = re.compile(r"(?<![\w.])/\S*?/shared/data/glue\b")


def listing(names: list[str]) -> str:
    """``A``, ``A and B``, ``A, B and C``."""
    return " and ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} and {names[-1]}"


def mean_interval(values: list[float]) -> tuple[float, list[float] | None]:
    """Mean and 95% interval (``None`` for one value)."""
    return spread(values)["mean"], paired_interval(values)


def seeds_text(count: int) -> str:
    return "1 seed" if count == 1 else f"{count} seeds"


def number(value: float, interval: list[float] | None, signed: bool = False) -> str:
    """``86.20 [85.40, 87.00]`` (percent); signed: ``+0.32 [-0.43, +1.07]``."""
    def shown(fraction: float) -> str:  # no "-0.00"
        percent = 100 * fraction
        return ("{:+.2f}" if signed else "{:.2f}").format(0.0 if round(percent, 2) == 0 else percent)

    text = shown(value)
    if interval is not None:
        text += f" [{shown(interval[0])}, {shown(interval[1])}]"
    return text


def cell_text(cell: Cell, majority: float | None, static: bool = False) -> str:
    """``mean [95% CI] (n seeds) · cost%``; ``*`` after a mean not above the majority class;
    the seeds without an operating point named; ``not run`` without data."""
    if not cell.values:
        return "not run"
    present = {seed: value for seed, value in cell.values.items() if value is not None}
    if not present:
        return f"no {'exit' if static else 'operating point'} that cheap ({seeds_text(len(cell.values))})"
    mean, interval = mean_interval(list(present.values()))
    star = "*" if majority is not None and mean <= majority + 1e-9 else ""
    text = f"{number(mean, interval)}{star} ({seeds_text(len(present))})"
    missing = sorted(set(cell.values) - set(present))
    if missing:
        text += f"; none on seed {', '.join(map(str, missing))}"
    if cell.costs:
        cost = 100 * sum(cell.costs.values()) / len(cell.costs)
        text += f" · {'exit ' + str(cell.exit_layer) + ', ' if static else ''}{cost:.0f}%"
    return text


def column_title(column: str) -> str:
    return "full depth" if column == FULL else f"{100 * float(column):.0f}% of the FLOPs"


def metric_title(data: TaskData) -> str:
    task = TASK_NAMES.get(data.task, data.task)
    return f"{task} ({METRIC_NAMES.get(data.main_metric, data.main_metric)})" if data.main_metric else task


def task_table(data: TaskData, results_dir: Path) -> list[str]:
    """Every row of one task: full depth and each budget; the majority class; what made it."""
    lines = [f"Dev {METRIC_NAMES.get(data.main_metric or '', data.main_metric)} (%), mean [95% interval] (seeds) · "
             "mean dev cost as a share of the fine-tuned model's full-depth FLOPs.", "",
             "| method | " + " | ".join(column_title(column) for column in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    if data.majority is not None:
        lines.append(f"| majority class (one answer for every row, no model) | "
                     + " | ".join(f"{100 * data.majority:.2f} · 0%" for _ in COLUMNS) + " |")
    for row in data.rows.values():
        static = row.source.kind == "heads"
        cells = [cell_text(row.cells[column], data.majority, static) for column in COLUMNS]
        if row.seeds and not row.cells[FULL].values:
            cells[0] = "no full-depth row in the JSON"
        if row.source.kind == "full_depth" and row.seeds:
            cells[1:] = ["no exits"] * (len(COLUMNS) - 1)
        lines.append(f"| {row.source.label} | " + " | ".join(cells) + " |")
    if data.majority is not None:
        lines += ["", "`*`: the mean is not above the majority class."]
    return lines + ["", *made_by(rows_of([data], data.rows), results_dir)]


def shown_path(path: Path, results_dir: Path) -> str:
    return f"benchmarks/results/{path.relative_to(results_dir).as_posix()}"


def file_group(paths: list[Path], results_dir: Path) -> str:
    """``folder/calibrated-mrpc-seed{42,43,44}.json``: the files of one source, seeds folded."""
    shown = [shown_path(path, results_dir) for path in paths]
    if len(shown) > 1:
        stems = {re.sub(r"(?<=seed)\d+", "{S}", name) for name in shown}
        if len(stems) == 1:
            seeds = ",".join(re.search(r"(?<=seed)(\d+)", name).group(1) for name in shown)  # type: ignore[union-attr]
            return stems.pop().replace("{S}", "{" + seeds + "}")
    return ", ".join(shown)


COMMANDS = {"calibrated": "benchmarks.calibrated", "full_depth": "benchmarks.tradeoff", "heads": "benchmarks.heads"}


def when_where(pairs: Sequence[tuple[str | None, Row]]) -> tuple[str, str]:
    """``(machine, "day to day")`` of some ``(task, row)`` pairs (from their sources, or the JSON's own
    fields; task ``None``: the source's days on every task)."""
    from benchmarks.report_data import read_json

    machines, days = set(), set()
    for task, row in pairs:
        tables = [read_json(path) for path in row.files]
        machines |= {table["machine"] for table in tables if isinstance(table, dict) and table.get("machine")}
        days |= {str(table["date"])[:10] for table in tables if isinstance(table, dict) and table.get("date")}
        machines |= {row.source.machine} if row.source.machine else set()
        days |= set(row.source.dates_on(task))
    where = ", ".join(sorted(machines)) or "machine not recorded"
    when = "date not recorded" if not days else min(days) if len(days) == 1 else f"{min(days)} to {max(days)}"
    return where, when


def made_by(pairs: list[tuple[str, Row]], results_dir: Path) -> list[str]:
    """Which command wrote which JSON of a table, with machine and dates (the full commands are in
    the provenance block). ``pairs`` are ``(task, row)``; over several tasks, file names show ``<task>``."""
    pairs = [(task, row) for task, row in pairs if row.files]
    if not pairs:
        return []
    tasks = list(dict.fromkeys(task for task, _ in pairs))
    where, when = when_where(pairs)
    lines = [f"Made on a {where}, {when}, by these commands (full command lines under "
             "[How these tables were made](#how-these-tables-were-made)):"]
    folded: dict[str, set[str]] = {}  # a name with <task> for the task -> the tasks it stands for
    for task, row in pairs:
        folded.setdefault(re.sub(rf"(?<=[-/]){task}(?=[-.])", "<task>", file_group(row.files, results_dir)),
                          set()).add(task)
    for kind, module in COMMANDS.items():
        names = []
        for task, row in pairs:
            name = file_group(row.files, results_dir)
            short = re.sub(rf"(?<=[-/]){task}(?=[-.])", "<task>", name)
            names += [short if len(folded[short]) > 1 else name] if row.source.kind == kind else []
        if names:
            lines.append(f"- `python -m {module}`: " + ", ".join(f"`{name}`" for name in dict.fromkeys(names)))
    several = [task for task in tasks if any(task in shown for shown in folded.values() if len(shown) > 1)]
    if several:
        lines.append(f"- `<task>`: {', '.join(several)}")
    return lines


def rows_of(tasks: list[TaskData], keys: Iterable[str]) -> list[tuple[str, Row]]:
    """``(task, row)`` of the sources ``keys`` on every task that has them."""
    return [(data.task, data.rows[key]) for data in tasks for key in keys if key in data.rows]


def paired(a: Cell, b: Cell) -> list[float]:
    """``a - b`` on every seed where both have a value."""
    return [a.values[seed] - b.values[seed] for seed in sorted(set(a.values) & set(b.values))  # type: ignore[operator]
            if a.values[seed] is not None and b.values[seed] is not None]


def difference_text(differences: list[float]) -> str:
    if not differences:
        return "not run"
    mean, interval = mean_interval(differences)
    return f"{number(mean, interval, signed=True)} ({seeds_text(len(differences))})"


def headline(tasks: list[TaskData], method: str, against: str) -> list[str]:
    """Per task and budget: the speed-up on dev, ``method``'s metric, its change against its own
    full depth and against ``against`` at the same budget, paired by seed."""
    name = {row.source.key: row.source.label for data in tasks for row in data.rows.values()}
    lines = [f"| task (dev metric) | FLOPs budget | speed-up on dev (cost) | {name.get(method, method)} | "
             f"change against its own full depth | minus {name.get(against, against)} at the same budget |",
             "|---|---|---|---|---|---|"]
    for data in tasks:
        own, other = data.rows.get(method), data.rows.get(against)
        if own is None or not own.seeds:
            lines.append(f"| {metric_title(data)} | | not run | | | |")
            continue
        for column in COLUMNS[1:]:
            cell = own.cells[column]
            present = [value for value in cell.values.values() if value is not None]
            if not present:
                lines.append(f"| {metric_title(data)} | {100 * float(column):.0f}% | no operating point | | | |")
                continue
            cost = sum(cell.costs.values()) / len(cell.costs)
            lines.append(f"| {metric_title(data)} | {100 * float(column):.0f}% | {1 / cost:.2f}x ({100 * cost:.0f}%) | "
                         f"{cell_text(Cell(cell.values), data.majority)} | "
                         f"{difference_text(paired(cell, own.cells[FULL]))} | "
                         f"{difference_text(paired(cell, other.cells[column])) if other else 'not run'} |")
    return lines


def gap_table(tasks: list[TaskData], a: str, b: str, what: str, columns: tuple[str, ...] = COLUMNS) -> list[str]:
    """``a`` minus ``b`` per task and column, paired by seed, mean [95% interval]."""
    lines = [f"| task | {what}: " + " | ".join(column_title(column) for column in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for data in tasks:
        row_a, row_b = data.rows.get(a), data.rows.get(b)
        if row_a is None or row_b is None or not row_a.seeds or not row_b.seeds:
            lines.append(f"| {metric_title(data)} | " + " | ".join("not run" for _ in columns) + " |")
            continue
        lines.append(f"| {metric_title(data)} | "
                     + " | ".join(difference_text(paired(row_a.cells[c], row_b.cells[c])) for c in columns) + " |")
    return lines


def skipping_rows(row: Row) -> dict[str, list[float]]:
    """Per seed: layers skipped per row, share of skips on the last two layers, share of rows in
    the most common skip pattern, distinct patterns, Spearman and mutual information."""
    out: dict[str, list[float]] = {key: [] for key in ("skipped", "last_two", "top", "patterns", "spearman", "mi")}
    for stats in (row.skipping[seed] for seed in sorted(row.skipping)):
        rates = stats["skip_rate_per_layer"]
        out["skipped"].append(stats["mean_skipped"])
        if sum(rates) > 0:
            out["last_two"].append(sum(rates[-2:]) / sum(rates))
        out["top"].append(stats["top_patterns"][0][1] / stats["num_rows"])
        out["patterns"].append(stats["num_patterns"])
        if stats.get("spearman") is not None:
            out["spearman"].append(stats["spearman"])
        out["mi"].append(stats["mutual_information"])
    return out


def value_range(values: list[float], percent: bool = False, digits: int = 2) -> str:
    if not values:
        return "-"
    scale = 100 if percent else 1
    mean = f"{scale * sum(values) / len(values):.{digits}f}"
    low, high = f"{scale * min(values):.{digits}f}", f"{scale * max(values):.{digits}f}"
    return mean if low == high else f"{mean} ({low} to {high})"


def skipping_table(tasks: list[TaskData]) -> list[str]:
    """How per-sample the skip gates are, on dev at gate threshold 0.5, no exits, mean (range) over seeds."""
    lines = ["| task | method | seeds | layers skipped per row | skip rate per layer, 1 to L | "
             "skips on the last two layers (%) | rows in the most common pattern (%) | distinct patterns | "
             "Spearman (skips, loss) | MI (nats) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for data in tasks:
        for row in data.rows.values():
            if not row.skipping:
                continue
            stats = skipping_rows(row)
            rates = [stats["skip_rate_per_layer"] for stats in row.skipping.values()]
            layers = [sum(layer) / len(layer) for layer in zip(*rates)]
            lines.append(f"| {metric_title(data)} | {row.source.label} | {len(row.skipping)} | "
                         f"{value_range(stats['skipped'])} | {', '.join(f'{rate:.2f}' for rate in layers)} | "
                         f"{value_range(stats['last_two'], True, 0)} | {value_range(stats['top'], True, 0)} | "
                         f"{value_range(stats['patterns'], digits=1)} | {value_range(stats['spearman'])} | "
                         f"{value_range(stats['mi'])} |")
    return lines


def summary(tasks: list[TaskData], method: str, against: str, gates_on: str, gates_off: str) -> list[str]:
    """The page's three main findings as sentences whose every number is computed here."""
    name = {row.source.key: row.source.label for data in tasks for row in data.rows.values()}
    cells = inside = 0
    means: list[float] = []
    gates: list[str] = []
    ahead: list[str] = []
    resolved = 0
    static: dict[str, list[dict[str, list[float]]]] = {}
    for data in tasks:
        task = TASK_NAMES.get(data.task, data.task)
        own, other = data.rows.get(method), data.rows.get(against)
        for column in COLUMNS[1:]:
            differences = paired(own.cells[column], other.cells[column]) if own and other else []
            if len(differences) > 1:
                low, high = paired_interval(differences)  # type: ignore[misc]
                cells, inside = cells + 1, inside + (low <= 0 <= high)
                means.append(sum(differences) / len(differences))
        on, off = data.rows.get(gates_on), data.rows.get(gates_off)
        gaps = [paired(off.cells[c], on.cells[c]) for c in COLUMNS[1:3]] if on and off else []
        if gaps and all(len(gap) > 1 for gap in gaps):
            gates.append(f"{task} " + " / ".join(f"{100 * sum(gap) / len(gap):+.2f}" for gap in gaps))
            ahead += [task] if all(sum(gap) > 0 for gap in gaps) else []
            resolved += sum(not low <= 0 <= high for low, high in (paired_interval(gap) or (0, 0) for gap in gaps))
        for row in (own, on):
            if row and row.skipping:
                static.setdefault(task, []).append(skipping_rows(row))
    lines = []
    if cells:
        lines.append(f"- **{name[method]} ties {name[against]}.** Paired by seed at the same budget, the 95% interval "
                     f"of the difference contains 0 in {inside} of {cells} task-budget cells; the seed means run from "
                     f"{100 * min(means):+.2f} to {100 * max(means):+.2f} points.")
    pruned = [task for task, rows in static.items() if all(min(stats["last_two"] or [0]) >= 0.8 for stats in rows)]
    if pruned:
        last = [value for task in pruned for stats in static[task] for value in stats["last_two"]]
        count = [value for task in pruned for stats in static[task] for value in stats["patterns"]]
        common = [value for task in pruned for stats in static[task] for value in stats["top"]]
        graded = [task for task, rows in static.items()
                  if all(stats["spearman"] and max(stats["spearman"]) <= -0.3 for stats in rows)]
        rho = [value for task in graded for stats in static[task] for value in stats["spearman"]]
        lines.append(f"- **The gates mostly prune the last layers.** On {listing(pruned)}, "
                     f"{100 * min(last):.0f}-{100 * max(last):.0f}% of the skips fall on the last two layers, in "
                     f"{min(count):.0f}-{max(count):.0f} distinct skip patterns over the dev rows (the most common "
                     f"covers {100 * min(common):.0f}-{100 * max(common):.0f}% of them; every gated SmartBERT, every "
                     "seed)" + (f"; only on {listing(graded)} does a row's skip count follow its difficulty "
                                f"(Spearman {min(rho):+.2f} to {max(rho):+.2f})" if graded else "") + ".")
    if gates:
        lines.append(f"- **Turning the gates off scores better.** Gates off minus gates on, same model and budget, at "
                     f"75% / 50% of the FLOPs: {'; '.join(gates)} points (ahead at both on {listing(ahead) or 'none'}; "
                     + (f"{resolved} of the 95% intervals exclude 0)." if resolved else "no 95% interval excludes 0)."))
    lines += static_summary(tasks)
    return lines or ["- not run"]


def best_mean(rows: list[Row], column: str) -> tuple[float, Row] | None:
    """The highest seed mean among ``rows`` in ``column``, and its row."""
    means = []
    for row in rows:
        values = [value for value in row.cells[column].values.values() if value is not None]
        if values:
            means.append((sum(values) / len(values), row))
    return max(means, key=lambda pair: pair[0]) if means else None


def static_summary(tasks: list[TaskData]) -> list[str]:
    """Per budget: on which tasks the best fixed exit is at or above the best dynamic method."""
    parts = []
    for column in COLUMNS[1:]:
        level, behind, exits = [], [], set()
        for data in tasks:
            static = best_mean([row for row in data.rows.values() if row.source.kind == "heads"], column)
            dynamic = best_mean([row for row in data.rows.values() if row.source.kind == "calibrated"], column)
            if static and dynamic:
                (level if static[0] >= dynamic[0] else behind).append(TASK_NAMES.get(data.task, data.task))
                exits.add(static[1].cells[column].exit_layer)
        if level or behind:
            parts.append(f"at {100 * float(column):.0f}% (exit {', '.join(map(str, sorted(exits)))}) it is at or above "
                         f"on {listing(level) or 'no task'}" + (f", below on {listing(behind)}" if behind else ""))
    if not parts:
        return []
    return ["- **Against a shallower model.** One fixed exit for every row (the deepest that fits the budget), "
            "compared with the best dynamic method on the seed means: " + "; ".join(parts) + "."]


def sanitize(command: str) -> str:
    """A recorded command with one machine's absolute data folder written as ``../shared/data/glue``."""
    return ABSOLUTE_DATA_DIR.sub("../shared/data/glue", command)


def provenance(tasks: list[TaskData], results_dir: Path) -> list[str]:
    """Per source: its JSON, the command recorded in its first table and the first seed's training
    command, machine and dates."""
    from benchmarks.report_data import read_json

    lines: list[str] = []
    seen = set()
    for data in tasks:
        for row in data.rows.values():
            if not row.files or row.source.key in seen:
                continue
            seen.add(row.source.key)
            first = read_json(row.files[0])
            written = first.get("command") if isinstance(first, dict) else None
            others = " (and the same for the other tasks)" if len(row.source.tasks) > 1 else ""
            where, when = when_where([(None, row)])
            lines.append(f"- **{row.source.label}** ({where}, {when}): `{file_group(row.files, results_dir)}`{others}")
            if written:
                lines.append(f"  - `{sanitize(written)}`")
            if row.commands:
                seed = min(row.commands)
                again = "; the other seeds with their `seed=S`" if len(row.seeds) > 1 else ""
                lines.append(f"  - trained (seed {seed}{again}): `{sanitize(row.commands[seed])}`")
    return lines
