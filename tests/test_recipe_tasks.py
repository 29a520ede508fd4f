"""SmartBERT beyond MRPC: STS-B (regression exits), MNLI (both dev sets), the gate warm-up, and the
per-run skipping statistics; a named backbone resolves to a local folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipes import smartbert
from recipes.run.models import load_model_and_tokenizer
from tests.conftest import TINY_SMARTBERT, approx_tree, minilm_dir, requires_minilm, run_smartbert
from tests.glue_fixtures import write_synthetic_glue

pytestmark = [requires_minilm, pytest.mark.usefixtures("one_thread")]

TINY = [*TINY_SMARTBERT, "stage1_epochs=2", "soft_epochs=1", "stage2_epochs=1", "calibration_budget=0.95"]


def run(task: str, data_dir: Path, model: Path, out: Path, *extra: str) -> dict:
    assert run_smartbert("--task", task, "--data-dir", data_dir, "--model", model, "--output-dir", out, *TINY,
                         *extra) == 0
    return json.loads((out / "results.json").read_text())


def test_stsb_sweeps_tolerance_and_patience_and_calibrates_the_tolerance(tiny_model_dir_3: Path,
                                                                         tmp_path: Path) -> None:
    data = write_synthetic_glue(tmp_path / "glue", "stsb", n_train=40, n_dev=16)
    results = run("stsb", data, tiny_model_dir_3, tmp_path / "run", "regression_tolerances=[0.1,1.0]")
    names = [row["name"] for row in results["sweep"]]
    assert names == ["full", "skip_only", "tolerance=0.1", "tolerance=1", "patience=1", "patience=2"]
    assert set(results["sweep"][0]["metrics"]) == {"pearson", "spearman"}
    point = results["operating_point"]
    calibration = point["calibration"]
    assert "error" not in calibration and calibration["criterion"] == "tolerance"
    assert calibration["relative_cost"] <= 0.95
    assert results["majority_class_baseline"] is None and results["skipping"]["num_rows"] == 16
    # The same run calibrated on its regression tolerance (benchmarks.calibrated --criterion tolerance).
    from benchmarks import calibrated

    out = tmp_path / "calibrated.json"
    assert calibrated.main(["--data-dir", str(data), "--run", f"smartbert={tmp_path / 'run'}", "--criterion",
                            "tolerance", "--budgets", "1.0", "0.95", "--json", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["criterion"] == "tolerance"
    cells = table["calibration"]["smartbert"]
    assert cells["1.0"]["criterion"] == "tolerance" and cells["1.0"]["threshold"] == 0.0  # no early exit needed
    for budget, cell in cells.items():
        assert "error" in cell or (cell["setting"].startswith("tolerance=")
                                   and cell["heldout_relative_cost"] <= float(budget) + 1e-9)


def test_mnli_evaluates_the_mismatched_dev_set_too(tiny_model_dir_3: Path, tmp_path: Path) -> None:
    data = write_synthetic_glue(tmp_path / "glue", "mnli", n_train=45, n_dev=18)
    results = run("mnli", data, tiny_model_dir_3, tmp_path / "run", "entropy_thresholds=[0.5]")
    assert results["dev_split"] == "dev_matched"
    mismatched = results["other_dev_splits"]["dev_mismatched"]
    assert [row["name"] for row in mismatched] == [row["name"] for row in results["sweep"]]
    assert sum(mismatched[0]["exit_layer_histogram"]) == results["sizes"]["dev_mismatched"]


def test_gate_warm_up_runs_every_layer_without_a_gate_objective_first(tiny_model_dir_3: Path, glue_dir: Path,
                                                                     tmp_path: Path) -> None:
    results = run("mrpc", glue_dir, tiny_model_dir_3, tmp_path / "run", "stage1_epochs=3", "gate_warmup_epochs=1",
                  "gate_objective={name: budget, target_cost: 0.6}")
    history = results["history"]["stage1"]
    assert [record["options"]["gate_mode"] for record in history] == ["run", "soft", "hard"]
    assert set(history[0]["terms"]) == {"task", "contrastive"}
    assert set(history[1]["terms"]) == {"task", "budget", "contrastive"}
    skipping = results["skipping"]
    assert skipping["num_rows"] == 16 and len(skipping["skip_rate_per_layer"]) == 3
    assert 1 <= skipping["num_patterns"] <= 8
    with pytest.raises(SystemExit):
        smartbert.main(["--help"])
    assert smartbert.main(["--task", "mrpc", "--data-dir", str(glue_dir), "--model", str(tiny_model_dir_3),
                           "--output-dir", str(tmp_path / "bad"), "stage1_epochs=2", "gate_warmup_epochs=2"]) == 2


@pytest.mark.parametrize("trained", ["all", "gates"])
def test_gated_epochs_train_gates_keeps_the_fine_tuned_backbone(trained: str, tiny_model_dir_3: Path,
                                                                glue_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``gated_epochs_train=gates``: after the warm-up, the backbone and last head stay exactly as the
    warm-up left them while the gates train; the paper's ``all`` trains the backbone on."""
    import torch

    from recipes.run.composer import Run

    snapshots: list[dict[str, torch.Tensor]] = []
    original = Run.evaluate_heldout

    def evaluate_heldout(self: Run) -> dict[str, float]:  # called once after every stage-1 epoch
        snapshots.append({key: value.detach().clone() for key, value in self.model.state_dict().items()})
        return original(self)

    monkeypatch.setattr(Run, "evaluate_heldout", evaluate_heldout)
    results = run("mrpc", glue_dir, tiny_model_dir_3, tmp_path / "run", "stage1_epochs=3", "gate_warmup_epochs=1",
                  "gate_objective=budget", "stage2_epochs=0", f"gated_epochs_train={trained}")
    assert [record["options"]["gate_mode"] for record in results["history"]["stage1"]] == ["run", "soft", "hard"]
    warm, last = snapshots[0], snapshots[-1]
    fine_tuned = [key for key in warm if key.startswith(("encoder.backbone.", "encoder.exit_heads.2."))]
    gates = [key for key in warm if key.startswith("encoder.gates.")]
    assert fine_tuned and gates
    assert any(not torch.equal(warm[key], last[key]) for key in gates)
    unchanged = [key for key in fine_tuned if torch.equal(warm[key], last[key])]
    if trained == "gates":
        assert unchanged == fine_tuned
    else:
        assert len(unchanged) < len(fine_tuned)


