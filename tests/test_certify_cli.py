"""Raw text in: pipeline.calibrate / certify (one argument order, label names), the calibrate command
line round trip, and predict's checks (output, labels, pairs, metric, cost, certificate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptive_depth import AdaptiveEncoder, AdaptivePipeline, EntropyExit
from adaptive_depth.calibrate import main as calibrate_main
from adaptive_depth.certificate import Certificate
from adaptive_depth.metrics import task_metric
from adaptive_depth.predict import main as predict_main
from tests.conftest import requires_minilm
from tests.conftest import tiny_minilm_encoder
from tests.test_pipeline import PAIRS, SENTENCES

pytestmark = requires_minilm  # the tokenizer of the real MiniLM tokenizes the raw texts

NAMES = ["not_equivalent", "equivalent"]
LABELS = [0, 1, 1, 0, 1, 0]


@pytest.fixture(scope="module")
def pair_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pair model that says it reads pairs and that its task's metric is F1."""
    encoder, tokenizer = tiny_minilm_encoder()
    config = encoder.adaptive_config
    config.label_names, config.threshold, config.text_pair, config.metric = NAMES, 0.5, True, "f1"
    return encoder.save_pretrained(tmp_path_factory.mktemp("models") / "pair", tokenizer=tokenizer)


def write_tsv(path: Path, repeat: int = 1, gold: list[str] | None = None) -> Path:
    lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    rows = list(zip(SENTENCES, PAIRS)) * repeat
    gold = gold or [str(LABELS[i % 6]) for i in range(len(rows))]
    lines += [f"{g}\t{1000 + i}\t{2000 + i}\t{a}\t{b}" for i, (g, (a, b)) in enumerate(zip(gold, rows))]
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_calibrate_takes_the_arguments_in_the_calls_order_and_label_names(pair_model: Path) -> None:
    pipeline = AdaptivePipeline.from_pretrained(pair_model)
    by_index = pipeline.calibrate(SENTENCES * 3, PAIRS * 3, labels=LABELS * 3, max_relative_cost=0.8)
    by_name = AdaptivePipeline.from_pretrained(pair_model).calibrate(
        SENTENCES * 3, PAIRS * 3, labels=[NAMES[i] for i in LABELS] * 3, max_relative_cost=0.8)
    by_text = AdaptivePipeline.from_pretrained(pair_model).calibrate(
        SENTENCES * 3, PAIRS * 3, labels=[str(i) for i in LABELS] * 3, max_relative_cost=0.8)
    assert (by_index.threshold, by_index.metric) == (by_name.threshold, by_name.metric) == (by_text.threshold,
                                                                                             by_text.metric)
    with pytest.raises(TypeError, match="positional"):  # the old (texts, labels, text_pairs) order
        pipeline.calibrate(SENTENCES, LABELS, PAIRS)  # type: ignore[misc]
    with pytest.raises(TypeError, match="texts must be strings"):  # labels where the pairs go
        pipeline.calibrate(SENTENCES, LABELS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"label 2 is 'maybe', which is not one of this model's labels: names "
                                         r"\['not_equivalent', 'equivalent'\] or class indices 0..1"):
        pipeline.calibrate(SENTENCES, PAIRS, labels=["equivalent", "maybe", 0, 1, 1, 0])


def test_a_pair_model_refuses_single_texts_unless_told(pair_model: Path) -> None:
    with pytest.raises(ValueError, match="reads text pairs.*allow_single_texts=True"):
        AdaptivePipeline.from_pretrained(pair_model)(SENTENCES)
    assert len(AdaptivePipeline.from_pretrained(pair_model, allow_single_texts=True)(SENTENCES)) == 6


