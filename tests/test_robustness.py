"""Dtypes, padding side, non-finite padding and the gate-threshold edge cases."""

from __future__ import annotations

import pytest
import torch

from adaptive_depth import AdaptiveEncoder, CrossLayerInfoNCE, EntropyExit
from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.gates import skip_decision, straight_through_hard
from tests.conftest import FAMILIES, padded_batch, tiny_model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_gates_and_heads_follow_the_backbone_dtype(model_type: str, dtype: torch.dtype) -> None:
    encoder = AdaptiveEncoder(tiny_model(model_type).to(dtype), num_labels=2, gate_inner_size=16,
                              head_inner_size=16).eval()
    assert {p.dtype for p in encoder.parameters()} == {dtype}
    input_ids, attention_mask = padded_batch()
    out = encoder(input_ids, attention_mask)
    assert out.logits.dtype == dtype and out.gate_probs.dtype == dtype
    trace = AdaptiveInferenceEngine(encoder, EntropyExit(0.3))(input_ids, attention_mask)
    assert trace.logits.dtype == dtype and bool(torch.isfinite(trace.logits.float()).all())


def _left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rows with their padding moved to the left."""
    lengths = attention_mask.sum(-1)
    width = input_ids.shape[1]
    ids, mask = torch.zeros_like(input_ids), torch.zeros_like(attention_mask)
    for row, length in enumerate(lengths.tolist()):
        ids[row, width - length:] = input_ids[row, :length]
        mask[row, width - length:] = 1
    return ids, mask


@pytest.mark.parametrize("model_type", FAMILIES)
def test_left_padding_is_refused_by_the_training_forward_and_the_engine(model_type: str) -> None:
    encoder = AdaptiveEncoder(tiny_model(model_type), num_labels=2, gate_inner_size=16, head_inner_size=16).eval()
    left = _left_padded(*padded_batch())
    with pytest.raises(ValueError, match=r"rows \[1, 2\].*padding_side = 'right'"):
        encoder(*left)
    with pytest.raises(ValueError, match="left padding"):
        AdaptiveInferenceEngine(encoder)(*left)


def test_a_hole_in_the_mask_is_refused_and_an_unpadded_batch_is_not() -> None:
    encoder = AdaptiveEncoder(tiny_model("bert"), num_labels=2, gate_inner_size=16, head_inner_size=16).eval()
    input_ids = torch.randint(5, 99, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    encoder(input_ids, mask)  # no padding at all: accepted
    mask[1, 2] = 0
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        encoder(input_ids, mask)
    mask[1] = 0
    with pytest.raises(ValueError, match="no real token"):
        encoder(input_ids, mask)


def test_contrastive_gradients_stay_finite_when_padding_holds_nan() -> None:
    torch.manual_seed(0)
    criterion = CrossLayerInfoNCE(input_dim=8, projection_dim=4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    states = [torch.randn(2, 4, 8) for _ in range(3)]
    clean = criterion(states, mask).loss
    poisoned = [s.masked_fill(~mask.bool().unsqueeze(-1), float("nan")).requires_grad_() for s in states]
    loss = criterion(poisoned, mask).loss
    loss.backward()
    assert torch.equal(loss.detach(), clean.detach())
    for parameter in criterion.parameters():
        assert bool(torch.isfinite(parameter.grad).all())
    for tensor in poisoned:
        assert bool(torch.isfinite(tensor.grad).all())


def test_gate_threshold_one_never_skips_even_a_saturated_float32_gate() -> None:
    encoder = AdaptiveEncoder(tiny_model("bert"), num_labels=2, gate_inner_size=16, head_inner_size=16).eval()
    for gate in encoder.gates:
        torch.nn.init.zeros_(gate.score.weight)
        torch.nn.init.constant_(gate.score.bias, 40.0)  # sigmoid(40) == 1.0 exactly in float32
    input_ids, attention_mask = padded_batch()
    p_skip = encoder(input_ids, attention_mask).gate_probs
    assert p_skip.dtype == torch.float32 and bool((p_skip == 1.0).all())
    never = AdaptiveInferenceEngine(encoder, EntropyExit(0.0), gate_threshold=1.0)(input_ids, attention_mask)
    assert bool(never.layers_run.all())
    always = AdaptiveInferenceEngine(encoder, EntropyExit(0.0), gate_threshold=0.5)(input_ids, attention_mask)
    assert not bool(always.layers_run.any())
    hard = encoder(input_ids, attention_mask, gate_mode="hard", gate_threshold=1.0).gate_values
    assert bool((hard == 0).all())


def test_skip_decision_at_the_ends() -> None:
    p_skip = torch.tensor([0.0, 0.3, 0.5, 1.0])
    assert skip_decision(p_skip, 0.0).all()
    assert not skip_decision(p_skip, 1.0).any()
    assert skip_decision(p_skip, 0.5).tolist() == [False, False, True, True]
    assert straight_through_hard(p_skip, 1.0).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_the_engine_refuses_flex_attention_up_front_and_runs_the_same_model_with_sdpa() -> None:
    """The engine narrows the attention mask to the rows that keep running; flex attention's
    BlockMask cannot be narrowed that way, so a flex backbone is refused before any batch (with the
    fix), not after some rows took another path."""
    try:
        flex = tiny_model("bert", attn_implementation="flex_attention", num_layers=3)
    except (ImportError, ValueError) as error:
        pytest.skip(f"flex attention is not available here: {error}")
    torch.manual_seed(0)
    encoder = AdaptiveEncoder(flex, num_labels=3, gate_inner_size=16, head_inner_size=16).eval()
    with pytest.raises(ValueError, match="attn_implementation='flex_attention'.*'sdpa' or 'eager'"):
        AdaptiveInferenceEngine(encoder, EntropyExit(0.5))
    switch = getattr(encoder.backbone, "set_attn_implementation", None)
    if switch is None:
        pytest.skip("this transformers cannot switch a loaded model's attention implementation")
    switch("sdpa")
    engine = AdaptiveInferenceEngine(encoder, EntropyExit(0.5))
    input_ids, attention_mask = padded_batch(batch_size=4, num_tokens=9)
    assert engine(input_ids, attention_mask).logits.shape == (4, 3)
    switch("flex_attention")  # switched after the engine was built
    with pytest.raises(ValueError, match="flex_attention"):
        engine(input_ids, attention_mask)
