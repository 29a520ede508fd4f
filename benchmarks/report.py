"""The results page, generated from the JSON in ``benchmarks/results``: ``docs/results.md``.

    python -m benchmarks.report            # rewrite the generated blocks of docs/results.md, and the plots
    python -m benchmarks.report --check    # exit 1, naming each block that differs from the JSON

The page is its own template: hand-written prose stays as it is, and every block between
``<!-- report:table NAME -->`` and ``<!-- /report -->`` is replaced by what the JSON gives
(:data:`BLOCKS` names them). ``--check`` compares only those blocks, reads JSON only (no model
runs) and writes nothing, so the tests run it. The plots (``docs/img/results-<task>.png``, next to
the page) are written by the plain command only.

Where each row of the per-task tables comes from is one list, :data:`SOURCES`: add a line there
when new JSON arrives. A source whose files do not exist yet shows "not run".
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from adaptive_depth.files import write_atomically
from benchmarks import report_attach
from benchmarks import report_tables as tables
from benchmarks.report_data import (COLUMNS, FullDepthIndex, ReportError, Row, Source, TaskData, fill_static,
                                    load_task, read_json, static_costs)

ROOT = Path(__file__).resolve().parents[1]
CLASSIFICATION = ("mrpc", "cola", "sst2", "rte")
REGRESSION = ("stsb",)
CPU = "2-core AMD EPYC CPU (no GPU), torch 2.13.0+cpu, 2 threads"
D23, D29, D30 = "2026-11-23", "2026-11-29", "2026-11-30"
D_ABL, D_ABL2 = "2026-12-03", "2026-12-04"  # the contrastive ablation, DeeBERT and PABEE: MRPC and RTE, then the rest
ABL_DAYS = (("mrpc", (D_ABL,)), ("rte", (D_ABL,)))  # per-task days where they differ from (D_ABL, D_ABL2)

# Every row of the per-task tables: (key, label, kind, globs under benchmarks/results with {task}, the method's
# name in the JSON, the tasks it belongs to, machine, days). A glob that matches nothing shows "not run".
SOURCES = [
    Source("finetune", "plain fine-tuning (no exits)", "full_depth",
           ("baselines/{task}-seed*/tradeoff-{task}.json", "tradeoff-{task}.json"), "finetune", CLASSIFICATION,
           CPU, (D23,)),
    Source("fastbert", "FastBERT", "calibrated", ("issue13/calibrated/calibrated-{task}-seed*.json",), "fastbert",
           CLASSIFICATION, CPU, (D29,)),
    Source("smartbert", "SmartBERT, budget objective, distilled exits", "calibrated",
           ("issue13/calibrated/calibrated-{task}-seed*.json",), "smartbert", CLASSIFICATION, CPU, (D29,)),
    Source("gates_only", "SmartBERT, fine-tuned first, then gates only", "calibrated",
           ("issue13/gates_only/calibrated-{task}-seed*.json",), "smartbert", CLASSIFICATION, CPU, (D29, D30)),
    Source("gates_off", "the same model, gates off (exits only)", "calibrated",
           ("issue13/gates_off/calibrated-gates-off-{task}-seed*.json",), "smartbert_gates_off", CLASSIFICATION,
           CPU, (D30,)),
    Source("no_contrastive", "SmartBERT, budget objective, no contrastive loss (eta1 = eta2 = 0)", "calibrated",
           ("ablation/contrastive/{task}-seed*/calibrated-{task}.json",), "smartbert", ("mrpc", "sst2"), CPU,
           (D_ABL, D_ABL2), ABL_DAYS),  # the ablation's two tasks
    Source("deebert", "DeeBERT", "calibrated", ("baselines/{task}-seed*/calibrated-{task}.json",), "deebert",
           CLASSIFICATION, CPU, (D_ABL, D_ABL2), ABL_DAYS),
    Source("pabee", "PABEE, its own patience exit", "calibrated", ("baselines/{task}-seed*/calibrated-{task}.json",),
           "pabee", CLASSIFICATION, CPU, (D_ABL, D_ABL2), ABL_DAYS),
    Source("static_fastbert", "FastBERT, one fixed exit for every row (static)", "heads",
           ("issue13/heads/heads-{task}.json",), "fastbert", CLASSIFICATION, CPU, (D30,)),
    Source("static_smartbert", "SmartBERT fine-tuned first, one fixed exit for every row (static)", "heads",
           ("issue13/heads/heads-{task}.json",), "smartbert", CLASSIFICATION, CPU, (D30,)),
    Source("stsb_smartbert", "SmartBERT, fine-tuned first, tolerance exit", "calibrated",
           ("issue13/stsb/calibrated-tolerance-{task}-seed*.json",), "smartbert", REGRESSION, CPU, (D30,)),
    Source("stsb_gates_off", "the same model, gates off", "calibrated",
           ("issue13/stsb/calibrated-tolerance-{task}-seed*.json",), "smartbert_gates_off", REGRESSION, CPU, (D30,)),
    Source("stsb_pabee", "PABEE, tolerance exit", "calibrated",
           ("issue13/stsb/calibrated-tolerance-{task}-seed*.json",), "pabee", REGRESSION, CPU, (D30,)),
    Source("stsb_pabee_patience", "PABEE, its own patience exit", "calibrated",
           ("issue13/stsb/calibrated-patience-{task}-seed*.json",), "pabee", REGRESSION, CPU, (D30,)),
]
HEADLINE = ("smartbert", "fastbert")  # the method of the first screen, and what it is compared with
GATES = ("gates_only", "gates_off")  # the same model with its gates on and off
CONTRASTIVE = ("no_contrastive", "smartbert", ("mrpc", "sst2"))  # the ablation, its reference, its tasks
WNLI_TABLE = "tradeoff-wnli.json"
BLOCK = re.compile(r"(<!-- report:table ([\w-]+) -->\n)(.*?)(<!-- /report -->)", re.DOTALL)


def load(results_dir: Path, sources: list[Source] = SOURCES) -> dict[str, TaskData]:
    """Every task's rows, with the static baseline's cells (needs the model config's sizes)."""
    from recipes.glue import get_task

    read_json.cache_clear()  # a table rewritten since the last call is read again
    index = FullDepthIndex(results_dir)
    tasks = {}
    for task in (*CLASSIFICATION, *REGRESSION):
        data = load_task(task, [source for source in sources if task in source.tasks], results_dir, index)
        for row in data.rows.values():
            if row.source.kind == "heads" and row.files:
                fill_static(data, row, static_costs(data, row, index, get_task(task).num_labels))
        tasks[task] = data
    return tasks


def static_block(tasks: list[TaskData]) -> list[str]:
    """The fixed cost of each exit, and the exit each budget takes (cost alone decides)."""
    lines = ["| task | static rows of | cost of exit 1, 2, ... L (% of the fine-tuned full depth) | "
             + " | ".join(f"exit at {tables.column_title(column)}" for column in COLUMNS[1:]) + " |",
             "|---|---|---|" + "---|" * (len(COLUMNS) - 1)]
    for data in tasks:
        for row in data.rows.values():
            if row.source.kind != "heads" or not row.seeds:
                continue
            costs = row.exit_costs
            exits = [f"exit {row.cells[c].exit_layer}" if row.cells[c].exit_layer else "none" for c in COLUMNS[1:]]
            lines.append(f"| {tables.metric_title(data)} | {row.source.label.split(',')[0]} | "
                         f"{', '.join(f'{100 * cost:.1f}' for cost in costs)} | {' | '.join(exits)} |")
    return lines if len(lines) > 2 else ["not run: no benchmarks.heads tables"]


def wnli_block(results_dir: Path) -> list[str]:
    """One line: does any method beat the majority class on WNLI?"""
    path = results_dir / WNLI_TABLE
    if not path.is_file():
        return ["WNLI: not run."]
    table = read_json(path)
    metric, majority = table["main_metric"], table["majority_class_baseline"][table["main_metric"]]
    best = max(table["rows"], key=lambda row: row["main_metric"])
    verdict = ("no method beats it" if best["main_metric"] <= majority + 1e-9 else
               f"{best['method']} ({best['setting']}) is above it")
    return [f"WNLI (dev {metric}, seed {table['seed']}, every setting of {len(table['runs'])} methods in "
            f"`benchmarks/results/{WNLI_TABLE}`, made by `python -m benchmarks.tradeoff` on a {CPU}, {D23}): the "
            f"majority class scores {100 * majority:.2f}, the best setting {100 * best['main_metric']:.2f} "
            f"({best['method']}, {best['setting']}): {verdict}."]


def contrastive_block(tasks: dict[str, TaskData], results_dir: Path) -> list[str]:
    ablation, reference, names = CONTRASTIVE
    chosen = [tasks[task] for task in names if task in tasks]
    label = {row.source.key: row.source.label for data in chosen for row in data.rows.values()}
    return [*tables.gap_table(chosen, ablation, reference, f"{label[ablation]} minus {label[reference]}"), "",
            "Paired by seed; `not run`: no JSON yet (expected in "
            "`benchmarks/results/ablation/contrastive/<task>-seed<S>/calibrated-<task>.json`).", "",
            *tables.made_by(tables.rows_of(chosen, (ablation, reference)), results_dir)]


def render(results_dir: Path) -> dict[str, str]:
    """Every generated block's Markdown, by block name."""
    tasks = load(results_dir)
    classification = [tasks[task] for task in CLASSIFICATION]
    everything = [*classification, *(tasks[task] for task in REGRESSION)]
    heads = [source.key for source in SOURCES if source.kind == "heads"]
    gated = [(task, row) for task, row in tables.rows_of(everything, [s.key for s in SOURCES]) if row.skipping]
    blocks = {
        "summary": tables.summary(classification, *HEADLINE, *GATES),
        "headline": [*tables.headline(classification, *HEADLINE), "",
                     *tables.made_by(tables.rows_of(classification, HEADLINE), results_dir)],
        **{task: tables.task_table(tasks[task], results_dir) for task in (*CLASSIFICATION, *REGRESSION)},
        "wnli": wnli_block(results_dir),
        "static": [*static_block(classification), "",
                   *tables.made_by(tables.rows_of(classification, heads), results_dir)],
        "skipping": [*tables.skipping_table(everything), "", *tables.made_by(gated, results_dir)],
        "gates": [*tables.gap_table(classification, GATES[1], GATES[0], "gates off minus gates on", COLUMNS[1:]), "",
                  *tables.made_by(tables.rows_of(classification, GATES), results_dir)],
        "contrastive": contrastive_block(tasks, results_dir),
        "provenance": tables.provenance(list(tasks.values()), results_dir),
        **report_attach.blocks(results_dir),
    }
    return {name: "\n".join(lines) + "\n" for name, lines in blocks.items()}


def splice(page: str, blocks: dict[str, str]) -> tuple[str, list[str]]:
    """The page with every block's content replaced; and the problems: blocks the page lacks or
    that the report does not know."""
    found = [match.group(2) for match in BLOCK.finditer(page)]
    problems = [f"the page has no block '{name}' (add <!-- report:table {name} --> ... <!-- /report -->)"
                for name in blocks if name not in found]
    problems += [f"the page's block '{name}' is not one the report writes ({', '.join(blocks)})"
                 for name in found if name not in blocks]
    problems += [f"block '{name}' appears {found.count(name)} times" for name in set(found) if found.count(name) > 1]
    page = BLOCK.sub(lambda match: match.group(1) + blocks.get(match.group(2), match.group(3)) + match.group(4), page)
    return page, problems


def check(page: str, blocks: dict[str, str]) -> list[str]:
    """What differs between the page's generated blocks and the JSON: one message per block."""
    differences = splice(page, blocks)[1]
    for match in BLOCK.finditer(page):
        name, shown = match.group(2), match.group(3)
        if name in blocks and shown != blocks[name]:
            pairs = zip(shown.splitlines() + [""] * 999, blocks[name].splitlines())
            line, (old, new) = next((i, pair) for i, pair in enumerate(pairs, 1) if pair[0] != pair[1])
            differences.append(f"table '{name}' differs from the JSON at its line {line}:\n"
                               f"  page: {old}\n  JSON: {new}")
    return differences


def plot_task(data: TaskData, path: Path) -> None:
    """Dev metric against relative FLOPs: every calibrated method (full depth and each budget,
    seed means with 95% intervals), the static exits, and the majority class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 5.8))
    for row in data.rows.values():
        points = []
        for column in (COLUMNS if row.source.kind != "heads" else COLUMNS[:1]):
            cell = row.cells[column]
            values = [value for value in cell.values.values() if value is not None]
            if values and cell.costs:
                mean, interval = tables.mean_interval(values)
                half = 0.0 if interval is None else (interval[1] - interval[0]) / 2
                points.append((100 * sum(cell.costs.values()) / len(cell.costs), 100 * mean, 100 * half))
        if row.source.kind == "heads" and row.seeds:
            points = static_points(row)
        if points:
            points.sort()
            axis.errorbar(*zip(*points), marker="s" if row.source.kind == "heads" else "o", capsize=2, markersize=4,
                          elinewidth=0.8, linestyle="--" if row.source.kind == "heads" else "-", label=row.source.label)
    if data.majority is not None:
        axis.axhline(100 * data.majority, color="grey", linestyle=":", linewidth=1.2, label="majority class")
    axis.set_xlabel("dev FLOPs, % of the fine-tuned model's full depth (paper convention)")
    axis.set_ylabel(f"dev {tables.METRIC_NAMES.get(data.main_metric or '', data.main_metric)} (%)")
    axis.set_title(f"{tables.metric_title(data)}: mean over seeds, 95% interval")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)


def static_points(row: Row) -> list[tuple[float, float, float]]:
    """Every exit of a static row (not only those the budgets pick), from its heads tables."""
    points = []
    runs = [run for path in row.files for run in read_json(path)["runs"] if run["method"] == row.source.method]
    for k, cost in enumerate(row.exit_costs, start=1):
        values = [run["heads"][k - 1]["metrics"][run["main_metric"]] for run in runs]
        mean, interval = tables.mean_interval(values)
        points.append((100 * cost, 100 * mean, 0.0 if interval is None else 50 * (interval[1] - interval[0])))
    return points


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare the page's generated blocks with the JSON; exit 1 naming each that differs")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "results.md",
                        help="the page (default: docs/results.md)")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results",
                        help="the JSON (default: benchmarks/results)")
    parser.add_argument("--no-plots", action="store_true", help="write the page only, not the PNG plots")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report``: 0, 1 when ``--check`` finds a difference, 2 on unusable input."""
    args = parse_args(argv)
    try:
        if not args.page.is_file():
            raise ReportError(f"{args.page}: no such page; it is the template of the generated blocks")
        page = args.page.read_text(encoding="utf-8")
        blocks = render(args.results_dir.resolve())
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        differences = check(page, blocks)
        for difference in differences:
            print(f"{args.page}: {difference}", file=sys.stderr)
        return 1 if differences else 0
    new_page, problems = splice(page, blocks)
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    write_atomically(args.page, [new_page])
    if not args.no_plots:
        tasks = load(args.results_dir.resolve())
        for task, data in tasks.items():
            if any(row.seeds for row in data.rows.values()):
                plot_task(data, args.page.parent / "img" / f"results-{task}.png")
    print(f"page: {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
