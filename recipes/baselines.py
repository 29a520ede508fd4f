"""Shared code of the early-exit baseline recipes: plain fine-tuning, DeeBERT, FastBERT, PABEE.

Each baseline is a :class:`BaselineMethod`: a small record of the pieces that differ between
the methods (exit-head type, which heads each stage trains and with which loss, the exit
criterion and its default thresholds). :class:`BaselineRecipe` owns the loops for all of them:

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
:mod:`recipes.fastbert`, :mod:`recipes.pabee`) only define their :class:`BaselineMethod` and
call :func:`main`. The losses are pure functions here, so tests check them on hand examples.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_depth.encoder import AdaptiveEncoder
from adaptive_depth.exits import ExitCriterion
from recipes import common
from recipes.common import CheckpointError, ConfigError, SweepSetting
from recipes.glue import (
    TASKS,
    EncodedDataset,
    GlueMetrics,
    collate,
    encode_examples,
    get_task,
    holdout_split,
    read_split,
    resolve_data_dir,
)

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

logger = logging.getLogger("recipes")

CONFIG_DIR = Path(__file__).parent / "configs"
BACKBONE_DIR = "backbone"

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
class BaselineConfig:
    """Hyper-parameters shared by the baseline recipes (key names as in the SmartBERT config).

    Attributes:
        task: GLUE task name (set by ``--task``).
        seed: seeds model init, shuffling and the held-out split.
        max_length: tokens per example, special tokens included.
        batch_size, eval_batch_size: training / evaluation batch sizes (per process).
        holdout_fraction: share of train held out for stage-1 model selection.
        max_train_rows, max_eval_rows: use only the first rows of train / dev (0: all).
        stage1_epochs, stage1_lr: epochs and backbone learning rate of stage 1 (the only stage
            of fine-tuning and PABEE).
        stage1_head_lr: stage-1 learning rate of the heads; 0 uses ``stage1_lr``.
        stage2_epochs, stage2_lr: stage 2 (intermediate heads) of DeeBERT and FastBERT;
            ignored by one-stage methods.
        weight_decay, warmup_ratio, max_grad_norm: AdamW and linear schedule settings.
        head_inner_size: width of FastBERT's attention heads (unused by pooler heads).
        thresholds: exit thresholds of the sweep (entropy, normalized entropy or patience);
            empty: the method's defaults (PABEE: patience ``1..L-1``).
        padded_length: length the paper's FLOPs convention counts at.
        bucket_by_length: batch training examples of similar length.
        torch_threads: ``torch.set_num_threads`` (0: leave the default).
    """

    task: str = "rte"
    seed: int = 42
    max_length: int = 128
    batch_size: int = 16
    eval_batch_size: int = 32
    holdout_fraction: float = 0.1
    max_train_rows: int = 0
    max_eval_rows: int = 0
    stage1_epochs: int = 3
    stage1_lr: float = 2e-5
    stage1_head_lr: float = 0.0
    stage2_epochs: int = 2
    stage2_lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    head_inner_size: int = 128
    thresholds: list[float] = field(default_factory=list)
    padded_length: int = 128
    bucket_by_length: bool = True
    torch_threads: int = 0

    def __post_init__(self) -> None:
        try:
            self.task = get_task(self.task).name
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for name in ("max_length", "batch_size", "eval_batch_size", "stage1_epochs", "head_inner_size",
                     "padded_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_rows", "max_eval_rows", "stage2_epochs", "weight_decay", "max_grad_norm",
                     "torch_threads", "stage1_head_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("stage1_lr", "stage2_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_length > self.padded_length:
            raise ConfigError(f"max_length ({self.max_length}) must be <= padded_length ({self.padded_length})")
        if any(value < 0 or math.isnan(value) for value in self.thresholds):
            raise ConfigError(f"thresholds must be >= 0, got {self.thresholds}")


def build_encoder(backbone: nn.Module, method: BaselineMethod, num_labels: int, config: BaselineConfig) -> AdaptiveEncoder:
    """The backbone with one ``method.head_type`` head per layer and no gates."""
    return AdaptiveEncoder(backbone, num_labels=num_labels, head_type=method.head_type, with_gates=False,
                           head_inner_size=config.head_inner_size)


class BaselineModel(nn.Module):
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

    def freeze_for_stage2(self) -> list[nn.Parameter]:
        """Freeze backbone and last head; returns the trainable (intermediate-head) parameters."""
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        trainable = []
        for module in self.stage2_modules():
            for parameter in module.parameters():
                parameter.requires_grad_(True)
                trainable.append(parameter)
        return trainable

    def train_stage2(self) -> None:
        """Eval mode (no dropout) for the frozen parts (and the teacher), train mode for the heads."""
        self.eval()
        for module in self.stage2_modules():
            module.train()


# --------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------


class BaselineRecipe:
    """Owns a baseline run: ``setup`` -> ``train`` (stage 1, stage 2 if any) -> ``evaluate``."""

    def __init__(self, method: BaselineMethod, config: BaselineConfig, data_dir: Path, model_name: str | None,
                 run_dir: Path, resume: bool) -> None:
        self.method = method
        self.config = config
        self.data_dir = data_dir
        self.model_name = model_name
        self.run_dir = run_dir
        self.resume = resume
        self.task = get_task(config.task)
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.start_time = time.perf_counter()
        self.history: dict[str, list[dict[str, Any]]] = {"stage1": [], "stage2": []}
        self.best_stage1: dict[str, Any] | None = None
        self.argv: list[str] | None = None

    # -- setup -----------------------------------------------------------------------

    def setup(self) -> None:
        config = self.config
        self.rank, self.world_size = common.distributed_setup()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        common.seed_everything(config.seed)
        dev_name = self.task.dev_splits[0]
        train_examples = read_split(self.data_dir, self.task, "train").examples[: config.max_train_rows or None]
        dev_examples = read_split(self.data_dir, self.task, dev_name).examples[: config.max_eval_rows or None]
        train_part, heldout_part = holdout_split(train_examples, config.holdout_fraction, config.seed)

        backbone, self.tokenizer, self.model_name = common.load_model_and_tokenizer(self.model_name)
        encoder = build_encoder(backbone, self.method, self.task.num_labels, config)
        self.model = BaselineModel(encoder, self.method, self.task.is_regression)
        self.thresholds = self._thresholds(encoder.num_steps)
        if self.is_main:
            backbone.config.save_pretrained(self.run_dir / BACKBONE_DIR)
            self.tokenizer.save_pretrained(self.run_dir / BACKBONE_DIR)

        self.collate = partial(collate, pad_token_id=self.tokenizer.pad_token_id)
        encoded = {
            "train": encode_examples(train_part, self.tokenizer, config.max_length),
            "heldout": encode_examples(heldout_part, self.tokenizer, config.max_length),
            "dev": encode_examples(dev_examples, self.tokenizer, config.max_length),
        }
        self.num_truncated = {name: split.num_truncated for name, split in encoded.items()}
        self.datasets = {name: EncodedDataset(split) for name, split in encoded.items()}
        self.sizes = {name: len(split) for name, split in encoded.items()}
        self.dev_split_name = dev_name
        if self.is_main:
            logger.info("%s %s: %d train, %d held out (from train), %d %s rows; model %s (%d layers)",
                        self.method.name, self.task.name, self.sizes["train"], self.sizes["heldout"],
                        self.sizes["dev"], dev_name, self.model_name, encoder.num_steps)
            for name, count in self.num_truncated.items():
                if count:
                    logger.warning("%s: %d of %d examples longer than max_length=%d tokens were truncated",
                                   name, count, self.sizes[name], config.max_length)

    def _thresholds(self, num_steps: int) -> list[float]:
        method = self.method
        if method.make_criterion is None:
            return []
        values = list(self.config.thresholds) or method.default_thresholds(num_steps)
        if method.integer_thresholds and any(value != int(value) for value in values):
            raise ConfigError(f"{method.name} thresholds are {method.threshold_name} counts: whole numbers, got {values}")
        return values

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoint"

    @property
    def best_stage1_path(self) -> Path:
        return self.run_dir / "stage1_best.safetensors"

    def _wrap(self) -> nn.Module:
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(self.model, find_unused_parameters=True)
        return self.model

    def _loader(self, name: str, shuffle: bool, epoch: int = 0) -> Any:
        if name != "train":
            return torch.utils.data.DataLoader(self.datasets[name], batch_size=self.config.eval_batch_size,
                                               collate_fn=self.collate)
        lengths = [len(ids) for ids in self.datasets[name].encoded.input_ids] if self.config.bucket_by_length else None
        return common.make_loader(self.datasets[name], self.config.batch_size, self.collate, shuffle, self.config.seed,
                                  epoch, lengths)

    def _stage1_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        """AdamW over the backbone and the stage-1 heads (intermediate heads too for ``"all"``)."""
        last = self.model.encoder.num_steps - 1
        backbone, heads = [], []
        for name, parameter in self.model.named_parameters():
            if name.startswith("encoder.backbone."):
                backbone.append(parameter)
            elif self.method.stage1_heads == "all" or int(name.split(".")[2]) == last:
                heads.append(parameter)
        config = self.config
        optimizer = torch.optim.AdamW(
            [{"params": backbone, "lr": config.stage1_lr},
             {"params": heads, "lr": config.stage1_head_lr or config.stage1_lr}],
            weight_decay=config.weight_decay,
        )
        steps = config.stage1_epochs * len(self._loader("train", True))
        return optimizer, common.linear_schedule(optimizer, steps, config.warmup_ratio)

    def _restore_optimizer(self, optimizer: Any, scheduler: Any, payload: dict[str, Any] | None) -> None:
        if payload is None or payload.get("optimizer") is None:
            return
        try:
            optimizer.load_state_dict(payload["optimizer"])
            if payload.get("scheduler") is not None:
                scheduler.load_state_dict(payload["scheduler"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"optimizer state in {self.checkpoint_dir} does not match: {error}") from error

    def _save(self, stage: int, epoch: int, optimizer: Any, scheduler: Any) -> None:
        if not self.is_main:
            return
        state = {
            "recipe": self.method.name, "task": self.task.name, "model": self.model_name, "stage": stage,
            "epoch": epoch, "config": common.config_to_dict(self.config), "history": self.history,
            "best_stage1": self.best_stage1,
        }
        common.save_checkpoint(self.checkpoint_dir, self.model.state_dict(), optimizer, state, scheduler)

    def _load_resume_state(self) -> tuple[int, int, dict[str, Any]] | None:
        """``(stage, last completed epoch, optimizer payload)`` of the checkpoint, or None."""
        if not self.resume:
            return None
        state_dict, state, payload = common.load_checkpoint(self.checkpoint_dir)
        for key, expected in (("recipe", self.method.name), ("task", self.task.name)):
            if state.get(key) != expected:
                raise CheckpointError(
                    f"checkpoint in {self.checkpoint_dir} is for {key} {state.get(key)!r}, this run is {expected!r}"
                )
        if state.get("stage") not in (1, 2) or not isinstance(state.get("epoch"), int):
            raise CheckpointError(f"checkpoint state in {self.checkpoint_dir} has no valid stage/epoch")
        saved_config = state.get("config", {})
        for key in ("max_length", "head_inner_size", "seed"):
            if saved_config.get(key) != getattr(self.config, key):
                raise CheckpointError(
                    f"checkpoint was trained with {key}={saved_config.get(key)!r}, this run has "
                    f"{key}={getattr(self.config, key)!r}; resume with the same value"
                )
        common.load_state_dict_strict(self.model, state_dict, str(self.checkpoint_dir))
        self.history = state.get("history", self.history)
        self.best_stage1 = state.get("best_stage1")
        logger.info("resuming from %s: stage %d, epoch %d completed", self.checkpoint_dir, state["stage"], state["epoch"])
        return state["stage"], state["epoch"], payload

    @torch.no_grad()
    def evaluate_heldout(self) -> dict[str, float]:
        """Task metrics of the last head (full depth) on the held-out split of train."""
        self.model.eval()
        metrics = GlueMetrics(self.task)
        for batch in self._loader("heldout", shuffle=False):
            inputs = {key: value for key, value in batch.items() if key == "token_type_ids"}
            logits = self.model.encoder(batch["input_ids"], batch["attention_mask"], gate_mode="run", heads="last",
                                        **inputs).logits
            metrics.update(logits[:, 0] if self.task.is_regression else logits.argmax(-1), batch["labels"])
        return metrics.compute()

    # -- stages ----------------------------------------------------------------------------

    def train(self) -> None:
        resume = self._load_resume_state()
        stage, done_epoch = (resume[0], resume[1]) if resume else (1, -1)
        payload = resume[2] if resume else None
        if stage == 1:
            self.train_stage1(start_epoch=done_epoch + 1, payload=payload)
            stage2_start, payload = 0, None
        else:
            stage2_start = done_epoch + 1
        reload_best = stage == 1 or done_epoch < 0
        if reload_best:
            self._reload_best_stage1()
        if self.method.two_stage:
            self.train_stage2(start_epoch=stage2_start, payload=payload)

    def train_stage1(self, start_epoch: int, payload: dict[str, Any] | None) -> None:
        config = self.config
        optimizer, scheduler = self._stage1_optimizer()
        self._restore_optimizer(optimizer, scheduler, payload)
        trainable = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        model = self._wrap()
        for epoch in range(start_epoch, config.stage1_epochs):
            self.model.train()
            stats = common.run_epoch(
                self._loader("train", True, epoch), lambda batch: model(batch, stage=1), optimizer, trainable,
                f"{self.method.name} stage 1 epoch {epoch + 1}/{config.stage1_epochs}", scheduler,
                config.max_grad_norm,
            )
            heldout = self.evaluate_heldout()
            main_value = heldout[self.task.main_metric]
            self.history["stage1"].append({"epoch": epoch, "loss": stats.loss, "seconds": stats.seconds,
                                           "samples_per_second": stats.samples_per_second, "heldout": heldout})
            if self.is_main:
                logger.info("stage 1 epoch %d: held-out %s", epoch + 1, heldout)
            if self.best_stage1 is None or main_value > self.best_stage1["value"]:
                self.best_stage1 = {"epoch": epoch, "metric": self.task.main_metric, "value": main_value}
                if self.is_main:
                    common.save_weights(self.best_stage1_path, self.model.state_dict())
            self._save(1, epoch, optimizer, scheduler)
        common.barrier()

    def _reload_best_stage1(self) -> None:
        """Stage 1 ends with the weights of its best held-out epoch (what stage 2 and the sweep use)."""
        if self.best_stage1_path.is_file():
            best = common.load_weights(self.best_stage1_path)
            common.load_state_dict_strict(self.model, best, str(self.best_stage1_path))
            logger.info("reloaded best stage-1 weights (%s)", self.best_stage1)

    def train_stage2(self, start_epoch: int, payload: dict[str, Any] | None) -> None:
        config = self.config
        trainable = self.model.freeze_for_stage2()
        if config.stage2_epochs == 0:
            return
        optimizer = torch.optim.AdamW(trainable, lr=config.stage2_lr, weight_decay=config.weight_decay)
        scheduler = common.linear_schedule(
            optimizer, config.stage2_epochs * len(self._loader("train", True)), config.warmup_ratio
        )
        self._restore_optimizer(optimizer, scheduler, payload)
        model = self._wrap()
        for epoch in range(start_epoch, config.stage2_epochs):
            self.model.train_stage2()
            stats = common.run_epoch(
                self._loader("train", True, 1000 + epoch), lambda batch: model(batch, stage=2), optimizer, trainable,
                f"{self.method.name} stage 2 epoch {epoch + 1}/{config.stage2_epochs}", scheduler,
                config.max_grad_norm,
            )
            self.history["stage2"].append({"epoch": epoch, "loss": stats.loss, "seconds": stats.seconds,
                                           "samples_per_second": stats.samples_per_second})
            self._save(2, epoch, optimizer, scheduler)

    # -- sweep -----------------------------------------------------------------------------

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

    def evaluate(self) -> dict[str, Any] | None:
        common.barrier()
        self.cleanup()
        if not self.is_main:
            return None
        rows = common.run_sweep(self.model.encoder, self._loader("dev", shuffle=False), self.sweep_settings(),
                                lambda: GlueMetrics(self.task), padded_length=self.config.padded_length)
        main_metric = self.task.main_metric
        majority = None
        if not self.task.is_regression:
            train_labels = torch.tensor(self.datasets["train"].encoded.labels)
            dev_labels = torch.tensor(self.datasets["dev"].encoded.labels)
            baseline = GlueMetrics(self.task)
            baseline.update(torch.full_like(dev_labels, int(train_labels.mode().values)), dev_labels)
            majority = baseline.compute()
        finished = _dt.datetime.now(_dt.timezone.utc)
        results = {
            "recipe": self.method.name, "method": self.method.description, "task": self.task.name,
            "command": common.command_line(f"recipes.{self.method.name}", self.argv), "model": self.model_name,
            "data_dir": str(self.data_dir), "dev_split": self.dev_split_name,
            "config": common.config_to_dict(self.config), "head_type": self.method.head_type,
            "started": self.started.isoformat(timespec="seconds"), "finished": finished.isoformat(timespec="seconds"),
            "wall_time_s": time.perf_counter() - self.start_time, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "sizes": self.sizes, "num_truncated": self.num_truncated,
            "main_metric": main_metric, "history": self.history, "best_stage1": self.best_stage1, "sweep": rows,
            "majority_class_baseline": majority,
            "curve_label": f"{self.method.name} ({self.method.threshold_name} exit)",
            "threshold_symbol": self.method.threshold_name,
        }
        common.write_results(self.run_dir, results, main_metric)
        print(common.format_table(rows, list(self.task.metrics)))
        print(f"results: {self.run_dir / 'results.json'}  plot: {self.run_dir / 'plot.png'}")
        return results

    def cleanup(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------
# Reloading a run, command line
# --------------------------------------------------------------------------------------


def load_trained(method: BaselineMethod, run_dir: str | Path, device: str | torch.device = "cpu"
                 ) -> tuple[AdaptiveEncoder, Any, BaselineConfig]:
    """Reload a trained baseline run: ``(encoder in eval mode, tokenizer, config)``.

    The weights are the ones the run's sweep evaluated: after stage 2 when it ran, else
    those of the best stage-1 epoch.

    Raises:
        CheckpointError: a missing, corrupt or mismatched checkpoint, or a run of another method.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    run_dir = Path(run_dir)
    backbone_dir = run_dir / BACKBONE_DIR
    if not (backbone_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} has no {BACKBONE_DIR}/config.json; is it a {method.name} run folder?")
    state_dict, state, _ = common.load_checkpoint(run_dir / "checkpoint")
    if state.get("recipe") != method.name:
        raise CheckpointError(f"{run_dir} is a {state.get('recipe')!r} run, not {method.name!r}")
    best_path = run_dir / "stage1_best.safetensors"
    if state.get("stage") == 1 and best_path.is_file():
        # Without a stage 2 the run ends on (and evaluates) its best stage-1 epoch, not the last.
        state_dict = common.load_weights(best_path)
    config = BaselineConfig(**state["config"])
    backbone = AutoModel.from_config(AutoConfig.from_pretrained(backbone_dir))
    encoder = build_encoder(backbone, method, get_task(config.task).num_labels, config)
    prefix = "encoder."
    weights = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    common.load_state_dict_strict(encoder, weights, str(run_dir / "checkpoint"))
    return encoder.eval().to(device), AutoTokenizer.from_pretrained(backbone_dir), config


