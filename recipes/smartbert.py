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

The method is :data:`METHOD` (a :class:`~recipes.methods.Method`); the loops, checkpoints,
``--resume`` and the command line are the shared run composer's (:mod:`recipes.run`). With ``WORLD_SIZE > 1`` (torchrun) it trains with
DistributedDataParallel (gloo on CPU); only rank 0 writes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adaptive_depth.config import check_gate_threshold
from adaptive_depth.contrastive import CrossLayerInfoNCE
from adaptive_depth.encoder import AdaptiveEncoder
from adaptive_depth.exits import EntropyExit, PatienceExit, ToleranceExit
from adaptive_depth.gates import GateSchedule, layer_drop_values
from adaptive_depth.losses import LossTerms, smartbert_stage1_loss, smartbert_stage2_loss
from recipes.cli import run_cli
from recipes.config import RESUME_ALLOWED_KEYS, RecipeConfig
from recipes.errors import ConfigError
from recipes.glue import GlueTask
from recipes.methods import Method, register_method
from recipes.reload import load_run
from recipes.results import SweepRow
from recipes.sweep import SweepSetting

__all__ = ["METHOD", "SmartBertConfig", "SmartBertModel", "load_trained", "main"]

RECIPE = "smartbert"


@dataclass
class SmartBertConfig(RecipeConfig):
    """Hyper-parameters of the SmartBERT recipe (defaults: the official RTE run).

    The shared keys (data, schedule, optimizer) are those of
    :class:`~recipes.config.RecipeConfig`; ``stage1_head_lr`` applies to the last head and
    the stage-1 projection. SmartBERT adds:

    Attributes:
        gate_warmup_epochs: leading stage-1 epochs in which every layer runs and the gates are not
            trained (no gate objective): the backbone and the last head learn the task first, so
            the gates then learn which layers a trained model can spare, instead of starving
            layers the model has not learned to use yet. 0 (default) is the paper's schedule. A
            warm-up epoch is never picked as the best stage-1 epoch (its gates are untrained).
        warmup_layer_drop: in the gate warm-up epochs, the probability that each layer is skipped
            for each training row (LayerDrop, Fan et al. 2019; :func:`adaptive_depth.gates.layer_drop_values`),
            so the backbone learns to work with layers missing and the gates trained after it have
            layers to skip that cost little accuracy. 0 (default) runs every layer. Needs
            ``gate_warmup_epochs >= 1``; evaluation always runs every layer.
        gated_epochs_train: what the stage-1 epochs after the warm-up train. ``"all"`` (default,
            the paper): the backbone, the last head and the gates together. ``"gates"``: only the
            gates, on the backbone and last head exactly as the warm-up left them (fine-tune first,
            then train the gates, as the baselines' two-stage schemes do), so full depth is the
            warm-up's fine-tuned model and no layer is starved while the gates learn to skip it.
            Needs ``gate_warmup_epochs >= 1``. The learning-rate schedule still spans all
            ``stage1_epochs``, so the warm-up ends at a non-zero backbone learning rate.
        soft_epochs: how many of the stage-1 epochs after the warm-up use soft gates (the rest: hard).
        gate_lr: stage-1 learning rate of the gates; 0 uses ``stage1_lr``.
        initial_skip_bias: initial bias of every gate's score (0: ``p_skip`` near 0.5; negative
            values start with the layers running).
        skip_weight: ``lambda`` of the skip reward (``gate_objective="paper"``), or the weight of
            the budget penalty (``"budget"``).
        gate_objective: ``"paper"``: the skip reward ``lambda / sum_i g_i`` of eq. 3;
            ``"budget"``: :func:`adaptive_depth.losses.budget_penalty`, which keeps the batch's
            expected share of layers run at ``target_cost`` and leaves rows free to differ.
        target_cost: the share of the layers' MACs the budget objective aims at.
        budget_on: what the budget objective measures in hard epochs: ``"probabilities"``
            (default; the expected share run under the soft skip probabilities) or
            ``"decisions"`` (the share the hard gates actually run, straight-through gradient);
            see :func:`adaptive_depth.losses.smartbert_stage1_loss`.
        difficulty_spread: with ``gate_objective="budget"``, ``> 0`` holds each row to its own
            target, ``target_cost +- difficulty_spread`` by the rank of its last-head loss in the
            batch (:func:`adaptive_depth.losses.routed_budget_penalty`), so that harder rows are
            given more layers; ``0`` (default) constrains only the batch mean.
        exit_objective: what the intermediate heads learn in stage 2: ``"paper"`` (eq. 7, the
            labels) or ``"distill"`` (the frozen last head's softmax, as FastBERT's students do:
            :func:`adaptive_depth.losses.distillation_loss`).
        stage2_gate_mode: what the heads see in stage 2 (an encoder ``gate_mode``). ``"hard"``
            (default, the paper): the states behind the trained gates' hard decisions, so a head
            learns on the layers that run for each row (and with ``"distill"``, from the last head
            behind the same gates). ``"run"``: every layer runs, as at full depth or with the gates
            off at inference (``exit_only``); the distillation teacher is the full-depth last head.
        regression_tolerance: for regression tasks (STS-B), two heads agree when their scores
            differ by less than this (the patience settings of the sweep).
        regression_tolerances: for regression tasks, the tolerances of the sweep's
            :class:`~adaptive_depth.exits.ToleranceExit` settings (score units: exit once two
            consecutive heads differ by less). They come first, so the run's operating point is
            calibrated on the tolerance, a continuous knob, rather than on patience.
        eta1, tau1: weight and temperature of the stage-1 contrastive loss.
        eta2, tau2: weight and temperature of the stage-2 contrastive loss.
        projection_dim: width of the contrastive projection heads.
        gate_threshold: a layer is skipped when ``p_skip >= gate_threshold``.
        gate_inner_size: width of the gates' self-attention.
        entropy_thresholds: the ``S`` values of the sweep.
    """

    gate_warmup_epochs: int = 0
    warmup_layer_drop: float = 0.0
    gated_epochs_train: str = "all"
    soft_epochs: int = 3
    gate_lr: float = 0.0
    initial_skip_bias: float = 0.0
    skip_weight: float = 0.04
    eta1: float = 0.01
    tau1: float = 0.5
    eta2: float = 0.05
    tau2: float = 0.55
    projection_dim: int = 128
    gate_threshold: float = 0.5
    gate_inner_size: int = 128
    entropy_thresholds: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    gate_objective: str = "paper"
    target_cost: float = 0.5
    exit_objective: str = "paper"
    stage2_gate_mode: str = "hard"
    budget_on: str = "probabilities"
    difficulty_spread: float = 0.0
    regression_tolerance: float = 0.1
    regression_tolerances: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5, 1.0])

    _positive = (*RecipeConfig._positive, "projection_dim", "gate_inner_size")
    _non_negative = (*RecipeConfig._non_negative, "gate_warmup_epochs", "soft_epochs", "skip_weight", "eta1", "eta2",
                     "gate_lr")
    _strictly_positive = (*RecipeConfig._strictly_positive, "tau1", "tau2")

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.gate_threshold = check_gate_threshold(self.gate_threshold)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        if self.gate_warmup_epochs >= self.stage1_epochs:
            raise ConfigError(f"gate_warmup_epochs ({self.gate_warmup_epochs}) must be below stage1_epochs "
                              f"({self.stage1_epochs}): the gates need at least one epoch to train")
        if not 0.0 <= self.warmup_layer_drop < 1.0:
            raise ConfigError(f"warmup_layer_drop must be in [0, 1) (the probability that a layer is skipped), "
                              f"got {self.warmup_layer_drop}")
        if self.warmup_layer_drop > 0 and self.gate_warmup_epochs < 1:
            raise ConfigError(f"warmup_layer_drop={self.warmup_layer_drop} drops layers in the gate warm-up, which "
                              "this config does not have: set gate_warmup_epochs >= 1 (or warmup_layer_drop=0)")
        if self.gated_epochs_train not in ("all", "gates"):
            raise ConfigError(f"gated_epochs_train must be 'all' or 'gates', got {self.gated_epochs_train!r}")
        if self.gated_epochs_train == "gates" and self.gate_warmup_epochs < 1:
            raise ConfigError("gated_epochs_train=gates trains only the gates after the warm-up, so the backbone "
                              "and last head must be fine-tuned first: set gate_warmup_epochs >= 1 (e.g. "
                              "stage1_epochs=5 gate_warmup_epochs=3)")
        if self.gate_objective not in ("paper", "budget"):
            raise ConfigError(f"gate_objective must be 'paper' or 'budget', got {self.gate_objective!r}")
        if self.budget_on not in ("probabilities", "decisions"):
            raise ConfigError(f"budget_on must be 'probabilities' or 'decisions', got {self.budget_on!r}")
        if self.exit_objective not in ("paper", "distill"):
            raise ConfigError(f"exit_objective must be 'paper' or 'distill', got {self.exit_objective!r}")
        if self.stage2_gate_mode not in ("hard", "run"):
            raise ConfigError(f"stage2_gate_mode must be 'hard' (the paper) or 'run' (every layer runs in stage 2), "
                              f"got {self.stage2_gate_mode!r}")
        if not 0.0 <= self.target_cost <= 1.0:
            raise ConfigError(f"target_cost must be in [0, 1], got {self.target_cost}")
        if not 0.0 <= self.difficulty_spread <= 0.5:
            raise ConfigError(f"difficulty_spread must be in [0, 0.5], got {self.difficulty_spread}")
        if self.difficulty_spread > 0 and self.gate_objective != "budget":
            raise ConfigError(f"difficulty_spread={self.difficulty_spread} aims the budget objective; set "
                              "gate_objective=budget (or difficulty_spread=0)")
        if any(value < 0 for value in self.entropy_thresholds):
            raise ConfigError(f"entropy_thresholds must be >= 0, got {self.entropy_thresholds}")
        if not all(value >= 0 for value in self.regression_tolerances):  # also refuses NaN
            raise ConfigError(f"regression_tolerances must be >= 0 (score units), got {self.regression_tolerances}")


