"""``results.json`` as typed records: written from and read into dataclasses, with a schema version,
and the run's ``plot.png``.

Readers (``benchmarks.tradeoff``, the tests, your notebooks) call :func:`read_results` and get
attributes instead of string keys; a file of another schema version is refused with a message
that says so, instead of failing on a missing key later. :func:`write_results` writes both files
at the end of a run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptive_depth.files import atomic_write, write_atomically
from recipes.run.folder import PLOT_FILE, RESULTS_FILE
from recipes.run.models import model_label

__all__ = ["RESULTS_SCHEMA_VERSION", "BestEpoch", "EpochRecord", "OperatingPoint", "RunResults", "SweepRow",
           "check_epochs_recorded", "command_line", "read_results", "write_results"]

RESULTS_SCHEMA_VERSION = 2  # 1: the untyped dicts of adaptive_depth <= 0.1.0.dev0 (no "schema_version" key)


@dataclass
class EpochRecord:
    """One training epoch.

    Attributes:
        epoch: 0-based epoch of its stage.
        loss: mean total loss per batch.
        terms: mean per batch of each named loss term (they add up to ``loss``).
        seconds, samples_per_second: wall time and throughput of the epoch.
        options: the stage's per-epoch options (SmartBERT: ``gate_mode``).
        heldout: task metrics of the last head on the held-out split (stage 1 only).
    """

    epoch: int
    loss: float
    terms: dict[str, float]
    seconds: float
    samples_per_second: float
    options: dict[str, Any] = field(default_factory=dict)
    heldout: dict[str, float] | None = None


@dataclass
class BestEpoch:
    """The stage-1 epoch whose weights the run keeps: best ``metric`` on the held-out split."""

    epoch: int
    metric: str
    value: float


@dataclass
class SweepRow:
    """One dev-set evaluation setting (see :func:`recipes.run.sweep.run_sweep`).

    Attributes:
        name: ``"full"``, ``"skip_only"``, ``"entropy=0.3"``...
        mode: engine mode.
        threshold: the exit threshold (``None`` without exits).
        metrics: task metrics (fractions, not percent).
        count: rows evaluated.
        mean_macs_exact, mean_macs_paper: MACs per row, both conventions.
        relative_cost_exact, relative_cost_paper: over the same rows at full depth.
        mean_layers_run: layers run per row.
        exit_layer_histogram: rows per 1-based exit layer.
        skip_rate_per_layer: share of rows whose gate skipped layer ``i`` (``None``: no gate ran).
        ms_per_sample: wall clock of the engine calls per row.
    """

    name: str
    mode: str
    threshold: float | None
    metrics: dict[str, float]
    count: int
    mean_macs_exact: float
    mean_macs_paper: float
    relative_cost_exact: float
    relative_cost_paper: float
    mean_layers_run: float
    exit_layer_histogram: list[int]
    skip_rate_per_layer: list[float | None]
    ms_per_sample: float


@dataclass
class OperatingPoint:
    """The exit threshold chosen on held-out data (for a cost budget, or certified), and dev there.

    Attributes:
        budget: the largest relative cost allowed (total MACs over total full-depth MACs, exact
            convention) with ``rule="budget"``.
        convention: the FLOPs convention of ``budget``.
        calibration: :meth:`adaptive_depth.Calibration.to_dict` (``rule="budget"``), ``{"error": ...}``
            when no threshold met the budget or was certified, or ``None`` (a method without exits,
            or a certified point).
        dev: the dev-set row at the chosen point.
        model_dir: the saved model, relative to the run folder.
        reason: why nothing was calibrated (methods without exits).
        rule: ``"budget"`` or ``"certified"`` (the config's ``operating_point``).
        certificate: :meth:`adaptive_depth.certificate.Certificate.to_dict` of a certified point.
    """

    budget: float
    convention: str
    calibration: dict[str, Any] | None
    dev: SweepRow
    model_dir: str
    reason: str | None = None
    rule: str = "budget"
    certificate: dict[str, Any] | None = None


@dataclass
class RunResults:
    """Everything a run records in ``results.json``.

    ``extras`` holds the method's own fields (SmartBERT: whether the half-cost target was
    reached; baselines: the curve label and threshold symbol of the plot). ``other_dev_splits``
    holds the sweep on a task's further dev sets (MNLI mismatched); ``skipping`` how per-sample
    the gates' skipping is (:func:`adaptive_depth.analysis.skip_statistics` on dev, with the
    full-depth model's per-row loss as difficulty), for methods with gates.
    """

    recipe: str
    task: str
    command: str
    model: str
    data_dir: str
    dev_split: str
    config: dict[str, Any]
    started: str
    finished: str
    wall_time_s: float
    torch: str
    threads: int
    sizes: dict[str, int]
    num_truncated: dict[str, int]
    main_metric: str
    history: dict[str, list[EpochRecord]]
    best_stage1: BestEpoch | None
    sweep: list[SweepRow]
    majority_class_baseline: dict[str, float] | None
    operating_point: OperatingPoint | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    other_dev_splits: dict[str, list[SweepRow]] = field(default_factory=dict)
    skipping: dict[str, Any] | None = None
    schema_version: int = RESULTS_SCHEMA_VERSION

    def row(self, name: str) -> SweepRow:
        """The sweep row called ``name``."""
        for row in self.sweep:
            if row.name == name:
                return row
        raise KeyError(f"no sweep row {name!r}; rows: {[row.name for row in self.sweep]}")

    @property
    def full_depth(self) -> SweepRow:
        """The full-depth row (engine mode ``"full"``)."""
        return next(row for row in self.sweep if row.mode == "full")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "results") -> RunResults:
        """Rebuild from :meth:`to_dict`'s output.

        Raises:
            ValueError: another schema version, or missing/unknown fields.
        """
        version = values.get("schema_version", 1)
        if version != RESULTS_SCHEMA_VERSION:
            raise ValueError(
                f"{source} has results schema version {version}, this code reads version {RESULTS_SCHEMA_VERSION}; "
                "re-run the recipe (or read the file as plain JSON)"
            )
        values = dict(values)
        try:
            values["history"] = {stage: [EpochRecord(**record) for record in records]
                                 for stage, records in values["history"].items()}
            values["best_stage1"] = BestEpoch(**values["best_stage1"]) if values.get("best_stage1") else None
            values["sweep"] = [SweepRow(**row) for row in values["sweep"]]
            values["other_dev_splits"] = {name: [SweepRow(**row) for row in rows]
                                          for name, rows in values.get("other_dev_splits", {}).items()}
            point = values.get("operating_point")
            if point is not None:
                values["operating_point"] = OperatingPoint(**{**point, "dev": SweepRow(**point["dev"])})
            return cls(**values)
        except (KeyError, TypeError) as error:
            raise ValueError(f"{source} does not hold valid results: {error}") from error


def read_results(path: str | os.PathLike[str]) -> RunResults:
    """Read a ``results.json`` (or a run folder holding one).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, another schema version, or missing fields.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    return RunResults.from_dict(values, str(path))


