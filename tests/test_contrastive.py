"""Cross-layer InfoNCE (paper eq. 4-6): algebraic properties, padding, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_depth import CrossLayerInfoNCE, cross_layer_info_nce

shapes = st.tuples(st.integers(1, 5), st.integers(2, 8), st.integers(2, 6), st.integers(2, 4))  # B, N, D, L


def random_layers(batch: int, tokens: int, dim: int, layers: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, dim, generator=generator, dtype=torch.float64) for _ in range(layers)]


def random_mask(batch: int, tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, tokens + 1, (batch,), generator=generator)
    return (torch.arange(tokens)[None, :] < lengths[:, None]).long()


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10_000), temperature=st.floats(0.05, 2.0))
def test_invariant_to_permuting_the_batch(shape, seed: int, temperature: float) -> None:
    batch, tokens, dim, layers = shape
    states, mask = random_layers(*shape, seed), random_mask(batch, tokens, seed)
    permutation = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    expected = cross_layer_info_nce(states, mask, temperature)
    permuted = cross_layer_info_nce([s[permutation] for s in states], mask[permutation], temperature)
    torch.testing.assert_close(permuted, expected)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10_000), fill=st.floats(-1e4, 1e4) | st.just(float("nan")))
def test_ignores_what_padding_positions_hold(shape, seed: int, fill: float) -> None:
    batch, tokens, dim, layers = shape
    states, mask = random_layers(*shape, seed), random_mask(batch, tokens, seed)
    polluted = [torch.where(mask.bool()[..., None], s, torch.full_like(s, fill)) for s in states]
    torch.testing.assert_close(cross_layer_info_nce(polluted, mask), cross_layer_info_nce(states, mask))


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 4), tokens=st.integers(3, 10), seed=st.integers(0, 10_000))
def test_lower_when_layers_agree_token_by_token_than_when_shuffled(batch: int, tokens: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, tokens, 16, generator=generator, dtype=torch.float64)
    following = base + 0.05 * torch.randn(batch, tokens, 16, generator=generator, dtype=torch.float64)
    shift = torch.roll(torch.arange(tokens), 1)  # a derangement: no token keeps its place
    agreeing = cross_layer_info_nce([base, following], temperature=0.5)
    shuffled = cross_layer_info_nce([base, following[:, shift]], temperature=0.5)
    assert float(agreeing) < float(shuffled)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 4), tokens=st.integers(1, 12), layers=st.integers(2, 4), temperature=st.floats(0.05, 3.0))
def test_uniform_similarity_gives_log_n(batch: int, tokens: int, layers: int, temperature: float) -> None:
    identical = [torch.ones(batch, tokens, 8, dtype=torch.float64) for _ in range(layers)]
    torch.testing.assert_close(
        cross_layer_info_nce(identical, temperature=temperature), torch.tensor(math.log(tokens), dtype=torch.float64)
    )


def test_uniform_similarity_with_padding_counts_only_real_tokens() -> None:
    identical = [torch.ones(2, 6, 4, dtype=torch.float64) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    expected = (math.log(4) + math.log(2)) / 2
    torch.testing.assert_close(cross_layer_info_nce(identical, mask), torch.tensor(expected, dtype=torch.float64))


def test_gradcheck() -> None:
    states = [t.requires_grad_() for t in random_layers(2, 4, 3, 3, seed=1)]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda *layers: cross_layer_info_nce(list(layers), mask, 0.5), tuple(states))


def test_module_projects_and_trains() -> None:
    torch.manual_seed(0)
    criterion = CrossLayerInfoNCE(input_dim=8, projection_dim=4, temperature=0.5)
    states = [torch.randn(2, 5, 8) for _ in range(3)]
    out = criterion(states, torch.ones(2, 5))
    out.loss.backward()
    assert len(out.projections) == 3 and out.projections[0].shape == (2, 5, 4)
    assert criterion.projection[0].weight.grad is not None


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 layers"):
        cross_layer_info_nce([torch.randn(1, 3, 4)])
    with pytest.raises(ValueError, match="share one shape"):
        cross_layer_info_nce([torch.randn(1, 3, 4), torch.randn(1, 4, 4)])
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, N\]"):
        cross_layer_info_nce([torch.randn(2, 3, 4)] * 2, torch.ones(2, 4))
    with pytest.raises(ValueError, match="empty batch"):
        cross_layer_info_nce([torch.randn(0, 3, 4)] * 2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        cross_layer_info_nce([torch.randn(1, 3, 4)] * 2, temperature=0.0)
