"""SmartBERT recipe: stage 1 (backbone + gates + last head), stage 2 (intermediate heads), sweep.

Usage::

    python -m recipes.smartbert --task mrpc [--data-dir DIR] [--model PATH] [--config FILE]
        [--output-dir DIR] [--resume] [key=value ...]

Paper sections 3.3-3.6 (eq. 3-8), as described in ``docs/design.md``:

* stage 1 (eq. 3, :func:`adaptive_depth.losses.smartbert_stage1_loss`): ``CE(z_L, y) +
  lambda / sum_i g_i + eta1 * L_contra1`` over the hidden
  states ``X^1..X^L``; gates soft for the first ``soft_epochs`` epochs, hard after. The best
  epoch (never a gate warm-up epoch) is chosen on a split held out from *train* (never on dev).
* stage 2 (eq. 5-8): the best stage-1 weights are reloaded; backbone, gates and last head are
  frozen (``requires_grad`` off, not in the optimizer, eval mode); heads ``1..L-1`` and the
  stage-2 projection train on ``sum_i CE(z_i, y) + eta2 * L_contra2`` over the heads'
  self-attention outputs, with hard gates (:func:`adaptive_depth.losses.smartbert_stage2_loss`).
* sweep: the inference engine on dev at full depth, skip only and entropy thresholds; writes
  ``results.json`` and ``plot.png`` into the run folder.

The method is :data:`METHOD` (a :class:`~recipes.run.method.Method`); the loops, checkpoints,
``--resume`` and the command line are the shared run machinery's (:mod:`recipes.run`). With
``WORLD_SIZE > 1`` (torchrun) it trains with DistributedDataParallel (gloo on CPU); only rank 0
writes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adaptive_depth.config import AdaptiveEncoderConfig, check_gate_threshold
from adaptive_depth.contrastive import CrossLayerInfoNCE
from adaptive_depth.encoder import AdaptiveEncoder
from adaptive_depth.exits import EntropyExit, PatienceExit, ToleranceExit
from adaptive_depth.gates import GateSchedule
from adaptive_depth.losses import LossTerms, smartbert_stage1_loss, smartbert_stage2_loss
from adaptive_depth.objectives import exit_objective, gate_objective, objective_spec
from recipes.glue import GlueTask
from recipes.run.cli import run_cli
from recipes.run.config import RESUME_ALLOWED_KEYS, RecipeConfig
from recipes.run.errors import ConfigError
from recipes.run.method import Method, register_method
from recipes.run.results import SweepRow
from recipes.run.sweep import SweepSetting
from recipes.run.trained import load_run

__all__ = ["METHOD", "SmartBertConfig", "SmartBertModel", "load_trained", "main"]

RECIPE = "smartbert"


@dataclass
class SmartBertConfig(RecipeConfig):
    """Hyper-parameters of the SmartBERT recipe (defaults: the official RTE run).

    The shared keys (data, schedule, optimizer) are those of
    :class:`~recipes.run.config.RecipeConfig`; ``stage1_head_lr`` applies to the last head and
    the stage-1 projection. SmartBERT adds:

    Attributes:
        gate_objective: what the gates learn in stage 1, one nested key (a
            :func:`adaptive_depth.objectives.gate_objective` spec): ``{name: skip_reward, weight: 0.04}``,
            the paper's ``lambda / sum_i g_i`` (eq. 3, the default), or ``{name: budget, target_cost:
            0.5, weight: 2.0}``, which holds the expected share of layers run at a target. Override
            one option with ``gate_objective.weight=2.0``.
        exit_objective: what the intermediate heads learn in stage 2: ``labels`` (paper eq. 7-8, the
            default) or ``distill`` (the frozen last head's softmax, FastBERT's self-distillation).
        gate_warmup_epochs: leading stage-1 epochs in which every layer runs and the gates are not
            trained (no gate objective): the backbone and the last head learn the task first. 0
            (default) is the paper's schedule. A warm-up epoch is never picked as the best stage-1
            epoch (its gates are untrained).
        gated_epochs_train: what the stage-1 epochs after the warm-up train. ``"all"`` (default, the
            paper): the backbone, the last head and the gates together. ``"gates"``: only the gates,
            on the backbone and last head exactly as the warm-up left them (fine-tune first, then
            train the gates), so full depth is the warm-up's fine-tuned model. Needs
            ``gate_warmup_epochs >= 1``. The learning-rate schedule still spans all ``stage1_epochs``.
        soft_epochs: how many of the stage-1 epochs after the warm-up use soft gates (the rest: hard).
        gate_lr: stage-1 learning rate of the gates; 0 uses ``stage1_lr``.
        initial_skip_bias: initial bias of every gate's score (0: ``p_skip`` near 0.5; negative
            values start with the layers running).
        regression_tolerance: for regression tasks (STS-B), two heads agree when their scores
            differ by less than this (the patience settings of the sweep).
        regression_tolerances: for regression tasks, the tolerances of the sweep's
            :class:`~adaptive_depth.exits.ToleranceExit` settings (score units: exit once two
            consecutive heads differ by less). They come first, so the run's operating point is
            calibrated on the tolerance, a continuous knob, rather than on patience.
        eta1, tau1: weight and temperature of the stage-1 contrastive loss.
        eta2, tau2: weight and temperature of the stage-2 contrastive loss.
        projection_dim: width of the contrastive projection heads.
        gate_threshold: a layer is skipped when ``p_skip >= gate_threshold``; set as the encoder's own
            (``encoder.adaptive_config.gate_threshold``), which training, the held-out selection,
            the sweep, calibration and the saved model read.
        gate_inner_size: width of the gates' self-attention.
        entropy_thresholds: the ``S`` values of the sweep.
    """

    gate_objective: dict[str, Any] = field(default_factory=lambda: {"name": "skip_reward", "weight": 0.04})
    exit_objective: dict[str, Any] = field(default_factory=lambda: {"name": "labels"})
    gate_warmup_epochs: int = 0
    gated_epochs_train: str = "all"
    soft_epochs: int = 3
    gate_lr: float = 0.0
    initial_skip_bias: float = 0.0
    eta1: float = 0.01
    tau1: float = 0.5
    eta2: float = 0.05
    tau2: float = 0.55
    projection_dim: int = 128
    gate_threshold: float = AdaptiveEncoderConfig.gate_threshold  # the library's default, the paper's 0.5
    gate_inner_size: int = 128
    entropy_thresholds: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    regression_tolerance: float = 0.1
    regression_tolerances: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5, 1.0])

    _positive = (*RecipeConfig._positive, "projection_dim", "gate_inner_size")
    _non_negative = (*RecipeConfig._non_negative, "gate_warmup_epochs", "soft_epochs", "eta1", "eta2", "gate_lr")
    _strictly_positive = (*RecipeConfig._strictly_positive, "tau1", "tau2")

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.gate_threshold = check_gate_threshold(self.gate_threshold)
            # Normalised to the full spec (every option written out), so results.json records it.
            self.gate_objective = objective_spec(gate_objective(self.gate_objective))
            self.exit_objective = objective_spec(exit_objective(self.exit_objective))
        except ValueError as error:
            raise ConfigError(str(error)) from error
        if self.exit_objective["name"] not in ("labels", "distill"):
            raise ConfigError(f"SmartBERT's exit_objective is 'labels' (the paper) or 'distill', "
                              f"got {self.exit_objective['name']!r}")
        if self.gate_warmup_epochs >= self.stage1_epochs:
            raise ConfigError(f"gate_warmup_epochs ({self.gate_warmup_epochs}) must be below stage1_epochs "
                              f"({self.stage1_epochs}): the gates need at least one epoch to train")
        if self.gated_epochs_train not in ("all", "gates"):
            raise ConfigError(f"gated_epochs_train must be 'all' or 'gates', got {self.gated_epochs_train!r}")
        if self.gated_epochs_train == "gates" and self.gate_warmup_epochs < 1:
            raise ConfigError("gated_epochs_train=gates trains only the gates after the warm-up, so the backbone "
                              "and last head must be fine-tuned first: set gate_warmup_epochs >= 1 (e.g. "
                              "stage1_epochs=5 gate_warmup_epochs=3)")
        if not self.entropy_thresholds or not all(value >= 0 for value in self.entropy_thresholds):  # NaN too
            raise ConfigError(f"entropy_thresholds must be one or more values >= 0, got {self.entropy_thresholds}")
        if not self.regression_tolerance >= 0:
            raise ConfigError(f"regression_tolerance must be >= 0 (score units), got {self.regression_tolerance}")
        if not all(value >= 0 for value in self.regression_tolerances):  # also refuses NaN
            raise ConfigError(f"regression_tolerances must be >= 0 (score units), got {self.regression_tolerances}")


class SmartBertModel(nn.Module):
    """The trained modules; ``forward(batch, stage)`` is the stage's loss terms (so DDP can wrap it).

    Attributes:
        encoder: the :class:`AdaptiveEncoder` (backbone, gates, exit heads).
        contrast1: projection + InfoNCE over the hidden states (stage 1).
        contrast2: projection + InfoNCE over the heads' token states (stage 2).
    """

    def __init__(self, encoder: AdaptiveEncoder, config: SmartBertConfig) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = int(encoder.config.hidden_size)
        self.contrast1 = CrossLayerInfoNCE(hidden, config.projection_dim, config.tau1)
        self.contrast2 = CrossLayerInfoNCE(config.head_inner_size, config.projection_dim, config.tau2)
        self.gate_objective = gate_objective(config.gate_objective)
        self.exit_objective = exit_objective(config.exit_objective)
        self.eta1, self.eta2 = config.eta1, config.eta2

    def forward(self, batch: dict[str, Tensor], stage: int, gate_mode: str = "hard") -> LossTerms:
        """The loss terms of ``stage``: 1, paper eq. 3 with ``gate_mode`` gates (``"run"``, the gate
        warm-up: every layer, no gate objective); 2, eq. 6-8 with the exit objective, behind the hard gates."""
        inputs = {key: value for key, value in batch.items() if key == "token_type_ids"}
        if stage == 1:
            out = self.encoder(batch["input_ids"], batch["attention_mask"], gate_mode=gate_mode, heads="last", **inputs)
            objective = None if gate_mode == "run" else self.gate_objective
            return smartbert_stage1_loss(out, batch["labels"], objective, self.contrast1, self.eta1)
        out = self.encoder(batch["input_ids"], batch["attention_mask"], gate_mode="hard",
                           heads=self.exit_objective.heads, return_head_token_states=True, **inputs)
        return smartbert_stage2_loss(out, batch["labels"], self.exit_objective, self.contrast2, self.eta2)


def build_encoder(backbone: nn.Module, config: SmartBertConfig) -> AdaptiveEncoder:
    """The backbone with one gate and one attention exit head per layer, as the recipe trains it,
    with the config's gate threshold as the encoder's own (training, inference and the saved model)."""
    from recipes.glue import get_task

    encoder = AdaptiveEncoder(
        backbone, num_labels=get_task(config.task).num_labels, gate_inner_size=config.gate_inner_size,
        head_inner_size=config.head_inner_size, initial_skip_bias=config.initial_skip_bias,
    )
    encoder.adaptive_config.gate_threshold = config.gate_threshold
    return encoder


def build_model(backbone: nn.Module, config: SmartBertConfig, task: GlueTask) -> SmartBertModel:
    return SmartBertModel(build_encoder(backbone, config), config)


def stage1_param_groups(model: SmartBertModel, config: SmartBertConfig) -> list[dict[str, Any]]:
    """Backbone at ``stage1_lr``, gates at ``gate_lr``, last head and projection 1 at ``stage1_head_lr``."""
    groups = model.encoder.parameter_groups()
    return [{"params": groups["backbone"], "lr": config.stage1_lr},
            {"params": groups["gates"], "lr": config.gate_lr or config.stage1_lr},
            {"params": [*groups["last_head"], *model.contrast1.parameters()],
             "lr": config.stage1_head_lr or config.stage1_lr}]


def stage2_modules(model: SmartBertModel) -> list[nn.Module]:
    """What stage 2 trains: heads ``1..L-1`` and the stage-2 projection."""
    return [*model.encoder.exit_heads[:-1], model.contrast2]


def stage1_options(config: SmartBertConfig, epoch: int) -> dict[str, Any]:
    """Every layer for the first ``gate_warmup_epochs`` epochs, then soft gates for ``soft_epochs``
    epochs, hard after (paper §3.6)."""
    if epoch < config.gate_warmup_epochs:
        return {"gate_mode": "run"}
    return {"gate_mode": GateSchedule(config.soft_epochs).mode(epoch - config.gate_warmup_epochs)}


def stage1_selectable(config: SmartBertConfig, epoch: int) -> bool:
    """Only epochs after the gate warm-up may be the best: a warm-up epoch's gates are untrained
    (with a negative ``initial_skip_bias`` its model skips nothing), and picking it because it
    ties or beats the gated epochs on held-out would silently turn SmartBERT into fine-tuning."""
    return epoch >= config.gate_warmup_epochs


def stage1_frozen(model: SmartBertModel, config: SmartBertConfig, epoch: int) -> list[nn.Parameter]:
    """With ``gated_epochs_train="gates"``, every stage-1 parameter but the gates' after the warm-up."""
    if config.gated_epochs_train == "all" or epoch < config.gate_warmup_epochs:
        return []
    gates = {id(parameter) for parameter in model.encoder.gates.parameters()}
    return [parameter for group in stage1_param_groups(model, config) for parameter in group["params"]
            if id(parameter) not in gates]


