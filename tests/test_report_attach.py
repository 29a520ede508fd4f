"""The results page's attach blocks read the JSON the attach commands write; missing files show "not run"."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.report_attach import blocks


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record), encoding="utf-8")


def test_missing_files_show_not_run(tmp_path: Path) -> None:
    generated = blocks(tmp_path)
    assert set(generated) == {"attach", "attach-splits", "attach-latency"}
    assert all(any("not run" in line for line in lines) for lines in generated.values())


def test_the_tables_show_the_json(tmp_path: Path) -> None:
    certificate = {"n": 8000, "empirical_risk": 0.005, "upper_bound": 0.00625}
    point = {"threshold": 0.1234, "certificate": certificate, "metric_change": -0.0023, "rows_disagreeing": 5,
             "disagreement_with_full_depth": 5 / 872, "relative_cost_exact": 0.5, "relative_cost_paper": 0.52,
             "flops_speedup_exact": 2.0}
    write(tmp_path / "attach" / "certified-sst2-1.json",
          {"metric": "accuracy", "rows": 872, "operating_point": point, "full_depth": {"metric": 0.86},
           "original": {"metric": 0.86, "rows_predicted_differently": 0}, "date": "2026-12-03T18:00:00+00:00",
           "machine": "x86_64 shared"})
    lines = blocks(tmp_path)["attach"]
    row = next(line for line in lines if line.startswith("| SST-2 (accuracy)"))
    assert row == ("| SST-2 (accuracy) | 86.00 | 86.00 | 0 of 872 | 1% | 0.1234 | 8000 | 0.50% | 0.62% | 50.0% (52.0%) "
                   "| 2.00x | 0.57% (5 rows) | -0.23 |")
    assert "`attach/certified-sst2-1.json` (2026-12-03T18:00:00+00:00; x86_64 shared)" in lines[-1]
    split = {"rule": "certified", "max_risk": 0.01, "delta": 0.05, "splits": 500, "refused": 0, "violations": 3,
             "violation_rate": 0.006, "violation_rate_95": [0.001, 0.017], "mean_test_risk": 0.004,
             "mean_test_relative_cost": 0.6}
    write(tmp_path / "attach" / "splits-mrpc.json", {"rows": 1725, "results": [split], "date": "d",
                                                     "machine": {"processor": "cpu", "torch": "2", "torch_threads": 2}})
    assert ("| MRPC | 1725 | split | 1% (delta 0.05) | certified | 0.006 [0.001, 0.017] | 0/500 | 0.40% | 60.0% |"
            in blocks(tmp_path)["attach-splits"])
    speed = [{"setting": "plain HF model", "wall_speedup": 1.0, "flops_speedup": 1.0},
             {"setting": "batch engine", "wall_speedup": 1.5, "flops_speedup": 1.8},
             {"setting": "stream", "wall_speedup": 1.6, "flops_speedup": 1.8}]
    write(tmp_path / "attach" / "latency-sst2-2-b32.json", {"batch_size": 32, "data": {"rows": 872}, "rows": speed})
    assert "| SST-2 | 2% | 32 | 872 | 1.80x | 1.50x | 1.60x |" in blocks(tmp_path)["attach-latency"]
