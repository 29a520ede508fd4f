"""A full disk, whichever writer meets it: recognised in Python's, torch's and safetensors' errors,
with injected errors and, where a tmpfs can be mounted (root), on a real 1-2 MB disk."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError

from adaptive_depth import AdaptiveEncoder, EntropyExit
from adaptive_depth.storage import as_storage_error, storage_errno
from recipes.run import checkpoints as ckpt
from recipes.run.errors import StorageError, error_boundary
from tests.conftest import assert_same_model, padded_batch, random_encoder, requires_minilm

TORCH_ZIP_FAILURE = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def torch_zip_error() -> RuntimeError:
    """What ``torch.save`` into a file object raises on a full disk (measured with torch 2.13)."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError(TORCH_ZIP_FAILURE)  # noqa: B904 (implicit context, as torch's)
    except RuntimeError as error:
        return error


@pytest.mark.parametrize(("error", "expected"), [
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
    (OSError(errno.EROFS, "Read-only file system"), errno.EROFS),
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), errno.ENOSPC),
    (RuntimeError("write(): fd 3 failed with No space left on device"), errno.ENOSPC),  # torch, legacy format
    (RuntimeError("I/O error: Disk quota exceeded (os error 122)"), errno.EDQUOT),
    (torch_zip_error(), errno.ENOSPC),
    (OSError(errno.ENOENT, "No such file or directory"), None),
    (RuntimeError(TORCH_ZIP_FAILURE), None),  # torch.save given a path: the cause is lost (write to a file object)
    (ValueError("size mismatch"), None),
])
def test_storage_errno_finds_the_errno_in_any_writer_error(error: BaseException, expected: int | None) -> None:
    assert storage_errno(error) == expected
    converted = as_storage_error(error, "somewhere")
    assert (converted is None) == (expected is None)
    if converted is not None:
        assert converted.errno == expected and (converted is error or converted.__cause__ is error)


@pytest.mark.parametrize("writer", ["safetensors", "torch"])
def test_a_checkpoint_save_that_meets_a_full_disk_is_a_storage_error(
    writer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The errors the writers really raise (not OSError) become the recipes' one-line StorageError,
    and the previous checkpoint is kept."""
    folder = tmp_path / "checkpoint"
    weights = {"w": torch.arange(3.0)}
    ckpt.save_checkpoint(folder, weights, None, {"epoch": 0})
    if writer == "safetensors":
        def failing(path: Path, tensors: Any) -> None:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(ckpt, "write_weights", failing)
    else:
        def failing_save(*args: Any, **kwargs: Any) -> None:
            raise torch_zip_error()

        monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(StorageError, match="saving the checkpoint .* No space left on device; the disk is full"):
        ckpt.save_checkpoint(folder, weights, None, {"epoch": 1})
    assert json.loads((folder / ckpt.STATE_FILE).read_text())["epoch"] == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint"]

    def main() -> int:
        with error_boundary() as outcome:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return outcome.status

    assert main() == 2
    assert capsys.readouterr().err.strip() == ("error: No space left on device; the disk is full: free some space "
                                               "or pass another --output-dir")


def test_save_pretrained_reports_a_full_disk_as_an_oserror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def failing_save_file(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    encoder = random_encoder("bert", seed=1)  # first: transformers binds save_file when it is imported
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError) as caught:
        encoder.save_pretrained(tmp_path / "model")
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value.__cause__, SafetensorError)
    assert list(tmp_path.iterdir()) == []  # no staging folder left


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A tmpfs of ``request.param`` bytes (e.g. ``"1m"``), mounted under ``tmp_path``; skipped
    where mounting is not allowed (it needs root, on Linux)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(mount_point)],
                             cwd=tmp_path, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], cwd=tmp_path, check=False)


@pytest.mark.parametrize("small_disk", ["1m"], indirect=True)
def test_save_pretrained_on_a_really_full_disk_keeps_the_old_model(small_disk: Path) -> None:
    first = random_encoder("bert", seed=1)  # ~0.2 MB in float64: fits
    folder = first.save_pretrained(small_disk / "model")
    from tests.conftest import tiny_model

    big = AdaptiveEncoder(tiny_model("bert"), num_labels=2)
    big.backbone.resize_token_embeddings(20000)  # 20000 x 32 float32 = 2.4 MB: does not fit
    with pytest.raises(OSError) as caught:
        big.save_pretrained(folder)
    assert caught.value.errno == errno.ENOSPC, caught.value
    assert sorted(path.name for path in small_disk.iterdir()) == ["model"]  # the staging folder is gone
    assert_same_model(first, AdaptiveEncoder.from_pretrained(folder), *padded_batch(), EntropyExit(0.5))


@pytest.mark.integration
@requires_minilm
@pytest.mark.parametrize("small_disk", ["2m"], indirect=True)
def test_a_run_whose_checkpoint_meets_a_really_full_disk_stops_with_one_line(
    small_disk: Path, tiny_model_dir: Path, glue_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The run folder's backbone/ (the tokenizer, ~1 MB) fits; the first checkpoint (the 30522-word
    embedding, ~4 MB) does not: safetensors' SafetensorError becomes one line, exit 2."""
    from tests.test_recipe_runs import assert_one_error_line, base, run_cli

    out = small_disk / "run"
    assert run_cli(*base(glue_dir, tiny_model_dir, out), "stage1_epochs=1", "stage2_epochs=0") == 2
    assert_one_error_line(capsys.readouterr().err, "saving the checkpoint", "No space left on device",
                          "the disk is full")
    assert not list(out.glob(".checkpoint.tmp-*")) and not (out / "checkpoint").exists()
