"""The benchmark scripts run end to end (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import engine_latency, timing
from tests.conftest import requires_glue, requires_minilm


@pytest.mark.integration
@requires_minilm
@requires_glue
def test_engine_latency_writes_its_table(tmp_path: Path) -> None:
    output = tmp_path / "latency.json"
    assert engine_latency.main(["--task", "mrpc", "--samples", "4", "--repeats", "1", "--batch-sizes", "2",
                                "--thresholds", "0.3", "0.6", "--threads", "1", "--runtimes", "eager",
                                "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    settings = [(row["setting"], row["batch_size"]) for row in result["rows"]]
    assert settings[:4] == [("plain HF model", 1), ("full", 1), ("skip_only", 1), ("entropy S=0.3", 1)]
    assert ("plain HF model", 2) in settings and result["trained"] is False
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


def test_engine_latency_smoke_times_every_runtime_and_checks_their_decisions(tmp_path: Path, capsys) -> None:
    """--smoke: a tiny random model, every runtime and mode, one interleaved run, decisions checked."""
    output = tmp_path / "smoke.json"
    runtimes = ["eager", "torch-export"] + (["onnx"] if engine_latency.onnx_runtime_available() else [])
    assert engine_latency.main(["--smoke", "--runtimes", *runtimes, "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["command"].startswith("python -m benchmarks.engine_latency --smoke")
    assert {"date", "device", "cpu", "torch", "onnxruntime", "transformers"} <= set(result["machine"])
    assert result["runtimes"] == runtimes and result["threads"] == [1]
    rows = {(row["runtime"], row["setting"], row["batch_size"]): row for row in result["rows"]}
    for batch_size, exits in ((1, ["0.1", "0.3", "0.5", "0.6"]), (32, ["0.3", "0.6"])):
        assert ("plain", "plain HF model", batch_size) in rows
        assert (("plain", "plain HF model after an ORT call", batch_size) in rows) == ("onnx" in runtimes)
        for runtime in runtimes:
            for setting in ["full", "skip_only", *(f"entropy S={value}" for value in exits)]:
                row = rows[runtime, setting, batch_size]
                eager = rows["eager", setting, batch_size]
                if runtime != "eager":
                    assert row["decisions"]["same"] and row["decisions"]["rows"] == 16
                    # The exports run the unfused gates and heads, the eager engine the fused ones (as
                    # AdaptivePipeline does): the same decisions, MACs apart by the gates' and heads' counts.
                    assert row["mean_macs_exact"] == rows["torch-export", setting, batch_size]["mean_macs_exact"]
                    assert row["mean_macs_exact"] == pytest.approx(eager["mean_macs_exact"], rel=0.05)
                # The ratio against the runtime's own full depth, from the same timings and MACs
                full = rows[runtime, "full", batch_size]
                expected = (full["ms_per_sample"] / row["ms_per_sample"]) / (full["mean_macs_exact"] / row["mean_macs_exact"])
                assert row["wall_over_flops_vs_own_full"] == pytest.approx(expected, rel=1e-9)
                # One round (--smoke): its ratio is the run's ratio
                assert row["wall_over_flops_rounds"] == [pytest.approx(row["wall_over_flops"], rel=1e-12)]
            assert rows["plain", "plain HF model", batch_size]["wall_over_flops_vs_own_full"] is None
            assert rows["plain", "plain HF model", batch_size]["wall_over_flops_rounds"] is None
    assert result["decisions_match_eager"] is True
    out = capsys.readouterr().out
    assert "take the eager engine's decisions on every timed row: True" in out
    # The hypervisor's share of the run (noise on a shared VM) is recorded and printed.
    steal = result["machine"]["cpu_steal_share"]
    assert steal is None or 0.0 <= steal <= 1.0
    assert "CPU time stolen by the hypervisor during the run:" in out


def test_interleaved_rounds_keep_each_round_and_round_ratios_pair_them() -> None:
    """Passes that report their own seconds: the rounds come back in order, the medians from them, and
    each round's wall/FLOPs pairs the reference's seconds with the pass's in the same round."""
    seconds = {"plain": iter([9.0, 4.0, 6.0, 5.0]), "engine": iter([9.0, 2.0, 2.0, 4.0])}  # warm-up first
    passes = {name: (lambda values=values: next(values)) for name, values in seconds.items()}
    rounds = timing.interleaved_rounds({0: passes}, repeats=3, device=torch.device("cpu"))[0]
    assert rounds == {"plain": [4.0, 6.0, 5.0], "engine": [2.0, 2.0, 4.0]}
    assert timing.round_ratios(rounds["plain"], rounds["engine"], flops_speedup=2.0) == [1.0, 1.5, 0.625]
    assert timing.ratio_range([1.0, 1.5, 0.625]) == "0.62-1.50" and timing.ratio_range(None) == ""


