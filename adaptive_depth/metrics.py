"""Statistics over engine traces, in the torchmetrics ``update / compute / reset`` form.

Kept apart from :mod:`adaptive_depth.engine` so that importing the engine does not import
torchmetrics (seconds).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from adaptive_depth.config import METRICS
from adaptive_depth.engine import EngineOutput

__all__ = ["CostAccumulator", "task_metric"]


def task_metric(name: str, predictions: Tensor, labels: Tensor, num_labels: int) -> float:
    """The task metric ``name`` (one of :data:`adaptive_depth.config.METRICS`) of ``[R]`` predictions.

    ``"accuracy"`` is plain (micro) accuracy; ``"f1"`` the binary F1 of class 1 (GLUE MRPC/QQP);
    ``"mcc"`` Matthews' correlation (CoLA; 0 where it is undefined, e.g. a constant answer, as
    scikit-learn and GLUE have it); ``"pearson"``/``"spearman"`` the correlations of scores
    (STS-B). Class predictions are indices, never logits (torchmetrics would read floats outside
    ``[0, 1]`` as logits).

    Example:
        >>> task_metric("f1", torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 1]), num_labels=2)
        0.5
    """
    from torchmetrics.functional import confusion_matrix, f1_score, pearson_corrcoef, spearman_corrcoef

    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}.")
    if len(predictions) != len(labels) or len(labels) == 0:
        raise ValueError(f"got {len(predictions)} predictions for {len(labels)} labels.")
    if name in ("pearson", "spearman"):
        function = pearson_corrcoef if name == "pearson" else spearman_corrcoef
        return float(function(predictions.float(), labels.float()))
    predictions, labels = predictions.long(), labels.long()
    if name == "accuracy":
        return float((predictions == labels).double().mean())
    if name == "f1":
        return float(f1_score(predictions, labels, task="binary"))
    # Matthews' correlation from the confusion matrix C (rows true, columns predicted), in its
    # multiclass form (Gorodkin 2004), which is the usual formula for two classes.
    confusion = confusion_matrix(predictions, labels, task="multiclass", num_classes=num_labels).double()
    total, correct = confusion.sum(), confusion.trace()
    true, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
    denominator = ((total**2 - (predicted**2).sum()) * (total**2 - (true**2).sum())).sqrt()
    return 0.0 if float(denominator) == 0.0 else float((correct * total - (true * predicted).sum()) / denominator)


class CostAccumulator(Metric):
    """Aggregates :class:`EngineOutput` traces over a data set (``update`` / ``compute`` / ``reset``).

    ``compute()`` returns a dict: ``count``; ``mean_macs_exact`` and ``mean_macs_paper`` per
    sample; ``relative_cost_exact`` and ``relative_cost_paper`` (total MACs over the total MACs of
    the same samples at full depth: a ratio of sums, as everywhere in adaptive_depth);
    ``exit_layer_histogram`` (samples per 1-based exit step, list of ``L``); ``skip_rate_per_layer`` (fraction of the samples whose gate ran at step
    ``i`` that skipped it, NaN where no gate ran); ``mean_layers_run``.

    Being a torchmetrics ``Metric``, it also sums across processes under DDP.

    Args:
        num_steps: ``L``, the encoder's number of steps.
    """

    full_state_update = False

    def __init__(self, num_steps: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_steps = num_steps
        for name in ("count", "macs_exact", "macs_paper", "full_exact", "full_paper", "layers_run"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("exit_histogram", "skips", "gate_runs"):
            self.add_state(name, default=torch.zeros(num_steps, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, output: EngineOutput) -> None:  # type: ignore[override]
        """Add one batch's traces."""
        if output.layers_run.shape[1] != self.num_steps:
            raise ValueError(
                f"trace has {output.layers_run.shape[1]} steps, the accumulator expects {self.num_steps}."
            )
        # The sums go to the states' device (an engine on a GPU, statistics kept on the CPU).
        device = self.device
        self.count += output.exit_layer.numel()
        self.macs_exact += output.macs_exact.sum().double().to(device)
        self.macs_paper += output.macs_paper.sum().double().to(device)
        self.full_exact += output.full_macs_exact.sum().double().to(device)
        self.full_paper += output.full_macs_paper.sum().double().to(device)
        self.layers_run += output.layers_run.sum().double().to(device)
        self.exit_histogram += torch.bincount(output.exit_layer - 1, minlength=self.num_steps).double().to(device)
        self.skips += output.layers_skipped.sum(dim=0).double().to(device)
        self.gate_runs += output.gates_run.sum(dim=0).double().to(device)

    def compute(self) -> dict[str, Any]:  # type: ignore[override]
        """The aggregate statistics (see the class docstring)."""
        count = max(float(self.count), 1.0)
        return {
            "count": int(self.count),
            "mean_macs_exact": float(self.macs_exact) / count,
            "mean_macs_paper": float(self.macs_paper) / count,
            "relative_cost_exact": float(self.macs_exact) / max(float(self.full_exact), 1.0),
            "relative_cost_paper": float(self.macs_paper) / max(float(self.full_paper), 1.0),
            "mean_layers_run": float(self.layers_run) / count,
            "exit_layer_histogram": [int(value) for value in self.exit_histogram.tolist()],
            "skip_rate_per_layer": (self.skips / self.gate_runs).tolist(),
        }
