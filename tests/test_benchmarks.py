"""The benchmark scripts run end to end (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from benchmarks import engine_latency
from tests.conftest import requires_minilm


@pytest.mark.integration
@requires_minilm
@pytest.mark.skipif(not os.environ.get("GLUE_DIR"), reason="needs real GLUE inputs: set GLUE_DIR")
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
    assert ("plain HF model", 2) in settings and result["trained"] is False
    assert result["machine"]["torch_threads"] == 1
    for row in result["rows"]:
        assert row["mean_macs_exact"] > 0 and row["ms_per_sample"] > 0
        assert row["wall_over_flops"] == pytest.approx(row["wall_speedup"] / row["flops_speedup"])
