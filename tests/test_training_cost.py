"""benchmarks.training_cost runs end to end on a tiny model and extrapolates consistently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import training_cost
from tests.conftest import requires_minilm


@requires_minilm
def test_training_cost_times_both_stages_and_extrapolates(tmp_path: Path, glue_dir: Path,
                                                          tiny_model_dir_3: Path) -> None:
    output = tmp_path / "cost.json"
    threads = torch.get_num_threads()
    try:
        training_cost.main(["--model", str(tiny_model_dir_3), "--threads", "1", "--steps", "1", "--max-tries", "2",
                            "--batch-size", "4", "--length", "24", "--data-dir", str(glue_dir), "--train-rows", "10",
                            "--json", str(output)])
    finally:
        torch.set_num_threads(threads)
    report = json.loads(output.read_text())
    assert (report["layers"], report["hidden"], report["steps_per_epoch"]) == (3, 32, 3)
    assert set(report["settings"]) == {"fixed", "mrpc_bucketed"}
    assert report["settings"]["fixed"]["length"] == 24
    assert 1 <= report["settings"]["mrpc_bucketed"]["length"] <= 24
    for figures in report["settings"].values():
        assert figures["stage1_step_s"] > 0 and figures["stage2_step_s"] > 0
        assert 0 < figures["stage1_step_cores_used"] <= 1.5  # one thread (plus a little bookkeeping)
        assert isinstance(figures["stage1_step_undisturbed"], bool)
        assert figures["stage1_epoch_min"] == pytest.approx(figures["stage1_step_s"] * 3 / 60)
        assert figures["stage2_epoch_min"] == pytest.approx(figures["stage2_step_s"] * 3 / 60)
        assert figures["inference_ms_per_row"] == pytest.approx(1000 * figures["inference_batch_s"] / 4)
