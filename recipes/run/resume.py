"""Starting from a checkpoint: ``--resume`` (the run's own) and ``--stage1-from`` (another run's stage 1).

Both read a checkpoint's state, check it against this run with the one compatibility rule
(:func:`recipes.run.compat.check_compatible`), load its weights (checked against the checksums it
recorded) and return the training record to continue from; :class:`recipes.run.composer.Run`
calls them during ``setup``, before it trains. ``--resume`` may change an epoch key only as far
as :func:`check_resume_epochs` allows: a resumed run is bit-identical to an uninterrupted one on the
same device (another ``device`` is allowed, with a warning: :mod:`recipes.run.device`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from recipes.run.checkpoints import STATE_FILE, RunCheckpoints
from recipes.run.compat import RunIdentity, check_compatible
from recipes.run.device import device_change_warning
from recipes.run.errors import CheckpointError, ResumeMismatchError
from recipes.run.folder import BEST_STAGE1_FILE, CHECKPOINT_DIR
from recipes.run.method import Method
from recipes.run.results import BestEpoch, EpochRecord
from recipes.run.files import load_state_dict_strict, load_weights
from recipes.run.logs import logger

__all__ = ["ResumePoint", "adopt_stage1", "check_resume_epochs", "resume_from_checkpoint"]


@dataclass
class ResumePoint:
    """Where a resumed run continues.

    Attributes:
        stage, epoch: the last completed epoch (0-based) of that stage.
        payload: the optimizer, scheduler and random-generator states of the checkpoint.
        history: the epochs trained so far, per stage.
        best_stage1: the best stage-1 epoch so far (``None``: none yet).
    """

    stage: int
    epoch: int
    payload: dict[str, Any]
    history: dict[str, list[EpochRecord]]
    best_stage1: BestEpoch | None


def resume_from_checkpoint(checkpoints: RunCheckpoints, model: nn.Module, identity: RunIdentity, method: Method,
                           run_dir: Path) -> ResumePoint:
    """``--resume``: load the run's newest readable checkpoint into ``model`` and make it current
    (random generators restored, best weights published).

    Args:
        checkpoints: the run's checkpoints.
        model: the freshly built module the checkpoint's weights go into.
        identity: this run (checked against the checkpoint's state).
        method: its method (the config keys a resume may change: ``resume_allowed_keys``).
        run_dir: the run folder (named in the advice).

    Raises:
        CheckpointError: no readable checkpoint, or weights that do not fit ``model``.
        ResumeMismatchError: the checkpoint is of another recipe, task or model, its config differs
            in a key outside the method's ``resume_allowed_keys``, an epoch key changed for a
            stage that started (:func:`check_resume_epochs`), or it was trained on other data rows.
    """
    state_dict, state, payload = checkpoints.load_for_resume()
    loaded_from = Path(state["loaded_from"])
    check_compatible(state, identity, what=f"the checkpoint in {loaded_from}", allowed=method.resume_allowed_keys,
                     made="was trained", fix="start a new run (--overwrite or another --output-dir)")
    check_resume_epochs(state.get("config", {}), identity.config, state["stage"], state["epoch"], run_dir,
                        method.has_stage2)
    _warn_device_change(state, identity, f"the checkpoint in {loaded_from}")
    load_state_dict_strict(model, state_dict, str(loaded_from))
    history = {stage: [EpochRecord(**record) for record in records]
               for stage, records in state.get("history", {"stage1": [], "stage2": []}).items()}
    best_stage1 = BestEpoch(**state["best_stage1"]) if state.get("best_stage1") else None
    checkpoints.adopt(state, payload)
    return ResumePoint(state["stage"], state["epoch"], payload, history, best_stage1)


def adopt_stage1(source: Path, model: nn.Module, identity: RunIdentity, allowed: Iterable[str], stage1_epochs: int,
                 untrained: Callable[[str], bool]) -> tuple[list[EpochRecord], BestEpoch]:
    """``--stage1-from``: load the best stage-1 weights of the finished run in ``source`` into ``model``.

    Args:
        source: the other run's folder.
        model: this run's module; its keys for which ``untrained(key)`` is true (what stage 1
            never trains) keep their values.
        identity: this run (checked against the source's checkpoint).
        allowed: config keys that may differ from the source's (those that change only stage 2).
        stage1_epochs: this run's stage-1 epochs (the source must have finished them).
        untrained: whether a state-dict key belongs to a module stage 1 never trains.

    Returns:
        ``(the source's stage-1 epochs, its best stage-1 epoch)``.

    Raises:
        CheckpointError: ``source`` holds no checkpoint that finished stage 1, or its best stage-1
            weights are missing or damaged.
        ResumeMismatchError: it is a run of another recipe, task, model or data, or its config
            differs in a key outside ``allowed``.
    """
    what = f"--stage1-from {source}"
    folder = source / CHECKPOINT_DIR
    state_path = folder / STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{what}: no {state_path}; give the folder of a {identity.recipe} run that finished "
                              "stage 1") from None
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{what}: cannot read {state_path} ({error})") from None
    check_compatible(state, identity, what=what, allowed=allowed, made="trained stage 1",
                     fix="train stage 1 too (leave out --stage1-from)")
    _warn_device_change(state, identity, what)
    stage, epoch = state.get("stage"), state.get("epoch")
    if not state.get("best_stage1") or not (stage == 2 or (stage == 1 and epoch == stage1_epochs - 1)):
        raise CheckpointError(f"{what} has not finished stage 1 (its checkpoint is at stage {stage}, epoch "
                              f"{epoch if not isinstance(epoch, int) else epoch + 1}); finish it (--resume) first")
    best = load_weights(folder / BEST_STAGE1_FILE, sha256=state.get("files", {}).get(BEST_STAGE1_FILE))
    best.update({key: value for key, value in model.state_dict().items() if untrained(key)})
    load_state_dict_strict(model, best, str(folder / BEST_STAGE1_FILE))
    history = [EpochRecord(**record) for record in state.get("history", {}).get("stage1", [])]
    return history, BestEpoch(**state["best_stage1"])


def _warn_device_change(state: Mapping[str, Any], identity: RunIdentity, what: str) -> None:
    warning = device_change_warning(state.get("config") or {}, identity.config, what)
    if warning:
        logger.warning("%s", warning)


def check_resume_epochs(saved: Mapping[str, Any], current: Mapping[str, Any], stage: int, epoch: int,
                        run_dir: Path, has_stage2: bool) -> None:
    """Refuse an epoch key (``stage1_epochs``, ``stage2_epochs``) that ``--resume`` changes for a
    stage that has trained an epoch; ``stage2_epochs`` may change while stage 2 has not started.

    A stage's learning rate warms up and decays to 0 over its epoch count, so changing it after
    the stage started would give a run that no uninterrupted run matches: raising it trains
    more epochs on a restarted schedule, lowering it below the epochs done would record epochs
    that were trained as not trained. Resumed runs are bit-identical to uninterrupted ones.

    Args:
        saved, current: the checkpoint's config and this run's (as dicts).
        stage, epoch: the checkpoint's stage (1 or 2) and last completed epoch (0-based).
        run_dir: the run folder (named in the advice).
        has_stage2: whether the method trains a stage 2.

    Raises:
        ResumeMismatchError: an epoch key changed for a started stage (says what to do instead).
    """
    started = {1: epoch + 1 if stage == 1 else saved.get("stage1_epochs")}
    if has_stage2 and stage == 2:
        started[2] = epoch + 1
    for number, done in started.items():
        key = f"stage{number}_epochs"
        before, after = saved.get(key), current.get(key)
        if before == after or before is None:
            continue
        if after < done:
            what = f"it has trained {done} epoch(s), which {key}={after} cannot take back"
        elif stage > number or done >= before:
            what = (f"it finished its {before} epoch(s), with the learning rate decayed to 0; {key}={after} would "
                    "train more on a restarted schedule")
        else:
            what = (f"it is at epoch {done} of {before}, and its learning-rate schedule spans {key}, so it cannot "
                    "change mid-stage")
        if number == 1:
            fix = f"start a new run with {key}={after} (--overwrite or another --output-dir)"
        else:
            fix = f"train stage 2 again in a new run on this stage 1: --stage1-from {run_dir} --output-dir NEW {key}={after}"
        raise ResumeMismatchError(f"--resume with {key}={after}: stage {number} of the run in {run_dir} was trained "
                                  f"with {key}={before} and {what}. Resume with {key}={before}, or {fix}")
