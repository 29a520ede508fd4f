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


def _no_projection(base_model: nn.Module) -> nn.Module | None:
    return None


def _electra_projection(base_model: nn.Module) -> nn.Module | None:
    return getattr(base_model, "embeddings_project", None)  # only when embedding_size != hidden_size


def _albert_projection(base_model: nn.Module) -> nn.Module | None:
    return base_model.encoder.embedding_hidden_mapping_in


# Per family: the Linear that maps the embeddings to the first layer's width (if any), and whether
# the embeddings take token types (DistilBERT and MPNet do not).
# (The layer list and layer calls are in adaptive_depth.backbones.BACKBONES.)
EXPORT_EMBEDDINGS: dict[str, tuple[Callable[[nn.Module], nn.Module | None], bool]] = {
    "bert": (_no_projection, True),
    "roberta": (_no_projection, True),
    "xlm-roberta": (_no_projection, True),
    "camembert": (_no_projection, True),
    "mpnet": (_no_projection, False),
    "electra": (_electra_projection, True),
    "albert": (_albert_projection, True),
    "distilbert": (_no_projection, False),
}


class EmbeddingStep(nn.Module):
    """``(input_ids [R, N], token_type_ids [R, N]) -> [R, N, H]``, the first layer's input.

    Holds only the model's embeddings (and ELECTRA's or ALBERT's projection), so the exported
    graph carries none of the layers' weights. DistilBERT's and MPNet's step takes ``input_ids``
    only. Position ids are the model's defaults (``0..N-1``; RoBERTa and MPNet derive them from the
    padding in ``input_ids``), as in the model's forward.
    """

    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        model_type = base_model.config.model_type
        if model_type not in EXPORT_EMBEDDINGS:
            raise UnsupportedModelError(
                f"exporting model_type {model_type!r} is not supported; supported: {', '.join(sorted(EXPORT_EMBEDDINGS))}."
            )
        projection, self.takes_token_types = EXPORT_EMBEDDINGS[model_type]
        self.embeddings = base_model.embeddings
        self.projection = projection(base_model)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        if self.takes_token_types:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        else:
            hidden = self.embeddings(input_ids)
        return self.projection(hidden) if self.projection is not None else hidden


def layer_attention_mask(attention_mask: Tensor, attn_implementation: str, dtype: torch.dtype) -> Tensor:
    """The ``[R, 1, 1, N]`` mask a transformers 5.x layer broadcasts over its queries, from a ``[R, N]`` token mask.

    ``masking_utils.create_bidirectional_mask`` gives a ``[R, 1, N, N]`` bool mask (True = attend)
    for sdpa and an additive one (0 to attend, the dtype's minimum for padding keys) for eager
    attention; in an encoder every query row of it is the same, so the ``[R, 1, 1, N]`` row
    broadcast over the queries computes the same attention with ``N`` times fewer mask elements
    to build and convert per call. (transformers gives ``None`` for a batch without padding; an
    all-True mask computes the same attention.)

    Args:
        attention_mask: ``[R, N]``, 1 (or True) for tokens, 0 for padding.
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        dtype: the model's floating dtype (for the eager additive mask).
    """
    keys = attention_mask.bool()[:, None, None, :]
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
