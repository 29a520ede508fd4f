"""Writing a run's records: ``results.json`` and ``plot.png``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from recipes.checkpoint import atomic_write
from recipes.loading import model_label
from recipes.results import RunResults

__all__ = ["command_line", "write_results"]


def write_results(run_dir: str | os.PathLike[str], results: RunResults) -> tuple[Path, Path]:
    """Write ``results.json`` and ``plot.png`` (main metric vs relative paper FLOPs) into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path = run_dir / "results.json"
    text = json.dumps(results.to_dict(), indent=2)
    atomic_write(json_path, lambda temporary: temporary.write_text(text, encoding="utf-8"))

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
    plot_path = run_dir / "plot.png"
    atomic_write(plot_path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)
    return json_path, plot_path


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """``python -m <module> <argv>``, for the records (``argv`` defaults to ``sys.argv[1:]``)."""
    import shlex

    return " ".join(["python", "-m", module, *(shlex.quote(str(arg)) for arg in (sys.argv[1:] if argv is None else argv))])
