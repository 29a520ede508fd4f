"""Exit heads (SmartBERT §3.2, eq. 2) and exit criteria (§3.4, eq. 10; PABEE; max-prob; regression tolerance).

Every criterion decides per row of a batch and carries its per-row state as a ``[B, k]``
tensor, so an inference engine can drop rows that left with one ``index_select``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from adaptive_depth.fused_pool import FusedPool, FusedSnapshot, fused_call_allowed
from adaptive_depth.narrow_attention import NarrowAttentionPool

__all__ = [
    "ClassifierExitHead",
    "EntropyExit",
    "ExitCriterion",
    "ExitDecision",
    "ExitHead",
    "ExitHeadOutput",
    "MaxProbExit",
    "PatienceExit",
    "PoolerExitHead",
    "ToleranceExit",
    "entropy",
    "predictions_from_logits",
]


@dataclass
class ExitHeadOutput:
    """Output of :class:`ExitHead`.

    Attributes:
        logits: ``[B, C]`` class scores (``C = 1`` for regression).
        token_states: ``[B, N, d]`` the head's self-attention output at every token (the
            features of the stage-2 contrastive loss, paper eq. 5), or ``None`` unless asked.
    """

    logits: Tensor
    token_states: Tensor | None = None


class ExitHead(FusedSnapshot, nn.Module):
    """Classifier attached after one layer: the official SmartBERT / FastBERT head.

    ``tanh(Linear(H -> 128))``, one 128-d self-attention with 4 heads over the padding-masked
    sequence, the ``[CLS]`` position, ``tanh(Linear(128 -> 128))``, ``Linear(128 -> C)``.

    Args:
        hidden_size: width ``H`` of the hidden states.
        num_labels: number of classes ``C`` (1 for regression).
        inner_size: width of the narrowed representation.
        num_heads: attention heads.
        dropout: attention-probability dropout (training only).

    Example:
        >>> head = ExitHead(hidden_size=32, num_labels=3, inner_size=16)
        >>> tuple(head(torch.randn(2, 5, 32), torch.ones(2, 5)).logits.shape)
        (2, 3)
    """

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        inner_size: int = 128,
        num_heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}.")
        self.num_labels = num_labels
        self.pool = NarrowAttentionPool(hidden_size, inner_size, num_heads, dropout)
        self.prelim = nn.Linear(inner_size, inner_size)
        self.classifier = nn.Linear(inner_size, num_labels)
        self._fused: FusedPool | None = None  # set by AdaptiveEncoder.fuse_for_inference

    def _set_fused(self, enabled: bool) -> None:
        """Fuse the attention pooling and ``prelim`` for inference (:mod:`adaptive_depth.fused_pool`), or stop."""
        self._fused = FusedPool.build(self.pool, self.prelim) if enabled else None

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        return_token_states: bool = False,
    ) -> ExitHeadOutput:
        """Classify from the hidden states a layer produced.

        Args:
            hidden_states: ``[B, N, H]``.
            attention_mask: ``[B, N]``, 1 for tokens, 0 for padding (``None``: no padding).
            return_token_states: also return the attention output at every token.

        Returns:
            :class:`ExitHeadOutput`.
        """
        if self._fused is not None and not return_token_states and fused_call_allowed(self):
            self._fused = fused = self._fused.refreshed(self.pool, self.prelim)
            return ExitHeadOutput(logits=self.classifier(torch.tanh(fused(hidden_states, attention_mask))))
        pooled = self.pool(hidden_states, attention_mask, return_token_states)
        logits = self.classifier(torch.tanh(self.prelim(pooled.pooled)))
        return ExitHeadOutput(logits=logits, token_states=pooled.token_states)


class PoolerExitHead(nn.Module):
    """The DeeBERT "highway" / PABEE classifier: ``[CLS]`` -> ``tanh(Linear(H -> H))`` -> ``Linear(H -> C)``.

    Args:
        hidden_size: width ``H`` of the hidden states.
        num_labels: number of classes ``C`` (1 for regression).
        dropout: dropout before the classifier (training only).

    Example:
        >>> head = PoolerExitHead(hidden_size=32, num_labels=3)
        >>> tuple(head(torch.randn(2, 5, 32)).logits.shape)
        (2, 3)
    """

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}.")
        self.num_labels = num_labels
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, return_token_states: bool = False
    ) -> ExitHeadOutput:
        """Classify from the ``[CLS]`` position of ``hidden_states`` ``[B, N, H]``.

        ``attention_mask`` is accepted for interface parity and not needed; this head has no
        token-level states, so ``return_token_states=True`` is an error.
        """
        if return_token_states:
            raise ValueError("PoolerExitHead has no token states; use ExitHead for the stage-2 contrastive loss.")
        pooled = torch.tanh(self.pooler(hidden_states[:, 0]))
        return ExitHeadOutput(logits=self.classifier(self.dropout(pooled)))


class ClassifierExitHead(nn.Module):
    """A fine-tuned model's own classifier as an exit head: its modules, applied in order.

    The modules are the model's own (shared, not copied), so the head gives exactly the logits
    the model computes from the same hidden states. Which modules, in which order, each family
    uses is :data:`adaptive_depth.classifiers.CLASSIFIER_HEADS`; build it with
    :func:`adaptive_depth.classifiers.classifier_exit_head`.

    Args:
        modules: ``[B, N, H] -> [B, C]`` when applied in order (the first reads position 0).
        num_labels: ``C`` (1 for regression).

    Example:
        >>> from adaptive_depth.classifiers import FirstToken
        >>> head = ClassifierExitHead([FirstToken(), nn.Linear(4, 3)], num_labels=3)
        >>> tuple(head(torch.randn(2, 5, 4)).logits.shape)
        (2, 3)
    """

    def __init__(self, modules: list[nn.Module], num_labels: int) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}.")
        self.num_labels = num_labels
        self.classifier = nn.Sequential(*modules)

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, return_token_states: bool = False
    ) -> ExitHeadOutput:
        """Classify ``hidden_states`` ``[B, N, H]`` as the model does (``attention_mask`` is not
        needed: every family reads position 0); it has no token states to return."""
        if return_token_states:
            raise ValueError("ClassifierExitHead has no token states; the contrastive loss needs ExitHead.")
        return ExitHeadOutput(logits=self.classifier(hidden_states))

    def linear_macs(self) -> int:
        """MACs of one row: every ``nn.Linear`` once (each reads one position), in both conventions."""
        return sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))


def predictions_from_logits(logits: Tensor) -> Tensor:
    """The one place logits become predictions: the argmax class of ``[B, C]`` logits, or for a
    regression head (``C = 1``) the ``[B]`` scores themselves.

    Example:
        >>> predictions_from_logits(torch.tensor([[0.1, 2.0], [3.0, -1.0]])).tolist()
        [1, 0]
        >>> predictions_from_logits(torch.tensor([[0.25], [4.0]])).tolist()
        [0.25, 4.0]
    """
    return logits[..., 0] if logits.shape[-1] == 1 else logits.argmax(dim=-1)


def _at_least_float32(logits: Tensor) -> Tensor:
    """Half-precision logits in float32, float32 and float64 ones as they are (a float64 model's exits are
    decided in float64, as a one-row loop's host-side ``decide_row`` decides them)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def entropy(logits: Tensor, normalized: bool = False) -> Tensor:
    """Entropy of ``softmax(logits)`` in nats, per row.

    Args:
        logits: ``[B, C]`` with ``C >= 2``.
        normalized: divide by ``log(C)`` so the result lies in ``[0, 1]`` (FastBERT's "speed").

    Returns:
        ``[B]`` entropies, in ``[0, log C]`` (or ``[0, 1]`` when normalized).
    """
    num_classes = logits.shape[-1]
    if num_classes < 2:
        raise ValueError(
            f"entropy needs at least 2 classes, got logits of shape {tuple(logits.shape)}; "
            "for regression use PatienceExit."
        )
    log_probabilities = _at_least_float32(logits).log_softmax(dim=-1)
    values = (-(log_probabilities.exp() * log_probabilities).sum(dim=-1)).clamp_min(0.0)
    return values / math.log(num_classes) if normalized else values


@dataclass
class ExitDecision:
    """What a criterion decided for each row.

    Attributes:
        should_exit: ``[B]`` bool, True where the row leaves now.
        state: ``[B, k]`` per-row state to pass to the next call (``k`` may be 0).
        score: ``[B]`` the quantity compared with the threshold (entropy, max probability
            or patience count), for logging.
    """

    should_exit: Tensor
    state: Tensor
    score: Tensor


@runtime_checkable
class ExitCriterion(Protocol):
    """Decides, after each layer that ran, which rows exit.

    ``initial_state`` gives a ``[B, k]`` tensor; ``decide`` takes the logits of the rows
    that just ran and their state rows, and returns an :class:`ExitDecision`. A stateless criterion
    may also offer ``decide_row(logits: Sequence[float]) -> bool | None``, the decision for one row
    from logits read on the host (``None``: undecided, use ``decide``); the batch-1 loop calls it to
    save tensor operators (:class:`EntropyExit`, :class:`MaxProbExit`).
    """

    def initial_state(self, batch_size: int, device: torch.device) -> Tensor: ...

    def decide(self, logits: Tensor, state: Tensor) -> ExitDecision: ...


def _stateless(batch_size: int, device: torch.device) -> Tensor:
    return torch.zeros(batch_size, 0, device=device)


def _host_compare(value: float, threshold: float, spread: float, num_classes: int, *, strict: bool) -> bool | None:
    """``value < threshold`` (``strict``) or ``value >= threshold`` for a score computed in float64 on the
    host, or ``None`` when ``value`` lies so near the threshold that the float32 tensor computation of
    the same logits could fall on the other side. Its rounding error is a few units of float32's
    epsilon (1.2e-7) times the logits' spread and the number of classes; the margin allows 1e-5 of
    each (about 100 times that), so a row it refuses is rare and settled by the tensor computation."""
    if abs(value - threshold) <= 1e-5 * num_classes * (1.0 + spread):
        return None
    return value < threshold if strict else value >= threshold


@dataclass(frozen=True)
class EntropyExit:
    """Exit when ``entropy(softmax(z)) < threshold`` (paper eq. 10, DeeBERT, FastBERT).

    ``threshold = 0`` never exits (entropy is never negative); a threshold above ``log C``
    (or above 1 when normalized) exits at the first layer that runs.

    Args:
        threshold: the entropy threshold ``S`` (nats, or a fraction of ``log C``), ``>= 0``.
        normalized: compare ``entropy / log C`` instead of the raw entropy.

    Example:
        >>> EntropyExit(0.3).decide(torch.tensor([[5.0, -5.0], [0.0, 0.0]]), torch.zeros(2, 0)).should_exit
        tensor([ True, False])
    """

    threshold: float
    normalized: bool = False

    def __post_init__(self) -> None:
        if math.isnan(self.threshold) or self.threshold < 0:
            raise ValueError(f"entropy threshold must be >= 0, got {self.threshold}.")

    def initial_state(self, batch_size: int, device: torch.device) -> Tensor:
        return _stateless(batch_size, device)

    def decide(self, logits: Tensor, state: Tensor) -> ExitDecision:
        values = entropy(logits, self.normalized)
        return ExitDecision(should_exit=values < self.threshold, state=state, score=values)

    def decide_row(self, logits: Sequence[float]) -> bool | None:
        """:meth:`decide` for one row whose finite logits were read on the host: computed in float64,
        ``None`` where the entropy lies within float32's rounding of the threshold (then :meth:`decide`
        settles it). Saves a batch-1 loop the eight tensor operators of :func:`entropy`."""
        if len(logits) < 2:
            return None  # decide() raises the error
        top = max(logits)
        weights = [math.exp(value - top) for value in logits]
        total = math.fsum(weights)
        value = -math.fsum(weight / total * (logit - top - math.log(total)) for weight, logit in zip(weights, logits))
        if self.normalized:
            value /= math.log(len(logits))
        return _host_compare(value, self.threshold, top - min(logits), len(logits), strict=True)


@dataclass(frozen=True)
class MaxProbExit:
    """Exit when the largest class probability is at least ``threshold``.

    Args:
        threshold: in ``[0, 1]``; 0 exits at the first layer that runs, values above the
            largest reachable probability never exit.
    """

    threshold: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"max-probability threshold must be in [0, 1], got {self.threshold}.")

    def initial_state(self, batch_size: int, device: torch.device) -> Tensor:
        return _stateless(batch_size, device)

    def decide(self, logits: Tensor, state: Tensor) -> ExitDecision:
        if logits.shape[-1] < 2:
            raise ValueError("MaxProbExit needs at least 2 classes; for regression use PatienceExit.")
        top = _at_least_float32(logits).softmax(dim=-1).amax(dim=-1)
        return ExitDecision(should_exit=top >= self.threshold, state=state, score=top)

    def decide_row(self, logits: Sequence[float]) -> bool | None:
        """:meth:`decide` for one row whose finite logits were read on the host (see
        :meth:`EntropyExit.decide_row`): ``None`` within float32's rounding of the threshold."""
        if len(logits) < 2:
            return None  # decide() raises the error
        top = max(logits)
        value = 1.0 / math.fsum(math.exp(logit - top) for logit in logits)
        return _host_compare(value, self.threshold, top - min(logits), len(logits), strict=False)


