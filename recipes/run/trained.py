"""Reloading a run for inference, and the data fingerprint of the rows a run reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from adaptive_depth.encoder import AdaptiveEncoder
from recipes import checkpoint
from recipes.errors import CheckpointError
from recipes.glue import get_task
from recipes.methods import get_method
from recipes.operating_point import MODEL_DIR
from recipes.run import BACKBONE_DIR
from recipes.run_checkpoints import BEST_STAGE1_FILE

__all__ = ["load_run"]


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
    if (run_dir / MODEL_DIR / "adaptive_config.json").is_file():
        return _load_saved_model(run_dir, recipe, method.config_class, device)
    backbone_dir = run_dir / BACKBONE_DIR
    if not (backbone_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} has no {BACKBONE_DIR}/config.json; is it a {recipe} run folder?")
    # No fallback to the previous checkpoint: it is not what the run's sweep evaluated.
    state_dict, state, _ = checkpoint.load_checkpoint(run_dir / "checkpoint", fallback=False)
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
        state_dict = checkpoint.load_weights(best_path)
    config = method.config_class(**state["config"])
    backbone = AutoModel.from_config(AutoConfig.from_pretrained(backbone_dir))
    encoder = method.build_model(backbone, config, get_task(config.task)).encoder
    prefix = "encoder."
    weights = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    checkpoint.load_state_dict_strict(encoder, weights, str(run_dir / "checkpoint"))
    return encoder.eval().to(device), AutoTokenizer.from_pretrained(backbone_dir), config


def _load_saved_model(run_dir: Path, recipe: str, config_class: type, device: str | torch.device
                      ) -> tuple[AdaptiveEncoder, Any, Any]:
    """``load_run`` for a finished run: ``AdaptiveEncoder.from_pretrained(<run>/model)``."""
    from transformers import AutoTokenizer

    results_path = run_dir / "results.json"
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
