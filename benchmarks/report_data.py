"""The data of the results page (:mod:`benchmarks.report`), read from the JSON in ``benchmarks/results``.

For one task, every :class:`Source` becomes a :class:`Row` of :class:`Cell` (one per column: full
depth and each cost budget), each cell holding one value per seed:

- ``calibrated`` sources (``benchmarks.calibrated`` tables) give the budget cells, read and checked
  by :func:`benchmarks.seeds.load_tables` (one task, one backbone, one cost denominator, one kind
  of selection, no seed twice). Their full-depth cell is the ``full`` row of the same run folder in
  a ``benchmarks.tradeoff`` table, or the last head of a ``benchmarks.heads`` table, found in
  :class:`FullDepthIndex` (when both exist they must agree).
- ``full_depth`` sources (``benchmarks.tradeoff`` tables) give the full-depth cell only (plain
  fine-tuning has no exits).
- ``heads`` sources (``benchmarks.heads`` tables) give the static baseline: at each budget, every
  row exits at the deepest head whose fixed cost fits it (:func:`static_costs`).

Nothing here runs a model; a source whose files do not exist yet gives an empty row ("not run").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from benchmarks.calibrated import GATES_OFF, JOINT
from benchmarks.seeds import VERDICT_BUDGETS, SeedsError, load_tables

FULL = "full"  # the full-depth column
COLUMNS = (FULL, *(str(budget) for budget in VERDICT_BUDGETS))
SourceKind = Literal["calibrated", "full_depth", "heads"]


class ReportError(ValueError):
    """JSON that cannot be turned into the page; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Source:
    """One row of the per-task tables: where its JSON lives and which method in it.

    Attributes:
        key: short id, used in block names and as the row's label inside :mod:`benchmarks.seeds`.
        label: what the page calls it.
        kind: ``"calibrated"``, ``"full_depth"`` or ``"heads"`` (see the module docstring).
        patterns: globs under the results folder, ``{task}`` filled in; only tables that hold
            ``method`` count, and for one seed the first pattern that has it wins (a later pattern
            only fills seeds the earlier ones lack).
        method: the method's name inside the JSON (``smartbert``, ``smartbert_gates_off``...).
        tasks: the tasks whose tables show this row.
        machine: where the JSON was made, from the lab record (the JSON holds the commands only).
        dates: the days its runs were trained and measured (UTC, ``YYYY-MM-DD``), from the lab record.
        task_dates: ``(task, days)`` pairs for tasks whose runs were made on other days than
            ``dates`` (which then holds every task's days, for the provenance list).
    """

    key: str
    label: str
    kind: SourceKind
    patterns: tuple[str, ...]
    method: str
    tasks: tuple[str, ...]
    machine: str = ""
    dates: tuple[str, ...] = ()
    task_dates: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def dates_on(self, task: str | None) -> tuple[str, ...]:
        """The days of ``task``'s runs (``None``: of every task)."""
        return dict(self.task_dates).get(task, self.dates) if task is not None else self.dates


@dataclass
class Cell:
    """One method at one column: ``values[seed]`` (a fraction, ``None``: no operating point that
    cheap on that seed) and ``costs[seed]`` (dev cost relative to the fine-tuned full depth)."""

    values: dict[int, float | None] = field(default_factory=dict)
    costs: dict[int, float] = field(default_factory=dict)
    exit_layer: int | None = None  # static baseline: the head every row exits at


@dataclass
class Row:
    """One source on one task: a :class:`Cell` per column, the files read, the run folders and
    training commands per seed, and the skipping statistics per seed (runs with gates)."""

    source: Source
    cells: dict[str, Cell] = field(default_factory=lambda: {column: Cell() for column in COLUMNS})
    files: list[Path] = field(default_factory=list)
    run_dirs: dict[int, str] = field(default_factory=dict)
    commands: dict[int, str] = field(default_factory=dict)
    skipping: dict[int, dict[str, Any]] = field(default_factory=dict)
    exit_costs: list[float] = field(default_factory=list)  # static rows: the cost of each exit

    @property
    def seeds(self) -> list[int]:
        return sorted({seed for cell in self.cells.values() for seed in cell.values})


