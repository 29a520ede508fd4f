"""Resume at its edges: a damaged published file, epoch keys changed after epochs were done, and a
run whose saved model was damaged.

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

from recipes.run import checkpoints as ckpt
from recipes.run import files
from tests.conftest import RECIPE_RUN_MARKS, approx_tree, assert_same_weights
from tests.conftest import TINY_SMARTBERT as TINY
from tests.test_recipe_runs import SCHEDULE, assert_one_error_line, base, interrupt_epoch, run_cli, without_timings
from tests.test_recipe_runs import reference  # noqa: F401 (a module fixture, shared)

pytestmark = RECIPE_RUN_MARKS

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
    as an uninterrupted one (and publishes the right file again)."""
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
    assert without_timings(json.loads((out / "results.json").read_text())) == approx_tree(reference["results"])
    assert_same_weights(ckpt.load_checkpoint(out / "checkpoint")[0], reference["weights"])
    assert published.read_bytes() == original  # published again from the checkpoint's copy
    assert len(set(inodes(out).values())) == len(inodes(out))


def test_a_damaged_checkpoint_copy_is_not_carried_into_the_next_checkpoint(tmp_path: Path) -> None:
    """The best weights are copied from one checkpoint to the next and checked against the digest
    the first one recorded: damage made in between stops the save instead of being recorded."""
    folder = tmp_path / "checkpoint"
    weights = {"w": torch.arange(4.0)}
    ckpt.save_checkpoint(folder, weights, None, {"epoch": 0}, extra_files={BEST: weights})
    recorded = json.loads((folder / ckpt.STATE_FILE).read_text())["files"][BEST]
    best = files.RecordedFile(folder / BEST, recorded)
    ckpt.save_checkpoint(folder, weights, None, {"epoch": 1}, extra_files={BEST: best})
    assert os.stat(folder / BEST).st_ino != os.stat(ckpt.previous_checkpoint(folder) / BEST).st_ino
    with (folder / BEST).open("r+b") as handle:
        handle.truncate(10)
    with pytest.raises(ckpt.CheckpointError, match="checksum differs"):
        ckpt.save_checkpoint(folder, weights, None, {"epoch": 2}, extra_files={BEST: best})
    assert json.loads((folder / ckpt.STATE_FILE).read_text())["epoch"] == 1  # nothing was swapped in
    assert not list(tmp_path.glob(".checkpoint.tmp-*"))


# -- epoch keys on --resume --------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run folders whose checkpoint is at four places (``SCHEDULE``: 2 + 2 epochs):
    ``finished`` (stage 2, epoch 2), ``stage2-not-started`` (stage1 done, ``stage2_epochs=0``),
    ``mid-stage1`` (stage 1, epoch 1) and ``mid-stage2`` (stage 2, epoch 1)."""
    folders: dict[str, Path] = {}
    for name, overrides, interrupted_epoch in (("finished", [], None), ("stage2-not-started", ["stage2_epochs=0"], None),
                                               ("mid-stage1", [], 2), ("mid-stage2", [], 4)):
        out = tmp_path_factory.mktemp(name) / "run"
        with pytest.MonkeyPatch.context() as patch:
            if interrupted_epoch is not None:
                interrupt_epoch(patch, interrupted_epoch, signal.SIGTERM)
            status = run_cli(*base(glue_dir, tiny_model_dir, out), *SCHEDULE, *overrides)
        assert status == (0 if interrupted_epoch is None else 128 + signal.SIGTERM)
        folders[name] = out
    return folders


def resume_argv(glue_dir: Path, tiny_model_dir: Path, out: Path, *overrides: str) -> list[str]:
    return [*base(glue_dir, tiny_model_dir, out), *SCHEDULE, "--resume", *overrides]


@pytest.mark.parametrize(("where", "override", "fragment"), [
    ("finished", "stage1_epochs=3", "stage 1 of the run in {out} was trained with stage1_epochs=2 and it finished "
                                    "its 2 epoch(s)"),
    ("finished", "stage1_epochs=1", "it has trained 2 epoch(s), which stage1_epochs=1 cannot take back"),
    ("finished", "stage2_epochs=3", "--stage1-from {out} --output-dir NEW stage2_epochs=3"),
    ("finished", "stage2_epochs=1", "it has trained 2 epoch(s), which stage2_epochs=1 cannot take back"),
    ("stage2-not-started", "stage1_epochs=3", "finished its 2 epoch(s), with the learning rate decayed to 0"),
    ("stage2-not-started", "stage1_epochs=1", "which stage1_epochs=1 cannot take back"),
    ("mid-stage1", "stage1_epochs=3", "it is at epoch 1 of 2, and its learning-rate schedule spans stage1_epochs"),
    ("mid-stage1", "stage1_epochs=1", "it is at epoch 1 of 2"),
    ("mid-stage2", "stage2_epochs=3", "stage 2 of the run in {out} was trained with stage2_epochs=2 and it is at "
                                      "epoch 1 of 2"),
    ("mid-stage2", "stage1_epochs=3", "stage 1 of the run in {out} was trained with stage1_epochs=2 and it finished"),
])
def test_resume_refuses_an_epoch_key_changed_for_a_started_stage(
    where: str, override: str, fragment: str, runs: dict[str, Path], tiny_model_dir: Path, glue_dir: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Raising or lowering ``stage1_epochs`` / ``stage2_epochs`` once that stage has trained an epoch
    is refused before anything is written: results.json never records epochs that were not trained
    (nor hides ones that were), and a resumed run always matches an uninterrupted one."""
    out = tmp_path / "run"
    shutil.copytree(runs[where], out)
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in out.rglob("*") if path.is_file()}
    capsys.readouterr()
    assert run_cli(*resume_argv(glue_dir, tiny_model_dir, out, override)) == 2
    key, value = override.split("=")
    line = assert_one_error_line(capsys.readouterr().err, f"--resume with {override}", fragment.format(out=out))
    assert f"Resume with {key}=2" in line
    assert {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in out.rglob("*") if path.is_file()} == before


