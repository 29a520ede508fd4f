"""Per-sample skipping statistics: which layers each row skipped, and does it track difficulty?

:func:`skip_statistics` summarises the ``layers_skipped`` trace of
:class:`~adaptive_depth.engine.AdaptiveInferenceEngine` (``[N, L]`` bool, one row per sample)
into a :class:`SkipStatistics`: how many distinct skip patterns the gates use, the most common
ones, the per-layer skip rate, the spread of the number of skipped layers per row and, given a
per-row difficulty (for instance the full-depth model's loss on the row), whether rows that are
harder skip fewer layers (Spearman and Pearson correlation, mutual information).

A static pattern (every row skips the same layers, as a fixed layer-drop model would) gives one
distinct pattern, a skip-count standard deviation of 0, undefined correlations (``NaN``) and a
mutual information of exactly 0: the gates carry no per-sample information. Dynamic skipping
that reacts to the input shows several patterns and, if it reacts to difficulty, a negative
correlation (harder rows skip less) and a positive mutual information.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["SkipStatistics", "skip_statistics"]

SKIPPED = "S"
RAN = "-"


@dataclass(frozen=True)
class SkipStatistics:
    """Summary of per-sample skip decisions (see :func:`skip_statistics`).

    Attributes:
        num_rows: ``N``, rows summarised.
        num_layers: ``L``, layers per row.
        num_patterns: distinct skip patterns among the rows (1 for a static pattern).
        top_patterns: up to ``top_k`` ``(pattern, count)`` pairs, most common first (ties in
            pattern order); a pattern is a string of ``L`` characters, ``"S"`` where the row
            skipped the layer and ``"-"`` where it did not, layer 1 first (``"--S-SS"``).
        skip_rate_per_layer: ``L`` floats, the fraction of the ``N`` rows that skipped layer ``i``.
        mean_skipped: mean number of skipped layers per row.
        std_skipped: population standard deviation (divisor ``N``) of the same.
        spearman: Spearman rank correlation between a row's number of skipped layers and its
            difficulty (average ranks for ties); ``None`` without a difficulty, ``NaN`` when
            either is constant (undefined).
        pearson: Pearson correlation of the same; ``None`` / ``NaN`` as ``spearman``.
        mutual_information: mutual information in nats between the number of skipped layers
            and the difficulty's quantile bin (plug-in estimate over the empirical joint
            distribution); ``None`` without a difficulty, 0 for a static pattern.
        difficulty_bins: number of quantile bins of the difficulty used for the mutual information.
    """

    num_rows: int
    num_layers: int
    num_patterns: int
    top_patterns: list[tuple[str, int]]
    skip_rate_per_layer: list[float]
    mean_skipped: float
    std_skipped: float
    spearman: float | None = None
    pearson: float | None = None
    mutual_information: float | None = None
    difficulty_bins: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (strict JSON: an undefined ``NaN`` correlation becomes ``None``)."""

        def finite_or_none(value: float | None) -> float | None:
            return None if value is None or math.isnan(value) else value

        return {
            "num_rows": self.num_rows,
            "num_layers": self.num_layers,
            "num_patterns": self.num_patterns,
            "top_patterns": [[pattern, count] for pattern, count in self.top_patterns],
            "skip_rate_per_layer": list(self.skip_rate_per_layer),
            "mean_skipped": self.mean_skipped,
            "std_skipped": self.std_skipped,
            "spearman": finite_or_none(self.spearman),
            "pearson": finite_or_none(self.pearson),
            "mutual_information": self.mutual_information,
            "difficulty_bins": self.difficulty_bins,
        }