def check_epochs_recorded(history: Mapping[str, Sequence[Any]], config: Any, has_stage2: bool) -> None:
    """A last check before ``results.json`` is written: its history holds every epoch its config
    names, no more and no fewer (``RuntimeError`` otherwise: a bug, results must not claim it)."""
    expected = {"stage1": config.stage1_epochs, "stage2": config.stage2_epochs if has_stage2 else 0}
    for stage, epochs in expected.items():
        recorded = [record.epoch for record in history.get(stage, [])]
        if recorded != list(range(epochs)):
            raise RuntimeError(f"{stage} recorded epochs {recorded} but the config says {epochs}; results.json "
                               "would claim work that was not done")


def write_results(run_dir: str | os.PathLike[str], results: RunResults) -> tuple[Path, Path]:
    """Write ``results.json`` and ``plot.png`` (main metric vs relative paper FLOPs) into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path = run_dir / RESULTS_FILE
    text = json.dumps(results.to_dict(), indent=2)
    write_atomically(json_path, [text])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main_metric = results.main_metric
    figure, axis = plt.subplots(figsize=(6, 4))
    # Rows with a threshold (entropy, patience...) form the curve; the others are single points.
    adaptive = [row for row in results.sweep if row.threshold is not None]
    symbol = results.extras.get("threshold_symbol", "S")
    if adaptive:
        axis.plot([row.relative_cost_paper for row in adaptive], [100 * row.metrics[main_metric] for row in adaptive],
                  "o-", label=results.extras.get("curve_label", "skip + entropy exit"))
        for row in adaptive:
            axis.annotate(f"{symbol}={row.threshold:g}", (row.relative_cost_paper, 100 * row.metrics[main_metric]),
                          fontsize=7, textcoords="offset points", xytext=(3, 3))
    for row in (r for r in results.sweep if r.threshold is None):
        axis.plot([row.relative_cost_paper], [100 * row.metrics[main_metric]], "s" if row.mode == "full" else "^",
                  label=row.name)
    axis.set_xlabel("relative FLOPs (paper convention, vs full depth)")
    axis.set_ylabel(f"dev {main_metric} (%)")
    label = model_label(results.model) if results.model else ""
    axis.set_title(f"{results.recipe} {results.task} {label}".strip())
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    plot_path = run_dir / PLOT_FILE
    atomic_write(plot_path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)
    return json_path, plot_path


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """``python -m <module> <argv>``, for the records (``argv`` defaults to ``sys.argv[1:]``)."""
    import shlex

    return " ".join(["python", "-m", module, *(shlex.quote(str(arg)) for arg in (sys.argv[1:] if argv is None else argv))])
