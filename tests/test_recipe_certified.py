"""``operating_point=certified``: a recipe run saves the certified point (and the task's metric and
pairing) in its model; ``python -m recipes.heldout`` writes the held-out rows that certify it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adaptive_depth import AdaptiveEncoder
from adaptive_depth.calibrate import main as calibrate_main
from adaptive_depth.certificate import Certificate
from adaptive_depth.predict import main as predict_main
from recipes import heldout, smartbert
from recipes.run.config import load_config
from recipes.run.errors import ConfigError
from tests.conftest import RECIPE_RUN_MARKS, TINY_SMARTBERT
from tests.glue_fixtures import write_synthetic_glue

pytestmark = RECIPE_RUN_MARKS

TINY = [*TINY_SMARTBERT, "stage1_epochs=1", "soft_epochs=1", "stage2_epochs=1"]


@pytest.fixture(scope="module")
def certified_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certified")
    data = write_synthetic_glue(folder / "glue", "mrpc", n_train=200, n_dev=16)
    out = folder / "run"
    assert smartbert.main(["--task", "mrpc", "--data-dir", str(data), "--model", str(tiny_model_dir),
                           "--output-dir", str(out), "operating_point=certified", "certify_max_risk=0.5",
                           "certify_delta=0.2", *TINY]) == 0
    return out


def test_the_run_saves_the_certified_point(certified_run: Path) -> None:
    results = json.loads((certified_run / "results.json").read_text())
    point = results["operating_point"]
    assert point["rule"] == "certified" and results["sizes"]["heldout"] == 20
    config = AdaptiveEncoder.from_pretrained(certified_run / "model").adaptive_config
    assert (config.metric, config.text_pair) == ("f1", True)
    if point["certificate"] is None:  # refused: saved at no early exit, with the reason
        assert "no threshold is certified" in point["calibration"]["error"] and config.certificate is None
        return
    certificate = Certificate.from_dict(point["certificate"])
    assert Certificate.from_dict(config.certificate) == certificate and certificate.n == 20
    assert certificate.covers(config.make_criterion(), config.gate_threshold, config.mode)
    assert point["dev"]["name"] == f"certified {certificate.criterion}={certificate.threshold:.4g}"


def test_heldout_rows_certify_the_saved_model_again(certified_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert heldout.main([str(certified_run), "--output", str(tmp_path / "heldout.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and set(rows[0]) == {"text", "text_pair", "label"} and {r["label"] for r in rows} <= {"0", "1"}
    model = Path(shutil.copytree(certified_run / "model", tmp_path / "model"))
    status = calibrate_main([str(model), "--input", str(tmp_path / "heldout.jsonl"), "--max-risk", "0.5", "--delta",
                             "0.2", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 0 or "no threshold is certified" in err
    assert predict_main([str(model), "--input", str(tmp_path / "heldout.jsonl"), "--label-column", "label",
                         "--no-progress", "--output", str(tmp_path / "p.jsonl")]) == 0
    summary = capsys.readouterr().err
    assert ", f1 " in summary and ", accuracy " in summary and "total MACs / full-depth MACs" in summary


def test_the_operating_point_keys_are_checked() -> None:
    for override, message in (("operating_point=best", "operating_point must be 'budget' or 'certified'"),
                              ("certify_max_risk=0", r"certify_max_risk must be in \(0, 1\)"),
                              ("certify_delta=1", r"certify_delta must be in \(0, 1\)")):
        with pytest.raises(ConfigError, match=message):
            load_config(smartbert.SmartBertConfig, overrides=[override], task="mrpc")
    with pytest.raises(ConfigError, match="stsb is a regression task"):
        load_config(smartbert.SmartBertConfig, overrides=["operating_point=certified"], task="stsb")
    assert heldout.main([str(Path("/nonexistent-run"))]) == 2
