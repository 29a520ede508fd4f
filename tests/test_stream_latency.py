"""benchmarks.stream_latency and benchmarks.batch1_profile: smoke runs on a tiny saved model and synthetic GLUE rows."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import stream_latency
from tests.conftest import requires_minilm, tiny_minilm_encoder
from tests.glue_fixtures import write_synthetic_glue



def test_stream_latency_checks_its_output_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(stream_latency, "run", lambda args: pytest.fail("ran before the output was checked"))
    (tmp_path / "a_file").write_text("x")
    for output, message in ((tmp_path, "is a folder"), (tmp_path / "a_file" / "out.json", "is a file, not a folder")):
        with pytest.raises(SystemExit) as exited:
            stream_latency.main(["--model", str(tmp_path), "--output", str(output)])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and message in err and err.count("\n") == 1

@requires_minilm
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_stream_latency_writes_its_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    monkeypatch.chdir(tmp_path)
    encoder, tokenizer = tiny_minilm_encoder(seed=1)
    encoder.adaptive_config.threshold = 0.5
    encoder.adaptive_config.text_pair = True  # the documented run: a pair model (MRPC's) timed on SST-2's texts
    model = encoder.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    data = write_synthetic_glue(tmp_path / "glue", "sst2", n_train=40, n_dev=4)
    threads = torch.get_num_threads()
    try:
        stream_latency.main(["--model", str(model), "--data-dir", str(data), "--rows", "30", "--batch-size", "8",
                             "--repeats", "1", "--threads", "1", "--dtype", dtype, "--output", "latency.json"])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "latency.json").read_text())
    assert [row["setting"] for row in result["rows"]] == ["plain HF model", "batch engine", "stream"]
    # bf16 rounds differently in differently composed groups: a row near a threshold may go either way there
    assert result["stream_equals_batch_engine"] is True or dtype == "bf16"
    assert result["stream_equals_batch_engine"] == (result["rows_with_other_decisions"] == 0)
    assert result["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]  # what ran, not what was asked
    assert result["data"] == {"task": "sst2", "split": "train", "rows": 30, "mean_tokens": pytest.approx(
        result["data"]["mean_tokens"])} and result["machine"]["torch_threads"] == 1
    assert {"cpu", "date", "torch", "cpu_steal_share"} <= set(result["machine"])  # the shared machine record
    assert result["operating_point"]["criterion"] == "entropy" and result["operating_point"]["threshold"] == 0.5
    plain, batched, streamed = result["rows"]
    assert batched["mean_macs_exact"] == pytest.approx(streamed["mean_macs_exact"])  # the same work, regrouped
    for row in result["rows"]:
        assert row["rows_per_second"] > 0
        assert row["flops_speedup"] == pytest.approx(plain["mean_macs_exact"] / row["mean_macs_exact"])
        assert row["wall_over_flops"] == pytest.approx(row["wall_speedup"] / row["flops_speedup"])
    assert plain["wall_over_flops_rounds"] is None  # one round: its ratio is the run's
    assert [streamed["wall_over_flops"]] == pytest.approx(streamed["wall_over_flops_rounds"], rel=1e-12)
    assert sum(result["exit_layer_histogram"]) == 30


def test_rows_with_other_decisions_counts_each_differing_row_once() -> None:
    def output(exit_layer: list[int], layers_run: list[list[bool]], predictions: list[int]) -> SimpleNamespace:
        return SimpleNamespace(exit_layer=torch.tensor(exit_layer), layers_run=torch.tensor(layers_run),
                               predictions=torch.tensor(predictions))

    first = [output([1, 2, 2], [[1, 0], [1, 1], [0, 1]], [0, 1, 1]), output([2], [[1, 1]], [0])]
    assert stream_latency.rows_with_other_decisions(first, first) == 0
    second = [output([1, 2, 1], [[1, 0], [1, 0], [0, 1]], [0, 1, 0]),  # row 2: exit and prediction; row 1: a layer
              output([2], [[1, 1]], [1])]  # a prediction only
    assert stream_latency.rows_with_other_decisions(first, second) == 3
    with pytest.raises(ValueError):  # batches that do not pair up are an error, not a silent truncation
        stream_latency.rows_with_other_decisions(first, second[:1])


def test_stream_latency_rejects_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for option, message in ((["--rows", "0"], "--rows must be >= 1"), (["--batch-size", "0"], "--batch-size must be"),
                            (["--threads", "-1"], "--threads must be >= 0")):
        with pytest.raises(SystemExit) as exited:
            stream_latency.parse_args(["--model", str(tmp_path), *option])
        assert exited.value.code == 2 and f"error: {message}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        stream_latency.parse_args(["--model", str(tmp_path / "missing")])
    assert "is not a folder" in capsys.readouterr().err


@requires_minilm
def test_batch1_profile_splits_the_time_of_every_setting(tmp_path: Path, glue_dir: Path) -> None:
    from benchmarks import batch1_profile

    encoder, tokenizer = tiny_minilm_encoder(seed=2)
    model = encoder.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    threads = torch.get_num_threads()
    try:
        rows = batch1_profile.main(["--model", str(model), "--data-dir", str(glue_dir), "--samples", "6",
                                    "--repeats", "1", "--threads", "1", "--thresholds", "0.5"])
    finally:
        torch.set_num_threads(threads)
    assert [row["setting"] for row in rows] == ["full", "skip_only", "entropy S=0.5"]
    for row in rows:
        assert sum(row["time_share"].values()) == pytest.approx(1.0)
        assert sum(row["macs_share"].values()) == pytest.approx(1.0)
        assert row["ms_per_row"] > 0 and row["wall_over_flops"] > 0
    assert rows[0]["macs_share"]["gates"] == 0.0 and rows[1]["macs_share"]["gates"] > 0.0
