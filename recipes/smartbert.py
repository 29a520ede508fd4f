"""SmartBERT recipe: stage 1 (backbone + gates + last head), stage 2 (intermediate heads), sweep.

Usage::

    python -m recipes.smartbert --task mrpc [--data-dir DIR] [--model PATH] [--config FILE]
        [--output-dir DIR] [--resume] [key=value ...]

Paper sections 3.3-3.6 (eq. 3-8), as described in ``DESIGN.md``:

* stage 1 (eq. 3): ``CE(z_L, y) + lambda / sum_i g_i + eta1 * L_contra1`` over the hidden
  states ``X^1..X^L``; gates soft for the first ``soft_epochs`` epochs, hard after. The best
  epoch is chosen on a split held out from *train* (never on dev).
* stage 2 (eq. 5-8): the best stage-1 weights are reloaded; backbone, gates and last head are
  frozen (``requires_grad`` off, not in the optimizer, eval mode); heads ``1..L-1`` and the
  stage-2 projection train on ``sum_i CE(z_i, y) + eta2 * L_contra2`` over the heads'
  self-attention outputs, with hard gates.
* sweep: the inference engine on dev at full depth, skip only and entropy thresholds; writes
  ``results.json`` and ``plot.png`` into the run folder.

The loops, checkpoints, ``--resume`` and the command line are shared with the baseline recipes
(:mod:`recipes.two_stage`). With ``WORLD_SIZE > 1`` (torchrun) it trains with
DistributedDataParallel (gloo on CPU); only rank 0 writes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_depth.contrastive import CrossLayerInfoNCE
from adaptive_depth.encoder import AdaptiveEncoder, skip_regularizer
from adaptive_depth.exits import EntropyExit
from adaptive_depth.gates import GateSchedule
from recipes.common import ConfigError, SweepSetting
from recipes.two_stage import RESUME_ALLOWED_KEYS, RecipeConfig, StagedModel, TwoStageRecipe, load_run, run_cli

RECIPE = "smartbert"


@dataclass
class SmartBertConfig(RecipeConfig):
    """Hyper-parameters of the SmartBERT recipe (defaults: the official RTE run).

    The shared keys (data, schedule, optimizer) are those of
    :class:`~recipes.two_stage.RecipeConfig`; ``stage1_head_lr`` applies to the last head and
    the stage-1 projection. SmartBERT adds:

    Attributes:
        soft_epochs: how many of the stage-1 epochs use soft gates (the rest: hard).
        gate_lr: stage-1 learning rate of the gates; 0 uses ``stage1_lr``.
        initial_skip_bias: initial bias of every gate's score (0: ``p_skip`` near 0.5; negative
            values start with the layers running).
        skip_weight: ``lambda`` of the skip regularizer.
        eta1, tau1: weight and temperature of the stage-1 contrastive loss.
        eta2, tau2: weight and temperature of the stage-2 contrastive loss.
        projection_dim: width of the contrastive projection heads.
        gate_threshold: a layer is skipped when ``p_skip >= gate_threshold``.
        gate_inner_size: width of the gates' self-attention.
        entropy_thresholds: the ``S`` values of the sweep.
    """

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

    _positive = (*RecipeConfig._positive, "projection_dim", "gate_inner_size")
    _non_negative = (*RecipeConfig._non_negative, "soft_epochs", "skip_weight", "eta1", "eta2", "gate_lr")
    _strictly_positive = (*RecipeConfig._strictly_positive, "tau1", "tau2")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.gate_threshold <= 1.0:
            raise ConfigError(f"gate_threshold must be in [0, 1], got {self.gate_threshold}")
        if any(value < 0 for value in self.entropy_thresholds):
            raise ConfigError(f"entropy_thresholds must be >= 0, got {self.entropy_thresholds}")


class SmartBertModel(StagedModel):
    """The trained modules, and the losses of both stages in ``forward`` (so DDP can wrap it).

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

    def task_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.is_regression:
            return F.mse_loss(logits[:, 0], labels.float())
        return F.cross_entropy(logits, labels)

    def forward(self, batch: dict[str, Tensor], stage: int, gate_mode: str = "hard") -> Tensor:
        """The loss of ``stage`` (1: eq. 3 with ``gate_mode`` gates; 2: eq. 8 with hard gates)."""
        config = self.config_
        inputs = {key: value for key, value in batch.items() if key == "token_type_ids"}
        if stage == 1:
            out = self.encoder(
                batch["input_ids"], batch["attention_mask"], gate_mode=gate_mode, heads="last",
                gate_threshold=config.gate_threshold, **inputs,
            )
            loss = self.task_loss(out.logits, batch["labels"])
            loss = loss + skip_regularizer(out.gate_probs, config.skip_weight)
            if config.eta1 > 0:
                loss = loss + config.eta1 * self.contrast1(out.hidden_states[1:], out.attention_mask).loss
            return loss
        out = self.encoder(
            batch["input_ids"], batch["attention_mask"], gate_mode="hard", heads="intermediate",
            return_head_token_states=True, gate_threshold=config.gate_threshold, **inputs,
        )
        intermediate = range(self.encoder.num_steps - 1)
        loss = sum(self.task_loss(out.exit_logits[step], batch["labels"]) for step in intermediate)
        states = [out.head_token_states[step] for step in intermediate]
        if config.eta2 > 0 and len(states) >= 2:
            loss = loss + config.eta2 * self.contrast2(states, out.attention_mask).loss
        return loss

    def stage2_modules(self) -> list[nn.Module]:
        """What stage 2 trains: heads ``1..L-1`` and the stage-2 projection."""
        return [*self.encoder.exit_heads[:-1], self.contrast2]