def default_config_file(method_name: str, task: str) -> Path | None:
    """``recipes/configs/<method>_<task>.yaml`` if shipped."""
    path = CONFIG_DIR / f"{method_name}_{task}.yaml"
    return path if path.is_file() else None


def parse_args(method: BaselineMethod, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m recipes.{method.name}", description=method.description)
    parser.add_argument("--task", required=True, help=f"GLUE task: {', '.join(TASKS)}")
    parser.add_argument("--data-dir", default=None, help="glue_data folder (default: $GLUE_DIR)")
    parser.add_argument("--model", default=None, help="local model folder or HF id (default: all-MiniLM-L6-v2)")
    parser.add_argument("--config", default=None,
                        help=f"YAML config (default: recipes/configs/{method.name}_<task>.yaml)")
    parser.add_argument("--output-dir", default=None, help=f"run folder (default: runs/{method.name}-<task>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser.parse_intermixed_args(argv)


def main(method: BaselineMethod, argv: list[str] | None = None) -> int:
    """The command line of every baseline recipe; returns the exit status (2 on a user error)."""
    common.setup_logging()
    args = parse_args(method, argv)
    try:
        task = get_task(args.task)
        config_path = args.config or default_config_file(method.name, task.name)
        config = common.load_config(BaselineConfig, config_path, args.overrides, task=task.name)
        data_dir = resolve_data_dir(args.data_dir)
        if args.output_dir:
            run_dir = Path(args.output_dir)
        elif args.resume:
            raise ConfigError("--resume needs --output-dir: the run folder to continue")
        else:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = Path("runs") / f"{method.name}-{task.name}-{stamp}"
        if args.resume and not (run_dir / "checkpoint").is_dir():
            raise CheckpointError(f"--resume: no checkpoint in {run_dir / 'checkpoint'}")
        logger.info("%s: run folder %s; config %s", method.name, run_dir, config_path or "(defaults)")
        recipe = BaselineRecipe(method, config, data_dir, args.model, run_dir, args.resume)
        recipe.argv = argv
        recipe.setup()
        recipe.train()
        recipe.evaluate()
        recipe.cleanup()
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