class SmartBertModel(nn.Module):
    """The trained modules; ``forward(batch, stage)`` is the stage's loss terms (so DDP can wrap it).

    Attributes:
        encoder: the :class:`AdaptiveEncoder` (backbone, gates, exit heads).
        contrast1: projection + InfoNCE over the hidden states (stage 1).
        contrast2: projection + InfoNCE over the heads' token states (stage 2).
    """

    def __init__(self, encoder: AdaptiveEncoder, config: SmartBertConfig, is_regression: bool) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = int(encoder.config.hidden_size)
        self.contrast1 = CrossLayerInfoNCE(hidden, config.projection_dim, config.tau1)
        self.contrast2 = CrossLayerInfoNCE(config.head_inner_size, config.projection_dim, config.tau2)
        self.config_ = config
        self.is_regression = is_regression

    def forward(self, batch: dict[str, Tensor], stage: int, gate_mode: str = "hard",
                layer_drop: float = 0.0) -> LossTerms:
        """The loss terms of ``stage`` (1: eq. 3 with ``gate_mode`` gates; 2: eq. 8, or
        self-distillation with ``exit_objective="distill"``, behind the hard gates or, with
        ``stage2_gate_mode="run"``, with every layer running). In training mode, ``layer_drop > 0``
        (stage 1 with ``gate_mode="run"`` only) skips each layer for each row with that probability."""
        config = self.config_
        inputs = {key: value for key, value in batch.items() if key == "token_type_ids"}
        if stage == 1:
            dropped = None
            if layer_drop > 0 and self.training:
                if gate_mode != "run":
                    raise ValueError(f"layer_drop replaces the gates' decisions, so it needs gate_mode='run', "
                                     f"got {gate_mode!r}")
                dropped = layer_drop_values(batch["input_ids"].shape[0], self.encoder.num_steps, layer_drop,
                                            device=batch["input_ids"].device)
            out = self.encoder(batch["input_ids"], batch["attention_mask"], gate_mode=gate_mode, heads="last",
                               gate_values=dropped, gate_threshold=config.gate_threshold, **inputs)
            # In the gate warm-up every layer runs ("run"): no gate objective then.
            return smartbert_stage1_loss(
                out, batch["labels"], is_regression=self.is_regression, skip_weight=config.skip_weight,
                contrastive=self.contrast1, contrastive_weight=config.eta1,
                gate_objective=None if gate_mode == "run" else config.gate_objective, target_cost=config.target_cost,
                budget_on=config.budget_on, difficulty_spread=config.difficulty_spread,  # type: ignore[arg-type]
            )
        # Distillation needs the teacher: the frozen last head, behind the same gates (or none).
        heads = "all" if config.exit_objective == "distill" else "intermediate"
        out = self.encoder(batch["input_ids"], batch["attention_mask"], gate_mode=config.stage2_gate_mode,
                           heads=heads, return_head_token_states=True, gate_threshold=config.gate_threshold, **inputs)
        return smartbert_stage2_loss(out, batch["labels"], is_regression=self.is_regression,
                                     contrastive=self.contrast2, contrastive_weight=config.eta2,
                                     exit_objective=config.exit_objective)  # type: ignore[arg-type]


