"""The early-exit baselines on the shared run: plain fine-tuning, DeeBERT, FastBERT, PABEE.

Each baseline is a :class:`BaselineMethod`: a small record of the pieces that differ between
the methods (exit-head type, which heads each stage trains and with which loss, the exit
criterion and its default thresholds). :class:`BaselineRecipe` runs any of them on the loops
every recipe shares (:class:`recipes.two_stage.TwoStageRecipe`, as SmartBERT does):

* ``setup``: GLUE train (minus a held-out part for model selection) and dev, the backbone
  wrapped in :class:`~adaptive_depth.encoder.AdaptiveEncoder` with ``with_gates=False``;
* ``train_stage1``: the backbone and the heads of ``method.stage1_heads`` on
  ``method.stage1_loss``; the best epoch on the held-out part (full depth) is kept;
* ``train_stage2`` (two-stage methods only): the best stage-1 weights are reloaded, the
  backbone and the last head are frozen (``requires_grad`` off, not in the optimizer, eval
  mode) and the intermediate heads train on ``method.stage2_loss``;
* ``evaluate``: :func:`recipes.common.run_sweep` on dev at full depth and, in engine mode
  ``"exit_only"``, at every threshold; ``results.json`` and ``plot.png``.

The per-method modules (:mod:`recipes.finetune`, :mod:`recipes.deebert`,
:mod:`recipes.fastbert`, :mod:`recipes.pabee`) only define their :class:`BaselineMethod`.
The losses are pure functions here, so tests check them on hand examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_depth.encoder import AdaptiveEncoder
from adaptive_depth.exits import ExitCriterion
from recipes.common import ConfigError, SweepSetting
from recipes.glue import get_task
from recipes.two_stage import RESUME_ALLOWED_KEYS, RecipeConfig, StagedModel, TwoStageRecipe, load_run, run_cli

__all__ = [
    "BaselineConfig",
    "BaselineMethod",
    "BaselineModel",
    "BaselineRecipe",
    "distillation_loss",
    "intermediate_heads_loss",
    "last_head_loss",
    "layer_weighted_loss",
    "load_trained",
    "main",
    "self_distillation_loss",
    "task_loss",
    "weighted_layer_sum",
]

# (per-head logits, labels, is_regression) -> scalar loss
StageLoss = Callable[[Sequence[Tensor | None], Tensor, bool], Tensor]


# --------------------------------------------------------------------------------------
# Losses (pure functions)
# --------------------------------------------------------------------------------------


def task_loss(logits: Tensor, labels: Tensor, is_regression: bool) -> Tensor:
    """Cross-entropy of ``[B, C]`` logits, or MSE of ``logits[:, 0]`` for regression."""
    if is_regression:
        return F.mse_loss(logits[:, 0], labels.float())
    return F.cross_entropy(logits, labels)


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

    The teacher is detached (no gradient reaches it). With one output (regression) the KL
    is replaced by the squared error to the teacher's score.

    Args:
        student_logits: ``[B, C]`` logits of each student head.
        teacher_logits: ``[B, C]`` logits of the teacher (the last head).

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


def last_head_loss(exit_logits: Sequence[Tensor | None], labels: Tensor, is_regression: bool) -> Tensor:
    """The task loss of the last head (plain fine-tuning; stage 1 of DeeBERT and FastBERT)."""
    return task_loss(exit_logits[-1], labels, is_regression)


def intermediate_heads_loss(exit_logits: Sequence[Tensor | None], labels: Tensor, is_regression: bool) -> Tensor:
    """DeeBERT stage 2: ``sum_i CE(z_i, y)`` over the heads ``1..L-1``."""
    return sum(task_loss(logits, labels, is_regression) for logits in exit_logits[:-1])


def self_distillation_loss(exit_logits: Sequence[Tensor | None], labels: Tensor, is_regression: bool) -> Tensor:
    """FastBERT stage 2: heads ``1..L-1`` distilled towards the last head (labels unused)."""
    return distillation_loss(exit_logits[:-1], exit_logits[-1])


def layer_weighted_loss(exit_logits: Sequence[Tensor | None], labels: Tensor, is_regression: bool) -> Tensor:
    """PABEE: :func:`weighted_layer_sum` of every head's task loss."""
    return weighted_layer_sum([task_loss(logits, labels, is_regression) for logits in exit_logits])


