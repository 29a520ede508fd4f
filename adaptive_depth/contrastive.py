"""Cross-layer contrastive learning (SmartBERT §3.3, eq. 4-6).

Each token at layer ``i`` is an anchor; the same token at layer ``i + 1`` is its positive and
every other real token of the same sequence at layer ``i + 1`` is a negative:

.. math::

    \\mathcal{L} = \\frac{1}{L-1} \\sum_{i=1}^{L-1} \\frac{1}{N} \\sum_{m=1}^{N}
        -\\log \\frac{e^{s(p^i_m, p^{i+1}_m)/\\tau}}{\\sum_{k=1}^{N} e^{s(p^i_m, p^{i+1}_k)/\\tau}}

Padding tokens are neither anchors nor negatives (the official code lets them be both), and
the average runs over each sequence's real tokens, then over the batch, then over layer pairs.
Nothing here is specific to BERT: any stack that produces ``[B, N, D]`` per layer can use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

__all__ = ["ContrastiveOutput", "CrossLayerInfoNCE", "cross_layer_info_nce", "pairwise_info_nce"]

Similarity = Literal["cosine", "dot"]


def _check_inputs(layer_states: Sequence[Tensor], attention_mask: Tensor | None) -> Tensor:
    if len(layer_states) < 2:
        raise ValueError(
            f"cross-layer InfoNCE needs representations of at least 2 layers, got {len(layer_states)}."
        )
    shape = layer_states[0].shape
    if len(shape) != 3:
        raise ValueError(f"each layer's representation must be [B, N, D], got shape {tuple(shape)}.")
    for index, states in enumerate(layer_states):
        if states.shape != shape:
            raise ValueError(
                f"all layers must share one shape [B, N, D]; layer 0 is {tuple(shape)} "
                f"but layer {index} is {tuple(states.shape)}."
            )
    batch_size, num_tokens, _ = shape
    if batch_size == 0 or num_tokens == 0:
        raise ValueError(f"empty batch: representations have shape {tuple(shape)}.")
    if attention_mask is None:
        return torch.ones(batch_size, num_tokens, dtype=torch.bool, device=layer_states[0].device)
    if attention_mask.shape != (batch_size, num_tokens):
        raise ValueError(
            f"attention_mask must be [B, N] = {(batch_size, num_tokens)}, got {tuple(attention_mask.shape)}."
        )
    return attention_mask.bool()


def pairwise_info_nce(
    anchors: Tensor,
    positives: Tensor,
    valid: Tensor,
    temperature: float,
    similarity: Similarity = "cosine",
) -> Tensor:
    """Token-level InfoNCE between two views of the same sequences, one value per sequence.

    Args:
        anchors: ``[B, N, D]`` (layer ``i``).
        positives: ``[B, N, D]`` (layer ``i + 1``); token ``m`` is the positive of anchor ``m``.
        valid: ``[B, N]`` bool, True for real tokens.
        temperature: ``tau > 0``.
        similarity: ``"cosine"`` (the paper's choice) or ``"dot"``.

    Returns:
        ``[B]`` mean loss over each sequence's real anchors (0 for a sequence with none).
    """
    keep = rearrange(valid, "b n -> b n 1")
    anchors = torch.where(keep, anchors, torch.zeros_like(anchors))
    positives = torch.where(keep, positives, torch.zeros_like(positives))
    if similarity == "cosine":
        anchors = F.normalize(anchors, dim=-1)
        positives = F.normalize(positives, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}.")
    # Anchor m of layer i against every token k of layer i + 1; padded keys are never candidates.
    scores = einsum(anchors, positives, "b m d, b k d -> b m k") / temperature
    scores = scores.masked_fill(~rearrange(valid, "b k -> b 1 k"), float("-inf"))
    positive_scores = scores.diagonal(dim1=1, dim2=2)
    log_likelihood = positive_scores - torch.logsumexp(scores, dim=-1)
    log_likelihood = torch.where(valid, log_likelihood, torch.zeros_like(log_likelihood))
    count = valid.sum(dim=-1)
    return -log_likelihood.sum(dim=-1) / count.clamp_min(1).to(log_likelihood.dtype)


def cross_layer_info_nce(
    layer_states: Sequence[Tensor],
    attention_mask: Tensor | None = None,
    temperature: float = 0.5,
    similarity: Similarity = "cosine",
) -> Tensor:
    """Cross-layer InfoNCE over consecutive layers (paper eq. 4 and 6), padding-aware.

    Args:
        layer_states: ``L >= 2`` tensors ``[B, N, D]``, the (projected) token representations
            of consecutive layers.
        attention_mask: ``[B, N]``, 1 for real tokens, 0 for padding; ``None``: no padding.
        temperature: ``tau > 0`` (0.5 in stage 1 and 0.55 in stage 2 of the official RTE run).
        similarity: ``"cosine"`` or ``"dot"``.

    Returns:
        Scalar loss, mean over layer pairs of the mean over sequences that have real tokens.
        With all similarities equal it is ``log(N)`` for sequences of ``N`` real tokens.

    Example (patch tokens of a 3-block vision transformer; nothing BERT-specific):
        >>> blocks = [torch.randn(4, 16, 64) for _ in range(3)]
        >>> loss = cross_layer_info_nce(blocks, temperature=0.1)
        >>> loss.shape
        torch.Size([])
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    valid = _check_inputs(layer_states, attention_mask)
    has_tokens = valid.any(dim=-1)
    pair_losses = []
    for anchors, positives in zip(layer_states[:-1], layer_states[1:]):
        per_sequence = pairwise_info_nce(anchors, positives, valid, temperature, similarity)
        pair_losses.append(per_sequence[has_tokens].mean())
    return torch.stack(pair_losses).mean()


@dataclass
class ContrastiveOutput:
    """Output of :class:`CrossLayerInfoNCE`.

    Attributes:
        loss: scalar, the cross-layer InfoNCE of the projected representations.
        projections: the ``L`` projected tensors ``[B, N, P]``.
    """

    loss: Tensor
    projections: list[Tensor]


class CrossLayerInfoNCE(nn.Module):
    """Projection head ``f`` (paper eq. 4) plus :func:`cross_layer_info_nce`.

    One two-layer MLP ``Linear(D, D) -> ReLU -> Linear(D, P)`` is shared by all layers, so the
    loss compares layers in one space.

    Args:
        input_dim: width ``D`` of the representations.
        projection_dim: width ``P`` of the space the loss is computed in.
        temperature: ``tau > 0``.
        similarity: ``"cosine"`` or ``"dot"``.

    Example (hidden states of a small ``nn.TransformerEncoder``):
        >>> import torch.nn as nn
        >>> blocks = nn.ModuleList(nn.TransformerEncoderLayer(32, 4, batch_first=True) for _ in range(3))
        >>> states, x = [], torch.randn(2, 10, 32)
        >>> for block in blocks:
        ...     x = block(x)
        ...     states.append(x)
        >>> criterion = CrossLayerInfoNCE(input_dim=32, projection_dim=16, temperature=0.5)
        >>> criterion(states, torch.ones(2, 10)).loss.ndim
        0
    """

    def __init__(
        self,
        input_dim: int,
        projection_dim: int = 128,
        temperature: float = 0.5,
        similarity: Similarity = "cosine",
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.temperature = temperature
        self.similarity: Similarity = similarity
        self.projection = nn.Sequential(
            nn.Linear(input_dim, input_dim), nn.ReLU(), nn.Linear(input_dim, projection_dim)
        )

    def forward(
        self, layer_states: Sequence[Tensor], attention_mask: Tensor | None = None
    ) -> ContrastiveOutput:
        """Project every layer's tokens and compute the loss.

        Args:
            layer_states: ``L >= 2`` tensors ``[B, N, D]``.
            attention_mask: ``[B, N]``, 1 for real tokens, 0 for padding.
        """
        if attention_mask is not None:
            # Zero the padding before projecting: whatever it holds (even inf or NaN) must not
            # reach the projection's weight gradient (0 * NaN is NaN).
            padding = ~rearrange(_check_inputs(layer_states, attention_mask), "b n -> b n 1")
            layer_states = [states.masked_fill(padding, 0.0) for states in layer_states]
        projections = [self.projection(states) for states in layer_states]
        loss = cross_layer_info_nce(projections, attention_mask, self.temperature, self.similarity)
        return ContrastiveOutput(loss=loss, projections=projections)