def test_stage2_epochs_may_change_before_stage2_starts_and_match_an_uninterrupted_run(
    runs: dict[str, Path], reference: dict[str, Any], tiny_model_dir: Path, glue_dir: Path, tmp_path: Path,
) -> None:
    """A run that finished stage 1 with ``stage2_epochs=0``, resumed with ``stage2_epochs=2``, trains
    stage 2 and ends as the uninterrupted 2 + 2 run (up to float rounding)."""
    out = tmp_path / "run"
    shutil.copytree(runs["stage2-not-started"], out)
    assert run_cli(*resume_argv(glue_dir, tiny_model_dir, out, "stage2_epochs=2")) == 0
    results = without_timings(json.loads((out / "results.json").read_text()))
    assert [record["epoch"] for record in results["history"]["stage2"]] == [0, 1]
    assert results == approx_tree(reference["results"])
    assert_same_weights(ckpt.load_checkpoint(out / "checkpoint")[0], reference["weights"])


def test_reloading_a_run_whose_saved_model_was_damaged_is_a_checkpoint_error(runs: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    from recipes.run.trained import load_run

    out = tmp_path / "run"
    shutil.copytree(runs["finished"], out)
    heads = out / "model" / "adaptive_heads.safetensors"
    data = bytearray(heads.read_bytes())
    data[-1] ^= 1
    heads.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="saved model of .* cannot be loaded: .*adaptive_heads.safetensors "
                                                   "differs"):
        load_run(out, "smartbert")


def test_a_nan_held_out_score_does_not_stay_the_best_epoch(tiny_model_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """torchmetrics' Pearson is NaN on constant predictions (an STS-B head that has not learned yet); a NaN
    first epoch used to stay the best, since nothing compares greater than NaN."""
    from recipes.run.composer import Run
    from tests.glue_fixtures import write_synthetic_glue

    glue = write_synthetic_glue(tmp_path / "glue", "stsb", n_train=40, n_dev=16)
    scores = iter([float("nan"), 0.5, 0.9])
    measured = Run.evaluate_heldout
    monkeypatch.setattr(Run, "evaluate_heldout", lambda self: {**measured(self), "pearson": next(scores)})
    out = tmp_path / "run"
    assert run_cli("--task", "stsb", "--data-dir", str(glue), "--model", str(tiny_model_dir), "--output-dir", str(out),
                   *TINY, "stage1_epochs=3", "soft_epochs=1", "stage2_epochs=0", "regression_tolerances=[0.5]") == 0
    best = json.loads((out / "results.json").read_text())["best_stage1"]
    assert (best["epoch"], best["value"]) == (2, 0.9)


def test_a_run_stopped_between_its_saved_model_and_its_results_loads_from_its_checkpoint(
        tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import recipes.run.composer as composer
    from recipes import smartbert

    write_results = composer.write_results

    def interrupted(run_dir: Path, results: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)  # arrives right after <run>/model was saved
        return write_results(run_dir, results)

    monkeypatch.setattr(composer, "write_results", interrupted)
    out = tmp_path / "run"
    assert run_cli(*base(glue_dir, tiny_model_dir, out), "stage1_epochs=1", "soft_epochs=1", "stage2_epochs=1",
                   "entropy_thresholds=[0.3]") == 130
    assert (out / "model").is_dir() and not (out / "results.json").exists()
    encoder, _, config = smartbert.load_trained(out)
    assert config.stage2_epochs == 1 and encoder.num_steps == 2
