"""AdaptiveEncoder over every supported family: equivalence with the plain model, gates, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModel, AutoTokenizer, BertConfig, BertForSequenceClassification, GPT2Config, GPT2Model

from adaptive_depth import AdaptiveEncoder, UnsupportedModelError, skip_reward
from tests.conftest import ALIASES, FAMILIES, minilm_dir, padded_batch, requires_minilm, tiny_config, tiny_model


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_gates_forced_to_run_reproduce_the_plain_model(model_type: str, attn_implementation: str) -> None:
    model = tiny_model(model_type, attn_implementation)
    encoder = AdaptiveEncoder(model, num_labels=3).eval()
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        by_mode = encoder(input_ids, attention_mask, gate_mode="run").last_hidden_state
        by_values = encoder(
            input_ids, attention_mask, gate_values=torch.zeros(encoder.num_steps)
        ).last_hidden_state
    torch.testing.assert_close(by_mode, expected, rtol=0, atol=0)
    torch.testing.assert_close(by_values, expected)


@pytest.mark.parametrize("model_type", ALIASES)
def test_roberta_architecture_aliases_reproduce_their_model_and_compact_exactly(model_type: str) -> None:
    from adaptive_depth.engine import AdaptiveInferenceEngine

    model = tiny_model(model_type)
    assert model.config.model_type == model_type
    encoder = AdaptiveEncoder(model, num_labels=3, gate_inner_size=16, head_inner_size=16).eval()
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        actual = encoder(input_ids, attention_mask, gate_mode="run").last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    for gate in encoder.gates:
        gate.score.bias.data.fill_(0.0)
        gate.score.weight.data.normal_(0.0, 3.0)
    engine = AdaptiveInferenceEngine(encoder, mode="skip_only")
    batched = engine(input_ids, attention_mask)
    for row in range(len(input_ids)):
        length = int(attention_mask[row].sum())
        alone = engine(input_ids[row:row + 1, :length], attention_mask[row:row + 1, :length])
        assert torch.equal(alone.layers_run[0], batched.layers_run[row])
        torch.testing.assert_close(alone.logits[0], batched.logits[row], atol=1e-5, rtol=1e-5)


@requires_minilm
def test_real_minilm_with_gates_forced_to_run_matches_hf() -> None:
    path = minilm_dir()
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(
        ["A man is playing a guitar on stage.", "Hi.", "The cat sat on the mat while the dog slept by the door."],
        ["Someone plays music.", "Hello there, friend.", "Animals rest."],
        padding=True,
        return_tensors="pt",
    )
    assert bool((batch["attention_mask"] == 0).any()), "the batch must contain padding"
    encoder = AdaptiveEncoder(model, num_labels=2).eval()
    assert encoder.num_steps == 6
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
        actual = encoder(**batch, gate_mode="run").last_hidden_state
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_output_shapes_and_gate_modes(model_type: str) -> None:
    encoder = AdaptiveEncoder(tiny_model(model_type), num_labels=3, gate_inner_size=16, head_inner_size=16)
    input_ids, attention_mask = padded_batch(batch_size=4, num_tokens=7)
    steps = encoder.num_steps
    soft = encoder(input_ids, attention_mask, gate_mode="soft", return_head_token_states=True)
    assert len(soft.exit_logits) == steps and all(logits.shape == (4, 3) for logits in soft.exit_logits)
    assert soft.gate_probs.shape == (4, steps) and len(soft.hidden_states) == steps + 1
    assert all(states.shape == (4, 7, 16) for states in soft.head_token_states)
    torch.testing.assert_close(soft.gate_values, soft.gate_probs)
    hard = encoder(input_ids, attention_mask, gate_mode="hard", heads="last")
    assert set(hard.gate_values.unique().tolist()) <= {0.0, 1.0}
    assert hard.exit_logits[:-1] == [None] * (steps - 1) and hard.logits.shape == (4, 3)
    skipped = encoder(input_ids, attention_mask, gate_mode="skip", heads="none")
    for states in skipped.hidden_states[1:]:
        torch.testing.assert_close(states, skipped.hidden_states[0], rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    model_type=st.sampled_from(FAMILIES),
    forced=st.lists(st.booleans(), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_a_gate_forced_to_skip_is_the_identity(model_type: str, forced: list[bool], seed: int) -> None:
    encoder = AdaptiveEncoder(tiny_model(model_type, seed=seed % 3), num_labels=2).eval()
    steps = encoder.num_steps
    values = torch.tensor([float(flag) for flag in forced[:steps]] + [0.0] * max(0, steps - len(forced)))
    input_ids, attention_mask = padded_batch(seed=seed)
    with torch.no_grad():
        out = encoder(input_ids, attention_mask, gate_values=values, heads="none")
    for step in range(steps):
        if values[step] == 1.0:
            torch.testing.assert_close(out.hidden_states[step + 1], out.hidden_states[step], rtol=0, atol=0)
        else:
            assert not torch.equal(out.hidden_states[step + 1], out.hidden_states[step])


def test_hard_gates_pass_the_soft_gradient_to_the_gates() -> None:
    encoder = AdaptiveEncoder(tiny_model("bert"), num_labels=2)
    input_ids, attention_mask = padded_batch()
    out = encoder(input_ids, attention_mask, gate_mode="hard")
    out.logits.sum().backward()
    gate_gradients = [parameter.grad for parameter in encoder.gates.parameters()]
    assert all(gradient is not None for gradient in gate_gradients)
    assert any(bool(gradient.abs().sum() > 0) for gradient in gate_gradients)


def test_skip_reward_opens_gates() -> None:
    probabilities = torch.full((3, 4), 0.2, requires_grad=True)
    loss = skip_reward(probabilities, weight=0.04)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.04 / 0.8), rtol=1e-4, atol=0)
    assert bool((probabilities.grad < 0).all()), "descending the loss must raise p_skip"


def test_albert_gates_and_heads_are_per_step_not_per_shared_layer() -> None:
    config = tiny_config("albert")
    encoder = AdaptiveEncoder(AutoModel.from_config(config), num_labels=2)
    assert config.num_hidden_groups < config.num_hidden_layers
    assert encoder.num_steps == config.num_hidden_layers == len(encoder.exit_heads)


def test_unwrap_returns_the_untouched_model_and_state_dict_keys_are_stable() -> None:
    model = BertForSequenceClassification(tiny_config("bert"))
    keys_before = set(model.state_dict())
    encoder = AdaptiveEncoder(model)
    assert encoder.unwrap() is model
    assert set(model.state_dict()) == keys_before
    backbone_keys = {key[len("backbone."):] for key in encoder.state_dict() if key.startswith("backbone.")}
    assert backbone_keys == set(model.bert.state_dict())


# ----- bad input ---------------------------------------------------------------------------


def test_unsupported_model_type_names_the_supported_ones() -> None:
    gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*albert, bert, camembert, distilbert, electra, mpnet, roberta, xlm-roberta"):
        AdaptiveEncoder(gpt2)


def test_mismatched_num_labels_is_refused() -> None:
    model = BertForSequenceClassification(BertConfig(**tiny_config("bert").to_dict(), num_labels=3))
    with pytest.raises(ValueError, match=r"num_labels=2 does not match.*config.num_labels is 3"):
        AdaptiveEncoder(model, num_labels=2)


def test_wrong_mask_shape_is_refused() -> None:
    encoder = AdaptiveEncoder(tiny_model("bert"), num_labels=2)
    input_ids, _ = padded_batch(batch_size=2, num_tokens=5)
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids.*\(2, 5\).*\(2, 4\)"):
        encoder(input_ids, torch.ones(2, 4))


def test_empty_batch_is_refused() -> None:
    encoder = AdaptiveEncoder(tiny_model("bert"), num_labels=2)
    with pytest.raises(ValueError, match="empty batch"):
        encoder(torch.zeros(0, 5, dtype=torch.long))


def test_row_without_tokens_is_refused() -> None:
    encoder = AdaptiveEncoder(tiny_model("bert"), num_labels=2)
    input_ids, attention_mask = padded_batch(batch_size=3, num_tokens=5)
    attention_mask[2] = 0
    with pytest.raises(ValueError, match=r"rows \[2\] of attention_mask have no real token"):
        encoder(input_ids, attention_mask)


def test_bad_gate_values_and_heads_are_refused() -> None:
    encoder = AdaptiveEncoder(tiny_model("bert"), num_labels=2)
    input_ids, attention_mask = padded_batch()
    with pytest.raises(ValueError, match="gate_values must be"):
        encoder(input_ids, attention_mask, gate_values=torch.zeros(5))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        encoder(input_ids, attention_mask, gate_values=torch.full((2,), 2.0))
    with pytest.raises(ValueError, match="outside 0..1"):
        encoder(input_ids, attention_mask, heads=[3])
    with pytest.raises(ValueError, match="gate_mode must be"):
        encoder(input_ids, attention_mask, gate_mode="sometimes")  # type: ignore[arg-type]
