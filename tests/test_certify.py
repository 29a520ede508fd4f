"""Certified thresholds: the p-values, their validity on a synthetic engine, fixed-sequence testing,
refusals, and certify_threshold on real (tiny) encoders."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertConfig, BertModel

from adaptive_depth import AdaptiveEncoder, AdaptiveInferenceEngine, EntropyExit, PatienceExit, ToleranceExit
from adaptive_depth.certificate import Certificate
from adaptive_depth.certify import certify_threshold, default_grid, row_losses, select_threshold
from adaptive_depth.measure import measure_rows
from adaptive_depth.pvalues import (
    binomial_cdf,
    binomial_p_value,
    hoeffding_bentkus_p_value,
    upper_confidence_bound,
)


@given(n=st.integers(0, 60), k=st.integers(-2, 62), p=st.floats(0.0, 1.0))
def test_binomial_cdf_equals_the_brute_force_sum(n: int, k: int, p: float) -> None:
    brute = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, min(k, n) + 1)) if k >= 0 else 0.0
    assert binomial_cdf(k, n, p) == pytest.approx(min(brute, 1.0), rel=1e-9, abs=1e-12)


def test_binomial_cdf_is_stable_for_a_million_rows() -> None:
    n, p = 1_000_000, 0.01
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    # Normal approximation with continuity correction, accurate to ~1e-3 here.
    for z in (-3.0, -1.0, 0.0, 2.0):
        k = math.floor(mean + z * sd)
        normal = 0.5 * math.erfc(-(k + 0.5 - mean) / sd / math.sqrt(2))
        assert binomial_cdf(k, n, p) == pytest.approx(normal, abs=2e-3)
    tail = binomial_cdf(9000, n, p)
    assert 0.0 < tail < 1e-20  # far in the tail, still a positive number (log-space sum)


def test_upper_confidence_bound_is_clopper_pearson() -> None:
    assert upper_confidence_bound(0.0, 300, 0.05) == pytest.approx(1 - 0.05 ** (1 / 300), abs=1e-9)
    bound = upper_confidence_bound(4 / 300, 300, 0.05)
    assert binomial_p_value(4, 300, bound) == pytest.approx(0.05, abs=1e-6)
    assert upper_confidence_bound(1.0, 50, 0.05) == 1.0
    # Hoeffding-Bentkus is valid for [0, 1] losses, so never tighter than the exact binomial on 0/1 data.
    assert upper_confidence_bound(4 / 300, 300, 0.05, "hoeffding_bentkus") >= bound


def _nested_losses(generator: torch.Generator, true_risks: list[float], n: int) -> torch.Tensor:
    """``[G, n]`` 0/1 losses: row i has a loss at grid point j when ``u_i < true_risks[j]`` (rising risks:
    a row wrong at one threshold is wrong at every more aggressive one, as with early exit)."""
    uniform = torch.rand(n, generator=generator, dtype=torch.float64)
    return (uniform[None, :] < torch.tensor(true_risks, dtype=torch.float64)[:, None]).double()


def _violation_rate(true_risks: list[float], n: int, max_risk: float, delta: float, draws: int, seed: int,
                    rule: str = "certified", risk: str = "disagreement") -> float:
    generator = torch.Generator().manual_seed(seed)
    costs = [1.0 - j / len(true_risks) for j in range(len(true_risks))]
    violations = 0
    for _ in range(draws):
        losses = _nested_losses(generator, true_risks, n)
        if risk == "error_gap":  # gap x in {-1, 0, 1} as (x + 1) / 2; "full wrong" rows cancel nothing here
            losses = (losses + 1.0) / 2.0
        sums = losses.sum(dim=1).tolist()
        if rule == "certified":
            chosen = select_threshold(list(range(len(true_risks))), sums.__getitem__, costs.__getitem__, n, risk=risk,
                                      max_risk=max_risk, delta=delta).index
        else:  # the point estimate: the cheapest threshold whose measured risk is within max_risk
            measured = [value / n if risk != "error_gap" else 2 * value / n - 1 for value in sums]
            within = [j for j, value in enumerate(measured) if value <= max_risk]
            chosen = within[-1] if within else None
        violations += chosen is not None and true_risks[chosen] > max_risk
    return violations / draws


@settings(max_examples=6, deadline=None, derandomize=True)
@given(max_risk=st.sampled_from([0.02, 0.05, 0.1]), n=st.sampled_from([200, 500, 1000]), delta=st.sampled_from([0.1, 0.2]))
def test_certified_thresholds_are_valid_on_a_synthetic_engine(max_risk: float, n: int, delta: float) -> None:
    """Over many calibration draws, a certified threshold's TRUE risk exceeds max_risk at most a
    delta share of the time (plus Monte Carlo error), with many grid points close to max_risk."""
    true_risks = [max_risk * factor for factor in (0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.5, 2.0)]
    draws = 400
    rate = _violation_rate(true_risks, n, max_risk, delta, draws, seed=n)
    margin = 3 * math.sqrt(delta * (1 - delta) / draws)
    assert rate <= delta + margin


def test_the_validity_check_can_fail() -> None:
    """The same check, on the point estimate, sees it violate max_risk far more often than delta."""
    true_risks = [0.05 * factor for factor in (0.0, 0.5, 0.9, 1.05, 1.1, 1.2, 2.0)]
    assert _violation_rate(true_risks, 300, 0.05, 0.1, 300, seed=1, rule="point") > 0.3
    assert _violation_rate(true_risks, 300, 0.05, 0.1, 300, seed=1) <= 0.1 + 3 * math.sqrt(0.09 / 300)


def test_error_gap_certificates_are_valid() -> None:
    """Hoeffding-Bentkus on the rescaled gap: valid (and conservative)."""
    true_gaps = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3]
    rate = _violation_rate(true_gaps, 1000, 0.15, 0.1, 200, seed=2, risk="error_gap")
    assert rate <= 0.1 + 3 * math.sqrt(0.09 / 200)
    assert hoeffding_bentkus_p_value(0.2, 100, 0.5) < 0.05 < hoeffding_bentkus_p_value(0.45, 100, 0.5)


def test_fixed_sequence_stops_at_the_first_failure() -> None:
    """Point 1 fails, point 2 would pass alone: only point 0 is certified, and point 2 is never
    evaluated (an engine behind it would not run)."""
    sums = {0: 0.0, 1: 40.0, 2: 0.0}
    asked: list[int] = []

    def loss_sum_at(index: int) -> float:
        asked.append(index)
        return sums[index]

    selection = select_threshold([0.0, 0.1, 0.2], loss_sum_at, lambda index: 1.0 - index / 10, 1000,
                                 risk="disagreement", max_risk=0.01, delta=0.05)
    assert selection.index == 0 and [point.certified for point in selection.points] == [True, False]
    assert 2 not in asked
    cheapest = select_threshold([0.0, 0.1, 0.2], {0: 0.0, 1: 0.0, 2: 0.0}.__getitem__, lambda index: 1.0 - index / 10,
                                1000, risk="disagreement", max_risk=0.01, delta=0.05)
    assert cheapest.index == 2 and all(point.certified for point in cheapest.points)


def test_a_budget_keeps_the_lowest_bound_within_it() -> None:
    sums, costs = [0.0, 2.0, 1.0, 3.0], [1.0, 0.6, 0.5, 0.3]
    selection = select_threshold(range(4), sums.__getitem__, costs.__getitem__, 1000, risk="disagreement",
                                 max_risk=0.02, delta=0.05, max_relative_cost=0.6)
    assert selection.index == 2  # 1 loss beats 2 losses; point 0 is over budget; point 3 has 3 losses
    over = select_threshold(range(4), sums.__getitem__, costs.__getitem__, 1000, risk="disagreement",
                            max_risk=0.02, delta=0.05, max_relative_cost=0.2)
    assert over.index is None and over.reason == "over budget"


def tiny_encoder(num_labels: int = 2, num_layers: int = 4, seed: int = 0, with_gates: bool = False) -> AdaptiveEncoder:
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                                intermediate_size=37))
    encoder = AdaptiveEncoder(bert, num_labels=num_labels, with_gates=with_gates, head_inner_size=16,
                              gate_inner_size=16).eval()
    generator = torch.Generator().manual_seed(seed)
    for head in encoder.exit_heads:  # confident heads that often disagree with each other
        head.classifier.weight.data.normal_(0.0, 3.0, generator=generator)
    return encoder


def batches_of(rows: int, seed: int = 0, labels: bool = False, num_labels: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, rows, 100):
        size = min(100, rows - start)
        batch = {"input_ids": torch.randint(1, 99, (size, 7), generator=generator)}
        if labels:
            batch["labels"] = torch.randint(0, num_labels, (size,), generator=generator)
        out.append(batch)
    return out


def test_certify_threshold_end_to_end(one_thread: None) -> None:
    encoder = tiny_encoder()
    engine = AdaptiveInferenceEngine(encoder, EntropyExit(0.3), mode="exit_only")
    batches = batches_of(600)
    certificate = certify_threshold(engine, batches, max_risk=0.15, delta=0.05)
    assert certificate.n == 600 and certificate.p_value <= 0.05 and certificate.upper_bound <= 0.15
    assert certificate.p_value_method == "binomial" and certificate.risk == "disagreement"
    # Measured again, independently: the disagreement and the cost at the certified threshold.
    full = measure_rows(AdaptiveInferenceEngine(encoder, mode="full"), batches)
    rows = measure_rows(AdaptiveInferenceEngine(encoder, EntropyExit(certificate.threshold), mode="exit_only"), batches)
    assert float(row_losses("disagreement", rows.predictions, full.predictions).mean()) == pytest.approx(
        certificate.empirical_risk)
    assert rows.relative_cost("exact") == pytest.approx(certificate.relative_cost)
    assert certificate.threshold > 0.0 and certificate.relative_cost < 1.0  # it exits early
    # Every point before the last tested one is certified, and the cheapest of them was chosen.
    assert all(point.certified for point in certificate.grid[:-1])
    assert certificate.relative_cost == min(point.relative_cost for point in certificate.grid if point.certified)
    assert [point.threshold for point in certificate.grid] == default_grid(engine)[:len(certificate.grid)]
    assert Certificate.from_dict(certificate.to_dict()) == certificate
    assert "at most 0.15" in certificate.statement() and "exchangeable" in certificate.statement()
    within = certify_threshold(engine, batches, max_risk=0.15, delta=0.05, max_relative_cost=0.9)
    assert within.relative_cost <= 0.9 and within.upper_bound <= 0.15 and within.max_relative_cost == 0.9


def test_certify_refuses_what_cannot_be_certified_and_says_what_can(one_thread: None) -> None:
    engine = AdaptiveInferenceEngine(tiny_encoder(), EntropyExit(0.3), mode="exit_only")
    with pytest.raises(ValueError, match=r"no threshold is certified at max_risk=0.01, delta=0.05 with n=20 rows: .*"
                                         r"0/20 disagreements .*smallest certifiable risk with 20 rows is 13\.91% "
                                         r"\(with no disagreement at all\)"):
        certify_threshold(engine, batches_of(20), max_risk=0.01)
    with pytest.raises(ValueError, match=r"costs at most max_relative_cost=0.01: the cheapest certified one"):
        certify_threshold(engine, batches_of(300), max_risk=0.2, max_relative_cost=0.01)
    with pytest.raises(ValueError, match=r"the safest threshold \(entropy=0.03\) has [1-9]\d*/300 disagreements with "
                                         r"full depth \(upper bound \d+\.\d\d%.*at least \d+\.\d\d% for these rows"):
        certify_threshold(engine, batches_of(300), max_risk=0.01, thresholds=[0.1, 0.03])


@pytest.fixture(scope="module")
def small_engine() -> AdaptiveInferenceEngine:
    return AdaptiveInferenceEngine(tiny_encoder(num_layers=2), EntropyExit(0.3), mode="exit_only")


@pytest.mark.parametrize("arguments, message", [
    ({"max_risk": 0.0}, r"max_risk must be in \(0, 1\)"), ({"max_risk": 1.0}, r"max_risk must be in \(0, 1\)"),
    ({"max_risk": math.nan}, "max_risk"), ({"delta": -0.1}, r"delta must be in \(0, 1\)"),
    ({"delta": math.nan}, "delta"), ({"max_relative_cost": 0.0}, r"max_relative_cost must be in \(0, 1\]"),
    ({"max_relative_cost": math.nan}, "max_relative_cost"), ({"convention": "flops"}, "convention"),
    ({"risk": "loss"}, "risk must be one of"), ({"thresholds": [0.1, math.nan]}, "thresholds"),
    ({"tolerance": 0.1}, "tolerance is for risk 'moved'"), ({"risk": "moved", "tolerance": 0.1}, "for regression"),
    ({"risk": "error_gap"}, "needs 'labels'"),
])
def test_certify_validates_every_argument(arguments: dict, message: str, small_engine: AdaptiveInferenceEngine) -> None:
    with pytest.raises(ValueError, match=message):
        certify_threshold(small_engine, batches_of(10), **arguments)


def test_error_gap_needs_labels_in_every_batch_and_uses_them(one_thread: None) -> None:
    engine = AdaptiveInferenceEngine(tiny_encoder(), EntropyExit(0.3), mode="exit_only")
    batches = batches_of(1000, labels=True)
    with pytest.raises(ValueError, match="1 of 10 batches hold 'labels'"):
        certify_threshold(engine, [batches[0]] + [{"input_ids": b["input_ids"]} for b in batches[1:]],
                          risk="error_gap", max_risk=0.3)
    certificate = certify_threshold(engine, batches, risk="error_gap", max_risk=0.3, delta=0.1)
    assert certificate.p_value_method == "hoeffding_bentkus" and -1.0 <= certificate.empirical_risk <= 0.3
    labels = torch.cat([b["labels"] for b in batches])
    full = measure_rows(AdaptiveInferenceEngine(engine.encoder, mode="full"), batches).predictions
    rows = measure_rows(AdaptiveInferenceEngine(engine.encoder, EntropyExit(certificate.threshold), mode="exit_only"),
                        batches).predictions
    gap = float((rows != labels).double().mean() - (full != labels).double().mean())
    assert gap == pytest.approx(certificate.empirical_risk)


def test_regression_certifies_moved_scores(one_thread: None) -> None:
    encoder = tiny_encoder(num_labels=1)
    engine = AdaptiveInferenceEngine(encoder, ToleranceExit(0.5), mode="exit_only")
    batches = batches_of(400)
    for arguments, message in (({}, "use risk='moved'"), ({"risk": "moved"}, "needs tolerance > 0"),
                               ({"risk": "moved", "tolerance": 0.0}, "needs tolerance > 0"),
                               ({"risk": "moved", "tolerance": math.inf}, "finite"),
                               ({"risk": "moved", "tolerance": math.nan}, "needs tolerance")):
        with pytest.raises(ValueError, match=message):
            certify_threshold(engine, batches, max_risk=0.2, **arguments)
    full = measure_rows(AdaptiveInferenceEngine(encoder, mode="full"), batches).predictions
    tolerance = float((full - full.mean()).abs().median())  # scores move on the order of their spread
    certificate = certify_threshold(engine, batches, max_risk=0.2, risk="moved", tolerance=tolerance)
    assert certificate.criterion == "tolerance" and certificate.tolerance == tolerance
    rows = measure_rows(AdaptiveInferenceEngine(encoder, ToleranceExit(certificate.threshold), mode="exit_only"),
                        batches).predictions
    assert float(((rows - full).abs() > tolerance).double().mean()) == pytest.approx(certificate.empirical_risk)
    assert "move by more than" in certificate.statement()


def test_patience_grid_and_user_grids_are_ordered_safest_first(one_thread: None) -> None:
    engine = AdaptiveInferenceEngine(tiny_encoder(), PatienceExit(2), mode="exit_only")
    assert default_grid(engine) == [4.0, 3.0, 2.0, 1.0, 0.0]
    certificate = certify_threshold(engine, batches_of(300), max_risk=0.3, delta=0.1, thresholds=[0, 4, 2])
    assert [point.threshold for point in certificate.grid][:2] == [4.0, 2.0]
    with pytest.raises(ValueError, match="never exits early"):
        certify_threshold(AdaptiveInferenceEngine(engine.encoder, mode="full"), batches_of(10))