@dataclass(frozen=True)
class PatienceExit:
    """PABEE (Zhou et al. 2020): exit once ``patience`` consecutive heads agree.

    The counter rises when a head's prediction equals the previous head's (for regression:
    differs by less than ``regression_tolerance``) and resets otherwise; a row exits when the
    counter reaches ``patience``. Heads of skipped layers do not run, so "consecutive" means
    consecutive among the layers that ran. ``patience = 0`` exits at the first layer that runs.

    Args:
        patience: number of agreeing consecutive heads, ``>= 0``.
        regression_tolerance: agreement tolerance when ``C = 1``.

    State: ``[B, 2]`` (previous prediction, counter); the previous prediction is NaN at start.
    """

    patience: int
    regression_tolerance: float = 0.1

    def __post_init__(self) -> None:
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}.")

    def initial_state(self, batch_size: int, device: torch.device) -> Tensor:
        state = torch.zeros(batch_size, 2, device=device)
        state[:, 0] = float("nan")
        return state

    def decide(self, logits: Tensor, state: Tensor) -> ExitDecision:
        previous, counter = state[:, 0], state[:, 1]
        prediction = predictions_from_logits(logits).to(state.dtype)
        if logits.shape[-1] == 1:
            agrees = (prediction - previous).abs() < self.regression_tolerance
        else:
            agrees = prediction == previous
        counter = torch.where(agrees, counter + 1, torch.zeros_like(counter))
        new_state = torch.stack([prediction.to(state.dtype), counter], dim=-1)
        return ExitDecision(should_exit=counter >= self.patience, state=new_state, score=counter)