def build_encoder(backbone: nn.Module, config: SmartBertConfig) -> AdaptiveEncoder:
    """The backbone with one gate and one attention exit head per layer, as the recipe trains it."""
    from recipes.glue import get_task

    return AdaptiveEncoder(
        backbone, num_labels=get_task(config.task).num_labels, gate_inner_size=config.gate_inner_size,
        head_inner_size=config.head_inner_size, initial_skip_bias=config.initial_skip_bias,
    )


class SmartBertRecipe(TwoStageRecipe):
    """SmartBERT on the shared run (:class:`~recipes.two_stage.TwoStageRecipe`): gates in stage 1,
    hard gates when picking the best epoch, the stage-2 projection untouched by stage 1."""

    name = RECIPE
    resume_allowed_keys = (*RESUME_ALLOWED_KEYS, "entropy_thresholds")
    heldout_gate_mode = "hard"
    stage1_untrained_prefixes = ("contrast2.",)

    @property
    def gate_threshold(self) -> float:
        return self.config.gate_threshold

    def build_model(self, backbone: nn.Module) -> SmartBertModel:
        return SmartBertModel(build_encoder(backbone, self.config), self.config, self.task.is_regression)

    def stage1_param_groups(self) -> list[dict[str, Any]]:
        """Backbone at ``stage1_lr``, gates at ``gate_lr``, last head and projection 1 at ``stage1_head_lr``."""
        last = self.model.encoder.num_steps - 1
        backbone, gates, new_modules = [], [], []
        for name, parameter in self.model.named_parameters():
            is_intermediate_head = name.startswith("encoder.exit_heads.") and int(name.split(".")[2]) != last
            if name.startswith("contrast2.") or is_intermediate_head:
                continue
            if name.startswith("encoder.backbone."):
                backbone.append(parameter)
            elif name.startswith("encoder.gates."):
                gates.append(parameter)
            else:
                new_modules.append(parameter)
        config = self.config
        return [{"params": backbone, "lr": config.stage1_lr},
                {"params": gates, "lr": config.gate_lr or config.stage1_lr},
                {"params": new_modules, "lr": config.stage1_head_lr or config.stage1_lr}]

    def stage1_options(self, epoch: int) -> dict[str, Any]:
        """Soft gates for the first ``soft_epochs`` epochs, hard after (paper §3.6)."""
        return {"gate_mode": GateSchedule(self.config.soft_epochs).mode(epoch)}

    def sweep_settings(self) -> list[SweepSetting]:
        settings = [SweepSetting("full", "full"), SweepSetting("skip_only", "skip_only")]
        if not self.task.is_regression:  # entropy of a single regression output is always 0
            settings += [
                SweepSetting(f"entropy={value:g}", "adaptive", EntropyExit(value), value)
                for value in self.config.entropy_thresholds
            ]
        return settings

    def extra_results(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Whether some setting reached the README's target: at most half the full-depth FLOPs
        with the main metric within 1 point of full depth."""
        main = self.task.main_metric
        full = next(row for row in rows if row["mode"] == "full")
        target = [row["name"] for row in rows if row["relative_cost_paper"] <= 0.5
                  and row["metrics"][main] >= full["metrics"][main] - 0.01]
        majority = self.majority_class_baseline()
        return {"target_half_cost_within_1pt": {
            "reached": bool(target), "settings": target, "full_depth_value": full["metrics"][main],
            "full_depth_beats_majority_class": None if majority is None else full["metrics"][main] > majority[main],
        }}


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
        weights the run's sweep evaluated, its tokenizer, and the run's config. Use it with
        :class:`adaptive_depth.engine.AdaptiveInferenceEngine`.

    Raises:
        CheckpointError: a missing, corrupt or mismatched checkpoint.
    """
    return load_run(run_dir, RECIPE, SmartBertConfig, build_encoder, device)


def main(argv: list[str] | None = None) -> int:
    """``python -m recipes.smartbert``; returns the exit status (2 on a user error)."""
    return run_cli(RECIPE, __doc__.split("\n")[0], SmartBertConfig, SmartBertRecipe, argv)


if __name__ == "__main__":
    sys.exit(main())
