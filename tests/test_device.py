"""The recipes' ``device`` key: checked once, batches moved by one helper, the CPU path unchanged.

There is no GPU here: CUDA is faked (``torch.cuda.is_available`` / ``device_count``) for the
checks, batches move to the ``meta`` device, and a ``gpu``-marked test runs a tiny recipe on CUDA
where one exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from recipes.run.config import RESUME_ALLOWED_KEYS, RecipeConfig, load_config
from recipes.run.device import DeviceLoader, check_device_name, device_change_warning, move_batch, resolve_device
from recipes.run.errors import ConfigError
from tests.conftest import approx_tree, requires_minilm
from tests.conftest import run_smartbert as run_cli
from tests.test_recipe_runs import base, without_timings

SHORT = ["stage1_epochs=1", "soft_epochs=1", "stage2_epochs=1", "entropy_thresholds=[0.3]"]


def fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:0", "cuda:12"])
def test_good_device_names_are_kept(name: str) -> None:
    assert check_device_name(name) == name
    assert load_config(RecipeConfig, overrides=[f"device={name}"]).device == name


@pytest.mark.parametrize("name", ["gpu", "CPU", "cuda:", "cuda:-1", "cuda:01", "cuda:x", "cuda0", "mps", "cuda:0 ", ""])
def test_bad_device_names_are_config_errors_listing_the_good_ones(name: str) -> None:
    with pytest.raises(ConfigError, match=r"device must be 'cpu', 'cuda' or 'cuda:N'"):
        load_config(RecipeConfig, overrides=[f"device={name!r}"])


def test_the_default_device_is_the_cpu_and_a_resume_may_change_it() -> None:
    assert RecipeConfig().device == "cpu" and resolve_device("cpu") == torch.device("cpu")
    assert "device" in RESUME_ALLOWED_KEYS


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_is_refused_naming_device_cpu(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 0)
    with pytest.raises(ConfigError, match=rf"device={name}, but this machine has no CUDA device.*device=cpu"):
        resolve_device(name)


def test_cuda_devices_resolve_to_an_index_the_machine_has(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 2)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"2 CUDA device\(s\), cuda:0 to cuda:1, so there is no cuda:2"):
        resolve_device("cuda:2")


def test_under_torchrun_each_process_takes_its_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda", world_size=2) == torch.device("cuda", 1)
    assert resolve_device("cpu", world_size=2) == torch.device("cpu")
    with pytest.raises(ConfigError, match="would put every process on one GPU; give device=cuda"):
        resolve_device("cuda:0", world_size=2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match="no cuda:2 .*start fewer processes per node"):
        resolve_device("cuda", world_size=4)


def test_move_batch_moves_every_tensor_and_leaves_the_rest_alone() -> None:
    marker = object()
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "labels": torch.zeros(2), "note": "row", "count": 3, "nothing": None, "object": marker}
    moved = move_batch(batch, torch.device("meta"))
    assert list(moved) == list(batch)
    for key in ("input_ids", "attention_mask", "labels"):
        assert moved[key].device.type == "meta" and moved[key].dtype == batch[key].dtype
        assert moved[key].shape == batch[key].shape and batch[key].device.type == "cpu"  # the input is not changed
    assert moved["note"] == "row" and moved["count"] == 3 and moved["nothing"] is None and moved["object"] is marker


def test_device_loader_moves_each_batch_as_read_and_keeps_the_length() -> None:
    batches = [{"input_ids": torch.full((2, 3), index)} for index in range(3)]
    loader = DeviceLoader(batches, torch.device("meta"))
    assert len(loader) == 3
    assert [batch["input_ids"].device.type for batch in loader] == ["meta"] * 3
    assert [batch["input_ids"].device.type for batch in loader] == ["meta"] * 3  # iterable again (every epoch)


def test_a_device_change_on_resume_is_a_warning_only_between_cpu_and_cuda() -> None:
    assert device_change_warning({"device": "cuda:0"}, {"device": "cuda:1"}, "it") is None
    assert device_change_warning({}, {"device": "cpu"}, "it") is None  # a record before the key: the CPU
    warning = device_change_warning({"device": "cuda"}, {"device": "cpu"}, "the checkpoint in x")
    assert warning is not None and warning.startswith("the checkpoint in x was trained with device=cuda, this run uses "
                                                      "device=cpu") and "not bit-identically" in warning


@pytest.fixture(scope="module")
def default_run(tiny_model_dir: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("default") / "run"
    assert run_cli(*base(glue_dir, tiny_model_dir, out), *SHORT) == 0
    return without_timings(json.loads((out / "results.json").read_text()))


@pytest.mark.integration
@pytest.mark.usefixtures("one_thread")
@requires_minilm
def test_an_explicit_cpu_run_equals_the_default_run(default_run: dict[str, Any], tiny_model_dir: Path, glue_dir: Path,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_cli(*base(glue_dir, tiny_model_dir, out), *SHORT, "device=cpu") == 0
    results = without_timings(json.loads((out / "results.json").read_text()))
    assert results["config"]["device"] == "cpu" == default_run["config"]["device"]
    # Two separate runs of the same computation: equal up to float rounding.
    assert results == approx_tree(default_run)


@pytest.mark.integration
@pytest.mark.usefixtures("one_thread")
@requires_minilm
def test_asking_for_cuda_without_it_is_one_error_line_before_any_file(tiny_model_dir: Path, glue_dir: Path,
                                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    fake_cuda(monkeypatch, 0)
    out = tmp_path / "run"
    assert run_cli(*base(glue_dir, tiny_model_dir, out), *SHORT, "device=cuda") == 2
    err = capsys.readouterr().err
    assert "error: device=cuda, but this machine has no CUDA device" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.usefixtures("one_thread")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@requires_minilm
def test_a_cuda_run_finishes_and_resumes_on_the_cpu(default_run: dict[str, Any], tiny_model_dir: Path, glue_dir: Path,
                                                   tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from adaptive_depth import AdaptiveEncoder

    out = tmp_path / "run"
    assert run_cli(*base(glue_dir, tiny_model_dir, out), *SHORT, "device=cuda") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["device"] == "cuda" and results["sweep"][0]["metrics"]
    encoder = AdaptiveEncoder.from_pretrained(out / "model")  # the saved model loads on the CPU
    assert next(encoder.parameters()).device.type == "cpu"
    # Its stage 1 (a CUDA checkpoint) trains a stage 2 on the CPU, with the warning.
    again = tmp_path / "again"
    assert run_cli(*base(glue_dir, tiny_model_dir, again), *SHORT, "device=cpu", "--stage1-from", out) == 0
    assert "was trained with device=cuda, this run uses device=cpu" in caplog.text
    assert json.loads((again / "results.json").read_text())["config"]["device"] == "cpu"
