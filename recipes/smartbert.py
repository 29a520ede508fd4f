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

With ``WORLD_SIZE > 1`` (torchrun) it trains with DistributedDataParallel (gloo on CPU); only
rank 0 writes. This path is not covered by the tests.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_depth.contrastive import CrossLayerInfoNCE
from adaptive_depth.encoder import AdaptiveEncoder, skip_regularizer
from adaptive_depth.exits import EntropyExit
from adaptive_depth.gates import GateSchedule
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

logger = logging.getLogger("recipes")

CONFIG_DIR = Path(__file__).parent / "configs"
RECIPE = "smartbert"


@dataclass
class SmartBertConfig:
    """Hyper-parameters of the SmartBERT recipe (defaults: the official RTE run).

    Attributes:
        task: GLUE task name (set by ``--task``).
        seed: seeds model init, shuffling and the held-out split.
        max_length: tokens per example, special tokens included (longer pairs are truncated).
        batch_size: training batch size (per process).
        eval_batch_size: batch size of held-out evaluation and of the dev sweep.
        holdout_fraction: share of train held out for stage-1 model selection.
        max_train_rows, max_eval_rows: use only the first rows of train / dev (0: all).
        stage1_epochs, soft_epochs: stage-1 epochs, and how many of them use soft gates.
        stage1_lr: learning rate of stage 1 (backbone, gates, last head, projection 1).
        stage1_head_lr: stage-1 learning rate of the new modules (gates, last head, projection 1);
            0 uses ``stage1_lr`` (the official code uses one rate).
        gate_lr: stage-1 learning rate of the gates; 0 uses ``stage1_lr``.
        initial_skip_bias: initial bias of every gate's score (0: ``p_skip`` near 0.5; negative
            values start with the layers running).
        skip_weight: ``lambda`` of the skip regularizer.
        eta1, tau1: weight and temperature of the stage-1 contrastive loss.
        stage2_epochs, stage2_lr: stage-2 epochs and learning rate of the intermediate heads.
        eta2, tau2: weight and temperature of the stage-2 contrastive loss.
        projection_dim: width of the contrastive projection heads.
        weight_decay, warmup_ratio, max_grad_norm: optimizer settings (AdamW, linear schedule).
        gate_threshold: a layer is skipped when ``p_skip >= gate_threshold``.
        gate_inner_size, head_inner_size: widths of the gates' and heads' self-attention.
        entropy_thresholds: the ``S`` values of the sweep.
        padded_length: length the paper's FLOPs convention counts at.
        bucket_by_length: batch training examples of similar length (less padding).
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
    stage1_epochs: int = 5
    soft_epochs: int = 3
    stage1_lr: float = 2e-5
    stage1_head_lr: float = 0.0
    gate_lr: float = 0.0
    initial_skip_bias: float = 0.0
    skip_weight: float = 0.04
    eta1: float = 0.01
    tau1: float = 0.5
    stage2_epochs: int = 4
    stage2_lr: float = 2e-5
    eta2: float = 0.05
    tau2: float = 0.55
    projection_dim: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    gate_threshold: float = 0.5
    gate_inner_size: int = 128
    head_inner_size: int = 128
    entropy_thresholds: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    padded_length: int = 128
    bucket_by_length: bool = True
    torch_threads: int = 0

    def __post_init__(self) -> None:
        try:
            self.task = get_task(self.task).name
        except ValueError as error:
            raise ConfigError(str(error)) from None
        positive = ("max_length", "batch_size", "eval_batch_size", "stage1_epochs", "projection_dim",
                    "gate_inner_size", "head_inner_size", "padded_length")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("max_train_rows", "max_eval_rows", "stage2_epochs", "soft_epochs", "skip_weight", "eta1",
                        "eta2", "weight_decay", "max_grad_norm", "torch_threads", "stage1_head_lr", "gate_lr")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("stage1_lr", "stage2_lr", "tau1", "tau2"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.gate_threshold <= 1.0:
            raise ConfigError(f"gate_threshold must be in [0, 1], got {self.gate_threshold}")
        if self.max_length > self.padded_length:
            raise ConfigError(f"max_length ({self.max_length}) must be <= padded_length ({self.padded_length})")
        if any(value < 0 for value in self.entropy_thresholds):
            raise ConfigError(f"entropy_thresholds must be >= 0, got {self.entropy_thresholds}")


class SmartBertModel(nn.Module):
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

    def freeze_for_stage2(self) -> list[nn.Parameter]:
        """Freeze everything but :meth:`stage2_modules`; returns the trainable parameters."""
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        trainable = []
        for module in self.stage2_modules():
            for parameter in module.parameters():
                parameter.requires_grad_(True)
                trainable.append(parameter)
        return trainable

    def train_stage2(self) -> None:
        """Eval mode (no dropout) for the frozen parts, train mode for the trained ones."""
        self.eval()
        for module in self.stage2_modules():
            module.train()


class SmartBertRecipe:
    """Owns the run: ``setup`` -> ``train_stage1`` -> ``train_stage2`` -> ``evaluate``."""

    def __init__(self, config: SmartBertConfig, data_dir: Path, model_name: str | None, run_dir: Path,
                 resume: bool) -> None:
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
        train_split = read_split(self.data_dir, self.task, "train")
        dev_name = self.task.dev_splits[0]
        dev_split = read_split(self.data_dir, self.task, dev_name)
        train_examples = train_split.examples[: config.max_train_rows or None]
        dev_examples = dev_split.examples[: config.max_eval_rows or None]
        train_part, heldout_part = holdout_split(train_examples, config.holdout_fraction, config.seed)

        backbone, self.tokenizer, self.model_name = common.load_model_and_tokenizer(self.model_name)
        encoder = AdaptiveEncoder(
            backbone, num_labels=self.task.num_labels, gate_inner_size=config.gate_inner_size,
            head_inner_size=config.head_inner_size, initial_skip_bias=config.initial_skip_bias,
        )
        self.model = SmartBertModel(encoder, config, self.task.is_regression)
        if self.is_main:
            # The backbone's config and tokenizer make the run folder self-contained for load_trained().
            backbone.config.save_pretrained(self.run_dir / BACKBONE_DIR)
            self.tokenizer.save_pretrained(self.run_dir / BACKBONE_DIR)

        pad = self.tokenizer.pad_token_id
        self.collate = partial(collate, pad_token_id=pad)
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
            logger.info(
                "%s: %d train, %d held out (from train), %d %s rows; model %s (%d layers)",
                self.task.name, self.sizes["train"], self.sizes["heldout"], self.sizes["dev"], dev_name,
                self.model_name, encoder.num_steps,
            )
            for name, count in self.num_truncated.items():
                if count:
                    logger.warning("%s: %d of %d examples longer than max_length=%d tokens were truncated",
                                   name, count, self.sizes[name], config.max_length)

    @property
    def is_main(self) -> bool:
        """Rank 0 (as set up; stays right after the process group is gone)."""
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
        batch_size = self.config.batch_size if name == "train" else self.config.eval_batch_size
        if name != "train":
            return torch.utils.data.DataLoader(self.datasets[name], batch_size=batch_size, collate_fn=self.collate)
        lengths = [len(ids) for ids in self.datasets[name].encoded.input_ids] if self.config.bucket_by_length else None
        return common.make_loader(self.datasets[name], batch_size, self.collate, shuffle, self.config.seed, epoch, lengths)

    def _stage1_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        backbone, gates, new_modules = [], [], []
        for name, parameter in self.model.named_parameters():
            if name.startswith("contrast2.") or self._is_intermediate_head(name):
                continue
            if name.startswith("encoder.backbone."):
                backbone.append(parameter)
            elif name.startswith("encoder.gates."):
                gates.append(parameter)
            else:
                new_modules.append(parameter)
        config = self.config
        optimizer = torch.optim.AdamW(
            [{"params": backbone, "lr": config.stage1_lr},
             {"params": gates, "lr": config.gate_lr or config.stage1_lr},
             {"params": new_modules, "lr": config.stage1_head_lr or config.stage1_lr}],
            weight_decay=config.weight_decay,
        )
        steps = self.config.stage1_epochs * len(self._loader("train", True))
        return optimizer, common.linear_schedule(optimizer, steps, self.config.warmup_ratio)

    def _is_intermediate_head(self, name: str) -> bool:
        last = self.model.encoder.num_steps - 1
        return name.startswith("encoder.exit_heads.") and int(name.split(".")[2]) != last

    def _save(self, stage: int, epoch: int, optimizer: Any, scheduler: Any) -> None:
        if not self.is_main:
            return
        state = {
            "recipe": RECIPE, "task": self.task.name, "model": self.model_name, "stage": stage, "epoch": epoch,
            "config": common.config_to_dict(self.config), "history": self.history, "best_stage1": self.best_stage1,
        }
        common.save_checkpoint(self.checkpoint_dir, self.model.state_dict(), optimizer, state, scheduler)

    def _load_resume_state(self) -> tuple[int, int, dict[str, Any]] | None:
        """``(stage, last completed epoch, optimizer payload)`` of the checkpoint, or None."""
        if not self.resume:
            return None
        state_dict, state, payload = common.load_checkpoint(self.checkpoint_dir)
        for key, expected in (("recipe", RECIPE), ("task", self.task.name)):
            if state.get(key) != expected:
                raise CheckpointError(
                    f"checkpoint in {self.checkpoint_dir} is for {key} {state.get(key)!r}, this run is {expected!r}"
                )
        if state.get("stage") not in (1, 2) or not isinstance(state.get("epoch"), int):
            raise CheckpointError(f"checkpoint state in {self.checkpoint_dir} has no valid stage/epoch")
        saved_config = state.get("config", {})
        for key in ("max_length", "gate_inner_size", "head_inner_size", "projection_dim"):
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

    # -- evaluation on the held-out part of train ------------------------------------------

    @torch.no_grad()
    def evaluate_heldout(self, heads: str = "last") -> dict[str, float]:
        """Task metrics of the last head (hard gates) on the held-out split of train."""
        self.model.eval()
        metrics = GlueMetrics(self.task)
        for batch in self._loader("heldout", shuffle=False):
            inputs = {key: value for key, value in batch.items() if key == "token_type_ids"}
            out = self.model.encoder(batch["input_ids"], batch["attention_mask"], gate_mode="hard", heads=heads,
                                     gate_threshold=self.config.gate_threshold, **inputs)
            logits = out.logits
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
        self.train_stage2(start_epoch=stage2_start, payload=payload, reload_best=stage == 1 or done_epoch < 0)

    def train_stage1(self, start_epoch: int, payload: dict[str, Any] | None) -> None:
        config = self.config
        optimizer, scheduler = self._stage1_optimizer()
        if payload is not None and payload.get("optimizer") is not None:
            try:
                optimizer.load_state_dict(payload["optimizer"])
                if payload.get("scheduler") is not None:
                    scheduler.load_state_dict(payload["scheduler"])
            except (ValueError, KeyError) as error:
                raise CheckpointError(f"optimizer state in {self.checkpoint_dir} does not match: {error}") from error
        schedule = GateSchedule(config.soft_epochs)
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        model = self._wrap()
        for epoch in range(start_epoch, config.stage1_epochs):
            gate_mode = schedule.mode(epoch)
            self.model.train()
            stats = common.run_epoch(
                self._loader("train", True, epoch), lambda batch: model(batch, stage=1, gate_mode=gate_mode), optimizer,
                trainable, f"stage 1 epoch {epoch + 1}/{config.stage1_epochs} ({gate_mode} gates)", scheduler,
                config.max_grad_norm,
            )
            heldout = self.evaluate_heldout()
            main = heldout[self.task.main_metric]
            record = {"epoch": epoch, "gate_mode": gate_mode, "loss": stats.loss, "seconds": stats.seconds,
                      "samples_per_second": stats.samples_per_second, "heldout": heldout}
            self.history["stage1"].append(record)
            if self.is_main:
                logger.info("stage 1 epoch %d: held-out %s", epoch + 1, heldout)
            # Every process evaluates the same held-out rows, so all agree on the best epoch.
            if self.best_stage1 is None or main > self.best_stage1["value"]:
                self.best_stage1 = {"epoch": epoch, "metric": self.task.main_metric, "value": main}
                if self.is_main:
                    encoder_state = {k: v for k, v in self.model.state_dict().items() if not k.startswith("contrast2.")}
                    common.save_weights(self.best_stage1_path, encoder_state)
            self._save(1, epoch, optimizer, scheduler)
        common.barrier()

    def train_stage2(self, start_epoch: int, payload: dict[str, Any] | None, reload_best: bool) -> None:
        config = self.config
        if reload_best and self.best_stage1_path.is_file():
            best = common.load_weights(self.best_stage1_path)
            own = self.model.state_dict()
            best.update({k: v for k, v in own.items() if k.startswith("contrast2.")})
            common.load_state_dict_strict(self.model, best, str(self.best_stage1_path))
            logger.info("stage 2: reloaded best stage-1 weights (%s)", self.best_stage1)
        trainable = self.model.freeze_for_stage2()
        if config.stage2_epochs == 0:
            return
        optimizer = torch.optim.AdamW(trainable, lr=config.stage2_lr, weight_decay=config.weight_decay)
        scheduler = common.linear_schedule(
            optimizer, config.stage2_epochs * len(self._loader("train", True)), config.warmup_ratio
        )
        if payload is not None and payload.get("optimizer") is not None:
            try:
                optimizer.load_state_dict(payload["optimizer"])
                if payload.get("scheduler") is not None:
                    scheduler.load_state_dict(payload["scheduler"])
            except (ValueError, KeyError) as error:
                raise CheckpointError(f"optimizer state in {self.checkpoint_dir} does not match: {error}") from error
        model = self._wrap()
        for epoch in range(start_epoch, config.stage2_epochs):
            self.model.train_stage2()
            stats = common.run_epoch(
                self._loader("train", True, 1000 + epoch), lambda batch: model(batch, stage=2), optimizer, trainable,
                f"stage 2 epoch {epoch + 1}/{config.stage2_epochs}", scheduler, config.max_grad_norm,
            )
            self.history["stage2"].append(
                {"epoch": epoch, "loss": stats.loss, "seconds": stats.seconds, "samples_per_second": stats.samples_per_second}
            )
            self._save(2, epoch, optimizer, scheduler)

    # -- sweep -----------------------------------------------------------------------------

    def sweep_settings(self) -> list[SweepSetting]:
        settings = [SweepSetting("full", "full"), SweepSetting("skip_only", "skip_only")]
        if not self.task.is_regression:  # entropy of a single regression output is always 0
            settings += [
                SweepSetting(f"entropy={value:g}", "adaptive", EntropyExit(value), value)
                for value in self.config.entropy_thresholds
            ]
        return settings

    def evaluate(self) -> dict[str, Any] | None:
        # Training is over: end the process group, so that rank 0 evaluates alone and its
        # torchmetrics metrics compute locally instead of waiting for the other ranks.
        common.barrier()
        self.cleanup()
        if not self.is_main:
            return None
        rows = common.run_sweep(
            self.model.encoder, self._loader("dev", shuffle=False), self.sweep_settings(),
            lambda: GlueMetrics(self.task), self.config.gate_threshold, self.config.padded_length,
        )
        main = self.task.main_metric
        full = next(row for row in rows if row["mode"] == "full")
        target = [row["name"] for row in rows if row["relative_cost_paper"] <= 0.5
                  and row["metrics"][main] >= full["metrics"][main] - 0.01]
        majority = None
        if not self.task.is_regression:  # a model that learned nothing scores about this
            train_labels = torch.tensor(self.datasets["train"].encoded.labels)
            dev_labels = torch.tensor(self.datasets["dev"].encoded.labels)
            baseline = GlueMetrics(self.task)
            baseline.update(torch.full_like(dev_labels, int(train_labels.mode().values)), dev_labels)
            majority = baseline.compute()
        finished = _dt.datetime.now(_dt.timezone.utc)
        results = {
            "recipe": RECIPE, "task": self.task.name, "command": common.command_line("recipes.smartbert", self.argv), "model": self.model_name,
            "data_dir": str(self.data_dir), "dev_split": self.dev_split_name, "config": common.config_to_dict(self.config),
            "started": self.started.isoformat(timespec="seconds"), "finished": finished.isoformat(timespec="seconds"),
            "wall_time_s": time.perf_counter() - self.start_time, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "sizes": self.sizes, "num_truncated": self.num_truncated,
            "main_metric": main, "history": self.history, "best_stage1": self.best_stage1, "sweep": rows,
            "majority_class_baseline": majority,
            "target_half_cost_within_1pt": {
                "reached": bool(target), "settings": target, "full_depth_value": full["metrics"][main],
                "full_depth_beats_majority_class": None if majority is None else full["metrics"][main] > majority[main],
            },
        }
        common.write_results(self.run_dir, results, main)
        print(common.format_table(rows, list(self.task.metrics)))
        print(f"results: {self.run_dir / 'results.json'}  plot: {self.run_dir / 'plot.png'}")
        return results

    def cleanup(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


BACKBONE_DIR = "backbone"


def load_trained(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[AdaptiveEncoder, Any, SmartBertConfig]:
    """Reload a trained SmartBERT run for inference, in one call.

    Args:
        run_dir: the run folder written by ``python -m recipes.smartbert`` (holds
            ``checkpoint/`` and ``backbone/``).
        device: where to put the model.

    Returns:
        ``(encoder, tokenizer, config)``: the :class:`AdaptiveEncoder` in eval mode with the
        weights of the last completed epoch, its tokenizer, and the run's config. Use it with
        :class:`adaptive_depth.engine.AdaptiveInferenceEngine`.

    Raises:
        CheckpointError: a missing, corrupt or mismatched checkpoint.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    run_dir = Path(run_dir)
    backbone_dir = run_dir / BACKBONE_DIR
    if not (backbone_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} has no {BACKBONE_DIR}/config.json; is it a smartbert run folder?")
    state_dict, state, _ = common.load_checkpoint(run_dir / "checkpoint")
    config = SmartBertConfig(**state["config"])
    backbone = AutoModel.from_config(AutoConfig.from_pretrained(backbone_dir))
    encoder = AdaptiveEncoder(
        backbone, num_labels=get_task(config.task).num_labels, gate_inner_size=config.gate_inner_size,
        head_inner_size=config.head_inner_size,
    )
    prefix = "encoder."
    weights = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    common.load_state_dict_strict(encoder, weights, str(run_dir / "checkpoint"))
    return encoder.eval().to(device), AutoTokenizer.from_pretrained(backbone_dir), config


