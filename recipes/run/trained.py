"""A trained run read back: its model for inference, and with it the rows and batches it was evaluated on.

* :func:`load_run`: ``(encoder, tokenizer, config)`` of a finished run (from ``<run>/model``) or
  of an interrupted one (rebuilt from its last checkpoint); what ``recipes.<method>.load_trained``
  calls.
* :func:`load_trained_run`: a finished run with its train and dev rows read from a data folder
  and checked to be the rows it was trained on (:func:`checked_rows`, :mod:`recipes.run.compat`),
  batched as the run batched them: what ``benchmarks.calibrated`` and ``benchmarks.heads``
  evaluate; ``python -m recipes.heldout`` writes the checked held-out rows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adaptive_depth.encoder import AdaptiveEncoder
from recipes.glue import GlueExample, GlueTask, get_task, holdout_split
from recipes.run.checkpoints import load_checkpoint
from recipes.run.compat import RunIdentity, check_compatible
from recipes.run.config import config_to_dict
from recipes.run.data import eval_batches, run_examples, split_fingerprint
from recipes.run.errors import CheckpointError
from recipes.run.folder import BACKBONE_DIR, BEST_STAGE1_FILE, CHECKPOINT_DIR, MODEL_DIR, RESULTS_FILE, read_run_record
from recipes.run.method import Method, get_method
from recipes.run.files import load_state_dict_strict, load_weights

__all__ = ["TrainedRun", "checked_rows", "load_run", "load_trained_run"]


def load_run(run_dir: str | Path, recipe: str, device: str | torch.device = "cpu") -> tuple[AdaptiveEncoder, Any, Any]:
    """Reload a finished (or interrupted) run for inference: ``(encoder in eval mode, tokenizer, config)``.

    A finished run is loaded from its saved model (``<run>/model``, with the calibrated operating
    point in ``encoder.adaptive_config``; no optimizer state needed). A run that stopped before
    saving it is rebuilt from its last training checkpoint. Either way the weights are the ones
    the sweep evaluates: after stage 2 when it ran, else those of the best stage-1 epoch.

    Args:
        run_dir: the run folder.
        recipe: the method that must have written it (``"smartbert"``, ``"fastbert"``...).
        device: where to put the model.

    Raises:
        CheckpointError: a missing, corrupt or mismatched checkpoint or saved model (its
            files are checked against their manifest), or a run of another recipe.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    method = get_method(recipe)
    run_dir = Path(run_dir)
    # The saved model counts once its results are written too (an interrupt between the two leaves the checkpoint).
    if (run_dir / MODEL_DIR / "adaptive_config.json").is_file() and (run_dir / RESULTS_FILE).is_file():
        return _load_saved_model(run_dir, recipe, method.config_class, device)
    backbone_dir = run_dir / BACKBONE_DIR
    if not (backbone_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} has no {BACKBONE_DIR}/config.json; is it a {recipe} run folder?")
    # No fallback to the previous checkpoint: it is not what the run's sweep evaluated.
    state_dict, state, _ = load_checkpoint(run_dir / CHECKPOINT_DIR, fallback=False)
    if state.get("recipe") != recipe:
        raise CheckpointError(f"{run_dir} is a {state.get('recipe')!r} run, not {recipe!r}")
    if state.get("stage") == 1 and state.get("best_stage1") is not None:
        # Without a stage 2 the run ends on (and evaluates) its best stage-1 epoch, not the last:
        # the checkpoint's copy, whose checksum load_checkpoint verified.
        best_path = Path(state["loaded_from"]) / BEST_STAGE1_FILE
        if not best_path.is_file():
            raise CheckpointError(f"{run_dir} records a best stage-1 epoch but {best_path} is missing")
        state_dict = load_weights(best_path)
    config = method.config_class(**state["config"])
    backbone = AutoModel.from_config(AutoConfig.from_pretrained(backbone_dir))
    encoder = method.build_model(backbone, config, get_task(config.task)).encoder
    prefix = "encoder."
    weights = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    load_state_dict_strict(encoder, weights, str(run_dir / CHECKPOINT_DIR))
    return encoder.eval().to(device), AutoTokenizer.from_pretrained(backbone_dir), config