def test_pipeline_certify_sets_and_saves_the_certified_point(pair_model: Path, tmp_path: Path) -> None:
    pipeline = AdaptivePipeline.from_pretrained(pair_model)
    certificate = pipeline.certify(SENTENCES * 40, PAIRS * 40, max_risk=0.3, delta=0.1)
    assert pipeline.engine.criterion == EntropyExit(certificate.threshold) == certificate.make_criterion()
    folder = pipeline.encoder.save_pretrained(tmp_path / "certified", tokenizer=pipeline.tokenizer)
    reloaded = AdaptiveEncoder.from_pretrained(folder).adaptive_config
    assert Certificate.from_dict(reloaded.certificate) == certificate and reloaded.calibration is None
    assert certificate.covers(reloaded.make_criterion(), reloaded.gate_threshold, reloaded.mode)
    pipeline.calibrate(SENTENCES, PAIRS, labels=LABELS, max_relative_cost=0.9)  # another point: no certificate
    assert pipeline.encoder.adaptive_config.certificate is None


def test_calibrate_command_line_round_trip(pair_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    model = Path(pair_model.parent / "round_trip")
    AdaptiveEncoder.from_pretrained(pair_model).save_pretrained(
        model, tokenizer=AdaptivePipeline.from_pretrained(pair_model).tokenizer)
    rows = write_tsv(tmp_path / "heldout.tsv", repeat=40)
    config_path = model / "adaptive_config.json"
    before = config_path.read_bytes()
    assert calibrate_main([str(model), "--input", str(rows), "--max-disagreement", "0.001", "--no-progress"]) == 2
    assert "smallest certifiable risk with 240 rows" in capsys.readouterr().err
    assert config_path.read_bytes() == before  # nothing written
    assert calibrate_main([str(model), "--input", str(rows), "--max-disagreement", "0.3", "--delta", "0.1",
                           "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "With probability at least 1 - 0.1 over the draw of the 240 calibration rows" in out
    saved = json.loads(config_path.read_text())
    certificate = Certificate.from_dict(saved["certificate"])
    assert (saved["criterion"], saved["threshold"]) == (certificate.criterion, certificate.threshold)
    assert not [path.name for path in model.iterdir() if path.name.startswith(".")]  # no temporary files left

    assert predict_main([str(model), "--input", str(rows), "--output", str(tmp_path / "p.jsonl"), "--no-progress"]) == 0
    assert "certified: disagreement with full depth <= 0.3 with probability >= 0.9 (n=240" in capsys.readouterr().err
    assert predict_main([str(model), "--input", str(rows), "--output", str(tmp_path / "p.jsonl"), "--no-progress",
                         "--threshold", "0"]) == 0
    assert "not certified: the saved certificate covers entropy=" in capsys.readouterr().err
    # With --no-verify the manifest is left alone: the rewritten folder then loads with --no-verify only.
    manifest = (model / "adaptive_manifest.json").read_bytes()
    assert calibrate_main([str(model), "--input", str(rows), "--max-disagreement", "0.35", "--delta", "0.1",
                           "--no-progress", "--no-verify"]) == 0
    assert "left as it was" in capsys.readouterr().err and (model / "adaptive_manifest.json").read_bytes() == manifest
    assert predict_main([str(model), "--input", str(rows), "--no-progress", "--output", str(tmp_path / "p.jsonl")]) == 2
    assert "adaptive_config.json differs from the file save_pretrained wrote" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--max-risk", "0"], r"--max-risk must be in (0, 1)"), (["--delta", "1.5"], r"--delta must be in (0, 1)"),
    (["--max-relative-cost", "0"], "max_relative_cost must be in (0, 1]"),
    (["--risk", "error_gap"], "--risk error_gap compares error rates: name the gold labels with --label-column"),
    (["--risk", "moved", "--tolerance", "0.1"], "'moved' (scores moving by more than a tolerance) is for regression"),
])
def test_calibrate_command_line_errors_are_one_line(pair_model: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str], arguments: list[str],
                                                    message: str) -> None:
    rows = write_tsv(tmp_path / "rows.tsv")
    assert calibrate_main([str(pair_model), "--input", str(rows), "--no-progress", *arguments]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading and "certifying" lines
    assert last.startswith("error: ") and message in last


@pytest.mark.parametrize("case", ["folder", "no_parent", "under_a_file"])
def test_predict_checks_the_output_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   case: str) -> None:
    (tmp_path / "a_file").write_text("x")
    output = {"folder": tmp_path, "no_parent": tmp_path / "missing" / "p.jsonl",
              "under_a_file": tmp_path / "a_file" / "p.jsonl"}[case]
    # The model and the rows do not even exist: the output is checked first.
    assert predict_main([str(tmp_path / "no_model"), "--input", str(tmp_path / "no_rows.tsv"), "--output",
                         str(output)]) == 2
    err = capsys.readouterr().err
    assert {"folder": "is a folder", "no_parent": "does not exist; create it first",
            "under_a_file": "is a file, not a folder"}[case] in err