# --------------------------------------------------------------------------------------
# Method description and config
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaselineMethod:
    """What distinguishes one baseline from another.

    Attributes:
        name: recipe name (``python -m recipes.<name>``, config files ``<name>_<task>.yaml``).
        description: one line for ``--help`` and the records.
        head_type: ``"pooler"`` (DeeBERT highway / PABEE / BERT classifier) or ``"attention"``
            (FastBERT's classifier, :class:`~adaptive_depth.exits.ExitHead`).
        stage1_heads: heads that train with the backbone in stage 1 (``"last"`` or ``"all"``).
        stage1_loss: loss of stage 1 over the heads' logits.
        stage2_heads: heads that run in stage 2 (``"intermediate"`` or ``"all"``, when the last
            one is a teacher); ignored without ``stage2_loss``.
        stage2_loss: loss of stage 2 (only the intermediate heads train), or ``None`` for a
            one-stage method.
        make_criterion: threshold -> exit criterion, or ``None`` (full depth only).
        threshold_name: label of a threshold in the sweep (``"entropy"``, ``"patience"``).
        default_thresholds: ``L`` -> thresholds swept when the config gives none.
        integer_thresholds: thresholds must be whole numbers (patience).
        classification_only_exits: the criterion needs class probabilities (entropy): regression
            tasks get the full-depth row only.
    """

    name: str
    description: str
    head_type: Literal["pooler", "attention"]
    stage1_heads: Literal["last", "all"]
    stage1_loss: StageLoss
    stage2_heads: Literal["intermediate", "all"] = "intermediate"
    stage2_loss: StageLoss | None = None
    make_criterion: Callable[[float], ExitCriterion] | None = None
    threshold_name: str = "threshold"
    default_thresholds: Callable[[int], list[float]] = lambda num_steps: []
    integer_thresholds: bool = False
    classification_only_exits: bool = True

    @property
    def two_stage(self) -> bool:
        return self.stage2_loss is not None


@dataclass
class BaselineConfig(RecipeConfig):
    """Hyper-parameters of the baseline recipes: the shared keys of
    :class:`~recipes.two_stage.RecipeConfig` (``stage1_head_lr`` applies to the heads; stage 2
    is ignored by one-stage methods; ``head_inner_size`` only matters for FastBERT's attention
    heads), with a shorter default schedule, and:

    Attributes:
        thresholds: exit thresholds of the sweep (entropy, normalized entropy or patience);
            empty: the method's defaults (PABEE: patience ``1..L-1``).
    """

    stage1_epochs: int = 3
    stage2_epochs: int = 2
    thresholds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(value < 0 or math.isnan(value) for value in self.thresholds):
            raise ConfigError(f"thresholds must be >= 0, got {self.thresholds}")


def build_encoder(backbone: nn.Module, method: BaselineMethod, num_labels: int, config: BaselineConfig) -> AdaptiveEncoder:
    """The backbone with one ``method.head_type`` head per layer and no gates."""
    return AdaptiveEncoder(backbone, num_labels=num_labels, head_type=method.head_type, with_gates=False,
                           head_inner_size=config.head_inner_size)


