"""Gates and heads fused for inference (adaptive_depth.fused_pool): equal to the unfused path within float
rounding, the same engine decisions, MACs as FlopCounterMode counts them, and weights that stay current."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from adaptive_depth import AdaptiveEncoder, AdaptiveInferenceEngine, EntropyExit
from adaptive_depth.exits import ExitHead
from adaptive_depth.flops import encoder_cost, gate_macs, head_macs
from adaptive_depth.gates import SkipGate
from tests.conftest import FAMILIES, padded_batch, tiny_model
from tests.test_narrow_attention import right_padded_mask


def outputs(gate: SkipGate, head: ExitHead, hidden: torch.Tensor, mask: torch.Tensor | None,
            fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's ``p_skip`` and the head's logits, fused or not (the modules are left unfused)."""
    for module in (gate, head):
        module._set_fused(fused)
    try:
        with torch.inference_mode():
            return gate(hidden, mask).p_skip, head(hidden, mask).logits
    finally:
        for module in (gate, head):
            module._set_fused(False)


def randomize(*modules: torch.nn.Module, scale: float) -> None:
    """Larger weights and biases than the initialization: sharper attention, larger offsets to fold."""
    with torch.no_grad():
        for module in modules:
            for name, parameter in module.named_parameters():
                parameter.normal_(0.0, scale / parameter.shape[-1] ** 0.5 if name.endswith("weight") else scale)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    gate_heads=st.sampled_from([1, 2, 4]),
    head_heads=st.sampled_from([1, 2, 4]),
    batch_size=st.integers(1, 4),
    num_tokens=st.integers(1, 12),
    padded=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    scale=st.sampled_from([1.0, 4.0]),
)
def test_fused_gate_and_head_equal_the_unfused_path(seed, gate_heads, head_heads, batch_size, num_tokens, padded,
                                                    dtype, scale) -> None:
    torch.manual_seed(seed)
    gate = SkipGate(24, inner_size=16, num_heads=gate_heads).to(dtype).eval()
    head = ExitHead(24, 3, inner_size=16, num_heads=head_heads).to(dtype).eval()
    randomize(gate, head, scale=scale)
    hidden = 3 * torch.randn(batch_size, num_tokens, 24, dtype=dtype)
    mask = right_padded_mask(batch_size, num_tokens) if padded else None
    fused = outputs(gate, head, hidden, mask, True)
    # The truth: the unfused path in float64. Float32 rounding grows with the values (head logits up to ~20
    # with scale 4, where both paths are off by up to ~1e-4): held to 2e-5 of the largest value, plus 2e-5.
    plain = outputs(gate.double(), head.double(), hidden.double(), mask, False)
    tolerance = 2e-5 if dtype == torch.float32 else 1e-10
    for one, truth in zip(fused, plain):
        atol = tolerance * (1.0 + truth.abs().max().item())
        torch.testing.assert_close(one.double(), truth, rtol=0.0, atol=atol)


