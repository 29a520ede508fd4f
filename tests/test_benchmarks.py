"""The benchmark scripts run end to end (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import engine_latency
from tests.conftest import requires_glue, requires_minilm


@pytest.mark.integration
@requires_minilm
@requires_glue
def test_engine_latency_writes_its_table(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        output = tmp_path / "latency.json"
        engine_latency.main(["--task", "mrpc", "--samples", "4", "--repeats", "1", "--batch-sizes", "2",
                             "--thresholds", "0.3", "0.6", "--threads", "1", "--output", str(output)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(output.read_text())
    settings = [(row["setting"], row["batch_size"]) for row in result["rows"]]
    assert settings[:4] == [("plain HF model", 1), ("full", 1), ("skip_only", 1), ("entropy S=0.3", 1)]
    assert (("onnxruntime full", 1) in settings) == engine_latency.onnx_runtime_available()
    assert ("plain HF model", 2) in settings and result["trained"] is False
    assert result["machine"]["torch_threads"] == 1
    plain = {row["batch_size"]: row for row in result["rows"] if row["setting"] == "plain HF model"}
    for row in result["rows"]:
        assert row["mean_macs_exact"] > 0 and row["ms_per_sample"] > 0
        # Speed-ups are against the plain model at the same batch size (not, say, at batch 1).
        reference = plain[row["batch_size"]]
        assert row["wall_speedup"] == pytest.approx(reference["ms_per_sample"] / row["ms_per_sample"], rel=1e-6)
        assert row["flops_speedup"] == pytest.approx(reference["mean_macs_exact"] / row["mean_macs_exact"], rel=1e-6)
    # The engine at full depth costs what the encoder says full depth costs (flops.py, checked
    # against FlopCounterMode in test_flops.py), and exits nowhere early.
    full = next(row for row in result["rows"] if row["setting"] == "full" and row["batch_size"] == 1)
    assert full["flops_speedup"] < 1.0  # the exit head is wider than the plain classifier


@pytest.mark.parametrize(
    "option, message",
    [
        (["--samples", "0"], "--samples must be >= 1"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--batch-sizes", "4", "0"], "--batch-sizes must all be >= 1"),
        (["--thresholds", "-0.1"], "--thresholds must all be >= 0"),
        (["--threads", "-1"], "--threads must be >= 0"),
        (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    ],
)
def test_engine_latency_rejects_bad_options(option: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        engine_latency.parse_args(option)
    assert exited.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_engine_latency_help_names_every_default() -> None:
    actions = [action for action in engine_latency.build_parser()._actions if action.dest != "help"]
    assert len(actions) == 14
    for action in actions:
        assert "default" in action.help, f"{action.option_strings} does not document its default"


def test_engine_latency_writes_a_new_file_under_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    first = engine_latency.default_output("mrpc", "cuda:1")
    assert first.parent == Path("runs") and first.name.startswith("engine_latency-mrpc-cuda1-")
    first.parent.mkdir()
    first.write_text("{}")
    assert engine_latency.default_output("mrpc", "cuda:1") not in (first, Path("benchmarks/results"))
