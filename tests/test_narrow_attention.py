"""The inference-time folded NarrowAttentionPool (key folded into the query, value after the pooling)
equals the unfolded path: alone, in gates and heads of every family, and in exported graphs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from adaptive_depth import AdaptiveEncoder
from adaptive_depth.exits import ExitHead
from adaptive_depth.export_steps import GateStep, HeadStep
from adaptive_depth.flops import gate_macs, head_macs
from adaptive_depth.gates import SkipGate
from adaptive_depth.narrow_attention import NarrowAttentionPool
from tests.conftest import FAMILIES, counted_flops, padded_batch, tiny_model


def unfolded(pool: NarrowAttentionPool, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    pool.fold_at_inference = False
    try:
        return pool(hidden, mask).pooled
    finally:
        pool.fold_at_inference = True


def right_padded_mask(batch_size: int, num_tokens: int) -> torch.Tensor:
    mask = torch.ones(batch_size, num_tokens, dtype=torch.long)
    for row in range(batch_size):
        mask[row, 1 + row % num_tokens:] = 0
    return mask


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_heads=st.sampled_from([1, 2, 4]),
    batch_size=st.integers(1, 4),
    num_tokens=st.integers(1, 12),
    padded=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    weight_scale=st.sampled_from([1.0, 4.0]),
)
def test_folded_inference_equals_the_unfolded_path(seed, num_heads, batch_size, num_tokens, padded, dtype,
                                                   weight_scale) -> None:
    torch.manual_seed(seed)
    pool = NarrowAttentionPool(hidden_size=24, inner_size=16, num_heads=num_heads).to(dtype).eval()
    with torch.no_grad():  # larger weights: sharper attention, larger score offsets q . b_k to cancel
        for linear in (pool.query, pool.key, pool.value):
            linear.weight.mul_(weight_scale)
            linear.bias.normal_(0.0, weight_scale)
    hidden = 3 * torch.randn(batch_size, num_tokens, 24, dtype=dtype)
    mask = right_padded_mask(batch_size, num_tokens) if padded else None
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            folded = pool(hidden, mask).pooled
        assert any("baddbmm" in str(op) for op in counter.get_flop_counts()["Global"]), "the folded path did not run"
        # float32 rounding grows with the values (|x| up to ~10 with weight_scale 4): 1e-5 absolute
        # plus 1e-5 relative; float64 is held to 1e-10.
        tolerance = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(folded, unfolded(pool, hidden, mask), rtol=tolerance, atol=tolerance)


def test_padding_stays_masked_exactly() -> None:
    """What a padded position holds changes nothing: masked scores are the dtype's minimum, as unfolded."""
    torch.manual_seed(3)
    pool = NarrowAttentionPool(hidden_size=16, inner_size=8, num_heads=2).eval()
    hidden, mask = torch.randn(2, 6, 16), torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    noisy = hidden.clone()
    noisy[1, 3:] = 1e4 * torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(pool(noisy, mask).pooled, pool(hidden, mask).pooled, rtol=0.0, atol=0.0)
        torch.testing.assert_close(pool(hidden[1:, :3]).pooled[0], pool(hidden, mask).pooled[1], rtol=0.0, atol=1e-6)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_gates_and_heads_of_every_family_equal_the_unfolded_path(model_type: str) -> None:
    """On the hidden states each family's layers produce, padded batch and unpadded row (mask None)."""
    encoder = AdaptiveEncoder(tiny_model(model_type, num_layers=2), num_labels=3, gate_inner_size=16,
                              head_inner_size=16).eval()
    input_ids, attention_mask = padded_batch(batch_size=4, num_tokens=9, seed=1)
    with torch.no_grad():
        out = encoder(input_ids, attention_mask, gate_mode="run")
        for step in range(encoder.num_steps):
            hidden = out.hidden_states[step]
            for mask, rows in ((attention_mask, slice(None)), (None, slice(0, 1))):
                for module, read in ((encoder.gates[step], "p_skip"), (encoder.exit_heads[step], "logits")):
                    folded = getattr(module(hidden[rows], mask), read)
                    module.pool.fold_at_inference = False
                    plain = getattr(module(hidden[rows], mask), read)
                    module.pool.fold_at_inference = True
                    torch.testing.assert_close(folded, plain, rtol=0.0, atol=1e-5)


def test_gate_and_head_outputs_stay_equal_and_state_dict_keys_do_not_change() -> None:
    torch.manual_seed(0)
    gate, head = SkipGate(32, 16, 2).eval(), ExitHead(32, 3, 16, 4).eval()
    keys = (sorted(gate.state_dict()), sorted(head.state_dict()))
    hidden, mask = torch.randn(3, 7, 32), torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5])
    with torch.no_grad():
        folded = gate(hidden, mask).p_skip, head(hidden, mask).logits
        gate.pool.fold_at_inference = head.pool.fold_at_inference = False
        plain = gate(hidden, mask).p_skip, head(hidden, mask).logits
    torch.testing.assert_close(folded[0], plain[0], rtol=0.0, atol=1e-6)
    torch.testing.assert_close(folded[1], plain[1], rtol=0.0, atol=1e-6)
    assert (sorted(gate.state_dict()), sorted(head.state_dict())) == keys


