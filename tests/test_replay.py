"""One recorded pass replays the engine at any exit threshold: the same exits, answers and MACs."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_depth import AdaptiveEncoder, EntropyExit, MaxProbExit, PatienceExit, ToleranceExit
from adaptive_depth.calibration import _search, calibrate_threshold
from adaptive_depth.certify import certify_threshold, default_grid, row_losses, select_threshold
from adaptive_depth.config import criterion_spec, criterion_with_threshold
from adaptive_depth.engine import AdaptiveInferenceEngine, EngineOutput
from adaptive_depth.head_trace import HeadTrace
from adaptive_depth.measure import RowResults, batch_labels, measure_rows, record_rows, reference_predictions
from adaptive_depth.replay import replay_exits
from benchmarks import certify_splits
from tests.conftest import (FAMILIES, THRESHOLD_RESOLUTION, padded_batch, random_encoder, spread_gates_and_heads,
                            tiny_model)

CRITERIA = ("entropy", "normalized_entropy", "max_prob", "patience", "tolerance")


def any_encoder(model_type: str, seed: int, num_labels: int, dtype: torch.dtype = torch.float32,
                num_layers: int = 4) -> AdaptiveEncoder:
    """:func:`tests.conftest.random_encoder` with another number of outputs, dtype or depth."""
    model = tiny_model(model_type, seed=seed, num_layers=num_layers)
    encoder = AdaptiveEncoder(model, num_labels=num_labels, gate_inner_size=16, head_inner_size=16).to(dtype).eval()
    return spread_gates_and_heads(encoder, seed)


def make_criterion(name: str, fraction: float, num_steps: int):
    """The criterion ``name`` at a fraction of its range (0: never exits early, 1: exits at once)."""
    if name == "entropy":
        return EntropyExit(fraction * 1.2)  # log 3 = 1.0986: past it every head exits
    if name == "normalized_entropy":
        return EntropyExit(fraction, normalized=True)
    if name == "max_prob":
        return MaxProbExit(1.0 - fraction)
    if name == "patience":
        return PatienceExit(round((1.0 - fraction) * num_steps))
    return ToleranceExit(math.inf if fraction == 1.0 else fraction / (1.0 - fraction) * 0.5)


def assert_same_output(replayed: EngineOutput, engine: EngineOutput) -> None:
    """Decisions, flags and MACs identical; logits within float rounding."""
    for name in ("exit_layer", "layers_run", "layers_skipped", "heads_run", "gates_run", "num_tokens", "macs_exact",
                 "macs_paper", "full_macs_exact", "full_macs_paper"):
        assert torch.equal(getattr(replayed, name), getattr(engine, name)), name
    assert torch.equal(replayed.predictions, engine.predictions) or torch.allclose(
        replayed.predictions, engine.predictions, rtol=0.0, atol=1e-6)  # regression scores are logits
    torch.testing.assert_close(replayed.logits, engine.logits, rtol=0.0, atol=1e-6)


fractions = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_type=st.sampled_from(FAMILIES), seed=st.integers(0, 1000), criterion=st.sampled_from(CRITERIA),
       fractions=st.lists(fractions, min_size=1, max_size=3), mode=st.sampled_from(["adaptive", "exit_only"]),
       gate_threshold=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.2, 0.8)), batch_size=st.integers(1, 6),
       padded_length=st.sampled_from([None, 16]))
def test_replay_equals_the_engine(model_type, seed, criterion, fractions, mode, gate_threshold, batch_size,
                                  padded_length) -> None:
    """For every row: the engine at each threshold and one recorded pass replayed at it agree."""
    num_labels = 1 if criterion == "tolerance" else 3
    encoder = any_encoder(model_type, seed, num_labels, torch.float64, num_layers=3)
    input_ids, attention_mask = padded_batch(batch_size=batch_size, num_tokens=11, seed=seed)
    recorder = AdaptiveInferenceEngine(encoder, gate_threshold=gate_threshold, mode=mode, padded_length=padded_length)
    trace = recorder.trace_heads(input_ids, attention_mask)
    for fraction in fractions:
        exit_criterion = make_criterion(criterion, fraction, encoder.num_steps)
        engine = AdaptiveInferenceEngine(encoder, exit_criterion, gate_threshold, mode, padded_length)
        assert_same_output(replay_exits(trace, exit_criterion), engine(input_ids, attention_mask))


def test_the_property_test_sees_skips_and_every_exit_layer() -> None:
    """Guards the test above against degenerate cases: rows skip, rows exit at every layer, heads are NaN where
    they did not run."""
    encoder = random_encoder("bert", seed=3, num_layers=3)
    input_ids, attention_mask = padded_batch(batch_size=6, num_tokens=11, seed=3)
    trace = AdaptiveInferenceEngine(encoder, gate_threshold=0.5).trace_heads(input_ids, attention_mask)
    assert trace.gates_run.all() and not trace.layers_run.all() and trace.layers_run.any()
    assert torch.equal(trace.heads_run[:, :-1], trace.layers_run[:, :-1]) and trace.heads_run[:, -1].all()
    assert torch.equal(trace.head_logits.isnan().any(dim=-1), ~trace.heads_run)
    exits = set()
    for threshold in torch.linspace(0.0, 1.2, 25).tolist():
        exits |= set(replay_exits(trace, EntropyExit(threshold)).exit_layer.tolist())
    assert exits == {1, 2, 3}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_float32_replay_decides_as_the_engine(model_type: str) -> None:
    """In float32 too (the batch composition differs, so logits agree within rounding), on longer batches."""
    encoder = any_encoder(model_type, seed=11, num_labels=3)
    input_ids, attention_mask = padded_batch(batch_size=16, num_tokens=13, seed=11)
    for mode in ("adaptive", "exit_only"):
        trace = AdaptiveInferenceEngine(encoder, mode=mode).trace_heads(input_ids, attention_mask)
        for criterion in (EntropyExit(0.4), EntropyExit(0.8), MaxProbExit(0.7), PatienceExit(1)):
            engine = AdaptiveInferenceEngine(encoder, criterion, mode=mode)
            assert_same_output(replay_exits(trace, criterion), engine(input_ids, attention_mask))


def test_forced_skips_and_forced_exits() -> None:
    """Gates forced to skip (gate threshold 0: no head runs before the last) or to run, heads forced to exit."""
    encoder = random_encoder("roberta", seed=5, num_layers=3)
    input_ids, attention_mask = padded_batch(batch_size=5, num_tokens=9, seed=5)
    skip_all = AdaptiveInferenceEngine(encoder, gate_threshold=0.0).trace_heads(input_ids, attention_mask)
    assert not skip_all.layers_run.any() and not skip_all.heads_run[:, :-1].any()
    out = replay_exits(skip_all, EntropyExit(10.0))
    assert (out.exit_layer == encoder.num_steps).all()  # no head before the last ran, so none could exit
    assert_same_output(out, AdaptiveInferenceEngine(encoder, EntropyExit(10.0), gate_threshold=0.0)(
        input_ids, attention_mask))
    for gate in encoder.gates:  # every gate says "run"
        gate.score.bias.data.fill_(-50.0)
    trace = AdaptiveInferenceEngine(encoder).trace_heads(input_ids, attention_mask)
    assert trace.layers_run.all()
    first = replay_exits(trace, MaxProbExit(0.0))
    assert (first.exit_layer == 1).all() and first.heads_run.sum() == len(first.exit_layer)
    assert_same_output(first, AdaptiveInferenceEngine(encoder, MaxProbExit(0.0))(input_ids, attention_mask))


def test_traces_of_several_batches_concatenate() -> None:
    encoder = random_encoder("distilbert", seed=7, num_layers=3)
    engine = AdaptiveInferenceEngine(encoder, EntropyExit(0.5), padded_length=20)
    batches = [padded_batch(batch_size=4, num_tokens=11, seed=1), padded_batch(batch_size=3, num_tokens=7, seed=2),
               padded_batch(batch_size=1, num_tokens=5, seed=3)]
    trace = HeadTrace.cat([engine.trace_heads(*batch) for batch in batches])
    assert len(trace) == 8
    outputs = [engine(*batch) for batch in batches]
    expected = EngineOutput(**{name: torch.cat([getattr(out, name) for out in outputs])
                               for name in EngineOutput.__dataclass_fields__})
    assert_same_output(replay_exits(trace, engine.criterion), expected)
    with pytest.raises(ValueError, match="no trace"):
        HeadTrace.cat([])
    other = AdaptiveInferenceEngine(any_encoder("bert", seed=1, num_labels=2), mode="exit_only")
    with pytest.raises(ValueError, match="different models"):
        HeadTrace.cat([trace, other.trace_heads(*batches[0])])


def test_modes_without_exits_are_refused_and_the_trace_checks_inputs() -> None:
    encoder = random_encoder("bert", seed=0, num_layers=3)
    input_ids, attention_mask = padded_batch()
    trace = AdaptiveInferenceEngine(encoder).trace_heads(input_ids, attention_mask)
    with pytest.raises(TypeError, match="must be an ExitCriterion"):
        replay_exits(trace, 0.3)  # a threshold, not a criterion
    for mode in ("full", "skip_only"):
        with pytest.raises(ValueError, match="has no exits"):
            AdaptiveInferenceEngine(encoder, mode=mode).trace_heads(input_ids, attention_mask)
    with pytest.raises(ValueError):
        AdaptiveInferenceEngine(encoder).trace_heads(input_ids, attention_mask[:, :4])
    encoder.exit_heads[0].classifier.bias.data.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="exit head 1"):
        AdaptiveInferenceEngine(encoder, mode="exit_only").trace_heads(input_ids, attention_mask)


def batches_of(rows: int, seed: int, labels: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of 16 rows of various lengths (labels in ``[0, labels)`` when ``labels``)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, rows, 16):
        size = min(16, rows - start)
        input_ids, attention_mask = padded_batch(batch_size=size, num_tokens=int(torch.randint(6, 12, (1,),
                                                 generator=generator)), seed=seed + start)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels:
            batch["labels"] = torch.randint(0, labels, (size,), generator=generator)
        out.append(batch)
    return out


def engine_at(template: AdaptiveInferenceEngine, threshold: float) -> AdaptiveInferenceEngine:
    return AdaptiveInferenceEngine(template.encoder, criterion_with_threshold(template.criterion, threshold),
                                   template.gate_threshold, template.mode, template.padded_length)


def full_depth(template: AdaptiveInferenceEngine, batches: list[dict[str, torch.Tensor]]) -> RowResults:
    return measure_rows(AdaptiveInferenceEngine(template.encoder, mode="full", padded_length=template.padded_length),
                        batches)


@pytest.mark.parametrize("mode", ["adaptive", "exit_only"])
def test_the_reference_answers_are_full_depth(mode: str, one_thread: None) -> None:
    """From the record in exit_only (every layer ran), from a full pass when gates skipped: full depth's answers."""
    encoder = any_encoder("bert", seed=4, num_labels=3, num_layers=3)
    template = AdaptiveInferenceEngine(encoder, EntropyExit(0.3), mode=mode)
    batches = batches_of(64, seed=4)
    recorded = record_rows(template, batches)
    assert bool(recorded.layers_run.all()) == (mode == "exit_only")  # both ways of getting the reference are used
    assert torch.equal(reference_predictions(template, batches, recorded), full_depth(template, batches).predictions)


