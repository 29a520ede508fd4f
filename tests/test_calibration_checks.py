"""Every numeric argument of calibration is checked: no hang, no silent most-aggressive answer (issue 30)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertModel

from adaptive_depth import AdaptiveEncoder, AdaptiveInferenceEngine, EntropyExit
from adaptive_depth.calibration import calibrate_operating_point, calibrate_threshold
from adaptive_depth.metrics import task_metric


@pytest.fixture(scope="module")
def engine() -> AdaptiveInferenceEngine:
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=37))
    encoder = AdaptiveEncoder(bert, num_labels=2, head_inner_size=16, gate_inner_size=16).eval()
    return AdaptiveInferenceEngine(encoder, EntropyExit(0.3))


def batches(labelled: tuple[bool, ...] = (True, True)) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for has_labels in labelled:
        batch = {"input_ids": torch.randint(1, 99, (6, 5), generator=generator)}
        if has_labels:
            batch["labels"] = torch.randint(0, 2, (6,), generator=generator)
        out.append(batch)
    return out


@pytest.mark.parametrize("tolerance", [0.0, -1e-3, math.nan, math.inf, 1.0])
def test_a_bisection_tolerance_outside_0_1_is_refused(engine: AdaptiveInferenceEngine, tolerance: float) -> None:
    with pytest.raises(ValueError, match=r"tolerance is the width .* in \(0, 1\)"):
        calibrate_threshold(engine, batches(), 0.8, tolerance=tolerance)
    with pytest.raises(ValueError, match=r"tolerance is the width"):
        calibrate_operating_point(engine, batches(), 0.8, tolerance=tolerance)


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5, math.nan, math.inf])
def test_a_budget_outside_0_1_is_refused_by_name(engine: AdaptiveInferenceEngine, budget: float) -> None:
    with pytest.raises(ValueError, match=r"max_relative_cost must be in \(0, 1\]"):
        calibrate_threshold(engine, batches(), budget)
    with pytest.raises(ValueError, match=r"max_relative_cost must be in \(0, 1\]"):  # not "no gate threshold meets"
        calibrate_operating_point(engine, batches(), budget)


def test_labels_on_some_batches_only_are_refused(engine: AdaptiveInferenceEngine) -> None:
    with pytest.raises(ValueError, match="1 of 2 batches hold 'labels'; give labels in every batch or in none"):
        calibrate_threshold(engine, batches((True, False)), 0.8)
    with pytest.raises(ValueError, match="a metric needs labels"):
        calibrate_threshold(engine, batches((False, False)), 0.8, metric=lambda p, y: 0.0)
    unlabelled = calibrate_threshold(engine, batches((False, False)), 0.8)
    assert unlabelled.metric is None and unlabelled.metric_name is None
    labelled = calibrate_threshold(engine, batches(), 0.8)
    assert labelled.metric_name == "accuracy" and 0.0 <= labelled.metric <= 1.0


def test_a_label_count_other_than_the_row_count_is_refused(engine: AdaptiveInferenceEngine) -> None:
    """One label for a batch used to broadcast over its rows (a metric, or a certificate, from nothing)."""
    data = batches()
    data[1]["labels"] = data[1]["labels"][:1]
    with pytest.raises(ValueError, match="batch 1 has 6 rows but 1 labels; give one label per row"):
        calibrate_threshold(engine, data, 0.8)


def test_a_nan_metric_is_listed_not_chosen(engine: AdaptiveInferenceEngine) -> None:
    """NaN compares as neither better nor worse, so a first NaN candidate used to win every comparison."""
    calls = []

    def nan_first(predictions: torch.Tensor, labels: torch.Tensor) -> float:
        calls.append(1)
        return math.nan if len(calls) == 1 else 0.5

    chosen = calibrate_operating_point(engine, batches(), 1.0, gate_thresholds=(0.5, 1.0), metric=nan_first)
    assert chosen.gate_threshold == 1.0 and chosen.metric == 0.5
    assert math.isnan(chosen.candidates[0]["metric"])
    with pytest.raises(ValueError, match="with a finite metric: gate_threshold=0.5: the metric is nan"):
        calibrate_operating_point(engine, batches(), 1.0, gate_thresholds=(0.5,), metric=lambda p, y: math.nan)


@pytest.mark.parametrize("num_labels", [2, 3, 6, 39])
@pytest.mark.parametrize("name", ["entropy", "normalized_entropy"])
def test_the_most_aggressive_entropy_point_exits_near_uniform_rows(name: str, num_labels: int) -> None:
    """In float32 a near-uniform row's entropy exceeds log C by up to ~1e-6; nextafter(log C) kept them."""
    from adaptive_depth.measure import threshold_at_fraction

    criterion = EntropyExit(threshold_at_fraction(name, num_labels)(1.0), normalized=name == "normalized_entropy")
    logits = torch.randn(1000, num_labels, generator=torch.Generator().manual_seed(num_labels)) * 1e-4
    assert bool(criterion.decide(logits, torch.zeros(1000, 0)).should_exit.all())


def test_task_metrics_match_their_definitions() -> None:
    predictions, labels = torch.tensor([1, 1, 0, 0, 1]), torch.tensor([1, 0, 0, 1, 1])
    assert task_metric("accuracy", predictions, labels, 2) == pytest.approx(0.6)
    assert task_metric("f1", predictions, labels, 2) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # tp 2, fp 1, fn 1
    tp, tn, fp, fn = 2, 1, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert task_metric("mcc", predictions, labels, 2) == pytest.approx(mcc)
    assert task_metric("mcc", torch.ones(5, dtype=torch.long), labels, 2) == 0.0  # a constant answer, as GLUE
    scores = torch.tensor([0.5, 1.0, 2.0, 4.5])
    assert task_metric("pearson", scores, 2 * scores + 1, 1) == pytest.approx(1.0)
    assert task_metric("spearman", scores, scores**3, 1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown metric"):
        task_metric("bleu", predictions, labels, 2)
