"""The embeddings replay of ``AdaptiveEncoder.prepare`` (adaptive_depth.embedding_replay): a batch
without padding skips the backbone's forward preamble, with the same layer inputs as a capture, on every family."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_depth import AdaptiveEncoder, EntropyExit, LayerRunner
from adaptive_depth.engine import AdaptiveInferenceEngine
from tests.conftest import ALIASES, FAMILIES, padded_batch, tiny_model

# Families whose first layer sees only the embeddings' output (no projection, no per-batch bias); the tiny
# ELECTRA projects its 16-wide embeddings to 32.
REPLAYED = {"bert", "roberta", "distilbert", "xlm-roberta", "camembert"}


def _captured(encoder: AdaptiveEncoder, input_ids: torch.Tensor, **model_inputs: torch.Tensor) -> LayerRunner:
    return LayerRunner.capture(encoder.backbone, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               **model_inputs)


def _same(actual: object, expected: object) -> bool:
    if isinstance(expected, torch.Tensor):
        return isinstance(actual, torch.Tensor) and torch.equal(actual, expected)
    return actual == expected


def _assert_same_layer_inputs(actual: LayerRunner, expected: LayerRunner) -> None:
    """Bitwise the same first-layer input, layer mask and extra layer arguments (MPNet's position bias)."""
    assert torch.equal(actual.hidden_states, expected.hidden_states)
    assert actual.layer_mask is None and expected.layer_mask is None
    assert len(actual.extra_args) == len(expected.extra_args)
    assert actual.extra_kwargs.keys() == expected.extra_kwargs.keys()
    assert all(_same(a, e) for a, e in zip(actual.extra_args, expected.extra_args))
    assert all(_same(actual.extra_kwargs[key], value) for key, value in expected.extra_kwargs.items())


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", FAMILIES + ALIASES)
def test_a_batch_without_padding_gets_the_captured_layer_inputs(model_type: str, attn_implementation: str) -> None:
    encoder = AdaptiveEncoder(tiny_model(model_type, attn_implementation), num_labels=2).eval()
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(5, 99, (2, 7), generator=generator)
    with torch.no_grad():
        encoder.prepare(first, torch.ones_like(first))  # captures, and records the replay where it is exact
        replays = list(encoder._replays.kinds.values())
        assert len(replays) == 1 and (replays[0] is not None) == (model_type in REPLAYED)
        for shape in [(1, 5), (3, 11), (1, 1)]:  # other batch sizes and lengths: the same kind of batch
            input_ids = torch.randint(5, 99, shape, generator=generator)
            runner, token_mask = encoder.prepare(input_ids, torch.ones_like(input_ids))
            _assert_same_layer_inputs(runner, _captured(encoder, input_ids))
            assert bool(token_mask.all())
    assert len(encoder._replays.kinds) == 1


def test_token_types_and_training_mode_are_kinds_of_their_own() -> None:
    encoder = AdaptiveEncoder(tiny_model("bert"), num_labels=2).eval()
    input_ids = torch.randint(5, 99, (2, 6))
    token_type_ids = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    with torch.no_grad():
        encoder.prepare(input_ids)
        runner, _ = encoder.prepare(input_ids, token_type_ids=token_type_ids)
        assert len(encoder._replays.kinds) == 2
        _assert_same_layer_inputs(runner, _captured(encoder, input_ids, token_type_ids=token_type_ids))
        replayed, _ = encoder.prepare(input_ids, token_type_ids=token_type_ids)
        _assert_same_layer_inputs(replayed, _captured(encoder, input_ids, token_type_ids=token_type_ids))
    encoder.train()
    torch.manual_seed(3)
    trained, _ = encoder.prepare(input_ids)  # embedding dropout: the same random draws as the capture's
    torch.manual_seed(3)
    expected = _captured(encoder, input_ids)
    assert len(encoder._replays.kinds) == 3 and torch.equal(trained.hidden_states, expected.hidden_states)


def test_a_padded_batch_is_always_captured() -> None:
    encoder = AdaptiveEncoder(tiny_model("bert"), num_labels=2).eval()
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        runner, _ = encoder.prepare(input_ids, attention_mask)
    assert encoder._replays.kinds == {} and runner.layer_mask is not None


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=2, max_size=6), threshold=st.floats(0.05, 0.7))
def test_the_engine_decides_and_answers_alike_with_and_without_the_replay(lengths: list[int], threshold: float) -> None:
    torch.manual_seed(0)
    encoder = AdaptiveEncoder(tiny_model("bert", num_layers=4), num_labels=2, gate_inner_size=16,
                              head_inner_size=16).eval()
    for gate in encoder.gates:  # gates that skip some layers for some rows
        gate.score.weight.data.normal_(0.0, 3.0)
    engine = AdaptiveInferenceEngine(encoder, EntropyExit(threshold))
    generator = torch.Generator().manual_seed(len(lengths))
    rows = [torch.randint(5, 99, (1, length), generator=generator) for length in lengths]
    replayed = [engine(row) for row in rows]
    encoder._replays.key = lambda *args: None  # every call captures
    captured = [engine(row) for row in rows]
    for fast, slow in zip(replayed, captured):
        assert torch.equal(fast.logits, slow.logits) and torch.equal(fast.exit_layer, slow.exit_layer)
        assert torch.equal(fast.layers_run, slow.layers_run) and torch.equal(fast.macs_exact, slow.macs_exact)
