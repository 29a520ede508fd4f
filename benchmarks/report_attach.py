"""The results page's blocks for a fine-tuned classifier made faster (issue 28), from ``benchmarks/results/attach``.

Files (each written by the command it records, with its date and machine note inside):

- ``attach-<task>.json``: ``python -m recipes.attach``'s ``results.json`` (training, dev evaluation);
- ``certified-<task>-<P>.json``: ``python -m benchmarks.attach_eval`` on dev after ``python -m
  adaptive_depth.calibrate --max-disagreement 0.0P`` (the certificate is inside);
- ``splits-<task>.json``, ``splits-bootstrap-<task>.json``: ``python -m benchmarks.certify_splits``
  (``--draw split`` and ``--draw bootstrap``);
- ``latency-<task>-<P>-b<B>.json``: ``python -m benchmarks.stream_latency`` at the certified point,
  batch size ``B`` (the plain model there is the fine-tuned classifier itself).

A task or level without its file shows "not run".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.report_data import read_json

__all__ = ["LEVELS", "TASKS", "blocks"]

TASKS = ("sst2", "mrpc")
LEVELS = (0.01, 0.02)  # the disagreement levels certified
NAMES = {"sst2": "SST-2", "mrpc": "MRPC"}


def _read(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def _source(path: Path, record: dict[str, Any], results_dir: Path) -> str:
    machine = record.get("machine")
    if isinstance(machine, dict):
        name = machine.get("processor") or machine.get("device_name") or machine.get("device", "")
        machine = f"{name}, torch {machine.get('torch', '')}, {machine.get('torch_threads', '')} threads"
    return f"`{path.relative_to(results_dir)}` ({record.get('date', 'no date')}; {machine or 'no machine note'})"


def attach_block(results_dir: Path) -> list[str]:
    """Per task: the fine-tuned model, full depth, and each certified level on dev."""
    lines = ["| task (dev metric) | fine-tuned model | full depth | rows differing | certified at | threshold "
             "(entropy) | n | calibration disagreement | upper bound | dev relative cost, exact (paper) | "
             "FLOPs speed-up, exact | dev disagreement | metric change |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    sources = []
    for task in TASKS:
        attach_path = results_dir / "attach" / f"attach-{task}.json"
        attach = _read(attach_path)
        if attach is not None:
            sources.append(_source(attach_path, attach, results_dir))
        for level in LEVELS:
            path = results_dir / "attach" / f"certified-{task}-{round(100 * level)}.json"
            record = _read(path)
            if record is None:
                lines.append(f"| {NAMES[task]} | not run | | | {_pct(level, 0)}% | | | | | | | | |")
                continue
            sources.append(_source(path, record, results_dir))
            point, metric = record["operating_point"], record["metric"]
            certificate = point["certificate"] or {}
            original = record.get("original") or {}
            lines.append(
                f"| {NAMES[task]} ({metric}) | {_pct(original.get('metric'))} | {_pct(record['full_depth']['metric'])} "
                f"| {original.get('rows_predicted_differently', '-')} of {record['rows']} | {_pct(level, 0)}% "
                f"| {point['threshold']:.4f} | {certificate.get('n', '-')} | {_pct(certificate.get('empirical_risk'))}% "
                f"| {_pct(certificate.get('upper_bound'))}% | {_pct(point['relative_cost_exact'], 1)}% "
                f"({_pct(point['relative_cost_paper'], 1)}%) | {point['flops_speedup_exact']:.2f}x "
                f"| {_pct(point['disagreement_with_full_depth'])}% ({point['rows_disagreeing']} rows) "
                f"| {100 * point['metric_change']:+.2f} |")
    return [*lines, "", "From: " + ("; ".join(sources) if sources else "nothing yet") + "."]


def splits_block(results_dir: Path) -> list[str]:
    """Per task, draw and level: how often each rule's test disagreement exceeded the level."""
    lines = ["| task | rows | draw | max risk | rule | violation rate [95% MC] | refused | mean test risk "
             "| mean test cost |", "|---|---|---|---|---|---|---|---|---|"]
    sources = []
    for task in TASKS:
        for draw, name in (("split", f"splits-{task}.json"), ("bootstrap", f"splits-bootstrap-{task}.json")):
            path = results_dir / "attach" / name
            record = _read(path)
            if record is None:
                lines.append(f"| {NAMES[task]} | not run | {draw} | | | | | | |")
                continue
            sources.append(_source(path, record, results_dir))
            for row in record["results"]:
                low, high = row["violation_rate_95"]
                lines.append(f"| {NAMES[task]} | {record['rows']} | {draw} | {_pct(row['max_risk'], 0)}% (delta "
                             f"{row['delta']:g}) | {row['rule']} | {row['violation_rate']:.3f} [{low:.3f}, {high:.3f}] "
                             f"| {row['refused']}/{row['splits']} | {_pct(row['mean_test_risk'])}% "
                             f"| {_pct(row['mean_test_relative_cost'], 1)}% |")
    return [*lines, "", "From: " + ("; ".join(sources) if sources else "nothing yet") + "."]


def latency_block(results_dir: Path) -> list[str]:
    """Wall speed-up over the fine-tuned model of the certified point, per task, level and batch size."""
    lines = ["| task | certified at | batch size | rows | FLOPs speed-up | wall speed-up, batch engine | "
             "wall speed-up, stream |", "|---|---|---|---|---|---|---|"]
    sources = []
    for task in TASKS:
        for level in LEVELS:
            paths = sorted((results_dir / "attach").glob(f"latency-{task}-{round(100 * level)}-b*.json"))
            if not paths:
                lines.append(f"| {NAMES[task]} | {_pct(level, 0)}% | not run | | | | |")
            for path in paths:
                record = read_json(path)
                sources.append(_source(path, record, results_dir))
                speed = {row["setting"]: row for row in record["rows"]}
                lines.append(f"| {NAMES[task]} | {_pct(level, 0)}% | {record['batch_size']} | {record['data']['rows']} "
                             f"| {speed['batch engine']['flops_speedup']:.2f}x "
                             f"| {speed['batch engine']['wall_speedup']:.2f}x | {speed['stream']['wall_speedup']:.2f}x |")
    return [*lines, "", "From: " + ("; ".join(sources) if sources else "nothing yet") + "."]


def blocks(results_dir: Path) -> dict[str, list[str]]:
    """The generated blocks of this section, by name."""
    return {"attach": attach_block(results_dir), "attach-splits": splits_block(results_dir),
            "attach-latency": latency_block(results_dir)}