@pytest.mark.parametrize("model_type, criterion, mode, risk, tolerance, budget", [
    ("bert", EntropyExit(0.3), "adaptive", "disagreement", None, None),
    ("bert", EntropyExit(0.3), "exit_only", "disagreement", None, 0.8),  # over budget: refused alike
    ("albert", MaxProbExit(0.9), "adaptive", "error_gap", None, None),
    ("mpnet", EntropyExit(0.3, normalized=True), "adaptive", "disagreement", None, 0.95),
    ("roberta", PatienceExit(1), "adaptive", "disagreement", None, None),
    ("electra", ToleranceExit(0.1), "adaptive", "moved", 0.3, None),
    ("distilbert", PatienceExit(1, regression_tolerance=0.2), "exit_only", "moved", 0.3, None),
])
def test_certify_tests_and_chooses_what_engine_passes_give(model_type, criterion, mode, risk, tolerance, budget,
                                                           one_thread: None) -> None:
    """certify_threshold (one recorded pass, replayed) tests the same grid points with the same risks, p-values and
    costs, and certifies the same threshold (or refuses alike), as one engine pass per threshold."""
    num_labels = 1 if risk == "moved" else 3
    encoder = any_encoder(model_type, seed=6, num_labels=num_labels)
    template = AdaptiveInferenceEngine(encoder, criterion, mode=mode, padded_length=16)
    batches = batches_of(160, seed=6, labels=num_labels if risk == "error_gap" else 0)
    grid = default_grid(template, points=8)
    full = full_depth(template, batches).predictions
    labels = batch_labels(batches)
    engine_rows: dict[int, RowResults] = {}

    def rows_at(index: int) -> RowResults:  # what certify_threshold did before replay
        if index not in engine_rows:
            engine_rows[index] = measure_rows(engine_at(template, grid[index]), batches)
        return engine_rows[index]

    expected = select_threshold(grid, lambda index: float(row_losses(risk, rows_at(index).predictions, full, labels,
                                                                     tolerance).sum()),
                                lambda index: rows_at(index).relative_cost(), len(full), risk=risk, max_risk=0.3,
                                delta=0.2, max_relative_cost=budget)
    arguments = dict(max_risk=0.3, delta=0.2, risk=risk, thresholds=grid, tolerance=tolerance,
                     max_relative_cost=budget)
    if expected.index is None:
        with pytest.raises(ValueError, match="no threshold is certified|no .* threshold certified"):
            certify_threshold(template, batches, **arguments)
        return
    certificate = certify_threshold(template, batches, **arguments)
    assert len(certificate.grid) == len(expected.points) >= 2
    for got, want in zip(certificate.grid, expected.points):
        assert (got.threshold, got.certified) == (want.threshold, want.certified)
        assert got.empirical_risk == pytest.approx(want.empirical_risk, abs=1e-12)
        assert got.p_value == pytest.approx(want.p_value, rel=1e-9, abs=1e-15)
        assert got.relative_cost == pytest.approx(want.relative_cost, abs=1e-12)
    assert certificate.threshold == expected.points[expected.index].threshold
    assert certificate.upper_bound == pytest.approx(expected.upper_bound, abs=1e-12)
    chosen = engine_rows[expected.index]
    assert certificate.relative_cost_paper == pytest.approx(chosen.relative_cost("paper"), abs=1e-12)


