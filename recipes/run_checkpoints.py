"""A run's checkpoints: saved as a whole at the end of every epoch, with the best stage-1 weights,
checked when resumed, and the best stage-1 weights published as ``<run>/stage1_best.safetensors``."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from recipes import checkpoint, errors
from recipes.errors import CheckpointError
from recipes.logs import logger

__all__ = ["BEST_STAGE1_FILE", "RunCheckpoints"]

BEST_STAGE1_FILE = "stage1_best.safetensors"


class RunCheckpoints:
    """The ``checkpoint/`` folder of one run and the best stage-1 weights it holds.

    Args:
        run_dir: the run folder.
        is_main: whether this process writes (rank 0).
    """

    def __init__(self, run_dir: Path, is_main: bool = True) -> None:
        self.run_dir = run_dir
        self.is_main = is_main
        self.best_sha256: str | None = None  # of the best stage-1 weights the last checkpoint holds
        self.checkpointed: tuple[int, int] | None = None  # (stage, epoch) of the last checkpoint

    @property
    def folder(self) -> Path:
        return self.run_dir / "checkpoint"

    @property
    def best_path(self) -> Path:
        """The published best stage-1 weights."""
        return self.run_dir / BEST_STAGE1_FILE

    def save(self, stage: int, epoch: int, model: nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any],
             new_best: Mapping[str, Tensor] | None = None) -> None:
        """Checkpoint the end of ``epoch`` of ``stage``: weights, optimizer, random generators and
        the best stage-1 weights (``new_best`` when this epoch is the best, else those of the last
        checkpoint), all or nothing; then publish the best weights."""
        if not self.is_main:
            return
        extra: dict[str, Any] = {}
        source = self.best_source()
        if new_best is not None:
            extra[BEST_STAGE1_FILE] = new_best
        elif source is not None:
            extra[BEST_STAGE1_FILE] = source
        with errors.deferred_signals():  # a SIGINT/SIGTERM now stops the run after the save
            checkpoint.save_checkpoint(self.folder, model.state_dict(), optimizer, state, scheduler,
                                       rng_state=checkpoint.capture_rng_state(), extra_files=extra)
            saved = json.loads((self.folder / checkpoint.STATE_FILE).read_text(encoding="utf-8"))
            self.best_sha256 = saved["files"].get(BEST_STAGE1_FILE)
            self.checkpointed = (stage, epoch)
            self.publish_best()

    def best_source(self) -> checkpoint.RecordedFile | None:
        """The best stage-1 weights of the last checkpoint and their recorded digest, if it holds them."""
        path = self.folder / BEST_STAGE1_FILE
        return checkpoint.RecordedFile(path, self.best_sha256) if self.best_sha256 is not None and path.is_file() \
            else None

    def publish_best(self) -> None:
        """``<run>/stage1_best.safetensors``: a copy of the checkpoint's best weights, checked against
        the digest the checkpoint recorded and renamed into place. Never a hard link: a write into
        the published file (``cp`` over it, a truncation) must not reach the checkpoints."""
        source = self.best_source()
        if source is None:
            return
        published = self.best_path
        if (published.is_file() and not os.path.samefile(source.path, published)
                and checkpoint.file_digest(published) == source.sha256):
            return  # already published
        try:
            checkpoint.atomic_write(published, lambda temporary: checkpoint.copy_verified(source, temporary))
        except Exception as error:
            converted = errors.storage_error(error, f"writing {published}")
            if converted is error:
                raise
            raise converted from error

    def restore_optimizer(self, optimizer: Any, scheduler: Any, payload: dict[str, Any] | None) -> None:
        """Load the optimizer and scheduler state of a resumed checkpoint into fresh ones."""
        if payload is None or payload.get("optimizer") is None:
            return
        try:
            optimizer.load_state_dict(payload["optimizer"])
            if payload.get("scheduler") is not None:
                scheduler.load_state_dict(payload["scheduler"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"optimizer state in {self.folder} does not match: {error}") from error

    def load_for_resume(self) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
        """``(weights, state, payload)`` of the newest readable checkpoint, made the newest one,
        its best weights published and the random generators restored.

        The caller checks ``state`` against the run before using the weights (recipe, task,
        model, config, data).
        """
        state_dict, state, payload = checkpoint.load_checkpoint(self.folder)
        loaded_from = Path(state["loaded_from"])
        if state.get("stage") not in (1, 2) or not isinstance(state.get("epoch"), int):
            raise CheckpointError(f"checkpoint state in {loaded_from} has no valid stage/epoch")
        self.best_sha256 = state.get("files", {}).get(BEST_STAGE1_FILE)
        if state.get("best_stage1") is not None and self.best_sha256 is None:
            raise CheckpointError(f"the checkpoint in {loaded_from} records a best stage-1 epoch but holds no "
                                  f"{BEST_STAGE1_FILE}; it was written by an older version: start a new run")
        return state_dict, state, payload

    def adopt(self, state: dict[str, Any], payload: dict[str, Any]) -> None:
        """Make the checkpoint just loaded the newest one (it may be the fallback), publish its best
        weights and restore the random generators: the run continues exactly from there."""
        loaded_from = Path(state["loaded_from"])
        if loaded_from != self.folder and self.is_main:
            # The newest checkpoint was damaged: continue from the previous one, as if it were the newest.
            with errors.deferred_signals():
                if self.folder.exists():
                    shutil.rmtree(self.folder)
                os.replace(loaded_from, self.folder)
        if self.is_main:
            self.publish_best()  # a crash may have cut off the last publication
        self.checkpointed = (state["stage"], state["epoch"])
        if payload.get("rng") is not None:
            checkpoint.restore_rng_state(payload["rng"])
        logger.info("resuming from %s: stage %d, epoch %d completed", loaded_from, state["stage"], state["epoch"])

    def reload_best(self, model: nn.Module, keep: Callable[[str], bool], best_epoch: int) -> None:
        """Load the best stage-1 weights of the last checkpoint into ``model``, checked against the
        checksum it recorded; keys for which ``keep(key)`` is true keep their current values."""
        if not self.is_main:  # rank 0 wrote the checkpoint (stage 1 ends with a barrier)
            state = json.loads((self.folder / checkpoint.STATE_FILE).read_text(encoding="utf-8"))
            self.best_sha256 = state.get("files", {}).get(BEST_STAGE1_FILE)
        source = self.folder / BEST_STAGE1_FILE
        if self.best_sha256 is None or not source.is_file():
            raise CheckpointError(
                f"the best stage-1 weights (epoch {best_epoch + 1}) are missing from {self.folder}; "
                "the run folder was changed while it ran: start a new run (--overwrite)"
            )
        best = checkpoint.load_weights(source, sha256=self.best_sha256)
        best.update({key: value for key, value in model.state_dict().items() if keep(key)})
        checkpoint.load_state_dict_strict(model, best, str(self.best_path))