def pattern_string(row: Sequence[bool] | Tensor) -> str:
    """``"S"`` for a skipped layer, ``"-"`` for one that was not, layer 1 first.

    >>> pattern_string([False, False, True])
    '--S'
    """
    return "".join(SKIPPED if bool(skipped) else RAN for skipped in row)


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of a 1-d tensor, ties sharing their average rank (as ``scipy.stats.rankdata``).

    Args:
        values: ``[N]``.

    Returns:
        ``[N]`` float64 ranks.

    >>> average_ranks(torch.tensor([10.0, 30.0, 20.0, 20.0])).tolist()
    [1.0, 4.0, 2.5, 2.5]
    """
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    # Distinct value j (in sorted order) occupies ranks end_j - count_j + 1 .. end_j.
    ends = torch.cumsum(counts, dim=0).double()
    mean_rank = ends - (counts.double() - 1.0) / 2.0
    return mean_rank[inverse]


def pearson_correlation(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two ``[N]`` tensors, in float64; ``NaN`` when either is constant."""
    x, y = x.double(), y.double()
    x_centered, y_centered = x - x.mean(), y - y.mean()
    denominator = torch.sqrt((x_centered * x_centered).sum() * (y_centered * y_centered).sum())
    if denominator.item() == 0.0:
        return float("nan")
    return float(((x_centered * y_centered).sum() / denominator).clamp(-1.0, 1.0))


def quantile_bins(values: Tensor, num_bins: int) -> Tensor:
    """The quantile bin (0 .. ``num_bins - 1``) of each value.

    The edges are ``torch.quantile(values, k / num_bins)`` for ``k = 1 .. num_bins - 1`` (linear
    interpolation); a value equal to an edge goes to the lower bin, so equal values always share
    a bin (with many ties some bins stay empty).

    Args:
        values: ``[N]`` float.
        num_bins: number of bins, at least 1.

    Returns:
        ``[N]`` int64 bin indices.

    >>> quantile_bins(torch.arange(10.0), 5).tolist()
    [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    """
    levels = torch.arange(1, num_bins, dtype=torch.float64) / num_bins
    edges = torch.quantile(values.double(), levels)
    return torch.bucketize(values.double(), edges, right=False)


def mutual_information(labels_a: Tensor, labels_b: Tensor) -> float:
    """Plug-in mutual information in nats between two ``[N]`` integer labelings.

    ``sum_ab p(a, b) * log(p(a, b) / (p(a) * p(b)))`` over the empirical joint distribution
    (as ``sklearn.metrics.mutual_info_score``); exactly 0 when either labeling is constant.
    """
    _, a = torch.unique(labels_a, return_inverse=True)
    _, b = torch.unique(labels_b, return_inverse=True)
    num_a, num_b = int(a.max()) + 1, int(b.max()) + 1
    if num_a == 1 or num_b == 1:
        return 0.0  # exactly: the sum below would leave rounding residue of order 1e-16
    joint = torch.bincount(a * num_b + b, minlength=num_a * num_b).reshape(num_a, num_b).double()
    joint = joint / joint.sum()
    outer = joint.sum(dim=1, keepdim=True) * joint.sum(dim=0, keepdim=True)
    nonzero = joint > 0
    value = (joint[nonzero] * (joint[nonzero].log() - outer[nonzero].log())).sum()
    return max(float(value), 0.0)  # rounding can leave -1e-17 for independent labelings


