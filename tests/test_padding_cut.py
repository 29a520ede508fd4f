"""The batch engine cuts the padding the rows still running no longer need, once the longest rows left."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

from adaptive_depth import AdaptiveEncoder, EntropyExit
from adaptive_depth.backbones import LayerRunner
from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.exits import ExitDecision
from adaptive_depth.export import export_engine
from adaptive_depth.export_runtime import ExportedEngine
from tests.conftest import FAMILIES, spread_gates_and_heads, tiny_model


@dataclass(frozen=True)
class PlannedExit:
    """Row ``i`` leaves at the ``plan[i]``-th head it runs (its state carries the plan with the row)."""

    plan: tuple[int, ...]

    def initial_state(self, batch_size: int, device: torch.device) -> Tensor:
        return torch.tensor([[steps, 0.0] for steps in self.plan[:batch_size]], device=device)

    def decide(self, logits: Tensor, state: Tensor) -> ExitDecision:
        state = state + torch.tensor([0.0, 1.0], device=state.device)
        return ExitDecision(should_exit=state[:, 1] >= state[:, 0], state=state, score=state[:, 1])


def encoder_of(model_type: str, attn_implementation: str = "sdpa") -> AdaptiveEncoder:
    model = tiny_model(model_type, attn_implementation, seed=3, num_layers=4)
    encoder = AdaptiveEncoder(model, num_labels=3, gate_inner_size=16, head_inner_size=16).double().eval()
    return spread_gates_and_heads(encoder, seed=3)


def batch(lengths: list[int], seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 99, (len(lengths), max(lengths)), generator=generator)
    attention_mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    return input_ids, attention_mask


def layer_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int, bool]]:
    """Records ``(step, rows, positions, masked)`` of every layer the engine runs."""
    calls: list[tuple[int, int, int, bool]] = []
    run_layer = LayerRunner.run_layer

    def spy(self: LayerRunner, step: int, hidden_states: Tensor) -> Tensor:
        calls.append((step, *hidden_states.shape[:2], self.layer_mask is not None))
        return run_layer(self, step, hidden_states)

    monkeypatch.setattr(LayerRunner, "run_layer", spy)
    return calls


def assert_same_as_alone(engine: AdaptiveInferenceEngine, input_ids: Tensor, attention_mask: Tensor,
                         plan: tuple[int, ...]) -> None:
    """Each row decides and costs what it does alone (no padding at all); logits within float rounding."""
    batched = engine(input_ids, attention_mask)
    criterion = engine.criterion
    for row, steps in enumerate(plan):
        length = int(attention_mask[row].sum())
        engine.criterion = PlannedExit((steps,))
        alone = engine(input_ids[row:row + 1, :length], attention_mask[row:row + 1, :length])
        engine.criterion = criterion
        for name in ("exit_layer", "layers_run", "gates_run", "heads_run", "macs_exact"):
            assert torch.equal(getattr(batched, name)[row], getattr(alone, name)[0]), (row, name)
        torch.testing.assert_close(batched.logits[row], alone.logits[0])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_rows_left_behind_run_at_their_own_longest_length(model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lengths, plan = [9, 7, 4, 6], (1, 3, 2, 4)  # the longest row leaves after the first layer
    input_ids, attention_mask = batch(lengths)
    engine = AdaptiveInferenceEngine(encoder_of(model_type), PlannedExit(plan), mode="exit_only")
    calls = layer_calls(monkeypatch)
    engine(input_ids, attention_mask)
    # step 0: every row at 9; step 1: three rows at 7; step 2: rows 1 and 3 at 7; step 3: row 3 alone at 6
    assert [call[:3] for call in calls] == [(0, 4, 9), (1, 3, 7), (2, 2, 7), (3, 1, 6)]
    assert_same_as_alone(engine, input_ids, attention_mask, plan)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_no_padding_left_runs_unmasked(attn_implementation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lengths, plan = [10, 6, 6, 3], (1, 3, 3, 1)
    input_ids, attention_mask = batch(lengths, seed=1)
    engine = AdaptiveInferenceEngine(encoder_of("bert", attn_implementation), PlannedExit(plan), mode="exit_only")
    calls = layer_calls(monkeypatch)
    engine(input_ids, attention_mask)
    assert calls == [(0, 4, 10, True), (1, 2, 6, False), (2, 2, 6, False)]
    assert_same_as_alone(engine, input_ids, attention_mask, plan)


@pytest.mark.parametrize("model_type", ["bert", "mpnet"])
def test_the_cut_with_gates_that_skip(model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lengths, plan = [9, 7, 4, 6, 8], (1, 2, 1, 3, 1)
    input_ids, attention_mask = batch(lengths, seed=2)
    engine = AdaptiveInferenceEngine(encoder_of(model_type), PlannedExit(plan), gate_threshold=0.5)
    calls = layer_calls(monkeypatch)
    out = engine(input_ids, attention_mask)
    assert out.layers_skipped.any() and out.layers_run.sum() > len(lengths), "the gates should both skip and run"
    assert min(positions for _, _, positions, _ in calls) < max(lengths), "no layer ran on cut padding"
    assert_same_as_alone(engine, input_ids, attention_mask, plan)


def test_a_batch_without_padding_is_never_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    input_ids, attention_mask = batch([8, 8, 8])
    engine = AdaptiveInferenceEngine(encoder_of("bert"), PlannedExit((1, 2, 4)), mode="exit_only")
    calls = layer_calls(monkeypatch)
    engine(input_ids, attention_mask)
    assert [positions for _, _, positions, _ in calls] == [8, 8, 8, 8]


@pytest.mark.parametrize("export_format", ["torch-export", "onnx"])
def test_exported_engines_cut_the_same_padding(export_format: str, tmp_path: Path) -> None:
    lengths, plan = [9, 7, 4, 6], (1, 3, 2, 4)
    input_ids, attention_mask = batch(lengths)
    encoder = encoder_of("bert").float()
    folder = export_engine(encoder, tmp_path / "exported", export_format, criterion=EntropyExit(0.5))
    exported = ExportedEngine(folder).configure(mode="exit_only", criterion=PlannedExit(plan))
    positions: list[tuple[int, int]] = []
    for step, layer in enumerate(exported.layers):
        def spy(layer=layer, **inputs: Tensor) -> Tensor:
            positions.append(tuple(inputs["attention_mask"].shape))
            return layer(**inputs)
        exported.layers[step] = spy
    got = exported(input_ids, attention_mask)
    assert positions == [(4, 9), (3, 7), (2, 7), (1, 6)]
    expected = AdaptiveInferenceEngine(encoder, PlannedExit(plan), mode="exit_only")(input_ids, attention_mask)
    for name in ("exit_layer", "layers_run", "heads_run", "predictions"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    torch.testing.assert_close(got.logits, expected.logits, rtol=0.0, atol=1e-4)