def test_stolen_time_is_the_steal_share_of_the_ticks_between_two_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import timing

    readings = iter([(1000, 10), (3000, 110)])
    monkeypatch.setattr(timing, "_cpu_ticks", lambda: next(readings))
    assert timing.StolenTime().share() == pytest.approx(0.05)  # 100 of 2000 ticks
    readings = iter([(1000, 10), None])
    assert timing.StolenTime().share() is None  # /proc/stat unreadable at the end
    assert "unknown" in timing.steal_line(None) and "5.0%" in timing.steal_line(0.05)


def test_cpu_ticks_reads_the_steal_column_of_proc_stat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import timing

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 2 30 400 5 0 6 7 9 9\ncpu0 50 1 15 200 2 0 3 3 0 0\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(stat if path == "/proc/stat" else path, *a, **k))
    # user nice system idle iowait irq softirq steal: all 8 summed; guest columns are already in user/nice
    assert timing._cpu_ticks() == (100 + 2 + 30 + 400 + 5 + 0 + 6 + 7, 7)


@pytest.mark.parametrize("make, message", [
    (lambda root: ["--run", str(root / "missing-run")], "--run {root}/missing-run is not a folder"),
    (lambda root: ["--model-dir", str(root / "missing")], "--model-dir {root}/missing is not a folder"),
    (lambda root: ["--output", str(root)], "output {root} is a folder"),
    (lambda root: ["--output", str(root / "a_file" / "out.json")], "output {root}/a_file/out.json: {root}/a_file is a file"),
])
def test_engine_latency_errors_are_one_line(make, message: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "a_file").write_text("x")
    assert engine_latency.main(["--smoke", *make(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: {message.format(root=tmp_path)}") and err.count("\n") == 1
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    "option, message",
    [
        (["--samples", "0"], "--samples must be >= 1"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--batch-sizes", "4", "0"], "--batch-sizes must all be >= 1"),
        (["--thresholds", "-0.1"], "--thresholds must all be >= 0"),
        (["--threads", "1", "0"], "--threads must all be >= 1"),
        (["--run", "a", "--model", "b"], "give one of --model-dir, --run and --model"),
        (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    ],
)
def test_engine_latency_rejects_bad_options(option: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        engine_latency.parse_args(option)
    assert exited.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_engine_latency_times_each_batch_size_once() -> None:
    # Batch 1 is always timed: giving it (or any size twice) must not time it twice.
    assert engine_latency.parse_args(["--batch-sizes", "1", "32", "8", "32"]).batch_sizes == [32, 8]
    assert engine_latency.parse_args(["--batch-sizes", "1"]).batch_sizes == []


def test_engine_latency_help_names_every_default() -> None:
    actions = [action for action in engine_latency.build_parser()._actions if action.dest != "help"]
    assert len(actions) == 16
    for action in actions:
        assert "default" in action.help, f"{action.option_strings} does not document its default"


def test_engine_latency_writes_a_new_file_under_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    first = engine_latency.default_output("mrpc", "cuda:1")
    assert first.parent == Path("runs") and first.name.startswith("engine_latency-mrpc-cuda1-")
    first.parent.mkdir()
    first.write_text("{}")
    assert engine_latency.default_output("mrpc", "cuda:1") not in (first, Path("benchmarks/results"))
