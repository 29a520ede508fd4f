"""Training objectives as small callables: what the skip gates and the exit heads learn.

A training loss is the task loss plus an objective for the gates and one for the heads; each
objective is a small frozen dataclass, built from its name and options by
:func:`gate_objective` / :func:`exit_objective` (so a recipe config holds one nested key per
objective, e.g. ``gate_objective: {name: budget, target_cost: 0.5, weight: 2.0}``).

Gate objectives (a term of SmartBERT's stage-1 loss, paper eq. 3), over the ``[B, L]`` soft
skip probabilities:

* :class:`SkipReward` (``"skip_reward"``): the paper's "sloth of skipping", ``lambda / sum_i g_i``.
* :class:`BudgetPenalty` (``"budget"``): holds the batch's expected share of layers run at a
  target cost. It keeps the gates from collapsing where the skip reward does, and with a gate
  warm-up it gives SmartBERT's best results at a budget on MiniLM (``docs/results.md``).

Exit objectives (what the exit heads learn from their ``[B, C]`` logits, one per step):

* :class:`LastHead` (``"last_head"``): the last head on the labels (plain fine-tuning, stage 1 of
  DeeBERT and FastBERT).
* :class:`LabelExits` (``"labels"``): heads ``1..L-1`` on the labels (SmartBERT paper eq. 7-8,
  DeeBERT's highway heads).
* :class:`DistillExits` (``"distill"``): heads ``1..L-1`` towards the frozen last head
  (FastBERT's self-distillation; on SmartBERT's budget-trained gates it is a little better than
  the labels, ``docs/results.md``).
* :class:`WeightedExits` (``"weighted"``): PABEE's layer-weighted average over every head.

Each exit objective names the heads a training forward must run (:attr:`heads`, an
:class:`~adaptive_depth.AdaptiveEncoder` ``heads`` selection) and the loss term it logs (:attr:`term`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol, Union

from torch import Tensor

from adaptive_depth.losses import budget_penalty, distillation_loss, skip_reward, task_loss, weighted_layer_sum

__all__ = [
    "BudgetPenalty",
    "DistillExits",
    "ExitObjective",
    "GateObjective",
    "LabelExits",
    "LastHead",
    "SkipReward",
    "WeightedExits",
    "exit_objective",
    "gate_objective",
    "objective_spec",
]


class GateObjective(Protocol):
    """A gate term: ``[B, L]`` soft skip probabilities -> scalar loss, logged as :attr:`term`."""

    name: ClassVar[str]
    term: ClassVar[str]

    def __call__(self, gate_probs: Tensor) -> Tensor: ...


class ExitObjective(Protocol):
    """An exit-head loss: per-step logits (``None`` for heads that did not run) and labels -> scalar."""

    name: ClassVar[str]
    term: ClassVar[str]
    heads: ClassVar[str]

    def __call__(self, exit_logits: Sequence[Tensor | None], labels: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class SkipReward:
    """The paper's skip term (eq. 3): ``weight / sum_i g_i``, batch mean.

    It falls fastest when few gates are open, so it rewards the first skips most; on small models
    it can push most layers to be skipped (``docs/lab/``).

    Args:
        weight: ``lambda`` (0.04 in the official RTE run).

    Example:
        >>> import torch
        >>> round(float(SkipReward(0.04)(torch.full((2, 4), 0.5))), 4)
        0.02
    """

    weight: float = 0.04
    name: ClassVar[str] = "skip_reward"
    term: ClassVar[str] = "skip_reward"

    def __post_init__(self) -> None:
        _check_weight(self.name, self.weight)

    def __call__(self, gate_probs: Tensor) -> Tensor:
        return skip_reward(gate_probs, self.weight)


@dataclass(frozen=True)
class BudgetPenalty:
    """Hold the batch's expected share of layers run at ``target_cost``: ``weight * (mean - target)^2``.

    Only the batch mean is constrained, so rows are free to differ (see
    :func:`adaptive_depth.losses.budget_penalty`).

    Args:
        target_cost: wanted share of the layers run, in ``[0, 1]``.
        weight: penalty weight.

    Example:
        >>> import torch
        >>> float(BudgetPenalty(target_cost=0.5, weight=2.0)(torch.full((4, 6), 0.5)))
        0.0
    """

    target_cost: float = 0.5
    weight: float = 2.0
    name: ClassVar[str] = "budget"
    term: ClassVar[str] = "budget"

    def __post_init__(self) -> None:
        _check_weight(self.name, self.weight)
        if not 0.0 <= self.target_cost <= 1.0:
            raise ValueError(f"the budget objective's target_cost must be in [0, 1], got {self.target_cost}.")

    def __call__(self, gate_probs: Tensor) -> Tensor:
        return budget_penalty(gate_probs, self.target_cost, self.weight)


@dataclass(frozen=True)
class LastHead:
    """The last head's task loss (cross-entropy, or MSE for one output).

    Example:
        >>> import torch
        >>> round(float(LastHead()([None, torch.zeros(2, 2)], torch.tensor([0, 1]))), 4)
        0.6931
    """

    name: ClassVar[str] = "last_head"
    term: ClassVar[str] = "task"
    heads: ClassVar[str] = "last"

    def __call__(self, exit_logits: Sequence[Tensor | None], labels: Tensor) -> Tensor:
        return task_loss(_ran(exit_logits[-1], len(exit_logits) - 1), labels)


@dataclass(frozen=True)
class LabelExits:
    """Heads ``1..L-1`` on the labels: ``sum_i L_CE(z_i, y)`` (paper eq. 7-8; DeeBERT's highway heads).

    Example:
        >>> import torch
        >>> round(float(LabelExits()([torch.zeros(2, 2), torch.zeros(2, 2), None], torch.tensor([0, 1]))), 4)
        1.3863
    """

    name: ClassVar[str] = "labels"
    term: ClassVar[str] = "exit_heads"
    heads: ClassVar[str] = "intermediate"

    def __call__(self, exit_logits: Sequence[Tensor | None], labels: Tensor) -> Tensor:
        return sum(task_loss(_ran(logits, step), labels) for step, logits in enumerate(exit_logits[:-1]))  # type: ignore[return-value]


@dataclass(frozen=True)
class DistillExits:
    """Heads ``1..L-1`` towards the last head's softmax (FastBERT self-distillation; labels unused).

    The last head is the teacher and gets no gradient (:func:`adaptive_depth.losses.distillation_loss`).
    """

    name: ClassVar[str] = "distill"
    term: ClassVar[str] = "distillation"
    heads: ClassVar[str] = "all"

    def __call__(self, exit_logits: Sequence[Tensor | None], labels: Tensor) -> Tensor:
        students = [_ran(logits, step) for step, logits in enumerate(exit_logits[:-1])]
        return distillation_loss(students, _ran(exit_logits[-1], len(exit_logits) - 1))


@dataclass(frozen=True)
class WeightedExits:
    """PABEE: every head's task loss, averaged with weight ``i`` for 1-based layer ``i``."""

    name: ClassVar[str] = "weighted"
    term: ClassVar[str] = "weighted_task"
    heads: ClassVar[str] = "all"

    def __call__(self, exit_logits: Sequence[Tensor | None], labels: Tensor) -> Tensor:
        return weighted_layer_sum([task_loss(_ran(logits, step), labels) for step, logits in enumerate(exit_logits)])


GATE_OBJECTIVES: dict[str, type] = {cls.name: cls for cls in (SkipReward, BudgetPenalty)}
EXIT_OBJECTIVES: dict[str, type] = {cls.name: cls for cls in (LastHead, LabelExits, DistillExits, WeightedExits)}
ObjectiveSpec = Union[str, Mapping[str, Any]]


def gate_objective(spec: ObjectiveSpec) -> GateObjective:
    """The gate objective a name or ``{"name": ..., option: value}`` mapping describes.

    Example:
        >>> gate_objective({"name": "budget", "target_cost": 0.4})
        BudgetPenalty(target_cost=0.4, weight=2.0)

    Raises:
        ValueError: an unknown name or option, or an option out of range.
    """
    return _build("gate", GATE_OBJECTIVES, spec)


def exit_objective(spec: ObjectiveSpec) -> ExitObjective:
    """The exit objective a name (or ``{"name": ...}``) describes.

    Example:
        >>> exit_objective("distill")
        DistillExits()
    """
    return _build("exit", EXIT_OBJECTIVES, spec)


def objective_spec(objective: GateObjective | ExitObjective) -> dict[str, Any]:
    """``{"name": ..., option: value}`` of an objective: the inverse of :func:`gate_objective` /
    :func:`exit_objective` (what a config stores).

    Example:
        >>> objective_spec(SkipReward(0.04))
        {'name': 'skip_reward', 'weight': 0.04}
    """
    return {"name": objective.name, **{field.name: getattr(objective, field.name) for field in fields(objective)}}


def _build(kind: str, known: dict[str, type], spec: ObjectiveSpec) -> Any:
    options = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = options.pop("name", None)
    if name not in known:
        raise ValueError(f"unknown {kind} objective {name!r}; known: {', '.join(sorted(known))}.")
    cls = known[name]
    allowed = [field.name for field in fields(cls)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"the {kind} objective {name!r} takes no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(map(repr, allowed)) or 'none'}.")
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"the {kind} objective {name!r}'s option {key!r} must be a number, got {value!r}.")
    return cls(**{key: float(value) for key, value in options.items()})


def _check_weight(name: str, weight: float) -> None:
    if not weight >= 0:  # also refuses NaN
        raise ValueError(f"the {name} objective's weight must be >= 0, got {weight}.")


def _ran(logits: Tensor | None, step: int) -> Tensor:
    if logits is None:
        raise ValueError(f"exit head {step + 1} did not run; run the heads this objective names (its .heads).")
    return logits
