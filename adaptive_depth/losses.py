"""The training losses of SmartBERT and its building blocks.

Each loss is returned as :class:`LossTerms`: the named terms (already weighted, so they add up to
the total) and their sum. Recipes log every term, so that a diagnosis such as "the skip reward
drives the gates to skip most layers" is read off the log instead of needing a separate run.
Equation numbers are those of the SmartBERT paper (Hu et al., IJCAI 2023; ``docs/design.md``).
What the gates and the heads learn is passed in as an objective
(:mod:`adaptive_depth.objectives`), so the two stage losses are the paper's equations with the
objective as one argument:

* stage 1 (eq. 3): ``L_CE(z_L, y) + gate objective + eta1 * L_contra1``
* stage 2 (eq. 6-8): ``exit objective + eta2 * L_contra2``
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch  # noqa: F401 (the doctests use it)
import torch.nn.functional as F
from torch import Tensor

from adaptive_depth.contrastive import CrossLayerInfoNCE
from adaptive_depth.encoder import AdaptiveEncoderOutput

if TYPE_CHECKING:
    from adaptive_depth.objectives import ExitObjective, GateObjective

__all__ = [
    "LossTerms",
    "budget_penalty",
    "distillation_loss",
    "expected_relative_cost",
    "skip_reward",
    "smartbert_stage1_loss",
    "smartbert_stage2_loss",
    "task_loss",
    "weighted_layer_sum",
]


@dataclass
class LossTerms:
    """Named, already weighted scalar loss terms; :attr:`total` is their sum in order.

    Example:
        >>> terms = LossTerms({"task": torch.tensor(0.5), "skip_reward": torch.tensor(0.1)})
        >>> round(float(terms.total), 4), sorted(terms.scalars())
        (0.6, ['skip_reward', 'task', 'total'])
    """

    terms: dict[str, Tensor]

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("LossTerms needs at least one term.")
        for name, value in self.terms.items():
            if value.ndim != 0:
                raise ValueError(f"loss term {name!r} must be a scalar, got shape {tuple(value.shape)}.")

    @property
    def total(self) -> Tensor:
        """The loss to minimize: the terms summed in insertion order."""
        total: Tensor | None = None
        for value in self.terms.values():
            total = value if total is None else total + value
        return total  # type: ignore[return-value]

    def __getitem__(self, name: str) -> Tensor:
        return self.terms[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.terms)

    def scalars(self) -> dict[str, float]:
        """Every term and ``total`` as Python floats (for logs and ``results.json``)."""
        values = {name: float(value.detach()) for name, value in self.terms.items()}
        values["total"] = float(self.total.detach())
        return values


def task_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of ``[B, C]`` logits against ``[B]`` class ids, or, for one output
    (``C = 1``, regression), the MSE of ``logits[:, 0]`` against ``[B]`` scores (paper eq. 2 and 7)."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits[:, 0], labels.float())
    return F.cross_entropy(logits, labels)


def skip_reward(gate_probs: Tensor, weight: float, eps: float = 1e-6) -> Tensor:
    """The "sloth of skipping" term of paper eq. 3: ``lambda / sum_i g_i``, batch mean.

    It falls as gates open and falls fastest when few are open: it rewards the first skips
    most, which on small models can push most layers to be skipped (see ``docs/lab/``).

    Args:
        gate_probs: ``[B, L]`` soft skip probabilities.
        weight: ``lambda`` (0.04 in the official RTE run).
        eps: keeps the division finite when every gate is closed.
    """
    return (weight / (gate_probs.sum(dim=-1) + eps)).mean()


def expected_relative_cost(gate_probs: Tensor) -> Tensor:
    """Per row, the expected share of the layers that runs, ``mean_i (1 - p_i)``: ``[B, L]`` -> ``[B]``."""
    return (1.0 - gate_probs).mean(dim=-1)


def budget_penalty(gate_probs: Tensor, target_cost: float, weight: float) -> Tensor:
    """Keep the batch's expected layer cost at ``target_cost``: ``weight * (mean_b e_b - target)^2``.

    Only the batch mean is constrained, so rows are free to differ: the task loss decides which
    rows spend the budget (budget-constrained routing rather than the paper's skip reward,
    which has no target and can collapse; see :func:`skip_reward`).

    Args:
        gate_probs: ``[B, L]`` soft skip probabilities.
        target_cost: wanted share of the layers run, in ``[0, 1]``.
        weight: penalty weight.

    Example:
        >>> float(budget_penalty(torch.full((4, 6), 0.5), target_cost=0.5, weight=1.0))
        0.0
    """
    if not 0.0 <= target_cost <= 1.0:
        raise ValueError(f"target_cost must be in [0, 1], got {target_cost}.")
    gap = expected_relative_cost(gate_probs).mean() - target_cost
    return weight * gap * gap


def smartbert_stage1_loss(out: AdaptiveEncoderOutput, labels: Tensor, gate_objective: GateObjective | None,
                          contrastive: CrossLayerInfoNCE | None = None, eta: float = 0.0) -> LossTerms:
    """SmartBERT stage 1, paper eq. 3: ``L_CE(z_L, y) + gate term + eta1 * L_contra1``.

    Terms: ``task`` (the last head), the gate objective's term (``skip_reward`` for the paper's
    ``lambda / sum_i g_i``; none when ``gate_objective`` is ``None``, e.g. while every layer runs in a
    warm-up), and ``contrastive``: ``eta`` times the cross-layer InfoNCE over the hidden states after
    each layer (eq. 4-5), when ``contrastive`` is given and ``eta > 0``.

    Args:
        out: the encoder's output with the last head run (``heads="last"`` or ``"all"``).
        labels: ``[B]`` class ids or scores.
        gate_objective: a :mod:`adaptive_depth.objectives` gate objective over ``out.gate_probs``.
        contrastive: the stage-1 projection and InfoNCE.
        eta: its weight ``eta1``.
    """
    terms = {"task": task_loss(out.logits, labels)}
    if gate_objective is not None:
        terms[gate_objective.term] = gate_objective(out.gate_probs)
    if contrastive is not None and eta > 0:
        terms["contrastive"] = eta * contrastive(out.hidden_states[1:], out.attention_mask).loss
    return LossTerms(terms)


def smartbert_stage2_loss(out: AdaptiveEncoderOutput, labels: Tensor, exit_objective: ExitObjective,
                          contrastive: CrossLayerInfoNCE | None = None, eta: float = 0.0) -> LossTerms:
    """SmartBERT stage 2, paper eq. 6-8: the exit objective over heads ``1..L-1`` + ``eta2 * L_contra2``.

    Terms: the exit objective's term (``exit_heads`` for the paper's ``sum_i L_CE(z_i, y)``,
    :class:`~adaptive_depth.objectives.LabelExits`), then ``contrastive``: ``eta`` times the InfoNCE
    over those heads' token states (eq. 5-6), when ``contrastive`` is given, ``eta > 0`` and there are
    at least two intermediate heads.

    Args:
        out: the encoder's output with ``return_head_token_states=True`` and the heads the
            objective names run (``heads=exit_objective.heads``).
        labels: ``[B]`` class ids or scores.
        exit_objective: a :mod:`adaptive_depth.objectives` exit objective.
        contrastive: the stage-2 projection and InfoNCE.
        eta: its weight ``eta2``.
    """
    terms = {exit_objective.term: exit_objective(out.exit_logits, labels)}
    states = out.head_token_states[:-1]
    if contrastive is not None and eta > 0 and len(states) >= 2:
        terms["contrastive"] = eta * contrastive(states, out.attention_mask).loss  # type: ignore[arg-type]
    return LossTerms(terms)


def weighted_layer_sum(losses: Sequence[Tensor]) -> Tensor:
    """PABEE's weighted average ``sum_i i * L_i / sum_i i`` over 1-based layers ``i``.

    Example:
        >>> weighted_layer_sum([torch.tensor(3.0), torch.tensor(0.0), torch.tensor(1.0)])
        tensor(1.)
    """
    if not losses:
        raise ValueError("weighted_layer_sum needs at least one loss")
    total = sum(index * loss for index, loss in enumerate(losses, start=1))
    return total / (len(losses) * (len(losses) + 1) / 2)


def distillation_loss(student_logits: Sequence[Tensor], teacher_logits: Tensor) -> Tensor:
    """FastBERT self-distillation: ``sum_s KL(p_teacher || p_student_s)``, batch mean.

    The teacher is detached (no gradient reaches it). With one output (regression) the KL is
    replaced by the squared error to the teacher's score.

    Example:
        >>> teacher = torch.tensor([[2.0, -1.0]])
        >>> float(distillation_loss([teacher.clone()], teacher))
        0.0
    """
    teacher = teacher_logits.detach().float()
    if teacher.shape[-1] == 1:
        return sum(F.mse_loss(student[:, 0].float(), teacher[:, 0]) for student in student_logits)
    teacher_log_probs = teacher.log_softmax(dim=-1)
    return sum(
        F.kl_div(student.float().log_softmax(dim=-1), teacher_log_probs, reduction="batchmean", log_target=True)
        for student in student_logits
    )