def sweep_settings(config: SmartBertConfig, task: GlueTask, num_steps: int) -> list[SweepSetting]:
    """Full depth, skip only, then entropy thresholds. For regression (STS-B, where the entropy of
    one output is always 0) instead: the ``regression_tolerances`` (exit once two consecutive heads
    differ by less), then patience ``1..L-1`` (exit once that many consecutive heads agree within
    ``regression_tolerance``, as PABEE does)."""
    settings = [SweepSetting("full", "full"), SweepSetting("skip_only", "skip_only")]
    if task.is_regression:
        settings += [SweepSetting(f"tolerance={value:g}", "adaptive", ToleranceExit(value), value)
                     for value in config.regression_tolerances]
        settings += [SweepSetting(f"patience={value}", "adaptive", PatienceExit(value, config.regression_tolerance),
                                  float(value)) for value in range(1, num_steps)]
    else:
        settings += [SweepSetting(f"entropy={value:g}", "adaptive", EntropyExit(value), value)
                     for value in config.entropy_thresholds]
    return settings


def extra_results(config: SmartBertConfig, task: GlueTask, rows: list[SweepRow],
                  majority: dict[str, float] | None) -> dict[str, Any]:
    """Whether some setting reached the README's target: at most half the full-depth FLOPs with
    the main metric within 1 point of full depth."""
    main = task.main_metric
    full = next(row for row in rows if row.mode == "full")
    target = [row.name for row in rows if row.relative_cost_paper <= 0.5 and row.metrics[main] >= full.metrics[main] - 0.01]
    return {"target_half_cost_within_1pt": {
        "reached": bool(target), "settings": target, "full_depth_value": full.metrics[main],
        "full_depth_beats_majority_class": None if majority is None else full.metrics[main] > majority[main],
    }}


