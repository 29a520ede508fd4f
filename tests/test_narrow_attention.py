"""The inference-time fused projections of NarrowAttentionPool equal the unfused path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_depth.exits import ExitHead
from adaptive_depth.gates import SkipGate
from adaptive_depth.narrow_attention import NarrowAttentionPool


def unfused(pool: NarrowAttentionPool, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    pool.fuse_at_inference = False
    try:
        return pool(hidden, mask).pooled
    finally:
        pool.fuse_at_inference = True


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_heads=st.sampled_from([1, 2, 4]),
    batch_size=st.integers(1, 4),
    num_tokens=st.integers(1, 12),
    padded=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_fused_inference_equals_the_unfused_path(seed, num_heads, batch_size, num_tokens, padded, dtype) -> None:
    torch.manual_seed(seed)
    pool = NarrowAttentionPool(hidden_size=24, inner_size=16, num_heads=num_heads).to(dtype).eval()
    hidden = 3 * torch.randn(batch_size, num_tokens, 24, dtype=dtype)
    mask = None
    if padded:
        mask = torch.ones(batch_size, num_tokens, dtype=torch.long)
        for row in range(batch_size):
            mask[row, 1 + row % num_tokens:] = 0
    with torch.inference_mode():
        fused = pool(hidden, mask).pooled
        assert pool._fused is not None, "the fused path should have run"
        torch.testing.assert_close(fused, unfused(pool, hidden, mask), rtol=0.0, atol=1e-6)


def test_gate_and_head_outputs_stay_equal_and_state_dict_keys_do_not_change() -> None:
    torch.manual_seed(0)
    gate, head = SkipGate(32, 16, 2).eval(), ExitHead(32, 3, 16, 4).eval()
    keys = (sorted(gate.state_dict()), sorted(head.state_dict()))
    hidden, mask = torch.randn(3, 7, 32), torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5])
    with torch.no_grad():
        fused = gate(hidden, mask).p_skip, head(hidden, mask).logits
        gate.pool.fuse_at_inference = head.pool.fuse_at_inference = False
        plain = gate(hidden, mask).p_skip, head(hidden, mask).logits
    torch.testing.assert_close(fused[0], plain[0], rtol=0.0, atol=1e-6)
    torch.testing.assert_close(fused[1], plain[1], rtol=0.0, atol=1e-6)
    assert (sorted(gate.state_dict()), sorted(head.state_dict())) == keys


def test_the_cache_follows_weight_changes() -> None:
    torch.manual_seed(1)
    pool = NarrowAttentionPool(hidden_size=8, inner_size=8, num_heads=2).eval()
    hidden = torch.randn(2, 5, 8)
    with torch.no_grad():
        pool(hidden)
        other = NarrowAttentionPool(hidden_size=8, inner_size=8, num_heads=2)
        pool.load_state_dict(other.state_dict())  # copies in place: bumps the version counters
        torch.testing.assert_close(pool(hidden).pooled, unfused(pool, hidden, None), rtol=0.0, atol=1e-6)
        pool.value.bias.add_(1.0)
        torch.testing.assert_close(pool(hidden).pooled, unfused(pool, hidden, None), rtol=0.0, atol=1e-6)
        pool.double()  # new tensors: new data pointers and dtype
        torch.testing.assert_close(pool(hidden.double()).pooled, unfused(pool, hidden.double(), None),
                                   rtol=0.0, atol=1e-12)
        pool.key.weight.data.mul_(2.0)  # .data bypasses the version counter: the documented escape hatch
        pool.clear_fused_cache()
        torch.testing.assert_close(pool(hidden.double()).pooled, unfused(pool, hidden.double(), None),
                                   rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("grad", [True, False])
def test_training_and_gradients_use_the_parameters(grad: bool) -> None:
    """With gradients on (or in training mode) the unfused path runs, so the parameters get gradients."""
    pool = NarrowAttentionPool(hidden_size=8, inner_size=8, num_heads=2)
    pool.train(not grad)  # eval mode with gradients on, or training mode
    pool(torch.randn(2, 5, 8)).pooled.sum().backward()
    assert pool._fused is None
    assert all(p.grad is not None for p in (pool.query.weight, pool.key.weight, pool.value.weight))
