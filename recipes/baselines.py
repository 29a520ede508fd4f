"""The early-exit baselines as methods of the shared run: plain fine-tuning, DeeBERT, FastBERT, PABEE.

Each baseline is a :class:`BaselineSpec`: a small record of what differs between them (exit-head
type, the exit objective of each stage from :mod:`adaptive_depth.objectives`, the exit criterion
and its default thresholds). :func:`baseline_method` turns a spec into a
:class:`~recipes.run.method.Method` for the run composer (:mod:`recipes.run.composer`):

* stage 1: the backbone and the heads ``spec.stage1`` runs (its ``heads``) on that objective; the
  best epoch on the held-out part (full depth) is kept;
* stage 2 (two-stage methods only): the backbone and the last head are frozen and the
  intermediate heads train on ``spec.stage2``;
* sweep: the inference engine on dev at full depth and, in engine mode ``"exit_only"``, at
  every threshold.

The per-method modules (:mod:`recipes.finetune`, :mod:`recipes.deebert`,
:mod:`recipes.fastbert`, :mod:`recipes.pabee`) only define their spec.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from adaptive_depth.encoder import AdaptiveEncoder
from adaptive_depth.exits import ExitCriterion
from adaptive_depth.losses import LossTerms
from adaptive_depth.objectives import ExitObjective
from recipes.glue import GlueTask
from recipes.run.cli import run_cli
from recipes.run.config import RESUME_ALLOWED_KEYS, RecipeConfig
from recipes.run.errors import ConfigError
from recipes.run.method import Method, register_method
from recipes.run.results import SweepRow
from recipes.run.sweep import SweepSetting
from recipes.run.trained import load_run

__all__ = ["BaselineConfig", "BaselineModel", "BaselineSpec", "baseline_method", "entry_points", "register_baseline"]

@dataclass(frozen=True)
class BaselineSpec:
    """What distinguishes one baseline from another (a :func:`baseline_method` turns it into a method).

    Attributes:
        name: recipe name (``python -m recipes.<name>``, config files ``<name>_<task>.yaml``).
        description: one line for ``--help`` and the records.
        head_type: ``"pooler"`` (DeeBERT highway / PABEE / BERT classifier) or ``"attention"``
            (FastBERT's classifier, :class:`~adaptive_depth.exits.ExitHead`).
        stage1: the exit objective of stage 1, trained with the backbone; the heads it runs
            (``"last"`` or ``"all"``) are the heads stage 1 trains.
        stage2: the exit objective of stage 2 (only the intermediate heads train; a teacher
            head runs frozen when the objective needs it), or ``None`` for a one-stage method.
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
    stage1: ExitObjective
    stage2: ExitObjective | None = None
    make_criterion: Callable[[float], ExitCriterion] | None = None
    threshold_name: str = "threshold"
    default_thresholds: Callable[[int], list[float]] = lambda num_steps: []
    integer_thresholds: bool = False
    classification_only_exits: bool = True

    @property
    def two_stage(self) -> bool:
        return self.stage2 is not None


@dataclass
class BaselineConfig(RecipeConfig):
    """Hyper-parameters of the baseline recipes: the shared keys of
    :class:`~recipes.run.config.RecipeConfig` (``stage1_head_lr`` applies to the heads; stage 2
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


def build_encoder(backbone: nn.Module, spec: BaselineSpec, num_labels: int, config: BaselineConfig) -> AdaptiveEncoder:
    """The backbone with one ``spec.head_type`` head per layer and no gates."""
    return AdaptiveEncoder(backbone, num_labels=num_labels, head_type=spec.head_type, with_gates=False,
                           head_inner_size=config.head_inner_size)


class BaselineModel(nn.Module):
    """The encoder, and the loss terms of either stage in ``forward`` (so DDP can wrap it)."""

    def __init__(self, encoder: AdaptiveEncoder, spec: BaselineSpec) -> None:
        super().__init__()
        self.encoder = encoder
        self.spec = spec

    def forward(self, batch: dict[str, Tensor], stage: int) -> LossTerms:
        objective = self.spec.stage1 if stage == 1 else self.spec.stage2
        assert objective is not None, "a one-stage method has no stage 2"
        inputs = {key: value for key, value in batch.items() if key == "token_type_ids"}
        out = self.encoder(batch["input_ids"], batch["attention_mask"], gate_mode="run", heads=objective.heads,
                           **inputs)
        return LossTerms({objective.term: objective(out.exit_logits, batch["labels"])})


def thresholds(spec: BaselineSpec, config: BaselineConfig, num_steps: int) -> list[float]:
    """The exit thresholds of the sweep: the config's, else the spec's defaults for ``num_steps`` layers."""
    if spec.make_criterion is None:
        return []
    values = list(config.thresholds) or spec.default_thresholds(num_steps)
    if spec.integer_thresholds and any(value != int(value) for value in values):
        raise ConfigError(f"{spec.name} thresholds are {spec.threshold_name} counts: whole numbers, got {values}")
    return values


def baseline_method(spec: BaselineSpec) -> Method:
    """The :class:`~recipes.run.method.Method` of a baseline spec."""

    def build_model(backbone: nn.Module, config: BaselineConfig, task: GlueTask) -> BaselineModel:
        encoder = build_encoder(backbone, spec, task.num_labels, config)
        thresholds(spec, config, encoder.num_steps)  # a bad threshold is an error before training, not after
        return BaselineModel(encoder, spec)

    def stage1_param_groups(model: BaselineModel, config: BaselineConfig) -> list[dict[str, Any]]:
        """The backbone at ``stage1_lr``; the heads stage 1 runs (all of them for ``"all"``) at ``stage1_head_lr``."""
        groups = model.encoder.parameter_groups()
        heads = [*groups["intermediate_heads"], *groups["last_head"]] if spec.stage1.heads == "all" else groups["last_head"]
        return [{"params": groups["backbone"], "lr": config.stage1_lr},
                {"params": heads, "lr": config.stage1_head_lr or config.stage1_lr}]

    def sweep_settings(config: BaselineConfig, task: GlueTask, num_steps: int) -> list[SweepSetting]:
        settings = [SweepSetting("full", "full")]
        if spec.make_criterion is None or (spec.classification_only_exits and task.is_regression):
            return settings
        for value in thresholds(spec, config, num_steps):
            label = f"{value:g}" if not spec.integer_thresholds else str(int(value))
            settings.append(SweepSetting(f"{spec.threshold_name}={label}", "exit_only", spec.make_criterion(value), value))
        return settings

    def extra_results(config: BaselineConfig, task: GlueTask, rows: list[SweepRow],
                      majority: dict[str, float] | None) -> dict[str, Any]:
        return {"method": spec.description, "head_type": spec.head_type,
                "curve_label": f"{spec.name} ({spec.threshold_name} exit)", "threshold_symbol": spec.threshold_name}

    def stage2_modules(model: BaselineModel) -> list[nn.Module]:
        """What stage 2 trains: heads ``1..L-1``."""
        return list(model.encoder.exit_heads[:-1])

    return Method(
        name=spec.name, description=spec.description, config_class=BaselineConfig, build_model=build_model,
        stage1_param_groups=stage1_param_groups, sweep_settings=sweep_settings,
        stage2_modules=stage2_modules if spec.two_stage else None, extra_results=extra_results,
        resume_allowed_keys=(*RESUME_ALLOWED_KEYS, "thresholds"),
    )


def entry_points(method: Method) -> tuple[Callable[..., tuple[AdaptiveEncoder, Any, BaselineConfig]],
                                          Callable[[list[str] | None], int]]:
    """``(load_trained, main)`` of a baseline module: ``load_trained(run_dir, device="cpu")`` reloads
    a trained run (``(encoder in eval mode, tokenizer, config)``, see :func:`recipes.run.trained.load_run`);
    ``main(argv=None)`` is its command line."""

    def load_trained(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[AdaptiveEncoder, Any, Any]:
        return load_run(run_dir, method.name, device)

    def main(argv: list[str] | None = None) -> int:
        return run_cli(method, argv)

    return load_trained, main


def register_baseline(spec: BaselineSpec) -> Method:
    """:func:`baseline_method` of ``spec``, registered under ``spec.name``."""
    return register_method(baseline_method(spec))