def _load_saved_model(run_dir: Path, recipe: str, config_class: type, device: str | torch.device
                      ) -> tuple[AdaptiveEncoder, Any, Any]:
    """``load_run`` for a finished run: ``AdaptiveEncoder.from_pretrained(<run>/model)``."""
    from transformers import AutoTokenizer

    results_path = run_dir / RESULTS_FILE
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {results_path} ({error}); the run's records are missing") from error
    if results.get("recipe") != recipe:
        raise CheckpointError(f"{run_dir} is a {results.get('recipe')!r} run, not {recipe!r}")
    model_dir = run_dir / MODEL_DIR
    try:
        encoder = AdaptiveEncoder.from_pretrained(model_dir, device=device)
    except (ValueError, FileNotFoundError) as error:  # ModelFolderError: a damaged or edited file
        raise CheckpointError(f"the saved model of {run_dir} cannot be loaded: {error}") from error
    return encoder, AutoTokenizer.from_pretrained(str(model_dir)), config_class(**results["config"])


@dataclass
class TrainedRun:
    """A finished run with the rows it was trained and evaluated on (:func:`load_trained_run`).

    Attributes:
        method: the method that made it.
        run_dir: its folder.
        encoder: the trained model in eval mode, at its saved operating point.
        tokenizer: its tokenizer.
        config: its config.
        task: its GLUE task.
        examples: ``(train rows, dev rows)`` as the run read them (:func:`recipes.run.data.run_examples`).
    """

    method: Method
    run_dir: Path
    encoder: AdaptiveEncoder
    tokenizer: Any
    config: Any
    task: GlueTask
    examples: tuple[list[GlueExample], list[GlueExample]]

    @property
    def heldout_rows(self) -> list[GlueExample]:
        """The part of train the run held out for model selection and calibration."""
        return holdout_split(self.examples[0], self.config.holdout_fraction, self.config.seed)[1]

    def batches(self, rows: list[GlueExample]) -> list[dict[str, Tensor]]:
        """``rows`` batched as the run batched held-out and dev rows (:func:`recipes.run.data.eval_batches`)."""
        return eval_batches(rows, self.tokenizer, self.config)


def checked_rows(run_dir: Path, data_dir: Path, method: Method, config: Any,
                 record: Mapping[str, Any] | None = None) -> tuple[list[GlueExample], list[GlueExample]]:
    """The train and dev rows of the run in ``run_dir`` (made by ``method`` with ``config``), read
    from ``data_dir`` and checked against its ``run.json`` (``record``, when already read): the rows
    it was trained, selected and calibrated on.

    Raises:
        ResumeMismatchError: ``data_dir`` holds other rows (or the folder has no ``run.json``).
    """
    examples = run_examples(data_dir, config.task, config)
    record = read_run_record(run_dir) if record is None else record
    current = RunIdentity(recipe=method.name, task=config.task, model=str(record.get("model")),
                          config=config_to_dict(config), config_class=method.config_class,
                          data=split_fingerprint(data_dir, config.task, config, examples))
    check_compatible(record, current, what=str(run_dir), allowed=(), fix=None)
    return examples


def load_trained_run(method_name: str, run_dir: Path, data_dir: Path) -> TrainedRun:
    """A finished run of ``method_name`` (:func:`load_run`) with its rows read from ``data_dir``,
    checked to be those it was trained and selected on (:func:`checked_rows`).

    Raises:
        CheckpointError: ``run_dir`` is not a run of ``method_name``.
        ResumeMismatchError: ``data_dir`` holds other rows (or the folder has no ``run.json``).
    """
    method = get_method(method_name)
    encoder, tokenizer, config = load_run(run_dir, method_name)
    examples = checked_rows(run_dir, data_dir, method, config)
    return TrainedRun(method, Path(run_dir), encoder, tokenizer, config, get_task(config.task), examples)