def test_weight_changes_are_used_at_once() -> None:
    """Nothing derived from the weights is cached: in-place edits (also through ``.data``), loaded state
    dicts and dtype changes take effect at the next call."""
    torch.manual_seed(1)
    pool = NarrowAttentionPool(hidden_size=8, inner_size=8, num_heads=2).eval()
    hidden = torch.randn(2, 5, 8)
    with torch.no_grad():
        pool(hidden)
        other = NarrowAttentionPool(hidden_size=8, inner_size=8, num_heads=2)
        pool.load_state_dict(other.state_dict())  # copies in place
        torch.testing.assert_close(pool(hidden).pooled, unfolded(pool, hidden, None), rtol=0.0, atol=1e-6)
        pool.value.bias.add_(1.0)
        torch.testing.assert_close(pool(hidden).pooled, unfolded(pool, hidden, None), rtol=0.0, atol=1e-6)
        pool.query.bias.add_(1.0)
        torch.testing.assert_close(pool(hidden).pooled, unfolded(pool, hidden, None), rtol=0.0, atol=1e-6)
        before = pool(hidden).pooled
        pool.key.weight.data.mul_(2.0)  # .data bypasses the version counter
        after = pool(hidden).pooled
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, unfolded(pool, hidden, None), rtol=0.0, atol=1e-6)
        pool.double()  # new tensors of another dtype
        torch.testing.assert_close(pool(hidden.double()).pooled, unfolded(pool, hidden.double(), None),
                                   rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("grad", [True, False])
def test_training_and_gradients_use_the_parameters(grad: bool) -> None:
    """With gradients on (or in training mode) the unfolded path runs, so the parameters get gradients."""
    pool = NarrowAttentionPool(hidden_size=8, inner_size=8, num_heads=2)
    pool.train(not grad)  # eval mode with gradients on, or training mode
    pool(torch.randn(2, 5, 8)).pooled.sum().backward()
    assert all(p.grad is not None for p in (pool.query.weight, pool.key.weight, pool.value.weight))


@pytest.mark.parametrize("num_heads", [1, 2, 4])
@pytest.mark.parametrize("seq_len", [1, 9, 24])
def test_folded_macs_are_what_flop_counter_sees(num_heads: int, seq_len: int) -> None:
    torch.manual_seed(0)
    gate = SkipGate(48, inner_size=16, num_heads=num_heads).eval()
    head = ExitHead(48, 3, inner_size=16, num_heads=num_heads).eval()
    hidden, mask = torch.randn(2, seq_len, 48), torch.ones(2, seq_len, dtype=torch.long)
    for module, macs in ((gate, gate_macs(48, seq_len, "exact", 16, num_heads=num_heads)),
                         (head, head_macs(48, 3, seq_len, "exact", 16, num_heads=num_heads))):
        assert counted_flops(module, hidden, mask) == 2 * 2 * macs  # two rows, 2 FLOPs per MAC


def test_exported_gate_and_head_graphs_are_folded_and_exact() -> None:
    """torch.export (as adaptive_depth.export calls it: eval, no grad) traces the folded algebra: equal to
    the unfolded eager path, and no key or value projection over the N positions."""
    torch.manual_seed(2)
    gate, head = SkipGate(32, 16, 2).eval(), ExitHead(32, 3, 16, 4).eval()
    hidden, mask = torch.randn(3, 7, 32), torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5])
    rows, tokens = torch.export.Dim("rows", min=1, max=64), torch.export.Dim("tokens", min=1, max=64)
    dynamic = {"hidden_states": {0: rows, 1: tokens}, "attention_mask": {0: rows, 1: tokens}}
    for step, module in ((GateStep(gate), gate), (HeadStep(head), head)):
        with torch.no_grad():
            program = torch.export.export(step.eval(), (), kwargs={"hidden_states": hidden, "attention_mask": mask},
                                          dynamic_shapes=dynamic, strict=False)
            module.pool.fold_at_inference = False
            expected = step(hidden, mask)
            module.pool.fold_at_inference = True
        graph = str(program.graph)
        # narrow, then the gate's score or the head's prelim and classifier; the [CLS] query is one addmm
        assert graph.count("aten.linear") == (2 if module is gate else 3) and graph.count("aten.addmm") == 1
        torch.testing.assert_close(program.module()(hidden_states=hidden, attention_mask=mask), expected,
                                   rtol=0.0, atol=1e-5)
        torch.testing.assert_close(program.module()(hidden_states=hidden[2:, :2], attention_mask=mask[2:, :2]),
                                   expected[2:], rtol=0.0, atol=1e-5)