@pytest.mark.parametrize("model_type, criterion, risk", [("bert", EntropyExit(0.3), "disagreement"),
                                                         ("roberta", PatienceExit(1), "error_gap")])
def test_the_split_benchmark_grid_is_what_engine_passes_give(model_type, criterion, risk, one_thread: None) -> None:
    """benchmarks.certify_splits.run_grid: every grid threshold's per-row losses and MACs equal an engine pass's."""
    encoder = any_encoder(model_type, seed=9, num_labels=3, num_layers=3)
    template = AdaptiveInferenceEngine(encoder, criterion)
    batches = batches_of(48, seed=9, labels=3)
    grid = certify_splits.run_grid(template, batches, risk)
    full = full_depth(template, batches)
    assert torch.equal(grid.full_macs, full.full_macs_exact)
    assert grid.thresholds == default_grid(template)
    for index, threshold in enumerate(grid.thresholds):
        rows = measure_rows(engine_at(template, threshold), batches)
        assert torch.equal(grid.macs[index], rows.macs_exact), threshold
        assert torch.equal(grid.losses[index], row_losses(risk, rows.predictions, full.predictions,
                                                          batch_labels(batches))), threshold


@pytest.mark.parametrize("model_type, criterion, mode, gate_threshold, budget", [
    ("bert", EntropyExit(0.3), "adaptive", None, 0.45), ("bert", EntropyExit(0.3), "adaptive", None, 0.7),
    ("albert", EntropyExit(0.3, normalized=True), "exit_only", None, 0.45),
    ("mpnet", MaxProbExit(0.9), "adaptive", 0.7, 0.45), ("mpnet", MaxProbExit(0.9), "adaptive", 0.7, 0.7),
    ("roberta", PatienceExit(1), "exit_only", None, 0.8),
    ("roberta", PatienceExit(1), "adaptive", 0.9, 0.3),  # impossible: the same refusal
    ("electra", ToleranceExit(0.1), "adaptive", 0.8, 0.7),
    ("distilbert", ToleranceExit(0.1, patience=2), "exit_only", None, 0.9),
])
def test_calibration_bisects_to_the_same_threshold_with_and_without_replay(model_type, criterion, mode, gate_threshold,
                                                                          budget, one_thread: None) -> None:
    """calibrate_threshold (replays of one pass) probes the same thresholds, measures the same MACs at each and
    picks the same threshold and cost as the bisection over one engine pass per threshold."""
    num_labels = 1 if isinstance(criterion, ToleranceExit) else 3
    encoder = any_encoder(model_type, seed=8, num_labels=num_labels)
    template = AdaptiveInferenceEngine(encoder, criterion, gate_threshold, mode, padded_length=16)
    batches = batches_of(64, seed=8, labels=0 if num_labels == 1 else num_labels)
    engine_rows: dict[float, RowResults] = {}

    def measure(threshold: float) -> RowResults:  # what calibrate_threshold did before replay
        if threshold not in engine_rows:
            engine_rows[threshold] = measure_rows(engine_at(template, threshold), batches)
        return engine_rows[threshold]

    name = criterion_spec(criterion)[0]
    try:
        expected = _search(name, template, measure, "exact", budget, THRESHOLD_RESOLUTION)  # its default
    except ValueError as error:
        with pytest.raises(ValueError, match=re.escape(str(error))):
            calibrate_threshold(template, batches, budget)
        return
    calibration = calibrate_threshold(template, batches, budget)
    assert calibration.threshold == expected
    assert [threshold for threshold, _ in calibration.evaluations] == list(engine_rows)
    for threshold, cost in calibration.evaluations:
        assert cost == pytest.approx(engine_rows[threshold].relative_cost(), abs=1e-12)
    chosen = engine_rows[expected]
    assert calibration.relative_cost_paper == pytest.approx(chosen.relative_cost("paper"), abs=1e-12)
    assert calibration.mean_layers_run == pytest.approx(float(chosen.layers_run.double().mean()), abs=1e-12)
    if calibration.metric is not None:
        labels = torch.cat([batch["labels"] for batch in batches])
        assert calibration.metric == pytest.approx(float((chosen.predictions == labels).double().mean()), abs=1e-12)