def build_encoder(backbone: nn.Module, config: SmartBertConfig) -> AdaptiveEncoder:
    """The backbone with one gate and one attention exit head per layer, as the recipe trains it."""
    from recipes.glue import get_task

    return AdaptiveEncoder(
        backbone, num_labels=get_task(config.task).num_labels, gate_inner_size=config.gate_inner_size,
        head_inner_size=config.head_inner_size, initial_skip_bias=config.initial_skip_bias,
    )


def build_model(backbone: nn.Module, config: SmartBertConfig, task: GlueTask) -> SmartBertModel:
    return SmartBertModel(build_encoder(backbone, config), config, task.is_regression)


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
    """Every layer for the first ``gate_warmup_epochs`` epochs (each dropped per row with probability
    ``warmup_layer_drop``), then soft gates for ``soft_epochs`` epochs, hard after (paper §3.6)."""
    if epoch < config.gate_warmup_epochs:
        if config.warmup_layer_drop > 0:
            return {"gate_mode": "run", "layer_drop": config.warmup_layer_drop}
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
    gate_threshold=lambda config: config.gate_threshold,
    extra_results=extra_results,
    heldout_gate_mode="hard",  # the best epoch is picked with the gates skipping, as they will at inference
    stage1_selectable=stage1_selectable,
    stage1_frozen=stage1_frozen,
    stage1_untrained_prefixes=("contrast2.",),
    resume_allowed_keys=(*RESUME_ALLOWED_KEYS, "entropy_thresholds", "regression_tolerances"),
    stage2_keys=("stage2_epochs", "stage2_lr", "eta2", "tau2", "exit_objective", "stage2_gate_mode",
                 "regression_tolerance"),
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