def _default_config_file(task: str) -> Path | None:
    path = CONFIG_DIR / f"smartbert_{task}.yaml"
    return path if path.is_file() else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m recipes.smartbert", description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, help=f"GLUE task: {', '.join(TASKS)}")
    parser.add_argument("--data-dir", default=None, help="glue_data folder (default: $GLUE_DIR)")
    parser.add_argument("--model", default=None, help="local model folder or HF id (default: all-MiniLM-L6-v2)")
    parser.add_argument("--config", default=None, help="YAML config (default: recipes/configs/smartbert_<task>.yaml)")
    parser.add_argument("--output-dir", default=None, help="run folder (default: runs/smartbert-<task>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = parse_args(argv)
    try:
        task = get_task(args.task)
        config_path = args.config or _default_config_file(task.name)
        config = common.load_config(SmartBertConfig, config_path, args.overrides, task=task.name)
        data_dir = resolve_data_dir(args.data_dir)
        if args.output_dir:
            run_dir = Path(args.output_dir)
        elif args.resume:
            raise ConfigError("--resume needs --output-dir: the run folder to continue")
        else:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = Path("runs") / f"smartbert-{task.name}-{stamp}"
        if args.resume and not (run_dir / "checkpoint").is_dir():
            raise CheckpointError(f"--resume: no checkpoint in {run_dir / 'checkpoint'}")
        logger.info("run folder %s; config %s", run_dir, config_path or "(defaults)")
        recipe = SmartBertRecipe(config, data_dir, args.model, run_dir, args.resume)
        recipe.argv = argv
        recipe.setup()
        recipe.train()
        recipe.evaluate()
        recipe.cleanup()
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        # GlueDataError, ConfigError and UnsupportedModelError are ValueErrors.
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
