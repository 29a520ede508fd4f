"""The official GLUE metrics of each task (torchmetrics)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from recipes.glue.tasks import GlueTask, get_task

if TYPE_CHECKING:
    import torchmetrics


def matthews_corrcoef(confusion: Tensor) -> float:
    """Matthews correlation of a binary confusion matrix, 0.0 where it is undefined.

    GLUE scores CoLA with scikit-learn's ``matthews_corrcoef``, which returns 0 when a row or a
    column of the matrix is empty (e.g. a model that always answers the same class).
    torchmetrics' ``MatthewsCorrCoef`` returns a small non-zero limit there instead (+-0.0256
    for CoLA dev), which would credit a constant answer; so the value is computed here.

    Args:
        confusion: ``[2, 2]`` counts, rows the true class, columns the predicted one
            (``[[tn, fp], [fn, tp]]``, as torchmetrics' ``ConfusionMatrix(task="binary")``).

    Returns:
        ``(tp * tn - fp * fn) / sqrt((tp + fp)(tp + fn)(tn + fp)(tn + fn))``, in ``[-1, 1]``.

    Example:
        >>> matthews_corrcoef(torch.tensor([[1, 1], [1, 3]]))
        0.25
        >>> matthews_corrcoef(torch.tensor([[0, 322], [0, 721]]))  # always "acceptable"
        0.0
    """
    if tuple(confusion.shape) != (2, 2):
        raise ValueError(f"a binary confusion matrix is [2, 2], got shape {tuple(confusion.shape)}")
    (tn, fp), (fn, tp) = confusion.double().tolist()
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


class GlueMetrics:
    """The official GLUE metrics of one task, accumulated over batches (torchmetrics).

    Accuracy (micro: the share of correct predictions) for every classification task, F1 of
    the positive class ``"1"`` for MRPC and QQP, Matthews correlation for CoLA, Pearson and
    Spearman correlation for STS-B. Values are floats on the ``[0, 1]`` scale (correlations
    in ``[-1, 1]``), not percent.

    Args:
        task: a :class:`GlueTask` or its name.

    Example:
        >>> metrics = GlueMetrics("mrpc")
        >>> metrics.update(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 1]))
        >>> metrics.compute(), metrics.main_metric
        ({'accuracy': 0.5, 'f1': 0.5}, 'f1')
    """

    def __init__(self, task: GlueTask | str) -> None:
        self.task = get_task(task)
        self.main_metric = self.task.main_metric
        self._metrics: dict[str, torchmetrics.Metric] = {name: self._build(name) for name in self.task.metrics}

    def _build(self, name: str) -> torchmetrics.Metric:
        import torchmetrics  # imported here: it pulls in transformers and scipy (seconds)

        num_labels = self.task.num_labels
        if name == "accuracy":
            return torchmetrics.Accuracy(task="multiclass", num_classes=num_labels, average="micro")
        if name == "f1":
            return torchmetrics.F1Score(task="binary")
        if name == "mcc":  # the counts; matthews_corrcoef() turns them into the GLUE value
            return torchmetrics.ConfusionMatrix(task="binary")
        if name == "pearson":
            return torchmetrics.PearsonCorrCoef()
        if name == "spearman":
            with warnings.catch_warnings():  # it keeps every prediction; GLUE dev sets are small
                warnings.filterwarnings("ignore", message=".*will save all targets and predictions")
                return torchmetrics.SpearmanCorrCoef()
        raise ValueError(f"unknown GLUE metric {name!r}")

    def update(self, preds: Tensor | Sequence[float], target: Tensor | Sequence[float]) -> None:
        """Add a batch.

        Args:
            preds: ``[B]`` predicted label ids (``logits.argmax(-1)``), or ``[B]`` / ``[B, 1]``
                predicted scores for STS-B.
            target: ``[B]`` true label ids or scores.

        Raises:
            ValueError: float predictions for a classification task, or mismatched shapes.
        """
        preds = torch.as_tensor(preds).detach().cpu()
        target = torch.as_tensor(target).detach().cpu()
        if self.task.is_regression:
            preds = preds.float().reshape(-1) if preds.ndim == 2 and preds.shape[-1] == 1 else preds.float()
            target = target.float()
        else:
            if preds.is_floating_point():
                raise ValueError(
                    f"{self.task.name}: pass predicted label ids (logits.argmax(-1)), not float scores "
                    f"of shape {tuple(preds.shape)}"
                )
            preds, target = preds.long(), target.long()
        if preds.ndim != 1 or preds.shape != target.shape:
            raise ValueError(
                f"preds and target must both be [B]; got {tuple(preds.shape)} and {tuple(target.shape)}"
            )
        for metric in self._metrics.values():
            metric.update(preds, target)

    def compute(self) -> dict[str, float]:
        """The metrics over every batch since the last :meth:`reset`, as Python floats."""
        return {
            name: matthews_corrcoef(metric.compute()) if name == "mcc" else float(metric.compute())
            for name, metric in self._metrics.items()
        }

    def reset(self) -> None:
        """Forget all batches."""
        for metric in self._metrics.values():
            metric.reset()


def majority_class_metrics(task: GlueTask | str, train_labels: Sequence[int], eval_labels: Sequence[int]
                           ) -> dict[str, float] | None:
    """The metrics on ``eval_labels`` of always answering the most frequent of ``train_labels``
    (what a model that learned nothing scores); ``None`` for a regression task."""
    task = get_task(task)
    if task.is_regression:
        return None
    target = torch.tensor(list(eval_labels))
    baseline = GlueMetrics(task)
    baseline.update(torch.full_like(target, int(torch.tensor(list(train_labels)).mode().values)), target)
    return baseline.compute()