@pytest.mark.parametrize("overrides, message", [
    (["gated_epochs_train=gates"], "set gate_warmup_epochs >= 1"),
    (["gate_warmup_epochs=1", "gated_epochs_train=frozen"], "gated_epochs_train must be 'all' or 'gates'"),
    (["gate_objective.spread=0.2"], "the gate objective 'skip_reward' takes no option 'spread'"),
    (["gate_objective=sloth"], "unknown gate objective 'sloth'"),
    (["exit_objective=weighted"], "SmartBERT's exit_objective is 'labels' (the paper) or 'distill'"),
    (["warmup_layer_drop=0.2"], "unknown config key 'warmup_layer_drop'"),
])
def test_the_gate_warm_up_and_objective_keys_are_validated(overrides: list[str], message: str, tiny_model_dir_3: Path,
                                             glue_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--task", "mrpc", "--data-dir", str(glue_dir), "--model", str(tiny_model_dir_3), "--output-dir",
            str(tmp_path / "bad"), "stage1_epochs=2", *overrides]
    assert smartbert.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_known_model_name_resolves_to_its_local_folder() -> None:
    _, tokenizer, name = load_model_and_tokenizer("all-minilm-l6-v2")
    assert Path(name) == minilm_dir() and tokenizer("Hi.")["input_ids"][0] == tokenizer.cls_token_id


def test_skipping_statistics_reuse_the_sweeps_passes() -> None:
    """The statistics from the sweep's recorded full and skip-only passes equal those of fresh passes."""
    import torch

    from adaptive_depth import AdaptiveEncoder, EntropyExit
    from recipes.glue import GlueMetrics
    from recipes.run.sweep import SweepSetting, run_sweep, skipping_statistics
    from tests.conftest import padded_batch, tiny_model

    torch.manual_seed(0)
    encoder = AdaptiveEncoder(tiny_model("bert", num_layers=4), num_labels=2, gate_inner_size=16,
                              head_inner_size=16).eval()
    for gate in encoder.gates:
        gate.score.weight.data.normal_(0.0, 3.0)
    batches = []
    for seed in range(3):
        input_ids, mask = padded_batch(batch_size=5, num_tokens=9, seed=seed)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0, 1])})
    traces: dict = {}
    settings = [SweepSetting("full", "full"), SweepSetting("skip_only", "skip_only"),
                SweepSetting("entropy=0.3", "adaptive", EntropyExit(0.3), 0.3)]
    run_sweep(encoder, batches, settings, lambda: GlueMetrics("mrpc"), 0.5, None, traces=traces)
    assert sorted(traces) == ["full", "skip_only"]
    reused = skipping_statistics(encoder, batches, 0.5, False, traces)
    fresh = skipping_statistics(encoder, batches, 0.5, False)
    assert reused == approx_tree(fresh) and reused["num_rows"] == 15 and reused["num_patterns"] > 1


@pytest.mark.parametrize("budget", [1.0, 0.01])  # calibrated; impossible (saved at no early exit)
def test_the_saved_operating_point_keeps_the_criterions_options(tmp_path: Path, budget: float) -> None:
    """A run whose patience exit agrees within a non-default tolerance saves that tolerance, on
    either branch of the calibration, and the reloaded model rebuilds it."""
    from adaptive_depth import AdaptiveEncoder, PatienceExit
    from recipes.glue import GlueMetrics
    from recipes.run.operating_point import calibrate_and_save
    from recipes.run.sweep import SweepSetting
    from tests.conftest import padded_batch, tiny_model

    torch.manual_seed(0)
    encoder = AdaptiveEncoder(tiny_model("bert", num_layers=4), num_labels=1, with_gates=False, head_inner_size=16)
    batches = []
    for seed in range(2):
        input_ids, mask = padded_batch(batch_size=5, num_tokens=9, seed=seed)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": torch.rand(5) * 5})
    settings = [SweepSetting("full", "full"),
                SweepSetting("patience=2", "exit_only", PatienceExit(2, regression_tolerance=0.3), 2.0)]
    point = calibrate_and_save(encoder, None, tmp_path, settings, batches, batches, lambda: GlueMetrics("stsb"),
                               budget=budget, padded_length=None, label_names=None, max_length=9)
    assert (point.calibration is not None and "error" in point.calibration) == (budget < 0.5)
    saved = AdaptiveEncoder.from_pretrained(tmp_path / point.model_dir).adaptive_config
    assert saved.criterion == "patience" and saved.criterion_options == {"regression_tolerance": 0.3}
    assert saved.make_criterion().regression_tolerance == 0.3