@dataclass
class TaskData:
    """Every row of one task, with what the rows share (metric, denominator, majority class)."""

    task: str
    rows: dict[str, Row]
    main_metric: str | None = None
    model: str | None = None
    reference_macs: float | None = None
    padded_length: int = 128
    majority: float | None = None


@lru_cache(maxsize=None)
def read_json(path: Path) -> Any:
    """A JSON file's content (cached: the page reads some tables several times)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not JSON ({error})") from None


def run_key(folder: str) -> tuple[str, ...]:
    """A run folder as the tables name it, reduced to its last three parts (``i13d``,
    ``mrpc-s42``, ``smartbert``): tables written on other machines give the same run other roots."""
    return PurePosixPath(folder).parts[-3:]


@dataclass
class FullDepth:
    """A run's full-depth ``metric`` and, from a tradeoff table, ``relative_cost``, ``macs``
    (paper convention) and the training ``command``."""

    task: str
    seed: int
    method: str
    metric: float
    source: Path
    relative_cost: float | None = None
    macs: float | None = None
    command: str | None = None


class FullDepthIndex:
    """Every run folder's full depth, from every tradeoff and heads table under ``results_dir``."""

    def __init__(self, results_dir: Path) -> None:
        self.entries: dict[tuple[str, ...], list[FullDepth]] = {}
        for path in sorted(results_dir.rglob("*.json")):
            table = read_json(path)
            if not isinstance(table, dict):
                continue
            if isinstance(table.get("runs"), dict) and isinstance(table.get("rows"), list) and "at_cost" in table:
                for method, folder in table["runs"].items():
                    for row in table["rows"]:
                        if row.get("method") == method and row.get("setting") == FULL:
                            self.add(folder, FullDepth(table["task"], int(table["seed"]), method, row["main_metric"],
                                                       path, row["relative_cost"], row["mean_macs_paper"],
                                                       (table.get("commands") or {}).get(method)))
            elif isinstance(table.get("runs"), list):
                for run in table["runs"]:
                    if isinstance(run, dict) and "heads" in run:
                        last = run["heads"][-1]["metrics"][run["main_metric"]]
                        self.add(run["run"], FullDepth(run["task"], int(run["seed"]), run["method"], last, path))

    def add(self, folder: str, entry: FullDepth) -> None:
        for other in self.entries.setdefault(run_key(folder), []):
            if (other.task, other.seed) == (entry.task, entry.seed) and abs(other.metric - entry.metric) > 1e-6:
                raise ReportError(f"run {folder}: full depth {other.metric:.6f} in {other.source} but "
                                  f"{entry.metric:.6f} in {entry.source}; one of them is not this run's")
        self.entries[run_key(folder)].append(entry)

    def find(self, folder: str, task: str, seed: int) -> list[FullDepth]:
        """The entries of one run (tradeoff tables first, they carry cost and command)."""
        found = [entry for entry in self.entries.get(run_key(folder), []) if (entry.task, entry.seed) == (task, seed)]
        return sorted(found, key=lambda entry: entry.macs is None)


def source_files(source: Source, task: str, results_dir: Path) -> list[Path]:
    """The files of ``source`` on ``task``, one per seed, the earlier pattern winning a seed."""
    chosen: dict[int, Path] = {}
    for pattern in source.patterns:
        for path in sorted(results_dir.glob(pattern.format(task=task))):
            table = read_json(path)
            if source.kind == "heads":  # one heads table holds every seed
                runs = table.get("runs") if isinstance(table, dict) else None
                if not isinstance(runs, list):
                    raise ReportError(f"{path}: not a benchmarks.heads table (no list of runs)")
                return [path] if any(run.get("method") == source.method for run in runs) else []
            if not isinstance(table, dict) or "seed" not in table:
                raise ReportError(f"{path}: no seed; {source.key} expects benchmarks.{source.kind} tables")
            if source.method in (table.get("at_cost") if source.kind == "calibrated" else table.get("runs")) or {}:
                chosen.setdefault(int(table["seed"]), path)  # a table without the method is another row's
    return [chosen[seed] for seed in sorted(chosen)]


