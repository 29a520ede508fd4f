"""Slow: the recipes learn something real (all-MiniLM-L6-v2 on real GLUE rows), not just run.

The default suite checks that every recipe runs end to end on tiny random models; these
tests check that training on real data moves the metric past the majority class and that the
trained exit heads and gates save computation on the dev set. About 3 minutes in all on 2 CPU
cores: ``GLUE_DIR=../shared/data/glue python -m pytest -m slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes import fastbert, smartbert
from tests.conftest import requires_glue, requires_minilm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    requires_minilm,
    requires_glue,
]

# SST-2 (its majority class is 50.9% of dev, so learning shows clearly): the first 1200 training
# rows (1080 after the held-out split), the whole 872-row dev set, the CPU budget schedule of the
# shipped MRPC configs shortened to two stage-1 epochs and one stage-2 epoch.
SHORT = ["--task", "sst2", "max_train_rows=1200", "torch_threads=2", "stage1_epochs=2", "stage1_lr=5e-5",
         "stage1_head_lr=5e-4", "stage2_epochs=1", "stage2_lr=5e-4"]


def check_learned(results: dict) -> None:
    """Full depth well above the majority class; some setting at <= 75% of the FLOPs still is."""
    majority = results["majority_class_baseline"]["accuracy"]
    rows = results["sweep"]
    full = next(row for row in rows if row["mode"] == "full")
    assert full["metrics"]["accuracy"] >= majority + 0.15, (full["metrics"], majority)
    cheap = [row for row in rows if row["relative_cost_paper"] <= 0.75]
    assert cheap, [(row["name"], row["relative_cost_paper"]) for row in rows]
    best_cheap = max(cheap, key=lambda row: row["metrics"]["accuracy"])
    assert best_cheap["metrics"]["accuracy"] >= majority + 0.10, (best_cheap, majority)


def test_smartbert_learns_sst2_and_saves_computation(tmp_path: Path) -> None:
    out = tmp_path / "smartbert"
    assert smartbert.main(["--output-dir", str(out), *SHORT, "soft_epochs=1", "gate_lr=1e-4",
                           "initial_skip_bias=-1"]) == 0
    check_learned(json.loads((out / "results.json").read_text()))


def test_fastbert_learns_sst2_and_exits_early(tmp_path: Path) -> None:
    out = tmp_path / "fastbert"
    assert fastbert.main(["--output-dir", str(out), *SHORT]) == 0
    check_learned(json.loads((out / "results.json").read_text()))
