"""Baseline recipes (fine-tuning, DeeBERT, FastBERT, PABEE) and ``benchmarks.tradeoff``.

End-to-end runs use a 2-layer, hidden-32 random BERT with the all-MiniLM-L6-v2 tokenizer on a
synthetic MRPC folder (1 epoch per stage), in-process, one torch thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.exits import EntropyExit, PatienceExit
from benchmarks import tradeoff
from recipes import baselines, deebert, fastbert, finetune, pabee
from recipes.run.config import load_config
from recipes.run.loop import freeze_for_stage2
from recipes.run.errors import ConfigError
from tests.conftest import RECIPE_RUN_MARKS, assert_stage2_trained_only
from tests.conftest import TINY_BASELINE as TINY

pytestmark = RECIPE_RUN_MARKS

RECIPES = {"finetune": finetune, "deebert": deebert, "fastbert": fastbert, "pabee": pabee}


@pytest.fixture(scope="module")
def runs(tiny_model_dir_3: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One finished run of every baseline (shared by the tests that inspect them)."""
    root = tmp_path_factory.mktemp("runs")
    folders = {}
    for name, module in RECIPES.items():
        out = root / name
        code = module.main([str(arg) for arg in ("--task", "mrpc", "--data-dir", glue_dir, "--model", tiny_model_dir_3,
                                                 "--output-dir", out, *TINY)])
        assert code == 0, name
        folders[name] = out
    return folders


# -- end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RECIPES))
def test_end_to_end_results(runs: dict[str, Path], name: str) -> None:
    out = runs[name]
    results = json.loads((out / "results.json").read_text())
    assert (out / "plot.png").stat().st_size > 1000
    assert results["recipe"] == name and results["sizes"] == {"train": 36, "heldout": 4, "dev": 16}
    assert results["command"].startswith(f"python -m recipes.{name} --task mrpc")
    sweep = results["sweep"]
    full = sweep[0]
    assert full["name"] == "full" and full["mode"] == "full"
    assert full["relative_cost_paper"] == pytest.approx(1.0) and full["exit_layer_histogram"] == [0, 0, 16]
    expected = {"finetune": 1, "deebert": 1 + 8, "fastbert": 1 + 9, "pabee": 1 + 2}[name]
    assert len(sweep) == expected
    for row in sweep:
        assert 0.0 <= row["metrics"]["f1"] <= 1.0 and sum(row["exit_layer_histogram"]) == 16
        assert row["mean_macs_paper"] > 0
        if row["mode"] == "exit_only":
            assert row["name"].split("=")[0] == {"deebert": "entropy", "fastbert": "speed", "pabee": "patience"}[name]
    two_stage = name in ("deebert", "fastbert")
    assert len(results["history"]["stage1"]) == 1 and len(results["history"]["stage2"]) == int(two_stage)
    if name == "pabee":
        assert [row["name"] for row in sweep[1:]] == ["patience=1", "patience=2"]

    # The reloaded run reproduces the sweep's full-depth accuracy.
    encoder, _, config = RECIPES[name].load_trained(out)
    assert not encoder.has_gates and config.task == "mrpc"
    assert encoder.exit_heads[0].__class__.__name__ == ("ExitHead" if name == "fastbert" else "PoolerExitHead")


@pytest.mark.parametrize("name", ["deebert", "fastbert"])
def test_stage2_changes_only_intermediate_heads(runs: dict[str, Path], name: str) -> None:
    assert_stage2_trained_only(runs[name], trained=("encoder.exit_heads.0.", "encoder.exit_heads.1."),
                               frozen_includes=("encoder.backbone.", "encoder.exit_heads.2."))


def test_stage2_optimizer_and_grad_flags(tiny_model_dir_3: Path) -> None:
    from transformers import AutoModel

    config = load_config(baselines.BaselineConfig, None, TINY, task="mrpc")
    encoder = baselines.build_encoder(AutoModel.from_pretrained(tiny_model_dir_3), deebert.SPEC, 2, config)
    model = baselines.BaselineModel(encoder, deebert.SPEC)
    trainable = {id(parameter) for parameter in freeze_for_stage2(model, deebert.METHOD.stage2_modules(model))}
    for name, parameter in model.named_parameters():
        expected = name.startswith(("encoder.exit_heads.0.", "encoder.exit_heads.1."))
        assert (id(parameter) in trainable) == expected == parameter.requires_grad, name


