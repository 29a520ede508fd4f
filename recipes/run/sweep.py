"""The dev-set sweep: the inference engine at every evaluation setting, and its Markdown table."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from recipes.run.distributed import is_main_process
from recipes.run.logs import logger
from recipes.run.results import SweepRow

__all__ = ["SweepSetting", "format_table", "run_sweep", "skipping_statistics"]


@dataclasses.dataclass(frozen=True)
class SweepSetting:
    """One point of the evaluation sweep.

    Attributes:
        name: row label (``"full"``, ``"skip_only"``, ``"entropy=0.3"``).
        mode: engine mode (``"full"``, ``"skip_only"``, ``"adaptive"``).
        criterion: exit criterion for ``"adaptive"`` (``None`` otherwise).
        threshold: the criterion's threshold, for the table (``None`` if not adaptive).
    """

    name: str
    mode: str
    criterion: Any = None
    threshold: float | None = None


def run_sweep(
    encoder: nn.Module,
    loader: Iterable[Mapping[str, Tensor]],
    settings: Sequence[SweepSetting],
    make_metrics: Callable[[], Any],
    gate_threshold: float | None = None,
    padded_length: int | None = 128,
    traces: dict[str, list[tuple[Tensor, Tensor, Tensor]]] | None = None,
) -> list[SweepRow]:
    """Evaluate every setting on ``loader`` with the inference engine.

    Args:
        encoder: the trained :class:`~adaptive_depth.AdaptiveEncoder`.
        loader: batches with ``labels``.
        settings: the evaluation settings, in order.
        make_metrics: a fresh task-metrics object (``update`` / ``compute``).
        gate_threshold: a layer is skipped when ``p_skip >= gate_threshold``; ``None``: the
            encoder's own (``encoder.adaptive_config.gate_threshold``).
        padded_length: the length the paper's FLOPs convention counts at (``None``: real lengths).
        traces: when given, filled with the per-batch ``(layers_skipped, logits, labels)`` of the
            settings without an exit criterion, keyed by engine mode (``"full"``,
            ``"skip_only"``), for :func:`skipping_statistics` to reuse.

    Returns:
        One :class:`~recipes.run.results.SweepRow` per setting: task metrics, the
        :class:`~adaptive_depth.metrics.CostAccumulator` statistics and ``ms_per_sample``
        (wall clock of the engine calls only).
    """
    from adaptive_depth.engine import AdaptiveInferenceEngine
    from adaptive_depth.metrics import CostAccumulator

    encoder.eval()
    batches = list(loader)
    rows = []
    for setting in settings:
        engine = AdaptiveInferenceEngine(
            encoder, criterion=setting.criterion, gate_threshold=gate_threshold, mode=setting.mode,
            padded_length=padded_length,
        )
        metrics = make_metrics()
        costs = CostAccumulator(encoder.num_steps)
        seconds, samples = 0.0, 0
        for batch in batches:
            inputs = {key: value for key, value in batch.items() if key not in ("labels", "input_ids", "attention_mask")}
            start = time.perf_counter()
            output = engine(batch["input_ids"], batch["attention_mask"], **inputs)
            seconds += time.perf_counter() - start
            samples += int(batch["input_ids"].shape[0])
            metrics.update(output.predictions, batch["labels"])
            costs.update(output)
            if traces is not None and setting.criterion is None:
                traces.setdefault(setting.mode, []).append(
                    (output.layers_skipped.cpu(), output.logits.float().cpu(), batch["labels"].cpu()))
        statistics = costs.compute()
        statistics["skip_rate_per_layer"] = [None if value != value else value
                                             for value in statistics["skip_rate_per_layer"]]
        row = SweepRow(name=setting.name, mode=setting.mode, threshold=setting.threshold, metrics=metrics.compute(),
                       ms_per_sample=1000.0 * seconds / max(samples, 1), **statistics)
        rows.append(row)
        if is_main_process():
            logger.info("sweep %s: %s, relative cost (paper) %.3f", setting.name, row.metrics, row.relative_cost_paper)
    return rows


def format_table(rows: Sequence[SweepRow], metric_names: Sequence[str]) -> str:
    """A Markdown table of sweep rows."""
    header = ["setting", *metric_names, "MACs/sample exact (M)", "MACs/sample paper (M)", "rel. cost paper",
              "rel. cost exact", "mean layers", "ms/sample"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [row.name, *(f"{100 * row.metrics[name]:.2f}" for name in metric_names),
                  f"{row.mean_macs_exact / 1e6:.1f}", f"{row.mean_macs_paper / 1e6:.1f}",
                  f"{row.relative_cost_paper:.3f}", f"{row.relative_cost_exact:.3f}",
                  f"{row.mean_layers_run:.2f}", f"{row.ms_per_sample:.2f}"]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def skipping_statistics(encoder: nn.Module, loader: Iterable[Mapping[str, Tensor]], gate_threshold: float | None,
                        is_regression: bool, traces: dict[str, list[tuple[Tensor, Tensor, Tensor]]] | None = None,
                        ) -> dict[str, Any]:
    """How per-sample the gates' skipping is on ``loader``: the skip patterns of the engine in
    ``"skip_only"`` mode against each row's difficulty, the full-depth model's loss on it
    (cross-entropy, or squared error for regression); see
    :func:`adaptive_depth.analysis.skip_statistics`. A fixed pattern gives one distinct pattern
    and zero mutual information.

    Args:
        gate_threshold: as in :func:`run_sweep` (``None``: the encoder's own).
        traces: what :func:`run_sweep` recorded on the same ``loader``; the ``"skip_only"`` and
            ``"full"`` passes it holds are reused, the missing ones are run here.
    """
    import torch
    import torch.nn.functional as F

    from adaptive_depth.analysis import skip_statistics

    traces = dict(traces or {})
    missing = [SweepSetting(mode, mode) for mode in ("skip_only", "full") if mode not in traces]
    if missing:
        run_sweep(encoder, loader, missing, _NoMetrics, gate_threshold, None, traces=traces)
    skipped = torch.cat([layers_skipped for layers_skipped, _, _ in traces["skip_only"]])
    difficulty = []
    for _, logits, labels in traces["full"]:
        if is_regression:
            difficulty.append((logits[:, 0] - labels.float()) ** 2)
        else:
            difficulty.append(F.cross_entropy(logits, labels.long(), reduction="none"))
    statistics = skip_statistics(skipped, torch.cat(difficulty)).to_dict()
    if is_main_process():
        logger.info("skipping on dev: %d distinct skip patterns over %d rows, skip rate per layer %s, "
                    "Spearman(skip count, full-depth loss) %s", statistics["num_patterns"], statistics["num_rows"],
                    [round(rate, 3) for rate in statistics["skip_rate_per_layer"]], statistics.get("spearman"))
    return statistics


class _NoMetrics:
    """Task metrics that measure nothing (for passes run only for their traces)."""

    def update(self, predictions: Tensor, labels: Tensor) -> None:
        pass

    def compute(self) -> dict[str, float]:
        return {}
