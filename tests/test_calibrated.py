"""``benchmarks.calibrated``: every method calibrated to every budget on held-out, scored on dev."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import calibrated, run_calibration, seeds
from recipes import deebert, fastbert, finetune, smartbert
from tests.conftest import RECIPE_RUN_MARKS, THRESHOLD_RESOLUTION, TINY_BASELINE, TINY_SMARTBERT
from tests.glue_fixtures import write_synthetic_glue

pytestmark = RECIPE_RUN_MARKS

SMARTBERT = [*TINY_SMARTBERT, "stage1_epochs=2", "soft_epochs=1", "stage2_epochs=1", "entropy_thresholds=[0.3]"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic MRPC with 12 held-out rows (120 train), enough for the calibration to bisect."""
    return write_synthetic_glue(tmp_path_factory.mktemp("glue-cal"), "mrpc", n_train=120, n_dev=24)


@pytest.fixture(scope="module")
def runs(data: Path, tiny_model_dir_3: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Finished tiny runs of DeeBERT, FastBERT, SmartBERT and plain fine-tuning, one seed."""
    root = tmp_path_factory.mktemp("runs-cal")
    folders = {}
    for name, module, overrides in (("deebert", deebert, TINY_BASELINE), ("fastbert", fastbert, TINY_BASELINE),
                                    ("smartbert", smartbert, SMARTBERT), ("finetune", finetune, TINY_BASELINE)):
        folders[name] = root / name
        argv = ["--task", "mrpc", "--data-dir", str(data), "--model", str(tiny_model_dir_3),
                "--output-dir", str(folders[name]), *overrides]
        assert module.main(argv) == 0, name
    return folders


@pytest.mark.parametrize("name", ["deebert", "smartbert"])
def test_reproduces_the_runs_own_operating_point(runs: dict[str, Path], data: Path, name: str) -> None:
    """Budgets relative to the run's own full depth in the exact convention are what the run
    itself calibrated: same held-out rows and batches, so the same threshold and dev metrics."""
    results = json.loads((runs[name] / "results.json").read_text())
    point = results["operating_point"]
    assert point["calibration"] is not None and "error" not in point["calibration"]
    cells = run_calibration.calibrate_run(name, runs[name], data, [point["budget"]], None, convention="exact",
                                     progress=False)
    cell = cells[str(point["budget"])]
    assert cell["threshold"] == pytest.approx(point["calibration"]["threshold"], abs=THRESHOLD_RESOLUTION)
    assert cell["heldout_relative_cost"] == pytest.approx(point["calibration"]["relative_cost"])
    assert cell["heldout_rows"] == results["sizes"]["heldout"] == 12
    assert cell["metrics"] == pytest.approx(point["dev"]["metrics"])
    assert cell["relative_cost"] == pytest.approx(point["dev"]["relative_cost_exact"])


def test_end_to_end_table(runs: dict[str, Path], data: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "calibrated-mrpc.json"
    argv = ["--data-dir", str(data), "--run", f"fastbert={runs['fastbert']}", "--run", f"smartbert={runs['smartbert']}",
            "--budgets", "0.9", "0.6", "0.01", "--json", str(out)]
    assert calibrated.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| fastbert |" in printed and "f1 at 60% (dev cost, held-out cost)" in printed
    assert "no threshold meets it" in printed  # 1% is below the first layer's cost
    table = json.loads(out.read_text())
    assert table["task"] == "mrpc" and table["seed"] == 42 and set(table["runs"]) == {"fastbert", "smartbert"}
    assert "smartbert" in table["skipping"] and "fastbert" not in table["skipping"]
    for method, cells in table["calibration"].items():
        for budget in ("0.9", "0.6"):
            cell = cells[budget]
            assert cell["heldout_relative_cost"] <= float(budget) + 1e-9, (method, budget)
            assert table["at_cost"][method][budget] == {key: cell[key] for key in ("setting", "main_metric",
                                                                                 "relative_cost")}
        # Budgets are over the shared denominator: each is scaled by one factor (reference / own full depth).
        ratios = [cell["budget_own_full_depth"] / float(budget) for budget, cell in cells.items()]
        assert max(ratios) == pytest.approx(min(ratios))
        assert "error" in cells["0.01"] and table["at_cost"][method]["0.01"] is None
    # FastBERT's attention head costs more than the pooler head: its own budget is below the shared one.
    assert table["calibration"]["fastbert"]["0.9"]["budget_own_full_depth"] < 0.9
    # A less aggressive budget never costs more on held-out.
    for cells in table["calibration"].values():
        assert cells["0.6"]["heldout_relative_cost"] <= cells["0.9"]["heldout_relative_cost"] + 1e-9
    # benchmarks.seeds reads it like a tradeoff table.
    groups = seeds.load_tables([str(out)])
    assert set(groups[("mrpc", next(iter(groups))[1])].cells) == {"fastbert", "smartbert"}


def test_calibrate_on_half_of_dev_scores_the_other_half(runs: dict[str, Path], data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``--calibrate-on dev-half``: the threshold meets the budget on one half of dev; the metrics,
    cost and majority class are those of the other half, disjoint from it."""
    from recipes.glue import holdout_split, majority_class_metrics
    from recipes.run.data import run_examples

    out = tmp_path / "calibrated-dev-half.json"
    argv = ["--data-dir", str(data), "--run", f"deebert={runs['deebert']}", "--budgets", "0.8", "--calibrate-on",
            "dev-half", "--json", str(out)]
    assert calibrated.main(argv) == 0
    assert "cost on the scored half, on the calibration half" in capsys.readouterr().out
    table = json.loads(out.read_text())
    assert table["calibrate_on"] == "dev-half" and table["rows"] == {"calibrated_on": 12, "reported_on": 12}
    assert table["selection"] != calibrated.SELECTION  # benchmarks.seeds will not mix it with held-out tables
    cell = table["calibration"]["deebert"]["0.8"]
    assert cell["heldout_rows"] == 12 and cell["heldout_relative_cost"] <= cell["budget_own_full_depth"] + 1e-9

    config = deebert.METHOD.config_class(**json.loads((runs["deebert"] / "results.json").read_text())["config"])
    examples = run_examples(data, "mrpc", config)
    calibrate, report = run_calibration.calibration_rows(examples, config, "dev-half")
    assert not {row.source for row in calibrate} & {row.source for row in report}
    assert len(calibrate) + len(report) == len(examples[1])
    # The calibration ran on the calibration half's rows and dev was scored on the other half's.
    from adaptive_depth.engine import AdaptiveInferenceEngine
    from adaptive_depth.exits import EntropyExit
    from recipes.run.trained import load_run

    encoder, tokenizer, _ = load_run(runs["deebert"], "deebert")
    calibrate_batches, report_batches = run_calibration.heldout_and_dev(examples, config, tokenizer, "dev-half")
    first = tokenizer(calibrate[0].text_a, calibrate[0].text_b, truncation=True, max_length=config.max_length)
    assert calibrate_batches[0]["input_ids"][0, :len(first["input_ids"])].tolist() == first["input_ids"]
    assert sum(len(batch["labels"]) for batch in report_batches) == len(report)
    engine = AdaptiveInferenceEngine(encoder, EntropyExit(cell["threshold"]), mode="exit_only",
                                     padded_length=config.padded_length)
    traces = [(engine(batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"]),
               batch["labels"]) for batch in report_batches]
    hits = sum(int((trace.predictions == labels).sum()) for trace, labels in traces)
    layers = sum(float(trace.layers_run.sum()) for trace, _ in traces)
    assert hits / len(report) == pytest.approx(cell["metrics"]["accuracy"])
    assert layers / len(report) == pytest.approx(cell["mean_layers_run"])
    # The majority class: train's (less its held-out part) most frequent label, on the reported half.
    train_part = holdout_split(examples[0], config.holdout_fraction, config.seed)[0]
    assert table["majority_class_baseline"] == pytest.approx(majority_class_metrics(
        "mrpc", [row.label for row in train_part], [row.label for row in report]))


def test_gates_off_calibrates_the_same_run_without_its_skip_gates(runs: dict[str, Path], data: Path,
                                                                 tmp_path: Path) -> None:
    """``--gates-off smartbert``: a second calibration of the same run in engine mode ``exit_only``
    (no layer skipped, no gate run), reported as ``smartbert_gates_off``."""
    from adaptive_depth.engine import AdaptiveInferenceEngine
    from adaptive_depth.exits import EntropyExit
    from recipes.run.trained import load_run
    from recipes.run.data import run_examples

    out = tmp_path / "gates-off.json"
    argv = ["--data-dir", str(data), "--run", f"smartbert={runs['smartbert']}", "--gates-off", "smartbert",
            "--budgets", "0.8", "--json", str(out)]
    assert calibrated.main(argv) == 0
    table = json.loads(out.read_text())
    assert list(table["calibration"]) == ["smartbert", "smartbert_gates_off"] and table["gates_off"] == ["smartbert"]
    assert set(table["at_cost"]) == {"smartbert", "smartbert_gates_off"}
    cell = table["calibration"]["smartbert_gates_off"]["0.8"]
    assert "error" not in cell and cell["heldout_relative_cost"] <= 0.8 + 1e-9
    # Dev at that threshold with the gates off: every layer up to the exit runs.
    encoder, tokenizer, config = load_run(runs["smartbert"], "smartbert")
    _, dev = run_calibration.heldout_and_dev(run_examples(data, "mrpc", config), config, tokenizer)
    engine = AdaptiveInferenceEngine(encoder, EntropyExit(cell["threshold"]), mode="exit_only",
                                     padded_length=config.padded_length)
    traces = [engine(batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"])
              for batch in dev]
    assert not any(bool(trace.layers_skipped.any() or trace.gates_run.any()) for trace in traces)
    rows = sum(len(trace.exit_layer) for trace in traces)
    assert sum(float(trace.layers_run.sum()) for trace in traces) / rows == pytest.approx(cell["mean_layers_run"])
    assert sum(float(trace.exit_layer.sum()) for trace in traces) / rows == pytest.approx(cell["mean_layers_run"])


def test_joint_calibrates_gate_and_exit_thresholds_together(runs: dict[str, Path], data: Path,
                                                            tmp_path: Path) -> None:
    """``--joint smartbert``: at each gate threshold the exit threshold is calibrated as plain
    calibration does (0.5, the run's own, reproduces the ``smartbert`` row), the best held-out
    metric wins, and dev is scored at the winner's gate threshold."""
    out = tmp_path / "joint.json"
    argv = ["--data-dir", str(data), "--run", f"smartbert={runs['smartbert']}", "--joint", "smartbert",
            "--gate-thresholds", "0.5", "0.3", "1.0", "--budgets", "0.8", "--json", str(out)]
    assert calibrated.main(argv) == 0
    table = json.loads(out.read_text())
    assert list(table["calibration"]) == ["smartbert", "smartbert_joint"] and table["joint"] == ["smartbert"]
    assert table["gate_thresholds"] == [0.5, 0.3, 1.0]
    own, cell = table["calibration"]["smartbert"]["0.8"], table["calibration"]["smartbert_joint"]["0.8"]
    candidates = cell["candidates"]
    assert [c["gate_threshold"] for c in candidates] == [0.5, 0.3, 1.0]
    assert candidates[0]["threshold"] == pytest.approx(own["threshold"], abs=THRESHOLD_RESOLUTION)
    assert candidates[0]["metric"] == pytest.approx(own["heldout_metric"])
    assert candidates[0]["relative_cost"] == pytest.approx(own["heldout_relative_cost"])
    feasible = [c for c in candidates if "error" not in c]
    best = max(feasible, key=lambda c: (c["metric"], -c["relative_cost"]))
    assert cell["gate_threshold"] == best["gate_threshold"] and cell["threshold"] == best["threshold"]
    assert cell["heldout_metric"] == best["metric"] and cell["setting"].endswith(f"gate={best['gate_threshold']:g}")
    dev = {c["gate_threshold"]: c for c in cell["dev_candidates"]}
    assert dev[0.5]["main_metric"] == pytest.approx(own["main_metric"])
    assert dev[0.5]["relative_cost"] == pytest.approx(own["relative_cost"])
    assert dev[cell["gate_threshold"]]["main_metric"] == cell["main_metric"]
    assert len(cell["skip_rate_per_layer"]) == 3
    if cell["gate_threshold"] == 1.0:
        assert not any(cell["skip_rate_per_layer"])
    # How per-sample the skipping is at each gate threshold: the run's own statistics at 0.5, none at 1.0.
    skipping = table["joint_skipping"]["smartbert"]
    assert list(skipping) == ["0.5", "0.3", "1.0"]
    own_skipping = table["skipping"]["smartbert"]
    assert skipping["0.5"]["num_patterns"] == own_skipping["num_patterns"]
    assert skipping["0.5"]["skip_rate_per_layer"] == pytest.approx(own_skipping["skip_rate_per_layer"])
    assert skipping["1.0"]["num_patterns"] == 1 and not any(skipping["1.0"]["skip_rate_per_layer"])
    # At 1.0 the engine runs no gate, so that candidate is exactly the gates-off calibration.
    off_out = tmp_path / "gates-off.json"
    assert calibrated.main([*argv[:4], "--gates-off", "smartbert", "--budgets", "0.8", "--json", str(off_out)]) == 0
    off = json.loads(off_out.read_text())["calibration"]["smartbert_gates_off"]["0.8"]
    assert candidates[2]["threshold"] == pytest.approx(off["threshold"], abs=THRESHOLD_RESOLUTION)
    assert candidates[2]["metric"] == pytest.approx(off["heldout_metric"])
    assert candidates[2]["relative_cost"] == pytest.approx(off["heldout_relative_cost"], rel=1e-12)
    assert dev[1.0]["main_metric"] == pytest.approx(off["main_metric"])
    assert dev[1.0]["relative_cost"] == pytest.approx(off["relative_cost"], rel=1e-12)


def test_runs_from_a_tradeoff_table(runs: dict[str, Path], data: Path, tmp_path: Path) -> None:
    table = tmp_path / "tradeoff-mrpc.json"
    table.write_text(json.dumps({"runs": {"finetune": str(runs["finetune"]), "deebert": str(runs["deebert"])}}))
    out = tmp_path / "out.json"
    assert calibrated.main(["--data-dir", str(data), "--table", str(table), "--budgets", "0.7", "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["runs"]) == {"deebert"}  # the fine-tuned reference has no exits


@pytest.mark.parametrize("case, message", [
    ("no_equals", "expected method=run_folder"),
    ("budget", "each budget must be in (0, 1]"),
    ("unfinished", "does not exist: calibrate finished runs"),
    ("wrong_method", "is a 'deebert' run, not 'fastbert'"),
    ("no_exits", "finetune has no early exit"),
    ("other_data", "was made on other data"),
    ("nothing", "nothing to calibrate"),
    ("gates_off_missing", "not among the runs"),
    ("gates_off_gateless", "--gates-off deebert: its run has no skip gates"),
    ("joint_missing", "--joint smartbert: not among the runs"),
    ("joint_gateless", "--joint deebert: its run has no skip gates"),
    ("gate_thresholds", "--gate-thresholds 1.2: gate_threshold must be in [0, 1]"),
    ("tolerance", "--tolerance 0.0: the bisection's stopping width must be in (0, 1)"),
    ("criterion", "--criterion tolerance: mrpc is a classification task, whose exits can use entropy"),
])
def test_bad_input_is_a_clear_error(runs: dict[str, Path], data: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str], case: str, message: str) -> None:
    data_dir, run = str(data), [f"--run=deebert={runs['deebert']}"]
    budgets = ["--budgets", "0.5"]
    if case == "no_equals":
        run = ["--run", str(runs["deebert"])]
    elif case == "budget":
        budgets = ["--budgets", "1.5"]
    elif case == "unfinished":
        run = ["--run", f"deebert={tmp_path / 'nothing'}"]
    elif case == "wrong_method":
        run = ["--run", f"fastbert={runs['deebert']}"]
    elif case == "no_exits":
        run = ["--run", f"finetune={runs['finetune']}"]
    elif case == "other_data":
        data_dir = str(write_synthetic_glue(tmp_path / "other", "mrpc", n_train=120, n_dev=24, seed=1))
    elif case == "nothing":
        run = []
    elif case == "gates_off_missing":
        run += ["--gates-off", "smartbert"]
    elif case == "gates_off_gateless":
        run += ["--gates-off", "deebert"]
    elif case == "joint_missing":
        run += ["--joint", "smartbert"]
    elif case == "joint_gateless":
        run += ["--joint", "deebert"]
    elif case == "gate_thresholds":
        run += ["--gate-thresholds", "0.5", "1.2"]
    elif case == "criterion":
        run += ["--criterion", "tolerance"]
    elif case == "tolerance":
        run += ["--tolerance", "0"]
    argv = ["--data-dir", data_dir, *run, *budgets, "--json", str(tmp_path / "t.json")]
    assert calibrated.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_each_head_scored_alone(runs: dict[str, Path], data: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """``benchmarks.heads``: the last head, every layer running, is the run's own full-depth row."""
    from benchmarks import heads

    out = tmp_path / "heads.json"
    argv = ["--data-dir", str(data), "--run", f"fastbert={runs['fastbert']}", "--run", f"smartbert={runs['smartbert']}",
            "--json", str(out)]
    assert heads.main(argv) == 0
    assert "| smartbert | 42 | mrpc (f1) |" in capsys.readouterr().out
    for score in json.loads(out.read_text())["runs"]:
        results = json.loads((runs[score["method"]] / "results.json").read_text())
        full = next(row for row in results["sweep"] if row["mode"] == "full")
        assert [head["layer"] for head in score["heads"]] == [1, 2, 3] and score["num_rows"] == 24
        assert score["heads"][-1]["metrics"] == pytest.approx(full["metrics"])
        assert score["heads"][-1]["agreement_with_last"] == 1.0
        assert all(0.0 <= head["agreement_with_last"] <= 1.0 for head in score["heads"])
    assert heads.main(["--data-dir", str(data), "--run", f"finetune={runs['finetune']}", "--json", str(out)]) == 2
    assert "finetune has no early exit" in capsys.readouterr().err