def skip_statistics(layers_skipped: Tensor, difficulty: Tensor | None = None, *, top_k: int = 5,
                    difficulty_bins: int = 5) -> SkipStatistics:
    """Summarise which layers each row skipped and, given ``difficulty``, how that tracks it.

    Rows that exited early before layer ``i`` count as not skipping it (the engine's
    ``layers_skipped`` is ``False`` there), so ``skip_rate_per_layer`` is over all ``N`` rows.
    All arithmetic is in torch (float64); nothing here needs scipy.

    Args:
        layers_skipped: ``[N, L]`` bool (or 0/1), ``True`` where the row skipped layer ``i``;
            :attr:`EngineOutput.layers_skipped <adaptive_depth.engine.EngineOutput>` concatenated
            over batches.
        difficulty: optional ``[N]`` float, any per-row difficulty (higher = harder), e.g. the
            full-depth model's cross-entropy loss on the row. Must be finite.
        top_k: how many of the most common patterns to report.
        difficulty_bins: quantile bins of ``difficulty`` for the mutual information.

    Returns:
        A :class:`SkipStatistics`. A static pattern (all rows alike) gives ``num_patterns == 1``
        and ``mutual_information == 0.0``; its correlations are ``NaN`` (constant skip count).

    Raises:
        ValueError: ``layers_skipped`` is not 2-d with at least one row and one layer or holds
            values other than 0/1; ``difficulty`` is not ``[N]`` or not finite; ``top_k`` or
            ``difficulty_bins`` is below 1.

    Example:
        >>> import torch
        >>> skipped = torch.tensor([[0, 0, 1, 0], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
        >>> loss = torch.tensor([0.5, 0.1, 0.2, 2.0])
        >>> stats = skip_statistics(skipped, loss)
        >>> stats.num_patterns, stats.top_patterns[0]
        (3, ('--SS', 2))
        >>> stats.skip_rate_per_layer
        [0.0, 0.0, 0.75, 0.5]
        >>> round(stats.spearman, 4), round(stats.mean_skipped, 2)
        (-0.9487, 1.25)
        >>> static = skip_statistics(torch.tensor([[0, 1], [0, 1], [0, 1]]), torch.tensor([1.0, 2.0, 3.0]))
        >>> static.num_patterns, static.mutual_information
        (1, 0.0)
    """
    if layers_skipped.dim() != 2 or layers_skipped.shape[0] < 1 or layers_skipped.shape[1] < 1:
        raise ValueError(
            f"layers_skipped must be [N, L] with N >= 1 rows and L >= 1 layers, got shape "
            f"{tuple(layers_skipped.shape)}; pass the engine's EngineOutput.layers_skipped (concatenate batches "
            "with torch.cat(..., dim=0))."
        )
    if layers_skipped.dtype != torch.bool:
        if not bool(((layers_skipped == 0) | (layers_skipped == 1)).all()):
            raise ValueError("layers_skipped must hold only 0/1 (or bool) values: True where a row skipped a layer.")
        layers_skipped = layers_skipped != 0
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    if difficulty_bins < 1:
        raise ValueError(f"difficulty_bins must be at least 1, got {difficulty_bins}.")
    layers_skipped = layers_skipped.detach().cpu()
    num_rows, num_layers = layers_skipped.shape

    patterns, counts = torch.unique(layers_skipped.to(torch.uint8), dim=0, return_counts=True)
    ranked = sorted(
        ((pattern_string(pattern), int(count)) for pattern, count in zip(patterns, counts)),
        key=lambda item: (-item[1], item[0]),
    )
    skip_count = layers_skipped.sum(dim=1).double()
    statistics: dict[str, Any] = dict(
        num_rows=num_rows,
        num_layers=num_layers,
        num_patterns=int(patterns.shape[0]),
        top_patterns=ranked[:top_k],
        skip_rate_per_layer=layers_skipped.double().mean(dim=0).tolist(),
        mean_skipped=float(skip_count.mean()),
        std_skipped=float(skip_count.std(correction=0)),
    )
    if difficulty is not None:
        difficulty = difficulty.detach().cpu()
        if difficulty.shape != (num_rows,):
            raise ValueError(
                f"difficulty must be [N] = [{num_rows}] (one value per row of layers_skipped), got shape "
                f"{tuple(difficulty.shape)}."
            )
        difficulty = difficulty.double()
        if not bool(torch.isfinite(difficulty).all()):
            raise ValueError("difficulty holds NaN or infinite values; drop those rows from both tensors first.")
        statistics.update(
            spearman=pearson_correlation(average_ranks(skip_count), average_ranks(difficulty)),
            pearson=pearson_correlation(skip_count, difficulty),
            mutual_information=mutual_information(skip_count.long(), quantile_bins(difficulty, difficulty_bins)),
            difficulty_bins=difficulty_bins,
        )
    return SkipStatistics(**statistics)