def test_predict_writes_its_output_atomically(pair_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    from adaptive_depth.pipeline import Prediction

    rows, output = write_tsv(tmp_path / "dev.tsv"), tmp_path / "predictions.jsonl"
    output.write_text("the previous predictions\n")
    calls = []

    def failing_to_dict(self: Prediction) -> dict:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed half way")
        return {"label": self.label}

    monkeypatch.setattr(Prediction, "to_dict", failing_to_dict)
    with pytest.raises(RuntimeError, match="half way"):
        predict_main([str(pair_model), "--input", str(rows), "--output", str(output), "--no-progress"])
    assert output.read_text() == "the previous predictions\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dev.tsv", "predictions.jsonl"]


def test_predict_reports_the_tasks_metric_and_the_ratio_of_sums(pair_model: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    rows, output = write_tsv(tmp_path / "dev.tsv", gold=[NAMES[i] for i in LABELS]), tmp_path / "p.jsonl"
    assert predict_main([str(pair_model), "--input", str(rows), "--output", str(output), "--label-column", "Quality",
                         "--no-progress"]) == 0
    err = capsys.readouterr().err
    written = [json.loads(line) for line in output.read_text().splitlines()]
    import torch

    chosen, gold = torch.tensor([row["label_id"] for row in written]), torch.tensor(LABELS)
    cost = sum(row["macs_exact"] for row in written) / sum(row["full_macs_exact"] for row in written)
    assert (f"6 rows, relative cost {cost:.3f} (total MACs / full-depth MACs, exact convention), "
            f"f1 {task_metric('f1', chosen, gold, 2):.4f}, accuracy {task_metric('accuracy', chosen, gold, 2):.4f} "
            "against 'Quality'") in err
    assert "operating point not certified" in err


@pytest.mark.parametrize("arguments, message", [
    (["--label-column", "#1 ID"], "--label-column '#1 ID': label 1 is '1000', which is not one of this model's labels"),
    (["--pair-column", "#1 ID", "--text-column", "#2 String", "--label-column", "Nope"], "--label-column 'Nope' is not"),
])
def test_predict_refuses_a_label_column_that_holds_no_labels(pair_model: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str], arguments: list[str],
                                                             message: str) -> None:
    rows = write_tsv(tmp_path / "dev.tsv")
    assert predict_main([str(pair_model), "--input", str(rows), "--no-progress", *arguments]) == 2
    assert message in capsys.readouterr().err


def test_predict_refuses_single_texts_for_a_pair_model_unless_told(pair_model: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rows = tmp_path / "single.jsonl"
    rows.write_text("".join(json.dumps({"#1 String": text, "Quality": "1"}) + "\n" for text in SENTENCES))
    assert predict_main([str(pair_model), "--input", str(rows), "--no-progress"]) == 2
    assert "reads text pairs" in capsys.readouterr().err
    assert predict_main([str(pair_model), "--input", str(rows), "--no-progress", "--allow-single-texts"]) == 0
