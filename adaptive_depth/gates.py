"""Skip gates (SmartBERT §3.2, eq. 1 and 9), the hard-weight trick (§3.5, eq. 11-12) and the
soft-to-hard training schedule (§3.6).

A gate looks at the hidden states entering a layer and outputs ``p_skip`` in ``[0, 1]``.
Training mixes ``X_i = g * X_{i-1} + (1 - g) * E_i(X_{i-1})``; inference skips the layer when
``p_skip >= 0.5``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from adaptive_depth.fused_pool import FusedPool, FusedSnapshot, fused_call_allowed
from adaptive_depth.narrow_attention import NarrowAttentionPool

__all__ = [
    "GatePooling",
    "GateSchedule",
    "SkipGate",
    "SkipGateOutput",
    "StraightThroughHard",
    "skip_decision",
    "straight_through_hard",
]

GatePooling = Literal["attention", "cls", "mean"]


@dataclass
class SkipGateOutput:
    """Output of :class:`SkipGate`.

    Attributes:
        p_skip: ``[B]`` probability of skipping the layer, in ``[0, 1]``.
        logit: ``[B]`` the pre-sigmoid score.
    """

    p_skip: Tensor
    logit: Tensor


class SkipGate(FusedSnapshot, nn.Module):
    """Decides per sample whether to skip the next transformer layer.

    The default (``pooling="attention"``) is the official SmartBERT gate:
    ``tanh(Linear(H -> 128))``, one 128-d self-attention with 2 heads over the padding-masked
    sequence, the ``[CLS]`` position, ``Linear(128 -> 1)``, sigmoid. Cheaper variants read only
    ``[CLS]`` (``"cls"``) or the masked mean of the tokens (``"mean"``) through
    ``tanh(Linear(H -> 128)) -> Linear(128 -> 1)``.

    Args:
        hidden_size: width ``H`` of the hidden states.
        inner_size: width of the narrowed representation (128 in the paper's code).
        num_heads: attention heads for ``pooling="attention"``.
        pooling: ``"attention"``, ``"cls"`` or ``"mean"``.
        dropout: attention-probability dropout (training only).
        initial_skip_bias: bias of the final linear layer; ``0.0`` starts every gate at
            ``p_skip = 0.5`` on average; a negative value starts gates closed (run the layer).

    Example:
        >>> gate = SkipGate(hidden_size=32, inner_size=16)
        >>> out = gate(torch.randn(2, 5, 32), torch.ones(2, 5))
        >>> tuple(out.p_skip.shape), bool(((out.p_skip >= 0) & (out.p_skip <= 1)).all())
        ((2,), True)
    """

    def __init__(
        self,
        hidden_size: int,
        inner_size: int = 128,
        num_heads: int = 2,
        pooling: GatePooling = "attention",
        dropout: float = 0.1,
        initial_skip_bias: float = 0.0,
    ) -> None:
        super().__init__()
        if pooling not in ("attention", "cls", "mean"):
            raise ValueError(f"pooling must be 'attention', 'cls' or 'mean', got {pooling!r}.")
        self.pooling = pooling
        if pooling == "attention":
            self.pool = NarrowAttentionPool(hidden_size, inner_size, num_heads, dropout)
        else:
            self.narrow = nn.Linear(hidden_size, inner_size)
        self.score = nn.Linear(inner_size, 1)
        nn.init.constant_(self.score.bias, initial_skip_bias)
        self._fused: FusedPool | None = None  # set by AdaptiveEncoder.fuse_for_inference

    def _set_fused(self, enabled: bool) -> None:
        """Fuse the attention pooling and the score for inference (:mod:`adaptive_depth.fused_pool`), or stop."""
        self._fused = FusedPool.build(self.pool, self.score) if enabled and self.pooling == "attention" else None

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> SkipGateOutput:
        """Score the hidden states entering a layer.

        Args:
            hidden_states: ``[B, N, H]``.
            attention_mask: ``[B, N]``, 1 for tokens, 0 for padding (``None``: no padding).

        Returns:
            :class:`SkipGateOutput` with ``p_skip`` of shape ``[B]``.
        """
        if self._fused is not None and fused_call_allowed(self):
            self._fused = fused = self._fused.refreshed(self.pool, self.score)
            logit = fused(hidden_states, attention_mask).squeeze(-1)
            return SkipGateOutput(p_skip=torch.sigmoid(logit), logit=logit)
        if self.pooling == "attention":
            pooled = self.pool(hidden_states, attention_mask).pooled
        elif self.pooling == "cls":
            pooled = torch.tanh(self.narrow(hidden_states[:, 0]))
        else:
            if attention_mask is None:
                mean = hidden_states.mean(dim=1)
            else:
                weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
                mean = (hidden_states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            pooled = torch.tanh(self.narrow(mean))
        logit = self.score(pooled).squeeze(-1)
        return SkipGateOutput(p_skip=torch.sigmoid(logit), logit=logit)


def skip_decision(p_skip: Tensor, threshold: float = 0.5) -> Tensor:
    """Which rows skip: ``p_skip >= threshold``, except that ``threshold = 1`` never skips.

    A float32 sigmoid saturates to exactly 1.0 for logits above about 17, so ``p_skip >= 1``
    would still skip confident gates; ``threshold = 1`` is the documented "gates off" setting
    and means no skipping at all. ``threshold = 0`` skips every layer.

    Args:
        p_skip: skip probabilities of any shape, in ``[0, 1]``.
        threshold: in ``[0, 1]``.

    Returns:
        Bool tensor of the shape of ``p_skip``, True where the layer is skipped.

    Example:
        >>> p_skip = torch.tensor([0.2, 0.5, 1.0])
        >>> skip_decision(p_skip, 0.5).tolist(), skip_decision(p_skip, 1.0).tolist()
        ([False, True, True], [False, False, False])
    """
    if threshold >= 1.0:
        return torch.zeros_like(p_skip, dtype=torch.bool)
    return p_skip >= threshold


class _StraightThrough(torch.autograd.Function):
    """Forward: exactly ``1[soft >= threshold]`` (never 1 at threshold 1). Backward: the gradient passes unchanged."""

    @staticmethod
    def forward(ctx, soft: Tensor, threshold: float) -> Tensor:  # type: ignore[override]
        return skip_decision(soft, threshold).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad_output, None


def straight_through_hard(soft: Tensor, threshold: float = 0.5) -> Tensor:
    """Hard 0/1 gate values whose gradient is the soft gradient (paper eq. 11-12).

    The paper writes this as ``1[g >= 0.5] - sg(g) + g``; that sum is not always exactly
    0 or 1 in floating point, so the forward here returns the indicator itself and the
    backward passes the incoming gradient to ``soft`` unchanged.

    Args:
        soft: gate probabilities of any shape, in ``[0, 1]``.
        threshold: values ``>= threshold`` become 1 (skip); ``1`` never skips
            (see :func:`skip_decision`).

    Returns:
        Tensor of the same shape and dtype holding only 0.0 and 1.0.

    Example:
        >>> straight_through_hard(torch.tensor([0.2, 0.5, 0.9]))
        tensor([0., 1., 1.])
    """
    return _StraightThrough.apply(soft, threshold)


class StraightThroughHard(nn.Module):
    """Module form of :func:`straight_through_hard` with a switch between soft and hard.

    Args:
        threshold: the skip threshold (0.5 in the paper).
        hard: when ``False`` the module is the identity (soft gates, §3.6 warm-up).

    Example:
        >>> ste = StraightThroughHard()
        >>> ste(torch.tensor([0.49, 0.51]))
        tensor([0., 1.])
    """

    def __init__(self, threshold: float = 0.5, hard: bool = True) -> None:
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}.")
        self.threshold = threshold
        self.hard = hard

    def forward(self, soft: Tensor) -> Tensor:
        """Apply the gate; see :func:`straight_through_hard`."""
        return straight_through_hard(soft, self.threshold) if self.hard else soft

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, hard={self.hard}"


@dataclass(frozen=True)
class GateSchedule:
    """When the gates switch from soft to hard during training (paper §3.6).

    The official RTE configuration trains soft gates in stage-1 epochs 0-2 and hard gates in
    epochs 3-4, i.e. ``GateSchedule(soft_epochs=3)``.

    Args:
        soft_epochs: number of leading epochs (0-based count) trained with soft gates.
            ``0`` trains hard from the start; a large value never switches.

    Example:
        >>> schedule = GateSchedule(soft_epochs=3)
        >>> [schedule.mode(epoch) for epoch in range(5)]
        ['soft', 'soft', 'soft', 'hard', 'hard']
    """

    soft_epochs: int = 3

    def __post_init__(self) -> None:
        if self.soft_epochs < 0:
            raise ValueError(f"soft_epochs must be >= 0, got {self.soft_epochs}.")

    def mode(self, epoch: int) -> Literal["soft", "hard"]:
        """The gate mode for a 0-based ``epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}.")
        return "soft" if epoch < self.soft_epochs else "hard"