class BaselineModel(StagedModel):
    """The encoder, and the loss of either stage in ``forward`` (so DDP can wrap it)."""

    def __init__(self, encoder: AdaptiveEncoder, method: BaselineMethod, is_regression: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.method = method
        self.is_regression = is_regression

    def forward(self, batch: dict[str, Tensor], stage: int) -> Tensor:
        heads = self.method.stage1_heads if stage == 1 else self.method.stage2_heads
        loss_fn = self.method.stage1_loss if stage == 1 else self.method.stage2_loss
        inputs = {key: value for key, value in batch.items() if key == "token_type_ids"}
        out = self.encoder(batch["input_ids"], batch["attention_mask"], gate_mode="run", heads=heads, **inputs)
        return loss_fn(out.exit_logits, batch["labels"], self.is_regression)

    def stage2_modules(self) -> list[nn.Module]:
        """What stage 2 trains: heads ``1..L-1``."""
        return list(self.encoder.exit_heads[:-1])


class BaselineRecipe(TwoStageRecipe):
    """Any :class:`BaselineMethod` on the shared run (:class:`~recipes.two_stage.TwoStageRecipe`)."""

    resume_allowed_keys = (*RESUME_ALLOWED_KEYS, "thresholds")

    def __init__(self, method: BaselineMethod, config: BaselineConfig, data_dir: Path, model_name: str | None,
                 run_dir: Path, resume: bool) -> None:
        super().__init__(config, data_dir, model_name, run_dir, resume)
        self.method = method
        self.name = method.name

    def build_model(self, backbone: nn.Module) -> BaselineModel:
        encoder = build_encoder(backbone, self.method, self.task.num_labels, self.config)
        self.thresholds = self._thresholds(encoder.num_steps)
        return BaselineModel(encoder, self.method, self.task.is_regression)

    def _thresholds(self, num_steps: int) -> list[float]:
        method = self.method
        if method.make_criterion is None:
            return []
        values = list(self.config.thresholds) or method.default_thresholds(num_steps)
        if method.integer_thresholds and any(value != int(value) for value in values):
            raise ConfigError(f"{method.name} thresholds are {method.threshold_name} counts: whole numbers, got {values}")
        return values

    @property
    def has_stage2(self) -> bool:
        return self.method.two_stage

    def stage1_param_groups(self) -> list[dict[str, Any]]:
        """The backbone at ``stage1_lr``; the stage-1 heads (all of them for ``"all"``) at ``stage1_head_lr``."""
        last = self.model.encoder.num_steps - 1
        backbone, heads = [], []
        for name, parameter in self.model.named_parameters():
            if name.startswith("encoder.backbone."):
                backbone.append(parameter)
            elif self.method.stage1_heads == "all" or int(name.split(".")[2]) == last:
                heads.append(parameter)
        config = self.config
        return [{"params": backbone, "lr": config.stage1_lr},
                {"params": heads, "lr": config.stage1_head_lr or config.stage1_lr}]

    def sweep_settings(self) -> list[SweepSetting]:
        settings = [SweepSetting("full", "full")]
        method = self.method
        if method.make_criterion is None or (method.classification_only_exits and self.task.is_regression):
            return settings
        for value in self.thresholds:
            label = f"{value:g}" if not method.integer_thresholds else str(int(value))
            settings.append(SweepSetting(f"{method.threshold_name}={label}", "exit_only",
                                         method.make_criterion(value), value))
        return settings

    def extra_results(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        method = self.method
        return {"method": method.description, "head_type": method.head_type,
                "curve_label": f"{method.name} ({method.threshold_name} exit)", "threshold_symbol": method.threshold_name}


def load_trained(method: BaselineMethod, run_dir: str | Path, device: str | torch.device = "cpu"
                 ) -> tuple[AdaptiveEncoder, Any, BaselineConfig]:
    """Reload a trained baseline run: ``(encoder in eval mode, tokenizer, config)``.

    The weights are the ones the run's sweep evaluated: after stage 2 when it ran, else
    those of the best stage-1 epoch.

    Raises:
        CheckpointError: a missing, corrupt or mismatched checkpoint, or a run of another method.
    """
    def build(backbone: nn.Module, config: BaselineConfig) -> AdaptiveEncoder:
        return build_encoder(backbone, method, get_task(config.task).num_labels, config)

    return load_run(run_dir, method.name, BaselineConfig, build, device)


def main(method: BaselineMethod, argv: list[str] | None = None) -> int:
    """The command line of every baseline recipe; returns the exit status (2 on a user error)."""
    def make_recipe(config: BaselineConfig, data_dir: Path, model: str | None, run_dir: Path,
                    resume: bool) -> BaselineRecipe:
        return BaselineRecipe(method, config, data_dir, model, run_dir, resume)

    return run_cli(method.name, method.description, BaselineConfig, make_recipe, argv)
