"""Exit heads and the exit criteria, at ordinary and extreme thresholds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from adaptive_depth import EntropyExit, ExitCriterion, ExitHead, MaxProbExit, PatienceExit, ToleranceExit, entropy

logit_rows = st.tuples(st.integers(1, 8), st.integers(2, 6)).flatmap(
    lambda shape: arrays("float32", shape, elements=st.floats(-30, 30, width=32))
)


@settings(max_examples=100, deadline=None)
@given(logits=logit_rows)
def test_entropy_threshold_zero_never_exits(logits) -> None:
    logits = torch.from_numpy(logits)
    decision = EntropyExit(0.0).decide(logits, torch.zeros(len(logits), 0))
    assert not bool(decision.should_exit.any())


@settings(max_examples=100, deadline=None)
@given(logits=logit_rows, margin=st.floats(1e-3, 10.0), normalized=st.booleans())
def test_entropy_threshold_above_log_c_always_exits(logits, margin: float, normalized: bool) -> None:
    logits = torch.from_numpy(logits)
    ceiling = 1.0 if normalized else math.log(logits.shape[-1])
    decision = EntropyExit(ceiling + margin, normalized).decide(logits, torch.zeros(len(logits), 0))
    assert bool(decision.should_exit.all())


def test_entropy_values() -> None:
    uniform = torch.zeros(2, 4)
    torch.testing.assert_close(entropy(uniform), torch.full((2,), math.log(4)))
    torch.testing.assert_close(entropy(uniform, normalized=True), torch.ones(2))
    assert float(entropy(torch.tensor([[100.0, -100.0]]))) < 1e-6


def test_max_prob_extremes_and_patience() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    assert bool(MaxProbExit(0.0).decide(logits, torch.zeros(2, 0)).should_exit.all())
    assert not bool(MaxProbExit(1.0).decide(logits, torch.zeros(2, 0)).should_exit.any())
    assert MaxProbExit(0.8).decide(logits, torch.zeros(2, 0)).should_exit.tolist() == [True, False]

    criterion = PatienceExit(patience=2)
    state = criterion.initial_state(2, torch.device("cpu"))
    predictions = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
                   torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    exits = []
    for logits in predictions:
        decision = criterion.decide(logits, state)
        state = decision.state
        exits.append(decision.should_exit.tolist())
    # Row 0 agrees from the 2nd head on and exits at the 3rd; row 1 changes at the 2nd head.
    assert exits == [[False, False], [False, False], [True, False], [True, True]]
    assert bool(PatienceExit(0).decide(predictions[0], PatienceExit(0).initial_state(2, torch.device("cpu"))).should_exit.all())


def test_patience_regression() -> None:
    criterion = PatienceExit(patience=1, regression_tolerance=0.1)
    state = criterion.initial_state(2, torch.device("cpu"))
    state = criterion.decide(torch.tensor([[1.0], [1.0]]), state).state
    decision = criterion.decide(torch.tensor([[1.05], [2.0]]), state)
    assert decision.should_exit.tolist() == [True, False]


def exit_steps(criterion: ExitCriterion, scores: torch.Tensor) -> list[int]:
    """1-based step at which each row of ``scores`` ``[L, B]`` (one regression output per head)
    first exits, ``L + 1`` for never."""
    steps, batch = scores.shape
    state = criterion.initial_state(batch, torch.device("cpu"))
    first = [steps + 1] * batch
    for step in range(steps):
        decision = criterion.decide(scores[step, :, None], state)
        state = decision.state
        for row in decision.should_exit.nonzero().flatten().tolist():
            first[row] = min(first[row], step + 1)
    return first


@settings(max_examples=60, deadline=None)
@given(scores=st.tuples(st.integers(1, 6), st.integers(1, 5)).flatmap(
           lambda shape: arrays("float32", shape, elements=st.floats(-3, 3, width=32))),
       tolerances=st.tuples(st.floats(0, 4), st.floats(0, 4)), patience=st.integers(1, 3))
def test_tolerance_exit_is_patience_with_the_tolerance_as_threshold(scores, tolerances, patience) -> None:
    scores = torch.from_numpy(scores)
    low, high = sorted(tolerances)
    assert exit_steps(ToleranceExit(low, patience), scores) == exit_steps(PatienceExit(patience, low), scores)
    # Monotone in the tolerance, which calibration bisects: a larger one never exits a row later.
    assert all(a >= b for a, b in zip(exit_steps(ToleranceExit(low, patience), scores),
                                      exit_steps(ToleranceExit(high, patience), scores)))
    # The ends: 0 never exits (no difference is below 0); inf exits at head patience + 1.
    assert exit_steps(ToleranceExit(0.0, patience), scores) == [scores.shape[0] + 1] * scores.shape[1]
    expected = patience + 1 if patience + 1 <= scores.shape[0] else scores.shape[0] + 1
    assert exit_steps(ToleranceExit(math.inf, patience), scores) == [expected] * scores.shape[1]


def test_criteria_follow_the_protocol_and_validate() -> None:
    for criterion in (EntropyExit(0.3), MaxProbExit(0.9), PatienceExit(2)):
        assert isinstance(criterion, ExitCriterion)
    with pytest.raises(ValueError, match="entropy threshold must be >= 0"):
        EntropyExit(-0.1)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        MaxProbExit(1.5)
    with pytest.raises(ValueError, match="patience must be >= 0"):
        PatienceExit(-1)
    assert isinstance(ToleranceExit(0.1), ExitCriterion)
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match=r"tolerance must be >= 0 \(score units\)"):
            ToleranceExit(bad)
    with pytest.raises(ValueError, match="patience must be >= 1"):
        ToleranceExit(0.1, patience=0)
    with pytest.raises(ValueError, match="ToleranceExit is for regression"):
        ToleranceExit(0.1).decide(torch.zeros(2, 3), ToleranceExit(0.1).initial_state(2, torch.device("cpu")))
    with pytest.raises(ValueError, match="at least 2 classes"):
        EntropyExit(0.3).decide(torch.zeros(2, 1), torch.zeros(2, 0))


one_row_logits = st.integers(2, 8).flatmap(
    lambda classes: arrays("float32", (classes,), elements=st.floats(-1000, 1000, width=32)))


@settings(max_examples=300, deadline=None)
@given(logits=one_row_logits, kind=st.sampled_from(["entropy", "normalized", "max_prob"]), data=st.data())
def test_host_decision_of_one_row_is_the_tensor_decision_or_none(logits, kind: str, data) -> None:
    """``decide_row`` (the batch-1 loop's host path) decides as ``decide`` does, or defers (``None``)
    near the threshold; thresholds on, one float32 step beside, and away from the tensor score."""
    row = torch.from_numpy(logits)[None]
    make = {"entropy": EntropyExit, "normalized": lambda t: EntropyExit(t, normalized=True), "max_prob": MaxProbExit}[kind]
    score = float(make(0.0).decide(row, torch.zeros(1, 0)).score)
    near = [score, float(torch.tensor(score).nextafter(torch.tensor(math.inf))),
            float(torch.tensor(score).nextafter(torch.tensor(-math.inf)))]
    away = data.draw(st.floats(0.0, 1.0) if kind != "entropy" else st.floats(0.0, math.log(len(logits)) + 1.0))
    for threshold in (*near, away):
        threshold = min(max(threshold, 0.0), 1.0) if kind == "max_prob" else max(threshold, 0.0)
        criterion = make(threshold)
        expected = bool(criterion.decide(row, torch.zeros(1, 0)).should_exit)
        decided = criterion.decide_row(logits.tolist())
        assert decided in (None, expected), (threshold, score, decided, expected)
        if abs(threshold - score) > 1e-2 and float(row.max() - row.min()) <= 20:  # the host does decide there
            assert decided is expected


@pytest.mark.parametrize("make", [MaxProbExit, EntropyExit])
def test_float64_logits_are_decided_in_float64_by_both_paths(make) -> None:
    """Large float64 logits 0.03 apart: float32 rounds them equal (entropy log 2, top probability 0.5), float64
    does not. The tensor decision used to round to float32 and disagree with the host's float64 one."""
    logits = [1_000_000.03, 1_000_000.0]
    row = torch.tensor([logits], dtype=torch.float64)
    criterion = make(0.505) if make is MaxProbExit else make(0.6931)
    assert bool(criterion.decide(row, torch.zeros(1, 0)).should_exit) is True
    assert criterion.decide_row(logits) is True
    assert bool(criterion.decide(row.float(), torch.zeros(1, 0)).should_exit) is False  # float32 rounds them equal


def test_host_decision_defers_below_two_classes() -> None:
    assert EntropyExit(0.3).decide_row([0.5]) is None and MaxProbExit(0.5).decide_row([0.5]) is None


def test_exit_head_cls_output_equals_full_self_attention_at_cls() -> None:
    torch.manual_seed(0)
    head = ExitHead(hidden_size=16, num_labels=3, inner_size=8, num_heads=4).eval()
    hidden, mask = torch.randn(3, 6, 16), torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5])
    fast = head(hidden, mask)
    full = head(hidden, mask, return_token_states=True)
    torch.testing.assert_close(fast.logits, full.logits)
    torch.testing.assert_close(head.pool(hidden, mask).pooled, full.token_states[:, 0])
    assert full.token_states.shape == (3, 6, 8) and fast.token_states is None
    with pytest.raises(ValueError, match="num_labels must be >= 1"):
        ExitHead(16, 0)