@dataclass(frozen=True)
class ToleranceExit:
    """Regression exit with a continuous knob: leave once ``patience`` consecutive heads' scores
    each differ from the previous head's by less than ``tolerance`` (score units).

    It decides exactly as ``PatienceExit(patience, regression_tolerance=tolerance)``, but its
    threshold is the tolerance, so calibration can bisect it to a cost budget, where patience
    alone offers only ``L + 1`` operating points (on STS-B often none between "exit at the first
    heads" and nearly full depth). ``tolerance = 0`` never exits early; a larger one exits
    earlier; ``inf`` exits at head ``patience + 1`` of those that run.

    Args:
        tolerance: the agreement tolerance, ``>= 0`` (may be ``inf``).
        patience: number of agreeing consecutive heads, ``>= 1``.

    State: ``[B, 2]`` as :class:`PatienceExit`'s.

    Raises:
        ValueError: (``decide``) on logits with more than one output: for classes, use
            :class:`PatienceExit`, :class:`EntropyExit` or :class:`MaxProbExit`.
    """

    tolerance: float
    patience: int = 1

    def __post_init__(self) -> None:
        if not self.tolerance >= 0:  # also refuses NaN
            raise ValueError(f"tolerance must be >= 0 (score units), got {self.tolerance}.")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1 (a first head has nothing to agree with), got {self.patience}.")

    def initial_state(self, batch_size: int, device: torch.device) -> Tensor:
        return PatienceExit(self.patience, self.tolerance).initial_state(batch_size, device)

    def decide(self, logits: Tensor, state: Tensor) -> ExitDecision:
        if logits.shape[-1] != 1:
            raise ValueError(f"ToleranceExit is for regression (one output), got logits of shape "
                             f"{tuple(logits.shape)}; for classes use PatienceExit, EntropyExit or MaxProbExit.")
        return PatienceExit(self.patience, self.tolerance).decide(logits, state)
