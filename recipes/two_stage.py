"""The run every recipe shares: held-out model selection, two training stages, checkpoints, sweep.

SmartBERT (:mod:`recipes.smartbert`) and the baselines (:mod:`recipes.baselines`: fine-tuning,
DeeBERT, FastBERT, PABEE) train the same way:

* ``setup``: GLUE train (minus a seeded held-out part for model selection) and dev, the backbone
  wrapped in an :class:`~adaptive_depth.encoder.AdaptiveEncoder`;
* ``train_stage1``: the backbone and the stage-1 modules; after every epoch the last head is
  scored on the held-out part and the best epoch's weights are kept (never chosen on dev);
* ``train_stage2`` (two-stage methods): the best stage-1 weights are reloaded, everything but
  the intermediate heads is frozen (``requires_grad`` off, not in the optimizer, eval mode);
* ``evaluate``: :func:`recipes.common.run_sweep` on dev, ``results.json`` and ``plot.png``.

:class:`TwoStageRecipe` owns those loops, the checkpoints (``--resume`` continues from the last
completed epoch) and the command line (:func:`run_cli`); a recipe subclasses it once and fills
in what differs: the model and its losses (:class:`StagedModel`), the stage-1 parameter groups,
per-epoch options such as the gate mode, the sweep settings and extra result fields.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from adaptive_depth.encoder import AdaptiveEncoder
from recipes import common, errors
from recipes.common import CheckpointError, ConfigError, SweepSetting
from recipes.checks import check_model_inputs, check_unknown_tokens, same_model
from recipes.errors import ResumeMismatchError, TrainingDivergedError
from recipes.run_folder import RUN_FILE, RunLock, check_run_folder, clear_run, compare_data, config_differences, \
    data_fingerprint
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
from recipes.operating_point import MODEL_DIR, calibrate_and_save

__all__ = ["BACKBONE_DIR", "RESUME_ALLOWED_KEYS", "RecipeConfig", "StagedModel", "TwoStageRecipe", "load_run",
           "run_cli", "split_fingerprint"]

logger = logging.getLogger("recipes")

CONFIG_DIR = Path(__file__).parent / "configs"
BACKBONE_DIR = "backbone"
BEST_STAGE1_FILE = "stage1_best.safetensors"
# Config keys a resumed run may change: more epochs (the finished ones are not redone), and
# settings that do not change what is trained (threads, evaluation batch size). Recipes add
# their sweep thresholds.
RESUME_ALLOWED_KEYS = ("stage1_epochs", "stage2_epochs", "torch_threads", "eval_batch_size")


@dataclass
class RecipeConfig:
    """Hyper-parameters every recipe has; each recipe's config extends it (defaults: the
    official SmartBERT RTE run, DESIGN.md).

    Attributes:
        task: GLUE task name (set by ``--task``).
        seed: seeds model init, shuffling and the held-out split.
        max_length: tokens per example, special tokens included (longer ones are truncated).
        batch_size: training batch size (per process).
        eval_batch_size: batch size of held-out evaluation and of the dev sweep.
        holdout_fraction: share of train held out for stage-1 model selection.
        max_train_rows, max_eval_rows: use only the first rows of train / dev (0: all).
        stage1_epochs, stage1_lr: epochs and backbone learning rate of stage 1.
        stage1_head_lr: stage-1 learning rate of the new modules (heads...); 0 uses ``stage1_lr``.
        stage2_epochs, stage2_lr: epochs and learning rate of stage 2 (the intermediate heads);
            ignored by one-stage methods.
        weight_decay, warmup_ratio, max_grad_norm: AdamW and linear-schedule settings.
        head_inner_size: width of the attention exit heads' self-attention.
        padded_length: length the paper's FLOPs convention counts at.
        bucket_by_length: batch training examples of similar length (less padding).
        torch_threads: ``torch.set_num_threads`` (0: leave the default).
        calibration_budget: after the sweep, the exit threshold is chosen on the held-out part of
            train so that the mean relative cost (exact MACs) is at most this; the model is saved
            to ``<run>/model`` at that operating point.
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
    stage1_lr: float = 2e-5
    stage1_head_lr: float = 0.0
    stage2_epochs: int = 4
    stage2_lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    head_inner_size: int = 128
    padded_length: int = 128
    bucket_by_length: bool = True
    torch_threads: int = 0
    calibration_budget: float = 0.5

    # Validation lists (unannotated, so not dataclass fields); subclasses extend them.
    _positive = ("max_length", "batch_size", "eval_batch_size", "stage1_epochs", "head_inner_size", "padded_length")
    _non_negative = ("max_train_rows", "max_eval_rows", "stage2_epochs", "weight_decay", "max_grad_norm",
                     "torch_threads", "stage1_head_lr")
    _strictly_positive = ("stage1_lr", "stage2_lr")

    def __post_init__(self) -> None:
        try:
            self.task = get_task(self.task).name
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for name in self._positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in self._non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in self._strictly_positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0.0 < self.calibration_budget <= 1.0:
            raise ConfigError(f"calibration_budget must be in (0, 1], got {self.calibration_budget}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_length < 4:
            raise ConfigError(f"max_length must be >= 4 tokens (special tokens included), got {self.max_length}")
        if self.max_length > self.padded_length:
            raise ConfigError(f"max_length ({self.max_length}) must be <= padded_length ({self.padded_length})")


class StagedModel(nn.Module):
    """An encoder plus the losses of both stages; ``forward(batch, stage, **options)`` is the loss.

    Subclasses set ``self.encoder`` and define :meth:`forward` and :meth:`stage2_modules`.
    Keeping the loss inside ``forward`` lets DistributedDataParallel wrap the whole thing.
    """

    encoder: AdaptiveEncoder

    def stage2_modules(self) -> list[nn.Module]:
        """The modules stage 2 trains (the intermediate exit heads, and any of their helpers)."""
        raise NotImplementedError

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


class TwoStageRecipe:
    """Owns a run: ``setup`` -> ``train`` (stage 1, then stage 2 if any) -> ``evaluate`` -> ``cleanup``.

    Subclasses define :meth:`build_model`, :meth:`stage1_param_groups` and
    :meth:`sweep_settings`, and may override the other hooks below.

    Attributes:
        name: the recipe's name (``python -m recipes.<name>``, ``results.json["recipe"]``).
        resume_allowed_keys: the config keys a resumed run may change (every other key, the
            model and the data must be those of the checkpoint).
        heldout_gate_mode: gate mode of the held-out evaluation that picks the best epoch.
        stage1_untrained_prefixes: state-dict prefixes of modules stage 1 never trains; they are
            left out of the best stage-1 weights and kept as they are when those are reloaded.
    """

    name: str = ""
    resume_allowed_keys: ClassVar[tuple[str, ...]] = RESUME_ALLOWED_KEYS
    heldout_gate_mode: ClassVar[str] = "run"
    stage1_untrained_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any, data_dir: Path, model_name: str | None, run_dir: Path, resume: bool) -> None:
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
        self.overwrite = False
        self.rank, self.world_size = 0, 1
        self.lock: RunLock | None = None
        self.data_record: dict[str, Any] | None = None
        self.resume_point: tuple[int, int, dict[str, Any]] | None = None
        self.checkpointed: tuple[int, int] | None = None  # (stage, epoch) of the last checkpoint
        self._best_sha256: str | None = None  # of the best stage-1 weights the last checkpoint holds

    # -- hooks -----------------------------------------------------------------------------

    def build_model(self, backbone: nn.Module) -> StagedModel:
        """The trained modules around the loaded HF ``backbone``."""
        raise NotImplementedError

    def stage1_param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups of stage 1 (``{"params": [...], "lr": ...}``)."""
        raise NotImplementedError

    def stage1_options(self, epoch: int) -> dict[str, Any]:
        """Keyword arguments of the model's stage-1 ``forward`` in ``epoch`` (0-based); recorded
        in the history and shown in the progress bar."""
        return {}

    @property
    def gate_threshold(self) -> float:
        """A layer is skipped when its gate's ``p_skip`` reaches this (held-out evaluation, sweep)."""
        return 0.5

    @property
    def has_stage2(self) -> bool:
        """Whether the method trains intermediate heads in a second stage."""
        return True

    def sweep_settings(self) -> list[SweepSetting]:
        """The dev-set evaluation settings (full depth first)."""
        raise NotImplementedError

    def extra_results(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Recipe-specific fields of ``results.json``, given the sweep rows."""
        return {}

    # -- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        """Read and check the data and the model, then claim the run folder (lock, ``run.json``,
        ``backbone/``) and, with ``--resume``, load the checkpoint. Nothing is written before the
        inputs are checked."""
        config = self.config
        self.rank, self.world_size = common.distributed_setup()
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        common.seed_everything(config.seed)
        dev_name = self.task.dev_splits[0]
        train_examples = read_split(self.data_dir, self.task, "train").examples[: config.max_train_rows or None]
        dev_examples = read_split(self.data_dir, self.task, dev_name).examples[: config.max_eval_rows or None]
        if len(train_examples) < 2:
            raise ConfigError(f"{len(train_examples)} training row(s) (max_train_rows={config.max_train_rows}): the run "
                              "needs at least 2, one of them held out for model selection; raise max_train_rows")
        train_part, heldout_part = holdout_split(train_examples, config.holdout_fraction, config.seed)
        self.data_record = data_fingerprint({"train": train_examples, dev_name: dev_examples}, self.data_dir)

        backbone, self.tokenizer, self.model_name = common.load_model_and_tokenizer(self.model_name)
        check_model_inputs(backbone.config, self.tokenizer, config.max_length, self.model_name)
        try:
            self.model = self.build_model(backbone)
        except ValueError as error:  # a module rejected a size from the config
            raise ConfigError(f"cannot build the {self.name} model with this config: {error}") from error

        self.collate = partial(collate, pad_token_id=self.tokenizer.pad_token_id)
        encoded = {
            "train": encode_examples(train_part, self.tokenizer, config.max_length),
            "heldout": encode_examples(heldout_part, self.tokenizer, config.max_length),
            "dev": encode_examples(dev_examples, self.tokenizer, config.max_length),
        }
        check_unknown_tokens(encoded["train"].input_ids, self.tokenizer, self.model_name)
        self.num_truncated = {name: split.num_truncated for name, split in encoded.items()}
        self.datasets = {name: EncodedDataset(split) for name, split in encoded.items()}
        self.sizes = {name: len(split) for name, split in encoded.items()}
        self.dev_split_name = dev_name
        if self.is_main:
            self._claim_run_folder(backbone)
        self.resume_point = self._load_resume_state()
        if self.is_main:
            logger.info("%s %s: %d train, %d held out (from train), %d %s rows; model %s (%d layers)",
                        self.name, self.task.name, self.sizes["train"], self.sizes["heldout"], self.sizes["dev"],
                        dev_name, self.model_name, self.model.encoder.num_steps)
            for name, count in self.num_truncated.items():
                if count:
                    logger.warning("%s: %d of %d examples longer than max_length=%d tokens were truncated",
                                   name, count, self.sizes[name], config.max_length)

    def _claim_run_folder(self, backbone: nn.Module) -> None:
        """Lock the run folder, clear it on ``--overwrite``, record ``run.json`` and the backbone's
        config and tokenizer (which make the folder self-contained for :func:`load_run`)."""
        self.lock = RunLock(self.run_dir)
        with errors.deferred_signals():  # an interrupt here must not leave a lock without an owner
            self.lock.acquire()
        if self.overwrite:
            removed = clear_run(self.run_dir)
            if removed:
                logger.info("--overwrite: removed %s from %s", ", ".join(removed), self.run_dir)
        try:
            backbone.config.save_pretrained(self.run_dir / BACKBONE_DIR)
            self.tokenizer.save_pretrained(self.run_dir / BACKBONE_DIR)
            record = {"recipe": self.name, "task": self.task.name, "model": self.model_name,
                      "config": common.config_to_dict(self.config), "data": self.data_record,
                      "command": common.command_line(f"recipes.{self.name}", self.argv)}
            text = json.dumps(record, indent=2)
            common._atomic_write(self.run_dir / RUN_FILE, lambda path: path.write_text(text, encoding="utf-8"))
        except OSError as error:
            raise errors.storage_error(error, f"writing into the run folder {self.run_dir}") from error

    def release(self) -> None:
        """Give the run folder up (remove the lock); safe to call more than once."""
        if self.lock is not None:
            self.lock.release()

    @property
    def is_main(self) -> bool:
        """Rank 0 (as set up; stays right after the process group is gone)."""
        return self.rank == 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoint"

    @property
    def best_stage1_path(self) -> Path:
        return self.run_dir / BEST_STAGE1_FILE

    def _wrap(self) -> nn.Module:
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(self.model, find_unused_parameters=True)
        return self.model

    def loader(self, name: str, shuffle: bool = False, epoch: int = 0) -> Any:
        """Batches of split ``name`` (``"train"``, ``"heldout"``, ``"dev"``), padded per batch."""
        if name != "train":
            return torch.utils.data.DataLoader(self.datasets[name], batch_size=self.config.eval_batch_size,
                                               collate_fn=self.collate)
        lengths = [len(ids) for ids in self.datasets[name].encoded.input_ids] if self.config.bucket_by_length else None
        return common.make_loader(self.datasets[name], self.config.batch_size, self.collate, shuffle, self.config.seed,
                                  epoch, lengths)

    # -- checkpoints -----------------------------------------------------------------------

    def _save(self, stage: int, epoch: int, optimizer: Any, scheduler: Any,
              new_best: dict[str, Tensor] | None = None) -> None:
        """Checkpoint the end of ``epoch`` of ``stage``: weights, optimizer, random generators and
        the best stage-1 weights (``new_best`` when this epoch is the best, else those of the
        last checkpoint), all or nothing; then publish the best weights as ``stage1_best.safetensors``."""
        if not self.is_main:
            return
        state = {
            "recipe": self.name, "task": self.task.name, "model": self.model_name, "stage": stage, "epoch": epoch,
            "config": common.config_to_dict(self.config), "data": self.data_record, "history": self.history,
            "best_stage1": self.best_stage1,
            "data_order": {"seed": self.config.seed, "epoch_offset": 0 if stage == 1 else 1000},
        }
        extra: dict[str, Any] = {}
        if new_best is not None:
            extra[BEST_STAGE1_FILE] = new_best
        elif self._best_source() is not None:
            extra[BEST_STAGE1_FILE] = self._best_source()
        with errors.deferred_signals():  # a SIGINT/SIGTERM now stops the run after the save
            common.save_checkpoint(self.checkpoint_dir, self.model.state_dict(), optimizer, state, scheduler,
                                   rng_state=common.capture_rng_state(), extra_files=extra)
            saved = json.loads((self.checkpoint_dir / common.STATE_FILE).read_text(encoding="utf-8"))
            self._best_sha256 = saved["files"].get(BEST_STAGE1_FILE)
            self.checkpointed = (stage, epoch)
            self._publish_best(self.checkpoint_dir)

    def _best_source(self) -> Path | None:
        """The best stage-1 weights of the last checkpoint, if it holds them."""
        path = self.checkpoint_dir / BEST_STAGE1_FILE
        return path if self._best_sha256 is not None and path.is_file() else None

    def _publish_best(self, checkpoint: Path) -> None:
        """``<run>/stage1_best.safetensors``: the checkpoint's best weights (a hard link, else a copy)."""
        source = checkpoint / BEST_STAGE1_FILE
        if not source.is_file():
            return
        if self.best_stage1_path.is_file() and os.path.samefile(source, self.best_stage1_path):
            return  # already published (rename() of one hard link onto another would do nothing)
        temporary = self.run_dir / f".{BEST_STAGE1_FILE}.tmp-{os.getpid()}"
        temporary.unlink(missing_ok=True)
        try:
            try:
                os.link(source, temporary)
            except OSError:
                shutil.copyfile(source, temporary)
            os.replace(temporary, self.best_stage1_path)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise errors.storage_error(error, f"writing {self.best_stage1_path}") from error

    def _restore_optimizer(self, optimizer: Any, scheduler: Any, payload: dict[str, Any] | None) -> None:
        if payload is None or payload.get("optimizer") is None:
            return
        try:
            optimizer.load_state_dict(payload["optimizer"])
            if payload.get("scheduler") is not None:
                scheduler.load_state_dict(payload["scheduler"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"optimizer state in {self.checkpoint_dir} does not match: {error}") from error

    def _load_resume_state(self) -> tuple[int, int, dict[str, Any]] | None:
        """``(stage, last completed epoch, optimizer payload)`` of the checkpoint, or None.

        Raises:
            ResumeMismatchError: the checkpoint is of another recipe, task or model, its config
                differs in a key outside :attr:`resume_allowed_keys`, or it was trained on
                other data rows.
        """
        if not self.resume:
            return None
        state_dict, state, payload = common.load_checkpoint(self.checkpoint_dir)
        loaded_from = Path(state["loaded_from"])
        for key, expected in (("recipe", self.name), ("task", self.task.name)):
            if state.get(key) != expected:
                raise ResumeMismatchError(
                    f"checkpoint in {loaded_from} is for {key} {state.get(key)!r}, this run is {expected!r}"
                )
        if state.get("stage") not in (1, 2) or not isinstance(state.get("epoch"), int):
            raise CheckpointError(f"checkpoint state in {loaded_from} has no valid stage/epoch")
        if state.get("model") is not None and not same_model(state["model"], self.model_name):
            raise ResumeMismatchError(f"the checkpoint in {loaded_from} was trained from model {state['model']}, "
                                      f"this run loads {self.model_name}; resume with the same --model")
        differences = config_differences(state.get("config", {}), common.config_to_dict(self.config),
                                         ("task", *self.resume_allowed_keys))
        if differences:
            raise ResumeMismatchError(
                f"the checkpoint in {loaded_from} was trained with another config ({'; '.join(differences)}); resume "
                f"with the same values (only {', '.join(self.resume_allowed_keys)} may change) or start a new run"
            )
        moved = compare_data(state.get("data"), self.data_record, f"the checkpoint in {loaded_from}")
        if moved:
            logger.warning("%s", moved)
        common.load_state_dict_strict(self.model, state_dict, str(loaded_from))
        self.history = state.get("history", self.history)
        self.best_stage1 = state.get("best_stage1")
        self._best_sha256 = state.get("files", {}).get(BEST_STAGE1_FILE)
        if self.best_stage1 is not None and self._best_sha256 is None:
            raise CheckpointError(f"the checkpoint in {loaded_from} records a best stage-1 epoch but holds no "
                                  f"{BEST_STAGE1_FILE}; it was written by an older version: start a new run")
        if loaded_from != self.checkpoint_dir and self.is_main:
            # The newest checkpoint was damaged: continue from the previous one, as if it were the newest.
            with errors.deferred_signals():
                if self.checkpoint_dir.exists():
                    shutil.rmtree(self.checkpoint_dir)
                os.replace(loaded_from, self.checkpoint_dir)
        if self.is_main:
            self._publish_best(self.checkpoint_dir)  # a crash may have cut off the last publication
        self.checkpointed = (state["stage"], state["epoch"])
        if payload.get("rng") is not None:
            common.restore_rng_state(payload["rng"])
        logger.info("resuming from %s: stage %d, epoch %d completed", loaded_from, state["stage"], state["epoch"])
        return state["stage"], state["epoch"], payload

    # -- evaluation on the held-out part of train ------------------------------------------

    @torch.no_grad()
    def evaluate_heldout(self) -> dict[str, float]:
        """Task metrics of the last head on the held-out split of train (``heldout_gate_mode`` gates)."""
        self.model.eval()
        metrics = GlueMetrics(self.task)
        for batch in self.loader("heldout"):
            inputs = {key: value for key, value in batch.items() if key == "token_type_ids"}
            logits = self.model.encoder(batch["input_ids"], batch["attention_mask"], gate_mode=self.heldout_gate_mode,
                                        heads="last", gate_threshold=self.gate_threshold, **inputs).logits
            metrics.update(logits[:, 0] if self.task.is_regression else logits.argmax(-1), batch["labels"])
        return metrics.compute()

    # -- stages ----------------------------------------------------------------------------

    def train(self) -> None:
        """Stage 1 from its first unfinished epoch, the best stage-1 weights, then stage 2."""
        stage, done_epoch, payload = self.resume_point if self.resume_point else (1, -1, None)
        if stage == 1:
            self.train_stage1(start_epoch=done_epoch + 1, payload=payload)
            self._reload_best_stage1()
            stage2_start, payload = 0, None
        else:
            stage2_start = done_epoch + 1
        if self.has_stage2:
            self.train_stage2(start_epoch=stage2_start, payload=payload)

    def train_stage1(self, start_epoch: int, payload: dict[str, Any] | None) -> None:
        config = self.config
        optimizer = torch.optim.AdamW(self.stage1_param_groups(), weight_decay=config.weight_decay)
        steps = config.stage1_epochs * len(self.loader("train", True))
        scheduler = common.linear_schedule(optimizer, steps, config.warmup_ratio)
        self._restore_optimizer(optimizer, scheduler, payload)
        trainable = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        model = self._wrap()
        for epoch in range(start_epoch, config.stage1_epochs):
            options = self.stage1_options(epoch)
            shown = "".join(f", {key}={value}" for key, value in options.items())
            self.model.train()
            stats = common.run_epoch(
                self.loader("train", True, epoch), lambda batch: model(batch, stage=1, **options), optimizer, trainable,
                f"{self.name} stage 1 epoch {epoch + 1}/{config.stage1_epochs}{shown}", scheduler,
                config.max_grad_norm, self._divergence_hint(1),
            )
            self._check_finite(trainable, f"stage 1 epoch {epoch + 1}", 1)
            heldout = self.evaluate_heldout()
            main_value = heldout[self.task.main_metric]
            self.history["stage1"].append({"epoch": epoch, **options, "loss": stats.loss, "seconds": stats.seconds,
                                           "samples_per_second": stats.samples_per_second, "heldout": heldout})
            if self.is_main:
                logger.info("stage 1 epoch %d: held-out %s", epoch + 1, heldout)
            # Every process evaluates the same held-out rows, so all agree on the best epoch.
            new_best = None
            if self.best_stage1 is None or main_value > self.best_stage1["value"]:
                self.best_stage1 = {"epoch": epoch, "metric": self.task.main_metric, "value": main_value}
                new_best = self._stage1_state()
            self._save(1, epoch, optimizer, scheduler, new_best)
        common.barrier()

    def _stage1_state(self) -> dict[str, Tensor]:
        prefixes = self.stage1_untrained_prefixes
        return {key: value for key, value in self.model.state_dict().items() if not (prefixes and key.startswith(prefixes))}

    def _divergence_hint(self, stage: int) -> str:
        """How to fix a diverged stage: the learning rates to lower, with their values."""
        config = self.config
        if stage == 2:
            return f"lower stage2_lr (now {config.stage2_lr:g}), e.g. stage2_lr={config.stage2_lr / 4:g}"
        extra = [f"{key} (now {getattr(config, key):g})" for key in ("stage1_head_lr", "gate_lr")
                 if getattr(config, key, 0)]
        return (f"lower stage1_lr (now {config.stage1_lr:g}), e.g. stage1_lr={config.stage1_lr / 4:g}"
                + (f", or {' / '.join(extra)}" if extra else ""))

    def _check_finite(self, parameters: Sequence[nn.Parameter], when: str, stage: int) -> None:
        """:class:`TrainingDivergedError` when a trained parameter holds NaN or infinity."""
        bad = sum(1 for parameter in parameters if not bool(torch.isfinite(parameter.detach()).all()))
        if bad:
            raise TrainingDivergedError(
                f"after {when}, {bad} of {len(parameters)} trained parameter tensors hold NaN or infinity: training "
                f"diverged; {self._divergence_hint(stage)} (the last good checkpoint, if any, is in "
                f"{self.checkpoint_dir}, but it would diverge the same way: start again with --overwrite)"
            )

    def _reload_best_stage1(self) -> None:
        """Stage 1 ends with the weights of its best held-out epoch (what stage 2 and the sweep use),
        read from the last checkpoint and checked against the checksum it recorded."""
        if self.best_stage1 is None:
            return
        if not self.is_main:  # rank 0 wrote the checkpoint (train_stage1 ends with a barrier)
            state = json.loads((self.checkpoint_dir / common.STATE_FILE).read_text(encoding="utf-8"))
            self._best_sha256 = state.get("files", {}).get(BEST_STAGE1_FILE)
        source = self.checkpoint_dir / BEST_STAGE1_FILE
        if self._best_sha256 is None or not source.is_file():
            raise CheckpointError(
                f"the best stage-1 weights (epoch {self.best_stage1['epoch'] + 1}) are missing from {self.checkpoint_dir}; "
                "the run folder was changed while it ran: start a new run (--overwrite)"
            )
        best = common.load_weights(source, sha256=self._best_sha256)
        prefixes = self.stage1_untrained_prefixes
        if prefixes:
            best.update({key: value for key, value in self.model.state_dict().items() if key.startswith(prefixes)})
        common.load_state_dict_strict(self.model, best, str(self.best_stage1_path))
        if self.best_stage1 is not None:  # epochs are 0-based in results.json, 1-based in the log
            logger.info("reloaded the best stage-1 weights: epoch %d, held-out %s %.4f", self.best_stage1["epoch"] + 1,
                        self.best_stage1["metric"], self.best_stage1["value"])

    def train_stage2(self, start_epoch: int, payload: dict[str, Any] | None) -> None:
        config = self.config
        trainable = self.model.freeze_for_stage2()
        if config.stage2_epochs == 0:
            return
        optimizer = torch.optim.AdamW(trainable, lr=config.stage2_lr, weight_decay=config.weight_decay)
        scheduler = common.linear_schedule(
            optimizer, config.stage2_epochs * len(self.loader("train", True)), config.warmup_ratio
        )
        self._restore_optimizer(optimizer, scheduler, payload)
        model = self._wrap()
        for epoch in range(start_epoch, config.stage2_epochs):
            self.model.train_stage2()
            stats = common.run_epoch(
                self.loader("train", True, 1000 + epoch), lambda batch: model(batch, stage=2), optimizer, trainable,
                f"{self.name} stage 2 epoch {epoch + 1}/{config.stage2_epochs}", scheduler, config.max_grad_norm,
                self._divergence_hint(2),
            )
            self._check_finite(trainable, f"stage 2 epoch {epoch + 1}", 2)
            self.history["stage2"].append({"epoch": epoch, "loss": stats.loss, "seconds": stats.seconds,
                                           "samples_per_second": stats.samples_per_second})
            self._save(2, epoch, optimizer, scheduler)

    # -- sweep -----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any] | None:
        """The dev sweep with the inference engine; writes ``results.json`` and ``plot.png`` (rank 0)."""
        # Training is over: end the process group, so that rank 0 evaluates alone and its
        # torchmetrics metrics compute locally instead of waiting for the other ranks.
        common.barrier()
        self.cleanup()
        if not self.is_main:
            return None
        config = self.config
        rows = common.run_sweep(
            self.model.encoder, self.loader("dev"), self.sweep_settings(), lambda: GlueMetrics(self.task),
            self.gate_threshold, config.padded_length,
        )
        main_metric = self.task.main_metric
        finished = _dt.datetime.now(_dt.timezone.utc)
        results = {
            "recipe": self.name, "task": self.task.name, "command": common.command_line(f"recipes.{self.name}", self.argv),
            "model": self.model_name, "data_dir": str(self.data_dir), "dev_split": self.dev_split_name,
            "config": common.config_to_dict(config), "started": self.started.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"), "wall_time_s": time.perf_counter() - self.start_time,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "sizes": self.sizes,
            "num_truncated": self.num_truncated, "main_metric": main_metric, "history": self.history,
            "best_stage1": self.best_stage1, "sweep": rows, "majority_class_baseline": self.majority_class_baseline(),
        }
        results.update(self.extra_results(rows))
        results["operating_point"] = calibrate_and_save(
            self.model.encoder, self.tokenizer, self.run_dir, self.sweep_settings(), self.loader("heldout"),
            self.loader("dev"), lambda: GlueMetrics(self.task), budget=config.calibration_budget,
            gate_threshold=self.gate_threshold, padded_length=config.padded_length, label_names=self.task.labels,
            max_length=config.max_length,
        )
        common.write_results(self.run_dir, results, main_metric)
        print(common.format_table(rows, list(self.task.metrics)))
        point = results["operating_point"]
        print(f"operating point (budget {point['budget']:.0%} of full-depth MACs, chosen on held-out): "
              f"{point['dev']['name']}: dev {point['dev']['metrics']}, relative cost (exact) "
              f"{point['dev']['relative_cost_exact']:.3f}")
        print(f"results: {self.run_dir / 'results.json'}  plot: {self.run_dir / 'plot.png'}  "
              f"model: {self.run_dir / point['model_dir']}")
        return results

    def majority_class_baseline(self) -> dict[str, float] | None:
        """Dev metrics of always answering train's most frequent label (what a model that learned
        nothing scores); ``None`` for regression."""
        if self.task.is_regression:
            return None
        train_labels = torch.tensor(self.datasets["train"].encoded.labels)
        dev_labels = torch.tensor(self.datasets["dev"].encoded.labels)
        baseline = GlueMetrics(self.task)
        baseline.update(torch.full_like(dev_labels, int(train_labels.mode().values)), dev_labels)
        return baseline.compute()

    def cleanup(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------
# Reloading a run, command line
# --------------------------------------------------------------------------------------


def load_run(run_dir: str | Path, recipe: str, config_class: type,
             build_encoder: Callable[[nn.Module, Any], AdaptiveEncoder], device: str | torch.device = "cpu",
             ) -> tuple[AdaptiveEncoder, Any, Any]:
    """Reload a finished (or interrupted) run for inference: ``(encoder in eval mode, tokenizer, config)``.

    A finished run is loaded from its saved model (``<run>/model``, with the calibrated operating
    point in ``encoder.adaptive_config``; no optimizer state needed). A run that stopped before
    saving it is rebuilt from its last training checkpoint. Either way the weights are the ones
    the sweep evaluates: after stage 2 when it ran, else those of the best stage-1 epoch.

    Args:
        run_dir: the run folder (holds ``checkpoint/`` and ``backbone/``).
        recipe: the recipe that must have written it.
        config_class: that recipe's config dataclass.
        build_encoder: ``(backbone, config) -> AdaptiveEncoder`` as the recipe builds it.
        device: where to put the model.

    Raises:
        CheckpointError: a missing, corrupt or mismatched checkpoint, or a run of another recipe.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    run_dir = Path(run_dir)
    if (run_dir / MODEL_DIR / "adaptive_config.json").is_file():
        return _load_saved_model(run_dir, recipe, config_class, device)
    backbone_dir = run_dir / BACKBONE_DIR
    if not (backbone_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} has no {BACKBONE_DIR}/config.json; is it a {recipe} run folder?")
    # No fallback to the previous checkpoint: it is not what the run's sweep evaluated.
    state_dict, state, _ = common.load_checkpoint(run_dir / "checkpoint", fallback=False)
    if state.get("recipe") != recipe:
        raise CheckpointError(f"{run_dir} is a {state.get('recipe')!r} run, not {recipe!r}")
    if state.get("stage") == 1 and state.get("best_stage1") is not None:
        # Without a stage 2 the run ends on (and evaluates) its best stage-1 epoch, not the last:
        # the checkpoint's copy, whose checksum load_checkpoint verified.
        best_path = Path(state["loaded_from"]) / BEST_STAGE1_FILE
        if "files" not in state:  # a checkpoint of an older version: the published copy
            best_path = run_dir / BEST_STAGE1_FILE
        if not best_path.is_file():
            raise CheckpointError(f"{run_dir} records a best stage-1 epoch but {best_path} is missing")
        state_dict = common.load_weights(best_path)
    config = config_class(**state["config"])
    backbone = AutoModel.from_config(AutoConfig.from_pretrained(backbone_dir))
    encoder = build_encoder(backbone, config)
    prefix = "encoder."
    weights = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    common.load_state_dict_strict(encoder, weights, str(run_dir / "checkpoint"))
    return encoder.eval().to(device), AutoTokenizer.from_pretrained(backbone_dir), config


def _load_saved_model(run_dir: Path, recipe: str, config_class: type, device: str | torch.device
                      ) -> tuple[AdaptiveEncoder, Any, Any]:
    """``load_run`` for a finished run: ``AdaptiveEncoder.from_pretrained(<run>/model)``."""
    import json

    from transformers import AutoTokenizer

    results_path = run_dir / "results.json"
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {results_path} ({error}); the run's records are missing") from error
    if results.get("recipe") != recipe:
        raise CheckpointError(f"{run_dir} is a {results.get('recipe')!r} run, not {recipe!r}")
    model_dir = run_dir / MODEL_DIR
    encoder = AdaptiveEncoder.from_pretrained(model_dir, device=device)
    return encoder, AutoTokenizer.from_pretrained(str(model_dir)), config_class(**results["config"])


def split_fingerprint(data_dir: Path, task: str, config: Any) -> dict[str, Any]:
    """:func:`recipes.run_folder.data_fingerprint` of the rows a run with ``config`` reads, as
    :meth:`TwoStageRecipe.setup` computes it (for ``benchmarks.tradeoff`` to check a run)."""
    glue_task = get_task(task)
    dev_name = glue_task.dev_splits[0]
    train = read_split(data_dir, glue_task, "train").examples[: config.max_train_rows or None]
    dev = read_split(data_dir, glue_task, dev_name).examples[: config.max_eval_rows or None]
    return data_fingerprint({"train": train, dev_name: dev}, data_dir)


def default_config_file(recipe: str, task: str) -> Path | None:
    """``recipes/configs/<recipe>_<task>.yaml`` if shipped."""
    path = CONFIG_DIR / f"{recipe}_{task}.yaml"
    return path if path.is_file() else None


def parse_args(recipe: str, description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line every recipe shares."""
    parser = argparse.ArgumentParser(prog=f"python -m recipes.{recipe}", description=description)
    parser.add_argument("--task", required=True, help=f"GLUE task: {', '.join(TASKS)}")
    parser.add_argument("--data-dir", default=None, help="glue_data folder (default: $GLUE_DIR)")
    parser.add_argument("--model", default=None, help="local model folder or HF id (default: all-MiniLM-L6-v2)")
    parser.add_argument("--config", default=None, help=f"YAML config (default: recipes/configs/{recipe}_<task>.yaml)")
    parser.add_argument("--output-dir", default=None, help=f"run folder (default: runs/{recipe}-<task>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir (its files are deleted)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser.parse_intermixed_args(argv)


def resume_command(recipe: str, argv: Sequence[str], run_dir: Path) -> str:
    """The command that continues this run: the same arguments with ``--output-dir`` (also when
    it was chosen by default) and ``--resume`` instead of ``--overwrite``."""
    import shlex

    arguments = [arg for arg in argv if arg not in ("--overwrite", "--resume")]
    if not any(arg == "--output-dir" or arg.startswith("--output-dir=") for arg in arguments):
        arguments += ["--output-dir", str(run_dir)]
    return " ".join(["python", "-m", f"recipes.{recipe}", *(shlex.quote(arg) for arg in arguments), "--resume"])


def interrupt_message(recipe: str, argv: Sequence[str], run_dir: Path | None, run: TwoStageRecipe | None) -> str:
    """What an interrupted run says: where it stopped and the exact command that continues it."""
    if run_dir is None or run is None or run.lock is None:
        return "nothing was written; run the same command again"
    if not common.has_checkpoint(run.checkpoint_dir):
        return (f"no epoch had finished, so {run_dir} holds no checkpoint; start again with: "
                f"{resume_command(recipe, argv, run_dir).removesuffix(' --resume')} --overwrite")
    where = "" if run.checkpointed is None else f" (last checkpoint: stage {run.checkpointed[0]}, epoch {run.checkpointed[1] + 1})"
    return f"resume with: {resume_command(recipe, argv, run_dir)}{where}"


def run_cli(recipe: str, description: str, config_class: type,
            make_recipe: Callable[[Any, Path, str | None, Path, bool], TwoStageRecipe],
            argv: Sequence[str] | None = None) -> int:
    """Parse the command line, then set up, train, evaluate; returns the exit status.

    Every user-facing failure (:mod:`recipes.errors`, bad GLUE data, an unsupported model) is
    one line, ``error: ...``, and status 2; SIGINT/SIGTERM print how to resume and give 130/143.

    Args:
        recipe: the recipe's name.
        description: one line for ``--help``.
        config_class: the recipe's config dataclass.
        make_recipe: ``(config, data_dir, model, run_dir, resume) -> TwoStageRecipe``.
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    from adaptive_depth.backbones import UnsupportedModelError
    from recipes.glue import GlueDataError

    common.setup_logging()
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    args = parse_args(recipe, description, argv)
    context: dict[str, Any] = {"run_dir": None, "run": None}

    def on_interrupt(_: errors.Interrupted) -> str:
        return interrupt_message(recipe, argv, context["run_dir"], context["run"])

    with errors.error_boundary(on_interrupt, handled=(GlueDataError, UnsupportedModelError)) as outcome, \
            errors.catch_signals():
        try:
            task = get_task(args.task)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        config_path = args.config or default_config_file(recipe, task.name)
        config = common.load_config(config_class, config_path, args.overrides, task=task.name)
        if config.task != task.name:
            raise ConfigError(f"--task {task.name} but the config asks for task {config.task!r} (from "
                              f"{'task=' if 'task' in common.parse_overrides(args.overrides) else config_path}); set "
                              "the task with --task only")
        data_dir = resolve_data_dir(args.data_dir)
        if args.output_dir:
            run_dir = Path(args.output_dir)
        elif args.resume:
            raise ConfigError("--resume needs --output-dir: the run folder to continue")
        else:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = Path("runs") / f"{recipe}-{task.name}-{stamp}"
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 owns the folder
            check_run_folder(run_dir, args.resume, args.overwrite)
        logger.info("%s: run folder %s; config %s", recipe, run_dir, config_path or "(defaults)")
        run = make_recipe(config, data_dir, args.model, run_dir, args.resume)
        run.argv, run.overwrite = argv, args.overwrite
        context.update(run_dir=run_dir, run=run)
        try:
            run.setup()
            run.train()
            run.evaluate()
            run.cleanup()
        finally:
            run.release()
    return outcome.status
