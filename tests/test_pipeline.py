"""AdaptivePipeline on raw texts, calibrate_threshold, calibrate_operating_point, and the predict command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adaptive_depth import (
    AdaptiveEncoder,
    AdaptivePipeline,
    EntropyExit,
    ToleranceExit,
    calibrate_operating_point,
    calibrate_threshold,
)
from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.predict import main as predict_main
from tests.conftest import THRESHOLD_RESOLUTION, requires_minilm, tiny_minilm_encoder

pytestmark = requires_minilm  # the tokenizer of the real MiniLM tokenizes the raw texts

SENTENCES = ["A man plays a guitar.", "Hi.", "The cat sat on the mat while the rain kept falling outside.",
             "Stocks fell sharply on Monday.", "She reads.", "Nobody knew what the committee would decide next year."]
PAIRS = ["A person plays music.", "Hello.", "It rained.", "Markets dropped.", "She is reading a book.", "Unknown."]


@pytest.fixture(scope="module")
def saved_pair_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    encoder, tokenizer = tiny_minilm_encoder()
    encoder.adaptive_config.label_names = ["not_equivalent", "equivalent"]
    encoder.adaptive_config.threshold = 0.5
    return encoder.save_pretrained(tmp_path_factory.mktemp("models") / "pair", tokenizer=tokenizer)


def test_a_loaded_pipeline_runs_its_gates_and_heads_fused(saved_pair_model: Path) -> None:
    pipeline = AdaptivePipeline.from_pretrained(saved_pair_model)
    assert pipeline.encoder.fused_for_inference
    assert all(module._fused is not None for module in (*pipeline.encoder.gates, *pipeline.encoder.exit_heads))
    unfused = AdaptiveEncoder.from_pretrained(saved_pair_model)
    engine = AdaptiveInferenceEngine(unfused, pipeline.engine.criterion)
    predictions = pipeline(SENTENCES, PAIRS)
    for prediction, text, pair in zip(predictions, SENTENCES, PAIRS):
        alone = engine(**pipeline.tokenizer([text], [pair], return_tensors="pt"))
        assert prediction.exit_layer == int(alone.exit_layer[0])


def test_predict_on_raw_text_pairs_matches_the_engine_row_by_row(saved_pair_model: Path) -> None:
    pipeline = AdaptivePipeline.from_pretrained(saved_pair_model, batch_size=4)
    predictions = pipeline(SENTENCES, PAIRS)
    assert len(predictions) == len(SENTENCES)
    engine = AdaptiveInferenceEngine(pipeline.encoder, EntropyExit(0.5))
    for prediction, text, pair in zip(predictions, SENTENCES, PAIRS):
        alone = engine(**pipeline.tokenizer([text], [pair], return_tensors="pt"))
        assert prediction.label == ["not_equivalent", "equivalent"][int(alone.predictions[0])]
        assert prediction.exit_layer == int(alone.exit_layer[0])
        assert prediction.layers_run == int(alone.layers_run.sum())
        assert prediction.relative_cost == pytest.approx(float(alone.macs_exact[0] / alone.full_macs_exact[0]))
        assert sum(prediction.probabilities) == pytest.approx(1.0, abs=1e-5)
        assert prediction.score == pytest.approx(max(prediction.probabilities))
    assert len({p.exit_layer for p in predictions}) > 1 or any(p.layers_skipped for p in predictions)
    assert [p.label for p in pipeline(SENTENCES[::-1], PAIRS[::-1])] == [p.label for p in predictions][::-1]


def test_predict_on_single_sentences_and_regression(tmp_path: Path) -> None:
    encoder, tokenizer = tiny_minilm_encoder(num_labels=1, seed=3)
    encoder.adaptive_config.criterion, encoder.adaptive_config.threshold = "patience", 1
    pipeline = AdaptivePipeline.from_pretrained(encoder.save_pretrained(tmp_path / "m", tokenizer=tokenizer))
    predictions = pipeline(SENTENCES)
    assert all(p.label is None and p.probabilities is None for p in predictions)
    single = pipeline("Hi.")
    assert len(single) == 1 and single[0].score == pytest.approx(predictions[1].score, abs=1e-5)


def test_bad_inputs_to_the_pipeline(saved_pair_model: Path) -> None:
    pipeline = AdaptivePipeline.from_pretrained(saved_pair_model)
    with pytest.raises(ValueError, match="6 texts and 2 text pairs"):
        pipeline(SENTENCES, PAIRS[:2])
    with pytest.raises(ValueError, match="no texts"):
        pipeline([])
    with pytest.raises(TypeError, match="item 1 is a int"):
        pipeline(["fine", 3])  # type: ignore[list-item]
    pipeline.tokenizer.padding_side = "left"  # the pipeline pads on the right whatever the tokenizer says
    assert len(pipeline(SENTENCES[:3])) == 3


def test_calibrate_meets_the_budget_and_is_the_least_aggressive_threshold(saved_pair_model: Path) -> None:
    pipeline = AdaptivePipeline.from_pretrained(saved_pair_model)
    labels = [0, 1, 1, 0, 1, 0]
    data = [inputs for _, inputs in pipeline.batches(SENTENCES * 3, PAIRS * 3, labels * 3, batch_size=5)]
    full = calibrate_threshold(pipeline.engine, data, max_relative_cost=1.0)
    assert full.threshold == 0.0 and full.relative_cost <= 1.0  # no early exit needed
    budget = 0.75
    calibration = calibrate_threshold(pipeline.engine, data, max_relative_cost=budget, tolerance=1e-4)
    assert 0.0 < calibration.threshold and calibration.metric_name == "accuracy"
    # Measured again, independently, at the chosen threshold: within budget.
    engine = AdaptiveInferenceEngine(pipeline.encoder, EntropyExit(calibration.threshold))
    outs = [engine(**{k: v for k, v in batch.items() if k != "labels"}) for batch in data]
    cost = sum(float(o.macs_exact.sum()) for o in outs) / sum(float(o.full_macs_exact.sum()) for o in outs)
    assert cost == pytest.approx(calibration.relative_cost) and cost <= budget
    # A threshold a little less aggressive breaks the budget: the search did not stop early.
    looser = AdaptiveInferenceEngine(pipeline.encoder, EntropyExit(calibration.threshold - 0.01))
    outs = [looser(**{k: v for k, v in batch.items() if k != "labels"}) for batch in data]
    assert sum(float(o.macs_exact.sum()) for o in outs) / sum(float(o.full_macs_exact.sum()) for o in outs) > budget


def test_calibrate_refuses_an_impossible_budget(saved_pair_model: Path) -> None:
    pipeline = AdaptivePipeline.from_pretrained(saved_pair_model)
    with pytest.raises(ValueError, match=r"no entropy threshold meets max_relative_cost=0\.01.*raise the budget"):
        pipeline.calibrate(SENTENCES, PAIRS, labels=[0, 1, 1, 0, 1, 0], max_relative_cost=0.01)
    with pytest.raises(ValueError, match="never exits early"):
        calibrate_threshold(AdaptiveInferenceEngine(pipeline.encoder, mode="full"), [{"input_ids": torch.ones(1, 3).long()}])
    with pytest.raises(ValueError, match=r"max_relative_cost must be in \(0, 1\]"):
        calibrate_threshold(pipeline.engine, [], max_relative_cost=0)


def test_pipeline_calibrate_sets_the_operating_point_that_is_saved(saved_pair_model: Path, tmp_path: Path) -> None:
    pipeline = AdaptivePipeline.from_pretrained(saved_pair_model)
    calibration = pipeline.calibrate(SENTENCES, PAIRS, labels=[0, 1, 1, 0, 1, 0], max_relative_cost=0.8)
    folder = pipeline.encoder.save_pretrained(tmp_path / "calibrated", tokenizer=pipeline.tokenizer)
    reloaded = AdaptivePipeline.from_pretrained(folder)
    assert reloaded.engine.criterion == EntropyExit(calibration.threshold)
    assert reloaded.encoder.adaptive_config.calibration["max_relative_cost"] == 0.8


def test_calibrate_a_regression_tolerance_to_the_budget(tmp_path: Path) -> None:
    """A regression model's tolerance is bisected like an entropy threshold: within budget, and a
    slightly smaller tolerance breaks it; the pipeline saves it as the operating point."""
    encoder, tokenizer = tiny_minilm_encoder(num_labels=1, seed=3, num_layers=6)
    encoder.adaptive_config.criterion, encoder.adaptive_config.threshold = "tolerance", 0.5
    pipeline = AdaptivePipeline.from_pretrained(encoder.save_pretrained(tmp_path / "m", tokenizer=tokenizer))
    assert pipeline.engine.criterion == ToleranceExit(0.5)
    scores = [0.5, 4.0, 2.5, 1.0, 3.0, 0.0]
    data = [inputs for _, inputs in pipeline.batches(SENTENCES * 3, PAIRS * 3, scores * 3, batch_size=5)]

    def cost_at(tolerance: float) -> float:
        engine = AdaptiveInferenceEngine(pipeline.encoder, ToleranceExit(tolerance), pipeline.engine.gate_threshold)
        outs = [engine(**{k: v for k, v in batch.items() if k != "labels"}) for batch in data]
        return sum(float(o.macs_exact.sum()) for o in outs) / sum(float(o.full_macs_exact.sum()) for o in outs)

    cheapest, dearest = cost_at(float("inf")), cost_at(0.0)
    assert cheapest < dearest
    budget = (cheapest + dearest) / 2
    negative_mse = lambda predictions, labels: -float(((predictions - labels) ** 2).mean())  # noqa: E731
    calibration = calibrate_threshold(pipeline.engine, data, max_relative_cost=budget, tolerance=1e-4,
                                      metric=negative_mse)
    assert calibration.criterion == "tolerance" and 0.0 < calibration.threshold < float("inf")
    assert calibration.relative_cost == pytest.approx(cost_at(calibration.threshold)) and calibration.relative_cost <= budget
    assert cost_at(calibration.threshold * 0.95) > budget  # the least aggressive: the search did not stop early
    assert calibration.metric is not None
    saved = pipeline.calibrate(SENTENCES * 3, PAIRS * 3, labels=scores * 3, max_relative_cost=budget)
    reloaded = AdaptivePipeline.from_pretrained(pipeline.encoder.save_pretrained(tmp_path / "c", tokenizer=tokenizer))
    assert reloaded.engine.criterion == ToleranceExit(saved.threshold)
    with pytest.raises(ValueError, match=r"no tolerance threshold meets .*exits at head 2 of those that run"):
        calibrate_threshold(pipeline.engine, data, max_relative_cost=cheapest * 0.9)


def test_calibrate_and_predict_keep_the_criterions_other_fields(tmp_path: Path) -> None:
    """A tolerance exit with patience 2 stays one through calibration, saving, loading and
    ``predict --threshold``, which used to rebuild it with patience 1."""
    encoder, tokenizer = tiny_minilm_encoder(num_labels=1, seed=3, num_layers=6)
    encoder.adaptive_config.set_criterion(ToleranceExit(0.5, patience=2))
    pipeline = AdaptivePipeline.from_pretrained(encoder.save_pretrained(tmp_path / "m", tokenizer=tokenizer))
    assert pipeline.engine.criterion == ToleranceExit(0.5, patience=2)
    scores = [0.5, 4.0, 2.5, 1.0, 3.0, 0.0] * 3
    calibration = pipeline.calibrate(SENTENCES * 3, PAIRS * 3, labels=scores, max_relative_cost=0.9)
    assert calibration.criterion_options == {"patience": 2}
    folder = pipeline.encoder.save_pretrained(tmp_path / "c", tokenizer=tokenizer)
    assert AdaptivePipeline.from_pretrained(folder).engine.criterion == ToleranceExit(calibration.threshold, patience=2)

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": a, "text_pair": b}) + "\n" for a, b in zip(SENTENCES, PAIRS)))
    output = tmp_path / "predictions.jsonl"
    assert predict_main([str(folder), "--input", str(rows), "--output", str(output), "--threshold", "inf",
                         "--no-progress"]) == 0
    exits = [json.loads(line)["exit_layer"] for line in output.read_text().splitlines()]

    def exit_layers(criterion: ToleranceExit) -> list[int]:
        return [p.exit_layer for p in AdaptivePipeline(pipeline.encoder, tokenizer, criterion=criterion)(SENTENCES, PAIRS)]

    assert exits == exit_layers(ToleranceExit(math.inf, patience=2)) != exit_layers(ToleranceExit(math.inf))


def test_tolerance_calibration_refuses_a_classifier(saved_pair_model: Path) -> None:
    pipeline = AdaptivePipeline.from_pretrained(saved_pair_model)
    engine = AdaptiveInferenceEngine(pipeline.encoder, ToleranceExit(0.1))
    with pytest.raises(ValueError, match="tolerance exits are for regression"):
        calibrate_threshold(engine, _labelled_batches(pipeline), max_relative_cost=0.8)


def _labelled_batches(pipeline: AdaptivePipeline) -> list[dict[str, torch.Tensor]]:
    labels = [0, 1, 1, 0, 1, 0]
    return [inputs for _, inputs in pipeline.batches(SENTENCES * 3, PAIRS * 3, labels * 3, batch_size=5)]


def test_calibrate_operating_point_keeps_the_gate_threshold_that_scores_best(saved_pair_model: Path) -> None:
    pipeline = AdaptivePipeline.from_pretrained(saved_pair_model)
    data = _labelled_batches(pipeline)
    gate_thresholds, budget = (0.3, 0.5, 1.0), 0.8
    point = calibrate_operating_point(pipeline.engine, data, budget, gate_thresholds=gate_thresholds)
    # Each candidate is calibrate_threshold at that gate threshold, measured independently.
    alone = [calibrate_threshold(AdaptiveInferenceEngine(pipeline.encoder, EntropyExit(0.5), gate), data, budget)
             for gate in gate_thresholds]
    assert [c["gate_threshold"] for c in point.candidates] == list(gate_thresholds)
    for candidate, calibration in zip(point.candidates, alone):
        assert candidate["threshold"] == pytest.approx(calibration.threshold, abs=THRESHOLD_RESOLUTION)
        assert candidate["metric"] == pytest.approx(calibration.metric)
        assert candidate["relative_cost"] == pytest.approx(calibration.relative_cost)
        assert calibration.relative_cost <= budget
    assert len({(c.threshold, c.metric) for c in alone}) > 1  # the gate threshold changes the operating point
    best = max(range(len(alone)), key=lambda i: (alone[i].metric, -alone[i].relative_cost))
    assert point.gate_threshold == gate_thresholds[best]
    assert point.threshold == pytest.approx(alone[best].threshold, abs=THRESHOLD_RESOLUTION)
    assert point.metric == pytest.approx(alone[best].metric) and point.relative_cost <= budget
    # At gate threshold 1.0 the gates run but never skip.
    never = AdaptiveInferenceEngine(pipeline.encoder, EntropyExit(point.candidates[-1]["threshold"]), 1.0)
    assert not any(bool(never(**{k: v for k, v in batch.items() if k != "labels"}).layers_skipped.any())
                   for batch in data)


def test_calibrate_operating_point_refuses_bad_input(saved_pair_model: Path) -> None:
    pipeline = AdaptivePipeline.from_pretrained(saved_pair_model)
    data = _labelled_batches(pipeline)
    with pytest.raises(ValueError, match="gate_thresholds is empty"):
        calibrate_operating_point(pipeline.engine, data, gate_thresholds=())
    with pytest.raises(ValueError, match=r"must be in \[0, 1\].*got 1.5"):
        calibrate_operating_point(pipeline.engine, data, gate_thresholds=(0.5, 1.5))
    with pytest.raises(ValueError, match="needs 'labels'"):
        calibrate_operating_point(pipeline.engine, [{k: v for k, v in batch.items() if k != "labels"} for batch in data])
    with pytest.raises(ValueError, match="runs no gates.*use calibrate_threshold"):
        calibrate_operating_point(AdaptiveInferenceEngine(pipeline.encoder, EntropyExit(0.5), mode="exit_only"), data)
    with pytest.raises(ValueError, match=r"no gate threshold meets the budget: gate_threshold=0.5: .*gate_threshold=1: "):
        calibrate_operating_point(pipeline.engine, data, 0.01, gate_thresholds=(0.5, 1.0))


def test_pipeline_calibrate_over_gate_thresholds_saves_the_gate_threshold(saved_pair_model: Path,
                                                                          tmp_path: Path) -> None:
    pipeline = AdaptivePipeline.from_pretrained(saved_pair_model)
    labels = [0, 1, 1, 0, 1, 0] * 3
    calibration = pipeline.calibrate(SENTENCES * 3, PAIRS * 3, labels=labels, max_relative_cost=0.8,
                                     gate_thresholds=(0.3, 1.0))
    assert pipeline.engine.gate_threshold == calibration.gate_threshold in (0.3, 1.0)
    assert len(calibration.candidates) == 2
    reloaded = AdaptivePipeline.from_pretrained(
        pipeline.encoder.save_pretrained(tmp_path / "calibrated", tokenizer=pipeline.tokenizer))
    assert reloaded.engine.gate_threshold == calibration.gate_threshold
    assert reloaded.engine.criterion == EntropyExit(calibration.threshold)


def test_predict_command_line_on_a_glue_style_tsv(saved_pair_model: Path, tmp_path: Path, capsys) -> None:
    rows = tmp_path / "dev.tsv"
    lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    lines += [f"{i % 2}\t{i}\t{i + 100}\t{a}\t{b}" for i, (a, b) in enumerate(zip(SENTENCES, PAIRS))]
    rows.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "predictions.jsonl"
    status = predict_main([str(saved_pair_model), "--input", str(rows), "--output", str(output),
                           "--label-column", "Quality", "--no-progress"])
    assert status == 0
    written = [json.loads(line) for line in output.read_text().splitlines()]
    expected = AdaptivePipeline.from_pretrained(saved_pair_model)(SENTENCES, PAIRS)
    assert [row["label"] for row in written] == [p.label for p in expected]
    assert "6 rows, relative cost" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"), ("csv", "must end in .jsonl or .tsv"), ("ragged", "line 3: 1 tab-separated"),
    ("badjson", "line 2: not JSON"), ("nocolumn", "no text column"), ("notmodel", "is not a folder holding"),
    ("twice", "the header names the column(s) ['sentence'] twice"),
])
def test_predict_command_line_errors_are_one_line(saved_pair_model: Path, tmp_path: Path, capsys,
                                                  case: str, message: str) -> None:
    model = str(saved_pair_model)
    path = tmp_path / "rows.tsv"
    if case == "csv":
        path = tmp_path / "rows.csv"
        path.write_text("a,b\n")
    elif case == "ragged":
        path.write_text("sentence\tlabel\nfine\t1\nbroken\n")
    elif case == "badjson":
        path = tmp_path / "rows.jsonl"
        path.write_text('{"text": "ok"}\n{"text": \n')
    elif case == "nocolumn":
        path = tmp_path / "rows.jsonl"
        path.write_text('{"body": "ok"}\n')
    elif case == "twice":  # the second column of a name used to win silently
        path.write_text("sentence\tsentence\nfine\tbroken\n")
    elif case == "notmodel":
        path.write_text("sentence\nfine\n")
        model = str(tmp_path / "nowhere")
    assert predict_main([model, "--input", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_predict_reads_qnli_columns_in_their_order(saved_pair_model: Path, tmp_path: Path) -> None:
    """QNLI's dev.tsv is ``index question sentence label``: the question is the first text. The text column used
    to default to ``sentence`` and the pair to nothing (or, with --pair-column sentence, to the same column)."""
    rows = tmp_path / "dev.tsv"
    lines = ["index\tquestion\tsentence\tlabel"]
    lines += [f"{i}\t{a}\t{b}\tentailment" for i, (a, b) in enumerate(zip(SENTENCES, PAIRS))]
    rows.write_text("\n".join(lines) + "\n", encoding="utf-8")
    expected = [p.label for p in AdaptivePipeline.from_pretrained(saved_pair_model)(SENTENCES, PAIRS)]
    swapped = [p.label for p in AdaptivePipeline.from_pretrained(saved_pair_model)(PAIRS, SENTENCES)]
    assert expected != swapped  # the order of the pair matters to this model
    for extra in ([], ["--pair-column", "sentence"], ["--text-column", "question"]):
        output = tmp_path / f"out{len(extra)}{''.join(extra)}.jsonl"
        assert predict_main([str(saved_pair_model), "--input", str(rows), "--output", str(output), "--no-progress",
                             *extra]) == 0
        assert [json.loads(line)["label"] for line in output.read_text().splitlines()] == expected, extra
    assert predict_main([str(saved_pair_model), "--input", str(rows), "--no-progress", "--text-column", "sentence",
                         "--pair-column", "sentence"]) == 2


def test_predict_reads_a_tsv_field_longer_than_the_csv_modules_default_limit(saved_pair_model: Path,
                                                                            tmp_path: Path) -> None:
    import csv

    rows = tmp_path / "long.tsv"
    rows.write_text("sentence1\tsentence2\n" + "word " * 40_000 + "\tshort\n", encoding="utf-8")  # 200,000 characters
    limit = csv.field_size_limit()
    assert predict_main([str(saved_pair_model), "--input", str(rows), "--output", str(tmp_path / "o.jsonl"),
                         "--no-progress"]) == 0
    assert csv.field_size_limit() == limit  # the csv module's process-wide limit is left as it was


@pytest.mark.parametrize("case, message", [
    ("nolabel", "--label-column 'label': rows [2] have no such field"),
    ("device", "--device 'gpu': "),
])
def test_predict_refuses_a_row_without_its_label_and_an_unknown_device(saved_pair_model: Path, tmp_path: Path,
                                                                       capsys, case: str, message: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a", "text_pair": "b", "label": 1}\n{"text": "c", "text_pair": "d"}\n')
    extra = ["--label-column", "label"] if case == "nolabel" else ["--device", "gpu"]
    assert predict_main([str(saved_pair_model), "--input", str(path), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_predict_into_a_closed_pipe_stops_quietly(saved_pair_model: Path, tmp_path: Path) -> None:
    """``predict ... | head -1``: the reader goes away; no BrokenPipeError traceback."""
    import subprocess
    import sys

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": a, "text_pair": b}) + "\n" for a, b in zip(SENTENCES, PAIRS)))
    process = subprocess.Popen([sys.executable, "-m", "adaptive_depth.predict", str(saved_pair_model), "--input",
                                str(path), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the first prediction is written
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr


def test_a_pipeline_refuses_a_bad_batch_size_and_dicts_of_texts(saved_pair_model: Path) -> None:
    pipeline = AdaptivePipeline.from_pretrained(saved_pair_model)
    for size in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            pipeline(SENTENCES, PAIRS, batch_size=size)
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            list(pipeline.batches(SENTENCES, PAIRS, batch_size=size))
    with pytest.raises(TypeError, match="texts must be a string or a sequence of strings, got a dict"):
        pipeline({"text": SENTENCES[0], "text_pair": PAIRS[0]})
    with pytest.raises(TypeError, match="text_pairs must be a string or a sequence of strings, got a bytes"):
        pipeline(SENTENCES[0], b"bytes")
    assert len(pipeline(SENTENCES, PAIRS, batch_size=2)) == len(SENTENCES)


def test_a_tsv_without_header_reads_every_line_as_a_row(tmp_path: Path) -> None:
    """``tsv_header=False`` (CoLA's GLUE files): the first line is a row and the columns are numbered."""
    from adaptive_depth.predict import InputFileError, read_rows

    path = tmp_path / "rows.tsv"
    path.write_text("gj04\t1\t\tFirst .\ngj04\t0\t*\tSecond .\n", encoding="utf-8")
    rows = read_rows(path, tsv_header=False)
    assert rows == [{"column 1": "gj04", "column 2": "1", "column 3": "", "column 4": "First ."},
                    {"column 1": "gj04", "column 2": "0", "column 3": "*", "column 4": "Second ."}]
    assert len(read_rows(path)) == 1  # with a header, the first line names the columns
    path.write_text("a\tb\nc\n", encoding="utf-8")
    with pytest.raises(InputFileError, match="line 2: 1 tab-separated fields, the first line has 2"):
        read_rows(path, tsv_header=False)


def test_predict_output_names_each_rows_line_in_the_input(saved_pair_model: Path, tmp_path: Path) -> None:
    """Blank lines hold no row, so the output's n-th line need not be the input's: each answer says its line."""
    rows = tmp_path / "rows.jsonl"
    body = [json.dumps({"text": a, "text_pair": b}) for a, b in zip(SENTENCES[:3], PAIRS[:3])]
    rows.write_text(f"\n{body[0]}\n\n\n{body[1]}\n{body[2]}\n\n", encoding="utf-8")
    output = tmp_path / "predictions.jsonl"
    assert predict_main([str(saved_pair_model), "--input", str(rows), "--output", str(output), "--no-progress"]) == 0
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["line"] for row in written] == [2, 5, 6]
    expected = AdaptivePipeline.from_pretrained(saved_pair_model)(SENTENCES[:3], PAIRS[:3])
    assert [row["label"] for row in written] == [p.label for p in expected]
    tsv = tmp_path / "rows.tsv"
    tsv.write_text("sentence1\tsentence2\n\n" + "".join(f"{a}\t{b}\n" for a, b in zip(SENTENCES[:2], PAIRS[:2])))
    assert predict_main([str(saved_pair_model), "--input", str(tsv), "--output", str(output), "--no-progress"]) == 0
    assert [json.loads(line)["line"] for line in output.read_text().splitlines()] == [3, 4]


