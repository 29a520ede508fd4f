"""SkipGate, the straight-through hard gate and the soft->hard schedule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from adaptive_depth import GateSchedule, SkipGate, StraightThroughHard, straight_through_hard

probabilities = arrays(
    dtype="float64", shape=st.integers(1, 16), elements=st.floats(0.0, 1.0, allow_nan=False)
)


@settings(max_examples=200, deadline=None)
@given(values=probabilities, threshold=st.floats(0.05, 0.95))
def test_straight_through_forward_is_exactly_zero_or_one(values, threshold: float) -> None:
    soft = torch.from_numpy(values)
    hard = straight_through_hard(soft, threshold)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(hard, (soft >= threshold).double(), rtol=0, atol=0)


@settings(max_examples=100, deadline=None)
@given(values=probabilities, weights=probabilities)
def test_straight_through_gradient_equals_the_soft_gradient(values, weights) -> None:
    size = min(len(values), len(weights))
    weight = torch.from_numpy(weights[:size])
    soft_hard = torch.from_numpy(values[:size]).requires_grad_()
    soft_soft = torch.from_numpy(values[:size]).requires_grad_()
    (straight_through_hard(soft_hard) * weight).sum().backward()
    (soft_soft * weight).sum().backward()
    torch.testing.assert_close(soft_hard.grad, soft_soft.grad, rtol=0, atol=0)


def test_gradcheck_through_the_soft_path_of_a_gate() -> None:
    torch.manual_seed(0)
    gate = SkipGate(hidden_size=8, inner_size=4, num_heads=2, dropout=0.0).double()
    ste = StraightThroughHard(hard=False)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])

    def soft_gate(hidden):
        return ste(gate(hidden, mask).p_skip)

    hidden = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(soft_gate, (hidden,))


def test_straight_through_gradient_equals_the_analytic_soft_gradient() -> None:
    # L = sum_b w_b * hard(sigmoid(z_b)): the straight-through estimator differentiates it as if
    # hard were the identity, so dL/dz_b = w_b * sigmoid(z_b) * (1 - sigmoid(z_b)) (computed by hand
    # below, not by autograd), while the forward value uses the 0/1 decisions.
    torch.manual_seed(0)
    logits = torch.randn(16, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(16, dtype=torch.float64)
    hard = straight_through_hard(torch.sigmoid(logits))
    loss = (hard * weights).sum()
    loss.backward()
    sigma = 1.0 / (1.0 + torch.exp(-logits.detach()))
    torch.testing.assert_close(logits.grad, weights * sigma * (1.0 - sigma))
    assert float(loss.detach()) == pytest.approx(float(weights[logits.detach() >= 0].sum()))


@pytest.mark.parametrize("pooling", ["attention", "cls", "mean"])
def test_gate_output_is_a_probability_per_row(pooling: str) -> None:
    gate = SkipGate(hidden_size=12, inner_size=8, num_heads=2, pooling=pooling)  # type: ignore[arg-type]
    out = gate(torch.randn(5, 6, 12), torch.ones(5, 6))
    assert out.p_skip.shape == (5,) and bool(((out.p_skip >= 0) & (out.p_skip <= 1)).all())
    torch.testing.assert_close(out.p_skip, torch.sigmoid(out.logit))


@settings(max_examples=30, deadline=None)
@given(pooling=st.sampled_from(["attention", "mean"]), fill=st.floats(-1e3, 1e3), length=st.integers(1, 5))
def test_gate_ignores_what_padding_positions_hold(pooling: str, fill: float, length: int) -> None:
    torch.manual_seed(0)
    gate = SkipGate(hidden_size=12, inner_size=8, num_heads=2, pooling=pooling).eval()  # type: ignore[arg-type]
    hidden = torch.randn(1, 6, 12)
    mask = torch.zeros(1, 6)
    mask[:, :length] = 1
    changed = hidden.clone()
    changed[:, length:] = fill
    torch.testing.assert_close(gate(hidden, mask).p_skip, gate(changed, mask).p_skip)


def test_initial_bias_sets_the_starting_gate() -> None:
    closed = SkipGate(hidden_size=12, inner_size=8, initial_skip_bias=-20.0, pooling="cls")
    assert bool((closed(torch.randn(3, 4, 12)).p_skip < 1e-3).all())


def test_schedule_and_bad_arguments() -> None:
    schedule = GateSchedule(soft_epochs=3)
    assert [schedule.mode(epoch) for epoch in range(5)] == ["soft"] * 3 + ["hard"] * 2
    assert GateSchedule(soft_epochs=0).mode(0) == "hard"
    with pytest.raises(ValueError, match="soft_epochs must be >= 0"):
        GateSchedule(soft_epochs=-1)
    with pytest.raises(ValueError, match="pooling must be"):
        SkipGate(8, pooling="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        StraightThroughHard(threshold=1.5)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        SkipGate(8, inner_size=10, num_heads=4)