def test_resume_continues_from_checkpoint(tiny_model_dir_3: Path, glue_dir: Path, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    base = ["--task", "mrpc", "--data-dir", str(glue_dir), "--model", str(tiny_model_dir_3), "--output-dir", str(out),
            *TINY]
    assert deebert.main([*base, "stage1_epochs=2", "stage2_epochs=0"]) == 0
    caplog.clear()
    assert deebert.main([*base, "--resume", "stage1_epochs=2", "stage2_epochs=1"]) == 0
    assert "stage 1, epoch 1 completed" in caplog.text
    assert "stage 1 epoch" not in caplog.text and "stage 2 epoch 1/1" in caplog.text
    results = json.loads((out / "results.json").read_text())
    assert [record["epoch"] for record in results["history"]["stage1"]] == [0, 1]
    assert [record["epoch"] for record in results["history"]["stage2"]] == [0]
    assert deebert.main([*base[:-len(TINY)], "--resume", "head_inner_size=8"]) == 2
    assert finetune.main([*base, "--resume"]) == 2  # a deebert checkpoint is not a finetune run


# -- exit criteria at their extremes ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "never", "always"),
    [("deebert", 0.0, 1e9), ("fastbert", 0.0, 1.0 + 1e-6), ("pabee", None, 0.0)],
)
def test_exit_criteria_extremes(tiny_model_dir_3: Path, name: str, never: float | None, always: float) -> None:
    from transformers import AutoModel

    config = load_config(baselines.BaselineConfig, None, TINY, task="mrpc")
    method = RECIPES[name].SPEC
    torch.manual_seed(0)
    encoder = baselines.build_encoder(AutoModel.from_pretrained(tiny_model_dir_3), method, 2, config).eval()
    input_ids = torch.randint(1000, 2000, (6, 9))
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[3:, 6:] = 0
    if never is not None:
        out = AdaptiveInferenceEngine(encoder, method.make_criterion(never), mode="exit_only")(input_ids, mask)
        assert out.exit_layer.tolist() == [3] * 6
    out = AdaptiveInferenceEngine(encoder, method.make_criterion(always), mode="exit_only")(input_ids, mask)
    assert out.exit_layer.tolist() == [1] * 6
    assert isinstance(method.make_criterion(0.5), PatienceExit if name == "pabee" else EntropyExit)
    if name == "fastbert":
        assert method.make_criterion(0.5).normalized
    if name == "pabee":  # patience L-1 on 3 layers: exits before the last only if heads 1-3 agree
        assert PatienceExit(2).decide(torch.tensor([[1.0, 0.0]]), PatienceExit(2).initial_state(1, "cpu")).score == 0


# -- configs ---------------------------------------------------------------------------------


CONFIGS = sorted(path for path in (Path(baselines.__file__).parent / "configs").glob("*.yaml")
                 if path.stem.split("_")[0] in RECIPES)


