"""The batched inference engine: equal to batch size 1, equal to the plain model, honest MACs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_depth import AdaptiveEncoder, EntropyExit, MaxProbExit, PatienceExit, entropy
from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.metrics import CostAccumulator
from tests.conftest import ALIASES, FAMILIES, counted_flops, padded_batch, random_encoder, tiny_model


def run_one_by_one(engine: AdaptiveInferenceEngine, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    outputs = []
    for row in range(len(input_ids)):
        length = int(attention_mask[row].sum())
        outputs.append(engine(input_ids[row : row + 1, :length], attention_mask[row : row + 1, :length]))
    return outputs


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model_type=st.sampled_from(FAMILIES),
    seed=st.integers(0, 1000),
    criterion=st.sampled_from(["entropy", "maxprob", "patience"]),
    threshold=st.floats(0.0, 1.2),
    gate_threshold=st.floats(0.2, 0.8),
    batch_size=st.integers(1, 6),
)
def test_batched_equals_batch_size_one(model_type, seed, criterion, threshold, gate_threshold, batch_size) -> None:
    encoder = random_encoder(model_type, seed)
    exit_criterion = {
        "entropy": EntropyExit(threshold),
        "maxprob": MaxProbExit(min(threshold, 1.0)),
        "patience": PatienceExit(int(threshold * 2)),
    }[criterion]
    engine = AdaptiveInferenceEngine(encoder, exit_criterion, gate_threshold=gate_threshold, padded_length=16)
    input_ids, attention_mask = padded_batch(batch_size=batch_size, num_tokens=11, seed=seed)
    batched = engine(input_ids, attention_mask)
    padded_rows = [engine(input_ids[row : row + 1], attention_mask[row : row + 1]) for row in range(batch_size)]
    for row, (single, padded) in enumerate(zip(run_one_by_one(engine, input_ids, attention_mask), padded_rows)):
        for one in (single, padded):  # the one-row path, without and with padding
            assert batched.exit_layer[row] == one.exit_layer[0]
            for name in ("layers_run", "layers_skipped", "heads_run", "gates_run"):
                assert torch.equal(getattr(batched, name)[row], getattr(one, name)[0]), name
            assert batched.predictions[row] == one.predictions[0]
            torch.testing.assert_close(batched.logits[row], one.logits[0])
            for name in ("num_tokens", "macs_exact", "full_macs_exact"):
                assert getattr(one, name).shape == (1,) and getattr(one, name).dtype == torch.long, name
                assert getattr(batched, name)[row] == getattr(one, name)[0], name
        assert single.macs_paper[0] == batched.macs_paper[row] == padded.macs_paper[0]
        assert single.full_macs_paper[0] == batched.full_macs_paper[row]


class _HostOnly(EntropyExit):
    """Decides on the host only: its tensor ``decide`` counts the calls it gets."""

    def decide(self, logits: torch.Tensor, state: torch.Tensor):
        object.__setattr__(self, "tensor_calls", getattr(self, "tensor_calls", 0) + 1)
        return super().decide(logits, state)


def test_one_row_decides_on_the_host_and_defers_near_the_threshold() -> None:
    encoder = random_encoder("bert", 3)
    input_ids, attention_mask = padded_batch(batch_size=1, num_tokens=9, seed=3)
    first = AdaptiveInferenceEngine(encoder, EntropyExit(0.0), mode="exit_only").trace_heads(input_ids, attention_mask)
    score = float(entropy(first.head_logits[0, 0][None]))  # the first head's entropy, as the tensor path computes it
    far, on = _HostOnly(score + 0.05), _HostOnly(score)
    assert int(AdaptiveInferenceEngine(encoder, far, mode="exit_only")(input_ids, attention_mask).exit_layer) == 1
    assert getattr(far, "tensor_calls", 0) == 0  # decided on the host
    AdaptiveInferenceEngine(encoder, on, mode="exit_only")(input_ids, attention_mask)
    assert on.tensor_calls >= 1  # on the threshold: deferred to the tensor computation


def test_the_random_gates_really_mix_skip_and_run() -> None:
    """Guards the property test above against degenerate gates that always run or always skip."""
    skipped = ran = exited_early = 0
    for seed in range(10):
        encoder = random_encoder("bert", seed, num_layers=4)
        input_ids, attention_mask = padded_batch(batch_size=6, num_tokens=11, seed=seed)
        out = AdaptiveInferenceEngine(encoder, EntropyExit(0.9))(input_ids, attention_mask)
        skipped += int(out.layers_skipped.sum())
        ran += int(out.layers_run.sum())
        exited_early += int((out.exit_layer < 4).sum())
    assert skipped > 0 and ran > 0 and exited_early > 0


@pytest.mark.parametrize("model_type", FAMILIES)
def test_threshold_zero_with_gates_off_predicts_like_the_plain_model(model_type: str) -> None:
    encoder = random_encoder(model_type, seed=1)
    input_ids, attention_mask = padded_batch(batch_size=4, num_tokens=9)
    with torch.no_grad():
        expected = encoder(input_ids, attention_mask, gate_mode="run", heads="last").logits
    for mode, gate_threshold in (("full", 0.5), ("adaptive", 1.0)):
        # gate_threshold 1.0 never skips, even a gate saturated at p_skip == 1.0 (test_robustness.py).
        engine = AdaptiveInferenceEngine(encoder, EntropyExit(0.0), gate_threshold=gate_threshold, mode=mode)
        out = engine(input_ids, attention_mask)
        assert bool(out.layers_run.all()) and bool((out.exit_layer == encoder.num_steps).all())
        torch.testing.assert_close(out.logits, expected)
        assert torch.equal(out.predictions, expected.argmax(-1))


def test_skip_only_answers_at_the_last_step() -> None:
    encoder = random_encoder("bert", seed=3, num_layers=4)
    out = AdaptiveInferenceEngine(encoder, mode="skip_only")(*padded_batch(batch_size=5))
    assert bool((out.exit_layer == 4).all())
    assert out.heads_run[:, :-1].sum() == 0 and bool(out.heads_run[:, -1].all())


def force_a_skip_and_an_early_exit(encoder: AdaptiveEncoder, input_ids: torch.Tensor) -> None:
    """Gate 1 skips the first layer for the rows whose score is above the median (its bias moves the
    threshold between the two middle rows); head 1 answers class 0 with near-zero entropy, so every
    row that ran the first layer exits there. The other rows go on through the random gates and heads."""
    runner, _ = encoder.prepare(input_ids)
    with torch.no_grad():
        logits = encoder.gates[0](runner.hidden_states).logit.sort().values
        encoder.gates[0].score.bias -= (logits[len(logits) // 2 - 1] + logits[len(logits) // 2]) / 2
        head = encoder.exit_heads[0].classifier
        head.weight.zero_()
        head.bias.copy_(torch.tensor([20.0, 0.0, 0.0]))


@pytest.mark.parametrize("model_type", FAMILIES + ALIASES)
def test_reported_macs_equal_flop_counter_with_a_skip_and_an_early_exit(model_type: str) -> None:
    """Exact convention on a batch where some rows skip a layer and some exit early: the engine's
    per-row MACs sum to FlopCounterMode's count of the same run (eager attention, which it counts;
    no padding, which it counts as tokens), and so does each row run alone (batch size 1 has a
    path of its own)."""
    for seed, length in ((0, 7), (1, 12)):
        encoder = random_encoder(model_type, seed, attn_implementation="eager", num_layers=3)
        input_ids = torch.randint(5, 99, (6, length), generator=torch.Generator().manual_seed(seed))
        force_a_skip_and_an_early_exit(encoder, input_ids)
        engine = AdaptiveInferenceEngine(encoder, EntropyExit(0.1))
        for rows in (slice(None), *(slice(row, row + 1) for row in range(len(input_ids)))):
            output = {}
            counted = counted_flops(lambda: output.setdefault("out", engine(input_ids[rows])))
            trace = output["out"]
            assert 2 * int(trace.macs_exact.sum()) == counted, (seed, rows, trace.macs_exact, counted)
            if rows == slice(None):
                assert bool(trace.layers_skipped[:, 0].any()) and bool(trace.layers_run[:, 0].any())
                assert bool((trace.exit_layer < encoder.num_steps).any()), trace.exit_layer


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_gate_threshold_one_runs_no_gate_and_counts_none(model_type: str) -> None:
    """Threshold 1 never skips, so the gates are not run: adaptive is exit_only, skip_only is full,
    in every output, and FlopCounterMode sees no gate MACs (exact convention)."""
    encoder = random_encoder(model_type, seed=5, attn_implementation="eager", num_layers=3)
    input_ids, attention_mask = padded_batch(batch_size=5, num_tokens=9, seed=5)
    for gated, plain in (("adaptive", "exit_only"), ("skip_only", "full")):
        engines = [AdaptiveInferenceEngine(encoder, EntropyExit(0.6), gate_threshold=1.0, mode=gated),
                   AdaptiveInferenceEngine(encoder, EntropyExit(0.6), mode=plain)]
        one, other = (engine(input_ids, attention_mask) for engine in engines)
        assert not bool(one.gates_run.any()) and not bool(one.layers_skipped.any())
        for field in ("exit_layer", "layers_run", "heads_run", "macs_exact", "macs_paper", "full_macs_exact"):
            assert torch.equal(getattr(one, field), getattr(other, field)), (gated, field)
        torch.testing.assert_close(one.logits, other.logits)
        flops = [counted_flops(lambda engine=engine: engine(input_ids[:1])) for engine in engines]
        assert flops[0] == flops[1], (gated, flops)
    # Just below 1 the gates run, and are counted: a row that ran the same layers and heads costs more.
    no_gates = AdaptiveInferenceEngine(encoder, EntropyExit(0.6), mode="exit_only")(input_ids, attention_mask)
    below = AdaptiveInferenceEngine(encoder, EntropyExit(0.6), gate_threshold=0.999)(input_ids, attention_mask)
    assert bool(below.gates_run[:, 0].all())
    same = (below.layers_run == no_gates.layers_run).all(-1) & (below.heads_run == no_gates.heads_run).all(-1)
    assert bool(same.any()) and bool((below.macs_exact[same] > no_gates.macs_exact[same]).all())


def test_accumulator_aggregates_traces() -> None:
    encoder = random_encoder("bert", seed=2, num_layers=4)
    engine = AdaptiveInferenceEngine(encoder, EntropyExit(0.8), padded_length=16)
    full = AdaptiveInferenceEngine(encoder, mode="full", padded_length=16)
    accumulator, baseline = CostAccumulator(encoder.num_steps), CostAccumulator(encoder.num_steps)
    outputs = []
    for seed in range(3):
        batch = padded_batch(batch_size=4, num_tokens=10, seed=seed)
        outputs.append(engine(*batch))
        accumulator.update(outputs[-1])
        baseline.update(full(*batch))
    stats, base = accumulator.compute(), baseline.compute()
    exits = torch.cat([out.exit_layer for out in outputs])
    assert stats["count"] == 12 and sum(stats["exit_layer_histogram"]) == 12
    assert stats["exit_layer_histogram"] == torch.bincount(exits - 1, minlength=4).tolist()
    assert base["relative_cost_exact"] == pytest.approx(1.0) and base["relative_cost_paper"] == pytest.approx(1.0)
    assert stats["mean_macs_exact"] == pytest.approx(float(torch.cat([o.macs_exact for o in outputs]).double().mean()))
    assert stats["relative_cost_paper"] == pytest.approx(stats["mean_macs_paper"] / base["mean_macs_paper"])
    skips = torch.cat([o.layers_skipped for o in outputs]).double().sum(0)
    gates = torch.cat([o.gates_run for o in outputs]).double().sum(0)
    assert stats["skip_rate_per_layer"] == pytest.approx((skips / gates).tolist(), nan_ok=True)
    accumulator.reset()
    assert int(accumulator.count) == 0 and float(accumulator.exit_histogram.sum()) == 0


def test_bad_input() -> None:
    encoder = random_encoder("bert", seed=0)
    engine = AdaptiveInferenceEngine(encoder)
    with pytest.raises(TypeError, match="wrap the model first"):
        AdaptiveInferenceEngine(tiny_model("bert"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty batch"):
        engine(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        engine(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"gate_threshold must be in \[0, 1\]"):
        AdaptiveInferenceEngine(encoder, gate_threshold=1.5)
    with pytest.raises(ValueError, match="entropy threshold must be >= 0"):
        AdaptiveInferenceEngine(encoder, EntropyExit(-1.0))
    with pytest.raises(ValueError, match="mode must be"):
        AdaptiveInferenceEngine(encoder, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="padded_length is 4"):
        AdaptiveInferenceEngine(encoder, padded_length=4)(torch.ones(1, 6, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_matches_cpu(fused: bool) -> None:
    encoder = random_encoder("bert", seed=5, num_layers=4).fuse_for_inference(fused)  # moved below: rebuilt there
    input_ids, attention_mask = padded_batch(batch_size=6, num_tokens=11)
    cpu = AdaptiveInferenceEngine(encoder, EntropyExit(0.7))(input_ids, attention_mask)
    engine = AdaptiveInferenceEngine(encoder.cuda(), EntropyExit(0.7))
    gpu = engine(input_ids.cuda(), attention_mask.cuda())
    assert torch.equal(cpu.exit_layer, gpu.exit_layer.cpu()) and torch.equal(cpu.layers_run, gpu.layers_run.cpu())
    assert torch.equal(cpu.predictions, gpu.predictions.cpu())
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, rtol=1e-5, atol=1e-5)
    for row in range(len(input_ids)):  # batch 1: the one-row loop, whose exit decisions are taken on the host
        one = engine(input_ids[row:row + 1].cuda(), attention_mask[row:row + 1].cuda())
        for field in ("exit_layer", "layers_run", "predictions"):
            assert torch.equal(getattr(one, field).cpu(), getattr(cpu, field)[row:row + 1]), field
        torch.testing.assert_close(one.logits.cpu(), cpu.logits[row:row + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_exit_only_with_pooler_heads_and_no_gates(model_type: str) -> None:
    """The early-exit-only baselines (DeeBERT, PABEE): every layer runs until a head exits."""
    encoder = AdaptiveEncoder(tiny_model(model_type, attn_implementation="eager", num_layers=4), num_labels=3,
                              head_type="pooler", with_gates=False).double().eval()
    assert not encoder.has_gates and encoder.num_steps == 4
    input_ids, attention_mask = padded_batch(batch_size=5, num_tokens=9)
    never = AdaptiveInferenceEngine(encoder, EntropyExit(0.0), mode="exit_only")(input_ids, attention_mask)
    first = AdaptiveInferenceEngine(encoder, EntropyExit(10.0), mode="exit_only")(input_ids, attention_mask)
    assert bool((never.exit_layer == 4).all()) and bool((first.exit_layer == 1).all())
    assert bool(never.layers_run.all()) and not bool(never.gates_run.any())
    with torch.no_grad():
        expected = encoder(input_ids, attention_mask, gate_mode="run", heads="last").logits
    torch.testing.assert_close(never.logits, expected)
    engine = AdaptiveInferenceEngine(encoder, EntropyExit(0.5), mode="exit_only")
    output = {}
    counted = counted_flops(lambda: output.setdefault("out", engine(input_ids[:1])))
    assert abs(2 * int(output["out"].macs_exact[0]) - counted) <= 0.01 * counted
    with pytest.raises(ValueError, match="needs skip gates"):
        AdaptiveInferenceEngine(encoder, mode="adaptive")
    with pytest.raises(ValueError, match="with_gates=False"):
        encoder(input_ids, attention_mask, gate_mode="soft")
    with pytest.raises(ValueError, match="head_type must be"):
        AdaptiveEncoder(tiny_model("bert"), head_type="linear")  # type: ignore[arg-type]
