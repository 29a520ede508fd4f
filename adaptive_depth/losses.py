"""The training losses of SmartBERT and the early-exit baselines, by name.

Each method's loss is a function returning :class:`LossTerms`: the named terms (already
weighted, so they add up to the total) and their sum. Recipes log every term, so that a
diagnosis such as "the skip reward drives the gates to skip most layers" is read off the log
instead of needing a separate run. Equation numbers are those of the SmartBERT paper
(Hu et al., IJCAI 2023; ``docs/design.md``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptive_depth.contrastive import CrossLayerInfoNCE
from adaptive_depth.encoder import AdaptiveEncoderOutput

__all__ = [
    "BudgetOn",
    "ExitObjective",
    "GateObjective",
    "LossTerms",
    "budget_penalty",
    "difficulty_targets",
    "deebert_highway_loss",
    "distillation_loss",
    "expected_relative_cost",
    "fastbert_distillation_loss",
    "last_head_loss",
    "pabee_weighted_loss",
    "routed_budget_penalty",
    "row_task_losses",
    "skip_reward",
    "smartbert_stage1_loss",
    "smartbert_stage2_loss",
    "task_loss",
    "weighted_layer_sum",
]

GateObjective = Literal["paper", "budget"]
ExitObjective = Literal["paper", "distill"]
BudgetOn = Literal["probabilities", "decisions"]


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


def task_loss(logits: Tensor, labels: Tensor, is_regression: bool) -> Tensor:
    """Cross-entropy of ``[B, C]`` logits against ``[B]`` class ids, or MSE of ``logits[:, 0]``
    against ``[B]`` scores for regression (paper eq. 2 and 7)."""
    if is_regression:
        return F.mse_loss(logits[:, 0], labels.float())
    return F.cross_entropy(logits, labels)


def skip_reward(gate_probs: Tensor, weight: float, eps: float = 1e-6) -> Tensor:
    """The "sloth of skipping" term of paper eq. 3: ``lambda / sum_i g_i``, batch mean.

    It falls as gates open and falls fastest when few are open: it rewards the first skips
    most, which on small models can push most layers to be skipped (see ``docs/results.md``).

    Args:
        gate_probs: ``[B, L]`` soft skip probabilities.
        weight: ``lambda`` (0.04 in the official RTE run).
        eps: keeps the division finite when every gate is closed.
    """
    return (weight / (gate_probs.sum(dim=-1) + eps)).mean()


def expected_relative_cost(gate_probs: Tensor, layer_costs: Tensor | Sequence[float] | None = None) -> Tensor:
    """Per row, the expected share of the layers' MACs that runs: ``sum_i (1 - p_i) c_i / sum_i c_i``.

    Args:
        gate_probs: ``[B, L]`` soft skip probabilities.
        layer_costs: ``[L]`` MACs (or any weights) of the steps; ``None``: equal.

    Returns:
        ``[B]`` values in ``[0, 1]``.
    """
    run = 1.0 - gate_probs
    if layer_costs is None:
        return run.mean(dim=-1)
    costs = torch.as_tensor(layer_costs, dtype=run.dtype, device=run.device)
    if costs.shape != run.shape[-1:]:
        raise ValueError(f"layer_costs must have one entry per step ({run.shape[-1]}), got {tuple(costs.shape)}.")
    return (run * costs).sum(dim=-1) / costs.sum()


def budget_penalty(gate_probs: Tensor, target_cost: float, weight: float,
                   layer_costs: Tensor | Sequence[float] | None = None) -> Tensor:
    """Keep the batch's expected layer cost at ``target_cost``: ``weight * (mean_b e_b - target)^2``.

    Only the batch mean is constrained, so rows are free to differ: the task loss decides which
    rows spend the budget (budget-constrained routing rather than the paper's skip reward,
    which has no target and can collapse; see :func:`skip_reward`).

    Args:
        gate_probs: ``[B, L]`` soft skip probabilities.
        target_cost: wanted share of the layers' MACs, in ``[0, 1]``.
        weight: penalty weight.
        layer_costs: ``[L]`` per-step MACs (``None``: equal), see :func:`expected_relative_cost`.

    Example:
        >>> float(budget_penalty(torch.full((4, 6), 0.5), target_cost=0.5, weight=1.0))
        0.0
    """
    if not 0.0 <= target_cost <= 1.0:
        raise ValueError(f"target_cost must be in [0, 1], got {target_cost}.")
    gap = expected_relative_cost(gate_probs, layer_costs).mean() - target_cost
    return weight * gap * gap


def difficulty_targets(row_losses: Tensor, target_cost: float, spread: float) -> Tensor:
    """Per-row cost targets that give harder rows more layers: ``target_cost +- spread`` by loss rank.

    The row with the lowest loss in the batch gets ``target_cost - spread``, the highest
    ``target_cost + spread``, the others linearly by rank in between (so the targets average
    ``target_cost``), clamped to ``[0, 1]``. Ranks, not loss values, so one outlier does not
    set everyone's target; the losses are detached (a target, not a path for gradients).

    Args:
        row_losses: ``[B]`` per-row losses (any scale; only their order counts).
        target_cost: the batch's mean target, in ``[0, 1]``.
        spread: half the range of targets, ``>= 0``.

    Returns:
        ``[B]`` targets.

    Example:
        >>> targets = difficulty_targets(torch.tensor([0.1, 2.0, 0.7]), target_cost=0.5, spread=0.2)
        >>> [round(value, 3) for value in targets.tolist()]
        [0.3, 0.7, 0.5]
    """
    if spread < 0:
        raise ValueError(f"spread must be >= 0, got {spread}.")
    batch = row_losses.shape[0]
    if batch < 2:
        return torch.full_like(row_losses, target_cost, dtype=torch.float32)
    ranks = row_losses.detach().argsort().argsort().float() / (batch - 1)  # 0 for the easiest row, 1 the hardest
    return (target_cost + spread * (2.0 * ranks - 1.0)).clamp(0.0, 1.0)


def routed_budget_penalty(gate_probs: Tensor, row_losses: Tensor, target_cost: float, spread: float, weight: float,
                          layer_costs: Tensor | Sequence[float] | None = None) -> Tensor:
    """The budget per row, aimed by difficulty: ``weight * mean_b (e_b - t_b)^2``.

    ``e_b`` is row ``b``'s expected share of the layers run (:func:`expected_relative_cost`) and
    ``t_b`` its :func:`difficulty_targets` target. :func:`budget_penalty` constrains only the
    batch mean, and on MRPC and CoLA the gates meet it with one fixed pattern for every row (see
    ``docs/results.md``): nothing in the objective asks rows to differ. Here each row is held to
    its own target, higher for rows the model currently finds harder (higher ``row_losses``),
    so the gates must learn, from the hidden states they see, which rows need depth. The targets
    average ``target_cost``, so the batch budget is the same; ``spread=0`` holds every row to it.

    Args:
        gate_probs: ``[B, L]`` skip probabilities (or the hard decisions, straight-through).
        row_losses: ``[B]`` per-row task losses of the last head (detached here).
        target_cost, spread: see :func:`difficulty_targets`.
        weight: penalty weight.
        layer_costs: ``[L]`` per-step MACs (``None``: equal).

    Example:
        >>> probs = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # row 0 runs half the layers, row 1 all
        >>> float(routed_budget_penalty(probs, torch.tensor([0.1, 3.0]), 0.75, 0.25, weight=1.0))
        0.0
    """
    if not 0.0 <= target_cost <= 1.0:
        raise ValueError(f"target_cost must be in [0, 1], got {target_cost}.")
    gap = expected_relative_cost(gate_probs, layer_costs) - difficulty_targets(row_losses, target_cost, spread)
    return weight * (gap * gap).mean()


def row_task_losses(logits: Tensor, labels: Tensor, is_regression: bool) -> Tensor:
    """:func:`task_loss` per row, ``[B]``: cross-entropy, or squared error for regression."""
    if is_regression:
        return (logits[:, 0] - labels.float()) ** 2
    return F.cross_entropy(logits, labels, reduction="none")


def smartbert_stage1_loss(
    out: AdaptiveEncoderOutput,
    labels: Tensor,
    *,
    is_regression: bool,
    skip_weight: float,
    contrastive: CrossLayerInfoNCE | None = None,
    contrastive_weight: float = 0.0,
    gate_objective: GateObjective | None = "paper",
    target_cost: float = 0.5,
    budget_on: BudgetOn = "probabilities",
    difficulty_spread: float = 0.0,
) -> LossTerms:
    """SmartBERT stage 1 (paper eq. 3 and 5): last head + gate objective + cross-layer contrast.

    Terms: ``task`` (CE of the last head), ``skip_reward`` (``gate_objective="paper"``:
    :func:`skip_reward` with ``lambda = skip_weight``) or ``budget`` (``"budget"``:
    :func:`budget_penalty` with weight ``skip_weight``; ``None``: no gate term, e.g. while the gates
    are held open in a warm-up), and ``contrastive`` (``eta1`` times the
    InfoNCE over the hidden states after each layer) when ``contrastive_weight > 0``.

    Args:
        out: the encoder's output with the last head run (``heads="last"`` or ``"all"``).
        labels: ``[B]`` class ids or scores.
        budget_on: what the budget measures: ``"probabilities"``, the expected share of layers
            run under the soft skip probabilities (``out.gate_probs``); ``"decisions"``, the share
            the gates actually let run (``out.gate_values``: with hard gates the 0/1 decisions,
            with the straight-through gradient). With soft gates the two are the same; with hard
            gates probabilities just under the threshold meet an expected budget while
            nothing is skipped, which ``"decisions"`` does not allow.
        difficulty_spread: ``> 0`` (with ``"budget"``) holds each row to its own target,
            ``target_cost +- difficulty_spread`` by its last-head loss rank in the batch
            (:func:`routed_budget_penalty`), instead of only the batch mean; ``0``: the batch mean.
    """
    terms = {"task": task_loss(out.logits, labels, is_regression)}
    if gate_objective == "paper":
        terms["skip_reward"] = skip_reward(out.gate_probs, skip_weight)
    elif gate_objective == "budget":
        if budget_on not in ("probabilities", "decisions"):
            raise ValueError(f"budget_on must be 'probabilities' or 'decisions', got {budget_on!r}.")
        measured = out.gate_probs if budget_on == "probabilities" else out.gate_values
        if difficulty_spread > 0:
            row_losses = row_task_losses(out.logits.detach(), labels, is_regression)
            terms["budget"] = routed_budget_penalty(measured, row_losses, target_cost, difficulty_spread, skip_weight)
        else:
            terms["budget"] = budget_penalty(measured, target_cost, skip_weight)
    elif gate_objective is not None:
        raise ValueError(f"gate_objective must be 'paper', 'budget' or None, got {gate_objective!r}.")
    if contrastive is not None and contrastive_weight > 0:
        terms["contrastive"] = contrastive_weight * contrastive(out.hidden_states[1:], out.attention_mask).loss
    return LossTerms(terms)


def smartbert_stage2_loss(
    out: AdaptiveEncoderOutput,
    labels: Tensor,
    *,
    is_regression: bool,
    contrastive: CrossLayerInfoNCE | None = None,
    contrastive_weight: float = 0.0,
    exit_objective: ExitObjective = "paper",
) -> LossTerms:
    """SmartBERT stage 2 (paper eq. 6-8): every intermediate head's loss + their contrast.

    Terms: ``exit_heads`` (``exit_objective="paper"``: the sum of the task losses of heads
    ``1..L-1`` against the labels) or ``distillation`` (``"distill"``: :func:`distillation_loss`
    of heads ``1..L-1`` towards the frozen last head, FastBERT's self-distillation on top of the
    gated backbone; labels unused), then ``contrastive`` (``eta2`` times the InfoNCE over those
    heads' token states) when ``contrastive_weight > 0`` and there are at least two intermediate heads.

    Args:
        out: the encoder's output with ``return_head_token_states=True`` and the intermediate
            heads run (``heads="intermediate"``; ``"all"`` for ``"distill"``, which needs the last head).
        labels: ``[B]`` class ids or scores.
        exit_objective: ``"paper"`` or ``"distill"``.
    """
    intermediate = range(len(out.exit_logits) - 1)
    if exit_objective == "paper":
        terms = {"exit_heads": sum(task_loss(out.exit_logits[step], labels, is_regression) for step in intermediate)}
    elif exit_objective == "distill":
        terms = {"distillation": distillation_loss([out.exit_logits[step] for step in intermediate], out.logits)}
    else:
        raise ValueError(f"exit_objective must be 'paper' or 'distill', got {exit_objective!r}.")
    states = [out.head_token_states[step] for step in intermediate]
    if contrastive is not None and contrastive_weight > 0 and len(states) >= 2:
        terms["contrastive"] = contrastive_weight * contrastive(states, out.attention_mask).loss
    return LossTerms(terms)  # type: ignore[arg-type]


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


def last_head_loss(exit_logits: Sequence[Tensor | None], labels: Tensor, is_regression: bool) -> LossTerms:
    """Plain fine-tuning (and stage 1 of DeeBERT and FastBERT): ``task``, the last head's loss."""
    return LossTerms({"task": task_loss(exit_logits[-1], labels, is_regression)})


def deebert_highway_loss(exit_logits: Sequence[Tensor | None], labels: Tensor, is_regression: bool) -> LossTerms:
    """DeeBERT stage 2: ``highway``, the sum of the task losses of heads ``1..L-1``."""
    return LossTerms({"highway": sum(task_loss(logits, labels, is_regression) for logits in exit_logits[:-1])})


def fastbert_distillation_loss(exit_logits: Sequence[Tensor | None], labels: Tensor, is_regression: bool
                               ) -> LossTerms:
    """FastBERT stage 2: ``distillation`` of heads ``1..L-1`` towards the last head (labels unused)."""
    return LossTerms({"distillation": distillation_loss(exit_logits[:-1], exit_logits[-1])})  # type: ignore[arg-type]


def pabee_weighted_loss(exit_logits: Sequence[Tensor | None], labels: Tensor, is_regression: bool) -> LossTerms:
    """PABEE: ``weighted_task``, :func:`weighted_layer_sum` of every head's task loss."""
    return LossTerms({"weighted_task": weighted_layer_sum(
        [task_loss(logits, labels, is_regression) for logits in exit_logits])})  # type: ignore[arg-type]
