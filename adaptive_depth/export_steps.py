"""The static-shape step modules that :mod:`adaptive_depth.export` exports.

Each takes a batch of active rows ``R`` of length ``N`` (both dynamic in the exported graphs):
``EmbeddingStep`` ids -> hidden states entering the first layer; ``LayerStep`` one encoder layer
with its attention mask built inside from the ``[R, N]`` token mask; ``GateStep`` -> ``p_skip``;
``HeadStep`` -> logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from adaptive_depth.backbones import UnsupportedModelError

__all__ = ["EXPORT_EMBEDDINGS", "EmbeddingStep", "GateStep", "HeadStep", "LayerStep", "layer_attention_mask"]


def _embed_with_token_types(base_model: nn.Module, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
    return base_model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)


def _embed_electra(base_model: nn.Module, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
    hidden = base_model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    project = getattr(base_model, "embeddings_project", None)  # only when embedding_size != hidden_size
    return project(hidden) if project is not None else hidden


def _embed_albert(base_model: nn.Module, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
    hidden = base_model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    return base_model.encoder.embedding_hidden_mapping_in(hidden)


def _embed_distilbert(base_model: nn.Module, input_ids: Tensor) -> Tensor:
    # DistilBERT and MPNet: no token types.
    return base_model.embeddings(input_ids)


# How each family turns ids into what its first layer receives, and whether it takes token types.
# (The layer list and layer calls are in adaptive_depth.backbones.BACKBONES.)
EXPORT_EMBEDDINGS: dict[str, tuple[Callable[..., Tensor], bool]] = {
    "bert": (_embed_with_token_types, True),
    "roberta": (_embed_with_token_types, True),
    "xlm-roberta": (_embed_with_token_types, True),
    "camembert": (_embed_with_token_types, True),
    "mpnet": (_embed_distilbert, False),
    "electra": (_embed_electra, True),
    "albert": (_embed_albert, True),
    "distilbert": (_embed_distilbert, False),
}


class EmbeddingStep(nn.Module):
    """``(input_ids [R, N], token_type_ids [R, N]) -> [R, N, H]``, the first layer's input.

    DistilBERT's step takes ``input_ids`` only. Position ids are the model's defaults
    (``0..N-1``; RoBERTa derives them from the padding in ``input_ids``), as in the model's forward.
    """

    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        model_type = base_model.config.model_type
        if model_type not in EXPORT_EMBEDDINGS:
            raise UnsupportedModelError(
                f"exporting model_type {model_type!r} is not supported; supported: {', '.join(sorted(EXPORT_EMBEDDINGS))}."
            )
        self.base_model = base_model
        self._embed, self.takes_token_types = EXPORT_EMBEDDINGS[model_type]

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        if self.takes_token_types:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            return self._embed(self.base_model, input_ids, token_type_ids)
        return self._embed(self.base_model, input_ids)


def layer_attention_mask(attention_mask: Tensor, attn_implementation: str, dtype: torch.dtype) -> Tensor:
    """The ``[R, 1, N, N]`` mask a transformers 5.x layer receives, from a ``[R, N]`` token mask.

    ``masking_utils.create_bidirectional_mask`` gives a bool mask (True = attend) for sdpa and an
    additive mask (0 to attend, the dtype's minimum for padding keys) for eager attention. (It
    gives ``None`` for a batch without padding; an all-True mask computes the same attention.)

    Args:
        attention_mask: ``[R, N]``, 1 (or True) for tokens, 0 for padding.
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        dtype: the model's floating dtype (for the eager additive mask).
    """
    rows, length = attention_mask.shape
    keys = attention_mask.bool()[:, None, None, :].expand(rows, 1, length, length)
    if attn_implementation == "sdpa":
        return keys
    if attn_implementation == "eager":
        zeros = torch.zeros(keys.shape, dtype=dtype, device=attention_mask.device)
        return zeros.masked_fill(~keys, torch.finfo(dtype).min)
    raise ValueError(
        f"cannot export attn_implementation={attn_implementation!r}; load the model with "
        "attn_implementation='sdpa' or 'eager'."
    )


class LayerStep(nn.Module):
    """``(hidden [R, N, H], attention_mask [R, N]) -> [R, N, H]``: one encoder layer with its mask built inside."""

    def __init__(self, layer: nn.Module, attn_implementation: str, dtype: torch.dtype,
                 position_bias: nn.Module | None = None) -> None:
        super().__init__()
        layer_attention_mask(torch.ones(1, 1), attn_implementation, dtype)  # fail early on other implementations
        self.layer = layer
        self.attn_implementation = attn_implementation
        self.dtype = dtype
        # MPNet: every layer also takes the relative position bias its encoder computes per batch.
        self.position_bias = position_bias

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        mask = layer_attention_mask(attention_mask, self.attn_implementation, self.dtype)
        if self.position_bias is not None:
            output = self.layer(hidden_states, mask, self.position_bias.compute_position_bias(hidden_states))
        else:
            output = self.layer(hidden_states, mask)
        return output[0] if isinstance(output, tuple) else output


class GateStep(nn.Module):
    """``(hidden [R, N, H], attention_mask [R, N]) -> p_skip [R]``."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        return self.gate(hidden_states, attention_mask).p_skip


class HeadStep(nn.Module):
    """``(hidden [R, N, H], attention_mask [R, N]) -> logits [R, C]``."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(hidden_states, attention_mask).logits