def test_configs_are_shipped() -> None:
    names = {path.name for path in CONFIGS}
    for recipe in RECIPES:
        assert {f"{recipe}_mrpc.yaml", f"{recipe}_rte.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_shipped_config_is_valid(path: Path) -> None:
    recipe, task = path.stem.split("_", 1)
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith(f"# python -m recipes.{recipe} --task {task} "), first_line
    config = load_config(baselines.BaselineConfig, path, (), task=task)
    assert config.task == yaml.safe_load(path.read_text(encoding="utf-8"))["task"] == task


def test_bad_config_values_are_clear_errors(capsys: pytest.CaptureFixture[str], glue_dir: Path,
                                            tiny_model_dir_3: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="thresholds"):
        load_config(baselines.BaselineConfig, None, ["thresholds=[-1]"], task="mrpc")
    assert pabee.main(["--task", "mrpc", "--data-dir", str(glue_dir), "--model", str(tiny_model_dir_3),
                       "--output-dir", str(tmp_path / "p"), "thresholds=[1.5]", *TINY]) == 2
    assert "whole numbers" in capsys.readouterr().err


# -- the trade-off benchmark -------------------------------------------------------------------


def test_tradeoff_end_to_end(tiny_model_dir_3: Path, glue_dir: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tradeoff"
    argv = ["--task", "mrpc", "--data-dir", str(glue_dir), "--model", str(tiny_model_dir_3), "--methods", "finetune",
            "deebert", "--output-dir", str(out), *TINY]
    assert tradeoff.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| finetune | full |" in printed and "| deebert | entropy=0.3 |" in printed and "cost (%)" in printed
    assert "f1 at cost <= 50%" in printed
    table = json.loads((out / "tradeoff-mrpc.json").read_text())
    assert table["at_cost"]["finetune"]["1.0"]["setting"] == "full"
    assert table["at_cost"]["finetune"]["0.5"] is None  # full depth is its only setting
    assert (out / "tradeoff-mrpc.png").stat().st_size > 1000
    assert set(table["runs"]) == {"finetune", "deebert"}
    assert set(table["wall_time_s"]) == {"finetune", "deebert"} and table["skipping"] == {}  # no gates
    reference = table["reference"]
    assert reference["mean_macs_paper"] == pytest.approx(reference["analytic_mean_macs_paper"])
    rows = {(row["method"], row["setting"]): row for row in table["rows"]}
    assert rows[("finetune", "full")]["relative_cost"] == pytest.approx(1.0)
    # DeeBERT's full depth has the same pooler head, so the same cost; its exits cost less or equal.
    assert rows[("deebert", "full")]["relative_cost"] == pytest.approx(1.0)
    for (method, setting), row in rows.items():
        assert row["relative_cost"] == pytest.approx(
            row["mean_macs_paper"] / reference["mean_macs_paper"])
        assert 0.0 <= row["main_metric"] <= 1.0
    # A second call reuses both finished runs (no training); --calibrate adds the calibrated table.
    assert tradeoff.main([*argv, "--calibrate"]) == 0
    assert "epoch" not in capsys.readouterr().err
    calibrated = json.loads((out / "calibrated-mrpc.json").read_text())
    assert set(calibrated["runs"]) == {"deebert"} and calibrated["budgets"] == [0.75, 0.5, 0.33]
    assert calibrated["reference"]["mean_macs_paper"] == pytest.approx(reference["mean_macs_paper"])
    # A run made with another config is not silently reused.
    assert tradeoff.main([*argv, "seed=7"]) == 2
    assert "another config" in capsys.readouterr().err
    assert tradeoff.main([*argv, "no_such_key=1"]) == 2


def test_best_at_cost_picks_the_best_setting_within_each_budget() -> None:
    def row(method: str, setting: str, metric: float, cost: float) -> dict:
        return {"method": method, "setting": setting, "main_metric": metric, "relative_cost": cost}

    rows = [row("a", "full", 0.80, 1.0), row("a", "s1", 0.82, 0.6), row("a", "s2", 0.70, 0.3),
            row("b", "full", 0.85, 1.1), row("b", "s1", 0.75, 0.5), row("b", "s2", 0.75, 0.4)]
    table = tradeoff.best_at_cost(rows, (1.0, 0.5, 0.2))
    assert table["a"]["1.0"]["setting"] == "s1"  # cheaper and better than full depth
    assert table["a"]["0.5"]["setting"] == "s2"
    assert table["a"]["0.2"] is None
    assert table["b"]["1.0"]["setting"] == "s2"  # full depth costs 1.1 > 1.0; tie goes to the cheaper
    assert table["b"]["0.5"] == {"setting": "s2", "main_metric": 0.75, "relative_cost": 0.4}


def test_at_cost_table_marks_values_no_better_than_the_majority_class() -> None:
    table = {
        "main_metric": "accuracy", "majority_class_baseline": {"accuracy": 0.5},
        "at_cost": {"a": {"1.0": {"setting": "full", "main_metric": 0.7, "relative_cost": 1.0},
                          "0.5": {"setting": "s", "main_metric": 0.5, "relative_cost": 0.4}},
                    "b": {"1.0": None, "0.5": None}},
    }
    lines = tradeoff.format_at_cost(table).splitlines()
    assert lines[2] == "| a | 70.00 (full, 100%) | 50.00* (s, 40%) |"
    assert lines[3] == "| b | - | - |"
    assert "* marks values no better than it" in lines[-1]