METHOD = register_method(Method(
    name=RECIPE,
    description=__doc__.split("\n")[0],
    config_class=SmartBertConfig,
    build_model=build_model,
    stage1_param_groups=stage1_param_groups,
    sweep_settings=sweep_settings,
    stage2_modules=stage2_modules,
    stage1_options=stage1_options,
    extra_results=extra_results,
    heldout_gate_mode="hard",  # the best epoch is picked with the gates skipping, as they will at inference
    stage1_selectable=stage1_selectable,
    stage1_frozen=stage1_frozen,
    stage1_untrained_prefixes=("contrast2.",),
    resume_allowed_keys=(*RESUME_ALLOWED_KEYS, "entropy_thresholds", "regression_tolerances"),
    stage2_keys=("stage2_epochs", "stage2_lr", "eta2", "tau2", "exit_objective", "regression_tolerance"),
))


def load_trained(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[AdaptiveEncoder, Any, SmartBertConfig]:
    """Reload a trained SmartBERT run for inference, in one call.

    Args:
        run_dir: the run folder written by ``python -m recipes.smartbert``. A finished run is
            loaded from ``<run>/model`` (``AdaptiveEncoder.from_pretrained``, which is all a
            user needs: ``AdaptivePipeline.from_pretrained(run_dir / "model")`` classifies
            raw text); an unfinished one from its last checkpoint.
        device: where to put the model.

    Returns:
        ``(encoder, tokenizer, config)``: the :class:`AdaptiveEncoder` in eval mode with the
        weights the run's sweep evaluated, its tokenizer, and the run's config.

    Raises:
        CheckpointError: a missing, corrupt or mismatched checkpoint.
    """
    return load_run(run_dir, RECIPE, device)


def main(argv: list[str] | None = None) -> int:
    """``python -m recipes.smartbert``; returns the exit status (2 on a user error)."""
    return run_cli(METHOD, argv)


if __name__ == "__main__":
    sys.exit(main())