def base_method(method: str) -> str:
    """The trained method behind a calibrated row (``smartbert_gates_off`` -> ``smartbert``)."""
    for suffix in (GATES_OFF, JOINT):
        if method.endswith(suffix):
            return method[: -len(suffix)]
    return method


def load_task(task: str, sources: list[Source], results_dir: Path, index: FullDepthIndex) -> TaskData:
    """Every source of ``task`` as a :class:`Row` (empty when its JSON does not exist)."""
    data = TaskData(task, {source.key: Row(source) for source in sources})
    calibrated = [source for source in sources if source.kind == "calibrated"]
    arguments = []
    for source in calibrated:
        data.rows[source.key].files = source_files(source, task, results_dir)
        arguments += [f"{path}:{source.method}={source.key}" for path in data.rows[source.key].files]
    if arguments:
        try:
            groups = load_tables(arguments)
        except SeedsError as error:
            raise ReportError(str(error)) from None
        if len(groups) > 1:
            raise ReportError(f"{task}: calibrated tables of several backbones {sorted(groups)}; a page table "
                              "compares methods on one backbone")
        group = next(iter(groups.values()))
        data.main_metric, data.majority, data.reference_macs = group.main_metric, group.majority, group.reference_macs
        for source in calibrated:
            fill_calibrated(data, data.rows[source.key], group, index)
    for source in sources:
        row = data.rows[source.key]
        if source.kind == "full_depth":
            row.files = source_files(source, task, results_dir)
            for path in row.files:
                fill_full_depth(data, row, path, index)
        elif source.kind == "heads":
            row.files = source_files(source, task, results_dir)
    return data


def fill_calibrated(data: TaskData, row: Row, group: Any, index: FullDepthIndex) -> None:
    """Budget cells from the group, the full-depth cell from the index, per seed."""
    key = row.source.key
    for seed, cells in group.cells.get(key, {}).items():
        path = Path(group.sources[key][seed])
        table = read_json(path)
        data.model = data.model or table["model"]
        data.padded_length = int(table.get("padded_length", data.padded_length))
        for budget in COLUMNS[1:]:
            if budget in cells:
                cell = cells[budget]
                row.cells[budget].values[seed] = None if cell is None else float(cell["main_metric"])
                if cell is not None:
                    row.cells[budget].costs[seed] = float(cell["relative_cost"])
        folder = table["runs"].get(base_method(row.source.method))
        if folder is None:
            raise ReportError(f"{path}: names no run of {base_method(row.source.method)}")
        row.run_dirs[seed] = folder
        if row.source.method in (table.get("skipping") or {}):
            row.skipping[seed] = table["skipping"][row.source.method]
        found = index.find(folder, data.task, seed)
        if found:
            row.cells[FULL].values[seed] = found[0].metric
            if found[0].relative_cost is not None:
                row.cells[FULL].costs[seed] = found[0].relative_cost
            if found[0].command:
                row.commands[seed] = found[0].command


def fill_full_depth(data: TaskData, row: Row, path: Path, index: FullDepthIndex) -> None:
    """The full-depth cell of one tradeoff table's method."""
    table = read_json(path)
    if row.source.method not in (table.get("runs") or {}):
        raise ReportError(f"{path}: has no run of {row.source.method}; it has {list(table.get('runs') or {})}")
    seed, folder = int(table["seed"]), table["runs"][row.source.method]
    entry = next(entry for entry in index.find(folder, data.task, seed) if entry.source == path)
    row.cells[FULL].values[seed], row.run_dirs[seed] = entry.metric, folder
    row.cells[FULL].costs[seed] = float(entry.relative_cost or 1.0)
    if entry.command:
        row.commands[seed] = entry.command
    majority = (table.get("majority_class_baseline") or {}).get(table["main_metric"])
    data.main_metric = data.main_metric or table["main_metric"]
    data.majority = majority if data.majority is None else data.majority