def test_predict_batch_size_defaults_to_a_token_budget(saved_pair_model: Path, tmp_path: Path, capsys) -> None:
    """Without --batch-size, rows per engine call follow the truncation length (256 at 128 tokens, where the
    stream kept all its FLOPs saving on a CPU; 32 at most at 1,024 tokens and more); a given one is kept."""
    from adaptive_depth.predict import auto_batch_size, load_rows_and_pipeline, parse_args

    assert [auto_batch_size(length) for length in (16, 128, 129, 512, 1024, 4096)] == [2048, 256, 254, 64, 32, 32]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": a, "text_pair": b}) + "\n" for a, b in zip(SENTENCES, PAIRS)))
    pipeline = load_rows_and_pipeline(parse_args([str(saved_pair_model), "--input", str(rows)]), None).pipeline
    assert pipeline.batch_size == auto_batch_size(pipeline.max_length) >= 32
    given = load_rows_and_pipeline(parse_args([str(saved_pair_model), "--input", str(rows), "--batch-size", "2"]), None)
    assert given.pipeline.batch_size == 2
    output = tmp_path / "out.jsonl"
    assert predict_main([str(saved_pair_model), "--input", str(rows), "--output", str(output), "--no-progress"]) == 0
    assert f"{pipeline.batch_size} per engine call" in capsys.readouterr().err
