"""Inputs the library used to take silently: a misspelled keyword, more tokens than the position
table holds, an exit head that outputs NaN (its rows would never exit)."""

from __future__ import annotations

import pytest
import torch

from adaptive_depth.encoder import AdaptiveEncoder
from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.exits import EntropyExit
from tests.conftest import FAMILIES, padded_batch, tiny_model


def make_encoder(model_type: str = "bert") -> AdaptiveEncoder:
    return AdaptiveEncoder(tiny_model(model_type), num_labels=2, gate_inner_size=16, head_inner_size=16).eval()


def test_a_misspelled_input_name_is_an_error_in_training_and_inference() -> None:
    encoder = make_encoder()
    input_ids, attention_mask = padded_batch()
    token_type_ids = torch.zeros_like(input_ids)
    encoder(input_ids, attention_mask, token_type_ids=token_type_ids)  # the right name works
    with pytest.raises(ValueError, match=r"no input named 'token_type_id'.*token_type_ids"):
        encoder(input_ids, attention_mask, token_type_id=token_type_ids)
    with pytest.raises(ValueError, match="no input named 'token_type_id'"):
        AdaptiveInferenceEngine(encoder)(input_ids, attention_mask, token_type_id=token_type_ids)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_more_tokens_than_the_position_table_is_a_clear_error(model_type: str) -> None:
    encoder = make_encoder(model_type)
    limit = encoder.config.max_position_embeddings - (2 if model_type in ("roberta", "mpnet") else 0)
    ids = torch.full((1, limit), 7)
    AdaptiveInferenceEngine(encoder, mode="full")(ids)  # exactly the table: fine
    with pytest.raises(ValueError, match=rf"{limit + 1} tokens but the {model_type} position table holds {limit}"):
        AdaptiveInferenceEngine(encoder, mode="full")(torch.full((1, limit + 1), 7))


def test_inputs_that_are_not_tensors_of_the_right_rank_are_clear_errors() -> None:
    """A list of ids, 3-D ids or 2-D embeddings used to fail inside transformers (AttributeError, unpacking)."""
    engine = AdaptiveInferenceEngine(make_encoder())
    input_ids, attention_mask = padded_batch()
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor, got a list.*return_tensors='pt'"):
        engine(input_ids.tolist(), attention_mask)
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor, got a list"):
        engine(input_ids, attention_mask.tolist())
    with pytest.raises(ValueError, match=r"input_ids must be \[B, N\], got shape \(1, 2, 5\)"):
        engine(torch.ones(1, 2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[B, N, H\], got shape \(2, 5\)"):
        engine(inputs_embeds=torch.ones(2, 5))
    engine(input_ids, attention_mask)  # the same batch as tensors runs


def test_nan_exit_head_is_an_error_not_a_row_that_never_exits() -> None:
    encoder = make_encoder()
    with torch.no_grad():
        encoder.exit_heads[0].classifier.bias.fill_(float("nan"))
    input_ids, attention_mask = padded_batch()
    engine = AdaptiveInferenceEngine(encoder, criterion=EntropyExit(10.0), mode="exit_only")
    with pytest.raises(FloatingPointError, match="exit head 1 gave NaN or infinite logits for 3 of 3 rows"):
        engine(input_ids, attention_mask)


def test_packed_position_ids_without_a_mask_are_refused_and_none_keeps_the_length_check() -> None:
    """transformers 5 reads position ids that restart within a row, with no mask, as packed sequences (a
    block mask the engine would not use); ``position_ids=None`` used to switch the length check off."""
    engine = AdaptiveInferenceEngine(make_encoder(), mode="full")
    ids = torch.full((2, 8), 7)
    with pytest.raises(ValueError, match="position_ids restart or jump within a row and no attention_mask"):
        engine(ids, position_ids=torch.arange(4).repeat(2)[None].expand(2, -1))
    engine(ids, position_ids=torch.arange(8)[None])  # consecutive positions run
    engine(ids, torch.ones_like(ids), position_ids=torch.arange(4).repeat(2)[None].expand(2, -1))  # with a mask too
    limit = engine.encoder.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"{limit + 1} tokens but the bert position table holds {limit}"):
        engine(torch.full((1, limit + 1), 7), position_ids=None)


def test_mpnets_length_limit_follows_its_fixed_padding_index() -> None:
    """MPNetEmbeddings numbers positions after padding index 1 whatever config.pad_token_id says."""
    from adaptive_depth.backbones import get_backbone

    config = tiny_model("mpnet").config
    limits = []
    for pad in (0, 1, 5):
        config.pad_token_id = pad
        limits.append(get_backbone(config).max_tokens(config))
    assert limits == [config.max_position_embeddings - 2] * 3


def test_decoders_and_layer_lists_that_disagree_with_the_config_are_refused() -> None:
    from adaptive_depth.backbones import UnsupportedModelError

    model = tiny_model("bert", num_layers=3)
    del model.encoder.layer[2:]  # layers dropped without the config
    with pytest.raises(ValueError, match="holds 2 layer modules but its config says 3"):
        AdaptiveEncoder(model, num_labels=2)
    decoder = tiny_model("bert")
    decoder.config.is_decoder = True
    with pytest.raises(UnsupportedModelError, match="configured as a decoder"):
        AdaptiveEncoder(decoder, num_labels=2)