def test_low_precision_keeps_tanh_and_stays_close() -> None:
    """In bfloat16 the narrowing stays tanh (a coarse sigmoid near 0.5 would lose precision)."""
    torch.manual_seed(0)
    gate, head = SkipGate(32, 16, 2).eval(), ExitHead(32, 3, 16, 4).eval()
    hidden = torch.randn(3, 7, 32)
    reference = outputs(gate, head, hidden, None, False)
    gate, head = gate.to(torch.bfloat16), head.to(torch.bfloat16)
    gate._set_fused(True)
    assert gate._fused is not None and not gate._fused.sigmoid
    fused = outputs(gate, head, hidden.to(torch.bfloat16), None, True)
    for one, other in zip(fused, reference):
        torch.testing.assert_close(one.float(), other, rtol=0.0, atol=0.1)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_fused_engine_takes_the_same_decisions_in_every_family(model_type: str) -> None:
    encoder = AdaptiveEncoder(tiny_model(model_type, num_layers=3), num_labels=3, gate_inner_size=16,
                              head_inner_size=16).eval()
    randomize(*encoder.gates, scale=3.0)
    input_ids, attention_mask = padded_batch(batch_size=6, num_tokens=11, seed=2)
    engine = AdaptiveInferenceEngine(encoder, EntropyExit(0.9))
    plain = engine(input_ids, attention_mask)
    one_row = [engine(input_ids[row:row + 1, :int(attention_mask[row].sum())]) for row in range(2)]
    encoder.fuse_for_inference()
    fused = engine(input_ids, attention_mask)
    for name in ("exit_layer", "layers_run", "gates_run", "heads_run"):
        assert torch.equal(getattr(fused, name), getattr(plain, name)), name
    torch.testing.assert_close(fused.logits, plain.logits, rtol=0.0, atol=1e-5)
    for row, unfused in enumerate(one_row):  # batch 1, no padding: the mask-free fused path
        out = engine(input_ids[row:row + 1, :int(attention_mask[row].sum())])
        assert torch.equal(out.exit_layer, unfused.exit_layer)
        torch.testing.assert_close(out.logits, unfused.logits, rtol=0.0, atol=1e-5)
    streamed = torch.cat([out.logits for out in engine.stream([{"input_ids": input_ids[:3],
                                                                 "attention_mask": attention_mask[:3]},
                                                                {"input_ids": input_ids[3:],
                                                                 "attention_mask": attention_mask[3:]}], max_rows=4)])
    torch.testing.assert_close(streamed, plain.logits, rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("num_heads", [1, 2, 4])
@pytest.mark.parametrize("seq_len", [1, 9, 24])
def test_fused_macs_are_what_flop_counter_sees(num_heads: int, seq_len: int) -> None:
    torch.manual_seed(0)
    gate = SkipGate(48, inner_size=16, num_heads=num_heads).eval()
    head = ExitHead(48, 3, inner_size=16, num_heads=num_heads).eval()
    gate._set_fused(True)
    head._set_fused(True)
    hidden, mask = torch.randn(2, seq_len, 48), torch.ones(2, seq_len, dtype=torch.long)
    for module, macs in ((gate, gate_macs(48, seq_len, "exact", 16, num_heads=num_heads, fused=True)),
                         (head, head_macs(48, 3, seq_len, "exact", 16, num_heads=num_heads, fused=True))):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(hidden, mask)
        assert not any("baddbmm" in str(op) for op in counter.get_flop_counts()["Global"]), "the unfused path ran"
        assert counter.get_total_flops() == 2 * 2 * macs  # two rows, 2 FLOPs per MAC


def test_engine_counts_the_path_that_runs() -> None:
    """The engine's exact MACs follow the fusion when it is turned on or off after the engine was built."""
    encoder = AdaptiveEncoder(tiny_model("bert", num_layers=2), num_labels=2, gate_inner_size=16,
                              head_inner_size=16).eval()
    engine = AdaptiveInferenceEngine(encoder, mode="full")
    input_ids = torch.randint(5, 99, (1, 9))
    costs = {}
    for fused in (False, True, False):
        encoder.fuse_for_inference(fused)
        out = engine(input_ids)
        costs[fused] = int(out.macs_exact)
        assert costs[fused] == encoder_cost(encoder, 9, "exact", fused=fused).full_depth_macs()
        assert int(out.macs_paper) == encoder_cost(encoder, 9, "paper").full_depth_macs()
    assert costs[True] != costs[False]


def test_changed_weights_are_seen_and_data_edits_once_fused_again() -> None:
    """An optimizer step, a loaded state dict, a replaced parameter and a move are seen at the next call;
    an edit through ``.data`` is not, until ``fuse_for_inference`` runs again (as documented)."""
    torch.manual_seed(1)
    gate, head = SkipGate(16, 8, 2).eval(), ExitHead(16, 2, 8, 4).eval()
    hidden = torch.randn(2, 5, 16)

    def check() -> None:
        for one, other in zip(outputs_kept(True), outputs_kept(False)):
            torch.testing.assert_close(one, other, rtol=0.0, atol=1e-6)

    def outputs_kept(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused as the modules stand (rebuilt where stale), or unfused with the fused state kept for later."""
        saved = gate._fused, head._fused
        if not fused:
            gate._fused = head._fused = None
        try:
            with torch.inference_mode():
                return gate(hidden).p_skip, head(hidden).logits
        finally:
            if not fused:
                gate._fused, head._fused = saved

    gate._set_fused(True)
    head._set_fused(True)
    check()
    optimizer = torch.optim.SGD([*gate.parameters(), *head.parameters()], lr=0.5)
    head.train()
    gate(hidden).p_skip.sum().add(head(hidden).logits.sum()).backward()  # training: the unfused path
    assert head.pool.query.weight.grad is not None and gate.pool.key.weight.grad is not None
    optimizer.step()
    head.eval()
    check()
    gate.load_state_dict(SkipGate(16, 8, 2).state_dict())
    check()
    head.prelim.weight = torch.nn.Parameter(torch.randn(8, 8))
    check()
    gate.double()
    head.double()
    hidden = hidden.double()
    check()
    before = outputs_kept(True)[0]
    gate.pool.value.bias.data.add_(5.0)  # bypasses the version counter: the snapshot is not rebuilt
    torch.testing.assert_close(outputs_kept(True)[0], before, rtol=0.0, atol=0.0)
    gate._set_fused(True)
    check()


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_a_fused_optimizer_step_in_training_mode_is_seen(name: str) -> None:
    """torch's fused optimizer kernels leave the parameters' version counters alone; ``.train()`` marks the
    snapshot stale, so the step between ``.train()`` and ``.eval()`` is seen at the next call."""
    torch.manual_seed(2)
    head = ExitHead(16, 3, 8, 4).eval()
    head._set_fused(True)
    hidden = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = head(hidden).logits  # the snapshot is built
    optimizer = getattr(torch.optim, name)(head.parameters(), lr=0.1, fused=True)
    version = head.pool.query.weight._version
    head.train()
    head(hidden).logits.pow(2).sum().backward()
    optimizer.step()
    head.eval()
    assert head.pool.query.weight._version == version  # why the stamp alone cannot see it
    with torch.no_grad():
        fused = head(hidden).logits
        head._set_fused(False)
        unfused = head(hidden).logits
    assert (unfused - before).abs().max() > 1e-3  # the step changed the answer
    torch.testing.assert_close(fused, unfused, rtol=0.0, atol=1e-6)


def test_modules_built_under_inference_mode_fuse() -> None:
    """Parameters created under torch.inference_mode (say, a pipeline loaded inside it) have no version
    counter; fusing them works and equals the unfused path."""
    torch.manual_seed(3)
    with torch.inference_mode():
        gate, head = SkipGate(16, 8, 2).eval(), ExitHead(16, 2, 8, 4).eval()
    assert gate.pool.key.weight.is_inference()
    hidden = torch.randn(2, 5, 16)
    for one, other in zip(outputs(gate, head, hidden, None, fused=True), outputs(gate, head, hidden, None, fused=False)):
        torch.testing.assert_close(one, other, rtol=0.0, atol=1e-6)