def model_dims(model: str) -> Any:
    """The backbone's sizes (:class:`adaptive_depth.flops.EncoderDims`) and config, from the model
    folder a table names, or the installed MiniLM wheel when it names that one elsewhere."""
    from transformers import AutoConfig

    from adaptive_depth.flops import encoder_dims
    from recipes.run.models import default_model_path, model_label

    folder = Path(model)
    if not (folder / "config.json").is_file():
        if model_label(model) != "all-MiniLM-L6-v2":
            raise ReportError(f"model {model}: no config.json there, so the static exits' FLOPs cannot be counted")
        folder = default_model_path()
    config = AutoConfig.from_pretrained(folder)
    return encoder_dims(config), config


def static_costs(data: TaskData, row: Row, index: FullDepthIndex, num_labels: int) -> list[float]:
    """Relative cost of exit ``k`` (``k = 1..L``) for every row: embedding, layers ``1..k`` and
    head ``k``, in the paper convention at the tables' padded length, over the same denominator
    as the calibrated tables (``reference``, the fine-tuned model's full depth).

    The head's cost is the method's full-depth MACs (a tradeoff table's ``full`` row of one of the
    heads table's runs) minus the embedding and ``L`` layers: every head of a run costs the same.

    Raises:
        ReportError: the model config does not give the tables' denominator, or no tradeoff
            table has a full-depth row of these runs, or two give different costs.
    """
    from adaptive_depth.flops import embedding_macs, full_model_macs, step_macs

    if data.model is None or data.reference_macs is None:
        raise ReportError(f"{data.task}: the static baseline needs the task's calibrated tables (denominator, model)")
    dims, config = model_dims(data.model)
    length = data.padded_length
    if abs(full_model_macs(config, length, "paper", num_labels) - data.reference_macs) > 0.5:
        raise ReportError(f"{data.task}: the model config gives {full_model_macs(config, length, 'paper', num_labels)} "
                          f"MACs at full depth, the tables' reference is {data.reference_macs:.0f}")
    full = set()
    for path in row.files:
        for run in read_json(path)["runs"]:
            if run["method"] == row.source.method:
                full |= {entry.macs for entry in index.find(run["run"], data.task, int(run["seed"])) if entry.macs}
    if len(full) != 1:
        raise ReportError(f"{data.task}: {row.source.method}'s full-depth MACs in the tradeoff tables of the heads' "
                          f"runs are {sorted(full) or 'absent'}; one value is needed to cost its exits")
    layer, embedding = step_macs(dims, length, "paper"), embedding_macs(dims, length, "paper")
    head = full.pop() - embedding - dims.num_layers * layer
    return [(embedding + k * layer + head) / data.reference_macs for k in range(1, dims.num_layers + 1)]


def fill_static(data: TaskData, row: Row, costs: list[float]) -> None:
    """Each column's cell: the deepest exit whose cost is within the budget (full depth: the last),
    chosen by cost alone; its dev metric per seed, from the heads table."""
    row.exit_costs = costs
    for path in row.files:
        for run in read_json(path)["runs"]:
            if run["method"] != row.source.method:
                continue
            seed = int(run["seed"])
            row.run_dirs[seed] = run["run"]
            for column in COLUMNS:
                limit = 1.0 if column == FULL else float(column)
                fits = [k for k, cost in enumerate(costs, start=1) if cost <= limit + 1e-12]
                exit_layer = len(costs) if column == FULL else (fits[-1] if fits else None)
                cell = row.cells[column]
                cell.exit_layer = exit_layer
                head = None if exit_layer is None else run["heads"][exit_layer - 1]
                cell.values[seed] = None if head is None else head["metrics"][run["main_metric"]]
                if exit_layer is not None:
                    cell.costs[seed] = costs[exit_layer - 1]
