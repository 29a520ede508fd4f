"""The run composer: any :class:`~recipes.run.method.Method` on the loops every method shares.

* ``setup``: GLUE train (minus a seeded held-out part for model selection) and dev, the
  method's modules around the backbone, the run folder claimed (after the inputs are checked);
* ``train``: stage 1 (the method's stage-1 parameters; after every epoch the last head is
  scored on the held-out part and the best epoch's weights are kept, never chosen on dev);
  stage 2 for two-stage methods (the best stage-1 weights reloaded, everything but the
  method's stage-2 modules frozen); a checkpoint at the end of every epoch;
* ``evaluate``: the dev sweep with the inference engine, the operating point calibrated on the
  held-out part, the model saved to ``<run>/model``, ``results.json`` and ``plot.png``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptive_depth.exits import predictions_from_logits
from recipes.glue import GlueMetrics, encode_examples, get_task, holdout_split, majority_class_metrics, read_split
from recipes.run import distributed, input_checks, loop, models, sweep
from recipes.run.checkpoints import RunCheckpoints
from recipes.run.compat import RunIdentity
from recipes.run.config import OPERATING_POINT_KEYS, config_to_dict
from recipes.run.data import RunSplits, run_examples, split_fingerprint
from recipes.run.errors import ConfigError
from recipes.run.folder import (BEST_STAGE1_FILE, CHECKPOINT_DIR, PLOT_FILE, RESULTS_FILE, RunLock, lock_run_folder,
                                record_run)
from recipes.run.logs import logger
from recipes.run.method import Method
from recipes.run.operating_point import calibrate_and_save, describe_operating_point
from recipes.run.results import (BestEpoch, EpochRecord, RunResults, check_epochs_recorded, command_line,
                                 write_results)
from recipes.run.resume import adopt_stage1, resume_from_checkpoint

__all__ = ["Run"]


class Run:
    """One training run of ``method``: ``setup`` -> ``train`` -> ``evaluate`` -> ``cleanup``.

    Args:
        method: what to train and how to evaluate it.
        config: the method's config.
        data_dir: the ``glue_data`` folder.
        model_name: ``--model`` (``None``: the default all-MiniLM-L6-v2).
        run_dir: the run folder.
        resume: continue from the checkpoint in ``run_dir``.
        stage1_from: a finished run of the same method, task, model, data and stage-1 config whose
            stage 1 this run takes instead of training its own (``--stage1-from``): its best
            stage-1 weights, history and best epoch; this run trains only stage 2 (and may differ
            in :attr:`Method.stage2_keys <recipes.run.method.Method>`). Stage 2's random draws
            (dropout) then differ from the source run's, which drew them after its stage 1.
    """

    def __init__(self, method: Method, config: Any, data_dir: Path, model_name: str | None, run_dir: Path,
                 resume: bool, stage1_from: Path | None = None) -> None:
        self.method = method
        self.config = config
        self.data_dir = data_dir
        self.model_name = model_name
        self.run_dir = run_dir
        self.resume = resume
        self.stage1_from = stage1_from
        self.stage1_adopted = False
        self.task = get_task(config.task)
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.start_time = time.perf_counter()
        self.history: dict[str, list[EpochRecord]] = {"stage1": [], "stage2": []}
        self.best_stage1: BestEpoch | None = None
        self.argv: list[str] | None = None
        self.overwrite = False
        self.rank, self.world_size, self.device = 0, 1, torch.device("cpu")
        self.lock: RunLock | None = None
        self.data_record: dict[str, Any] | None = None
        self.resume_point: tuple[int, int, dict[str, Any]] | None = None
        self.checkpoints = RunCheckpoints(run_dir / CHECKPOINT_DIR, run_dir / BEST_STAGE1_FILE)

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def is_main(self) -> bool:
        """Rank 0 (as set up; stays right after the process group is gone)."""
        return self.rank == 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.checkpoints.folder

    @property
    def checkpointed(self) -> tuple[int, int] | None:
        """``(stage, epoch)`` of the last checkpoint written or resumed from."""
        return self.checkpoints.checkpointed

    @property
    def identity(self) -> RunIdentity:
        """What this run is (recipe, task, model, config, data rows), to check saved runs against."""
        return RunIdentity(recipe=self.name, task=self.task.name, model=self.model_name,
                           config=config_to_dict(self.config), config_class=type(self.config), data=self.data_record)

    # -- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        """Read and check the data and the model, claim the run folder (lock), with ``--resume``
        load and check the checkpoint, then record ``run.json`` and ``backbone/``. Nothing is
        written before the inputs (and a resumed checkpoint) are checked."""
        config = self.config
        self.rank, self.world_size, self.device = distributed.distributed_setup(config.device)
        self.checkpoints.is_main = self.is_main
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        distributed.seed_everything(config.seed)
        dev_name = self.task.dev_splits[0]
        train_examples, dev_examples = run_examples(self.data_dir, self.task.name, config)
        if len(train_examples) < 2:
            raise ConfigError(f"{len(train_examples)} training row(s) (max_train_rows={config.max_train_rows}): the run "
                              "needs at least 2, one of them held out for model selection; raise max_train_rows")
        train_part, heldout_part = holdout_split(train_examples, config.holdout_fraction, config.seed)
        self.data_record = split_fingerprint(self.data_dir, self.task.name, config, (train_examples, dev_examples))

        backbone, self.tokenizer, self.model_name = models.load_model_and_tokenizer(self.model_name)
        input_checks.check_model_inputs(backbone.config, self.tokenizer, config.max_length, self.model_name)
        try:
            self.model = self.method.build_model(backbone, config, self.task)
        except ValueError as error:  # a module rejected a size from the config
            raise ConfigError(f"cannot build the {self.name} model with this config: {error}") from error
        self.model.to(self.device)  # before a checkpoint's (CPU) weights are copied in, and the optimizers

        encoded = {
            "train": encode_examples(train_part, self.tokenizer, config.max_length),
            "heldout": encode_examples(heldout_part, self.tokenizer, config.max_length),
            "dev": encode_examples(dev_examples, self.tokenizer, config.max_length),
        }
        input_checks.check_unknown_tokens(encoded["train"].input_ids, self.tokenizer, self.model_name)
        # MNLI has a second dev set (mismatched genres): evaluated too, never used for any choice.
        for name in self.task.dev_splits[1:]:
            rows = read_split(self.data_dir, self.task, name).examples[: config.max_eval_rows or None]
            encoded[name] = encode_examples(rows, self.tokenizer, config.max_length)
        self.splits = RunSplits(encoded, config, self.tokenizer.pad_token_id, self.device)
        self.sizes, self.num_truncated, self.dev_split_name = self.splits.sizes, self.splits.num_truncated, dev_name
        if self.stage1_from is not None and not self.resume:  # checked before anything is written
            self._adopt_stage1(self.stage1_from)
        if self.is_main:
            self.lock = lock_run_folder(self.run_dir, self.overwrite)
        self.resume_point = self._load_resume_state()  # checked before run.json is rewritten
        if self.is_main:
            record_run(self.run_dir, {"recipe": self.name, "task": self.task.name, "model": self.model_name,
                                      "config": config_to_dict(config), "data": self.data_record,
                                      "command": command_line(f"recipes.{self.name}", self.argv)},
                       backbone.config, self.tokenizer)
            logger.info("%s %s: %d train, %d held out (from train), %d %s rows; model %s (%d layers)",
                        self.name, self.task.name, self.sizes["train"], self.sizes["heldout"], self.sizes["dev"],
                        dev_name, self.model_name, self.model.encoder.num_steps)
            for name, count in self.num_truncated.items():
                if count:
                    logger.warning("%s: %d of %d examples longer than max_length=%d tokens were truncated",
                                   name, count, self.sizes[name], config.max_length)

    def release(self) -> None:
        """Give the run folder up (remove the lock); safe to call more than once."""
        if self.lock is not None:
            self.lock.release()

    def _wrap(self) -> nn.Module:
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(self.model, device_ids=device_ids, find_unused_parameters=True)
        return self.model

    def loader(self, name: str, shuffle: bool = False, epoch: int = 0) -> Any:
        """Batches of split ``name`` (:meth:`recipes.run.data.RunSplits.loader`)."""
        return self.splits.loader(name, shuffle, epoch)

    # -- checkpoints -----------------------------------------------------------------------

    def _save(self, stage: int, epoch: int, optimizer: Any, scheduler: Any, new_best: dict[str, Any] | None = None
              ) -> None:
        state = {
            "recipe": self.name, "task": self.task.name, "model": self.model_name, "stage": stage, "epoch": epoch,
            "config": config_to_dict(self.config), "data": self.data_record,
            "history": {stage_name: [dataclasses.asdict(record) for record in records]
                        for stage_name, records in self.history.items()},
            "best_stage1": dataclasses.asdict(self.best_stage1) if self.best_stage1 else None,
            "data_order": {"seed": self.config.seed, "epoch_offset": 0 if stage == 1 else 1000},
        }
        self.checkpoints.save(stage, epoch, self.model, optimizer, scheduler, state, new_best)

    def _adopt_stage1(self, source: Path) -> None:
        """``--stage1-from``: the best stage-1 weights, stage-1 history and best epoch of the finished
        run in ``source`` (:func:`recipes.run.resume.adopt_stage1`)."""
        if not self.method.has_stage2:
            raise ConfigError(f"--stage1-from: {self.name} has no stage 2 to train on another run's stage 1")
        allowed = (*self.method.stage2_keys, *OPERATING_POINT_KEYS,
                   *(key for key in self.method.resume_allowed_keys if key != "stage1_epochs"))
        self.history["stage1"], self.best_stage1 = adopt_stage1(
            source, self.model, self.identity, allowed, self.config.stage1_epochs, self._untrained_in_stage1)
        self.stage1_adopted = True
        if self.is_main:
            logger.info("stage 1 taken from %s: best epoch %d, held-out %s %.4f", source, self.best_stage1.epoch + 1,
                        self.best_stage1.metric, self.best_stage1.value)

    def _load_resume_state(self) -> tuple[int, int, dict[str, Any]] | None:
        """``--resume``: ``(stage, last completed epoch, optimizer payload)`` of the checkpoint
        (:func:`recipes.run.resume.resume_from_checkpoint`), or ``None`` without ``--resume``."""
        if not self.resume:
            return None
        point = resume_from_checkpoint(self.checkpoints, self.model, self.identity, self.method, self.run_dir)
        self.history, self.best_stage1 = point.history, point.best_stage1
        return point.stage, point.epoch, point.payload

    # -- training --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_heldout(self) -> dict[str, float]:
        """Task metrics of the last head on the held-out split of train (the method's held-out gate mode)."""
        self.model.eval()
        metrics = GlueMetrics(self.task)
        for batch in self.loader("heldout"):
            inputs = {key: value for key, value in batch.items() if key == "token_type_ids"}
            logits = self.model.encoder(batch["input_ids"], batch["attention_mask"],
                                        gate_mode=self.method.heldout_gate_mode, heads="last", **inputs).logits
            metrics.update(predictions_from_logits(logits), batch["labels"])
        return metrics.compute()

    def train(self) -> None:
        """Stage 1 from its first unfinished epoch, the best stage-1 weights, then stage 2."""
        stage, done_epoch, payload = self.resume_point if self.resume_point else (1, -1, None)
        if self.stage1_adopted:  # --stage1-from: stage 1 is done; checkpoint it as this run's own
            done_epoch = self.config.stage1_epochs - 1
            self._save(1, done_epoch, None, None, new_best=self._stage1_state())
        if stage == 1:
            self.train_stage1(start_epoch=done_epoch + 1, payload=payload)
            self._reload_best_stage1()
            stage2_start, payload = 0, None
        else:
            stage2_start = done_epoch + 1
        if self.method.has_stage2:
            self.train_stage2(start_epoch=stage2_start, payload=payload)

    def train_stage1(self, start_epoch: int, payload: dict[str, Any] | None) -> None:
        config = self.config
        optimizer = torch.optim.AdamW(self.method.stage1_param_groups(self.model, config),
                                      weight_decay=config.weight_decay)
        steps = config.stage1_epochs * len(self.loader("train", True))
        scheduler = loop.linear_schedule(optimizer, steps, config.warmup_ratio)
        self.checkpoints.restore_optimizer(optimizer, scheduler, payload)
        trainable = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        if self.world_size > 1 and any(self.method.stage1_frozen(self.model, config, epoch)
                                       for epoch in range(start_epoch, config.stage1_epochs)):
            # DistributedDataParallel registers its gradient hooks once, on the parameters that
            # require a gradient when it wraps the model; freezing some per epoch is not supported.
            raise ConfigError(f"{self.name}: this config freezes part of the model in some stage-1 epochs "
                              "(e.g. gated_epochs_train=gates), which distributed training does not support; "
                              "train it in one process")
        model, hint = self._wrap(), loop.divergence_hint(config, 1)
        for epoch in range(start_epoch, config.stage1_epochs):
            options = self.method.stage1_options(config, epoch)
            frozen = self.method.stage1_frozen(self.model, config, epoch)
            shown = "".join(f", {key}={value}" for key, value in options.items())
            if frozen:
                shown += f", frozen={len(frozen)}/{len(trainable)} tensors"
            self.model.train()
            with loop.frozen(frozen):
                stats = loop.run_epoch(
                    self.loader("train", True, epoch), lambda batch: model(batch, stage=1, **options), optimizer,
                    trainable, f"{self.name} stage 1 epoch {epoch + 1}/{config.stage1_epochs}{shown}", scheduler,
                    config.max_grad_norm, hint,
                )
            loop.check_finite(trainable, f"stage 1 epoch {epoch + 1}", hint, self.checkpoint_dir)
            heldout = self.evaluate_heldout()
            main_value = heldout[self.task.main_metric]
            self.history["stage1"].append(EpochRecord(
                epoch=epoch, loss=stats.loss, terms=stats.terms, seconds=stats.seconds,
                samples_per_second=stats.samples_per_second, options=options, heldout=heldout))
            if self.is_main:
                logger.info("stage 1 epoch %d: held-out %s", epoch + 1, heldout)
            # Every process evaluates the same held-out rows, so all agree on the best epoch.
            new_best = None
            selectable = self.method.stage1_selectable(config, epoch)
            if selectable and (self.best_stage1 is None or main_value > self.best_stage1.value
                               or (math.isnan(self.best_stage1.value) and not math.isnan(main_value))):
                self.best_stage1 = BestEpoch(epoch=epoch, metric=self.task.main_metric, value=main_value)
                new_best = self._stage1_state()
            self._save(1, epoch, optimizer, scheduler, new_best)
        distributed.barrier()

    def _untrained_in_stage1(self, key: str) -> bool:
        prefixes = self.method.stage1_untrained_prefixes
        return bool(prefixes) and key.startswith(prefixes)

    def _stage1_state(self) -> dict[str, Any]:
        return {key: value for key, value in self.model.state_dict().items() if not self._untrained_in_stage1(key)}

    def _reload_best_stage1(self) -> None:
        """Stage 1 ends with the weights of its best held-out epoch (what stage 2 and the sweep use)."""
        if self.best_stage1 is None:
            return
        self.checkpoints.reload_best(self.model, self._untrained_in_stage1, self.best_stage1.epoch)
        # Epochs are 0-based in results.json, 1-based in the log.
        logger.info("reloaded the best stage-1 weights: epoch %d, held-out %s %.4f", self.best_stage1.epoch + 1,
                    self.best_stage1.metric, self.best_stage1.value)

    def train_stage2(self, start_epoch: int, payload: dict[str, Any] | None) -> None:
        config = self.config
        modules = self.method.stage2_modules(self.model)  # type: ignore[misc]
        trainable = loop.freeze_for_stage2(self.model, modules)
        if config.stage2_epochs == 0:
            return
        optimizer = torch.optim.AdamW(trainable, lr=config.stage2_lr, weight_decay=config.weight_decay)
        scheduler = loop.linear_schedule(
            optimizer, config.stage2_epochs * len(self.loader("train", True)), config.warmup_ratio
        )
        self.checkpoints.restore_optimizer(optimizer, scheduler, payload)
        model, hint = self._wrap(), loop.divergence_hint(config, 2)
        for epoch in range(start_epoch, config.stage2_epochs):
            loop.stage2_train_mode(self.model, modules)
            stats = loop.run_epoch(
                self.loader("train", True, 1000 + epoch), lambda batch: model(batch, stage=2), optimizer, trainable,
                f"{self.name} stage 2 epoch {epoch + 1}/{config.stage2_epochs}", scheduler, config.max_grad_norm, hint,
            )
            loop.check_finite(trainable, f"stage 2 epoch {epoch + 1}", hint, self.checkpoint_dir)
            self.history["stage2"].append(EpochRecord(
                epoch=epoch, loss=stats.loss, terms=stats.terms, seconds=stats.seconds,
                samples_per_second=stats.samples_per_second))
            self._save(2, epoch, optimizer, scheduler)

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self) -> RunResults | None:
        """The dev sweep, the calibrated operating point and the saved model; writes
        ``results.json`` and ``plot.png`` (rank 0)."""
        # Training is over: end the process group, so that rank 0 evaluates alone and its
        # torchmetrics metrics compute locally instead of waiting for the other ranks.
        distributed.barrier()
        self.cleanup()
        if not self.is_main:
            return None
        config, task, encoder = self.config, self.task, self.model.encoder
        check_epochs_recorded(self.history, config, self.method.has_stage2)
        settings = self.method.sweep_settings(config, task, encoder.num_steps)
        traces: dict[str, Any] = {}  # the full and skip-only passes, reused for the skipping statistics
        rows = sweep.run_sweep(encoder, self.loader("dev"), settings, lambda: GlueMetrics(task),
                               padded_length=config.padded_length, traces=traces)
        other_dev = {name: sweep.run_sweep(encoder, self.loader(name), settings, lambda: GlueMetrics(task),
                                           padded_length=config.padded_length)
                     for name in task.dev_splits[1:]}
        skipping = (sweep.skipping_statistics(encoder, self.loader("dev"), None, task.is_regression,
                                               traces) if encoder.has_gates else None)
        # Always answering train's most frequent label: what a model that learned nothing scores.
        majority = majority_class_metrics(task, self.splits.labels("train"), self.splits.labels("dev"))
        point = calibrate_and_save(
            encoder, self.tokenizer, self.run_dir, settings, self.loader("heldout"), self.loader("dev"),
            lambda: GlueMetrics(task), budget=config.calibration_budget,
            padded_length=config.padded_length, label_names=task.labels, max_length=config.max_length,
            rule=config.operating_point, max_risk=config.certify_max_risk, delta=config.certify_delta,
        )
        finished = _dt.datetime.now(_dt.timezone.utc)
        results = RunResults(
            recipe=self.name, task=task.name, command=command_line(f"recipes.{self.name}", self.argv),
            model=self.model_name, data_dir=str(self.data_dir), dev_split=self.dev_split_name,
            config=config_to_dict(config), started=self.started.isoformat(timespec="seconds"),
            finished=finished.isoformat(timespec="seconds"), wall_time_s=time.perf_counter() - self.start_time,
            torch=torch.__version__, threads=torch.get_num_threads(), sizes=self.sizes,
            num_truncated=self.num_truncated, main_metric=task.main_metric, history=self.history,
            best_stage1=self.best_stage1, sweep=rows, majority_class_baseline=majority, operating_point=point,
            extras=self.method.extra_results(config, task, rows, majority), other_dev_splits=other_dev,
            skipping=skipping,
        )
        write_results(self.run_dir, results)
        print(sweep.format_table(rows, list(task.metrics)))
        print(describe_operating_point(point, config.certify_max_risk, config.certify_delta))
        print(f"results: {self.run_dir / RESULTS_FILE}  plot: {self.run_dir / PLOT_FILE}  "
              f"model: {self.run_dir / point.model_dir}")
        return results

    def cleanup(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
