"""The small attention block that both the skip gate and the exit head are built on.

The official SmartBERT (and FastBERT) gate and classifier narrow the hidden states with
``tanh(Linear(H -> d))``, run one ``d``-dimensional multi-head self-attention over the
(padding-masked) sequence, and read the ``[CLS]`` position. Their attention has query, key
and value projections and no output projection, which is why the paper's Table 2 counts
about 18.9M multiply-accumulates per gate or head on BERT-base at length 128.

Only the ``[CLS]`` output feeds the decision, so by default the query is computed for the
first position alone: the result is identical to full self-attention read at ``[CLS]``,
at a fraction of the cost. The contrastive loss of training stage 2 needs every token's
attention output; ``return_token_states=True`` computes all of them.

At inference (eval mode, gradients off) the key and value projections run as one matmul over
a cached concatenated weight, and the ``1 / sqrt(d_head)`` scale is folded into a cached copy of
the query weight: fewer, larger kernels, which is what counts at batch size 1 on a CPU. The
parameters and state-dict keys stay ``query`` / ``key`` / ``value``; the cache is rebuilt when
any of them is replaced or changed in place (but not through ``.data``: call
:meth:`NarrowAttentionPool.clear_fused_cache` after such an edit). The result equals the
unfused path within float rounding (``tests/test_gates.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional

__all__ = ["NarrowAttentionOutput", "NarrowAttentionPool"]


@dataclass
class NarrowAttentionOutput:
    """Output of :class:`NarrowAttentionPool`.

    Attributes:
        pooled: ``[B, d]`` attention output at the first (``[CLS]``) position.
        token_states: ``[B, N, d]`` attention output at every position, or ``None`` unless
            ``return_token_states=True`` was asked for. Rows at padding positions hold
            values that carry no meaning; mask them.
    """

    pooled: Tensor
    token_states: Tensor | None = None


class NarrowAttentionPool(nn.Module):
    """``tanh(Linear(H -> d))`` then one ``d``-dim self-attention (q, k, v; no out-projection).

    Args:
        hidden_size: width ``H`` of the incoming hidden states.
        inner_size: width ``d`` of the narrowed states (128 in the official code).
        num_heads: attention heads; must divide ``inner_size``.
        dropout: dropout on the attention probabilities (training mode only).

    Example:
        >>> pool = NarrowAttentionPool(hidden_size=32, inner_size=16, num_heads=2)
        >>> out = pool(torch.randn(3, 7, 32), torch.ones(3, 7, dtype=torch.long))
        >>> tuple(out.pooled.shape)
        (3, 16)
    """

    def __init__(
        self, hidden_size: int, inner_size: int = 128, num_heads: int = 2, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if inner_size % num_heads != 0:
            raise ValueError(
                f"inner_size ({inner_size}) must be divisible by num_heads ({num_heads})."
            )
        self.hidden_size = hidden_size
        self.inner_size = inner_size
        self.num_heads = num_heads
        self.narrow = nn.Linear(hidden_size, inner_size)
        self.query = nn.Linear(inner_size, inner_size)
        self.key = nn.Linear(inner_size, inner_size)
        self.value = nn.Linear(inner_size, inner_size)
        self.dropout = nn.Dropout(dropout)
        self.fuse_at_inference = True
        self._fused: tuple[tuple[Any, ...], Tensor, Tensor, Tensor, Tensor] | None = None

    def clear_fused_cache(self) -> None:
        """Forget the cached fused weights (after editing ``query`` / ``key`` / ``value`` through ``.data``)."""
        self._fused = None

    def train(self, mode: bool = True) -> NarrowAttentionPool:
        self._fused = None
        return super().train(mode)

    def _fused_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Scaled query weight and bias, concatenated key-value weight ``[2d, d]`` and bias ``[2d]``."""
        tensors = (self.query.weight, self.query.bias, self.key.weight, self.key.bias,
                   self.value.weight, self.value.bias)
        stamp = tuple((tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device) for tensor in tensors)
        if self._fused is None or self._fused[0] != stamp:
            scale = (self.inner_size // self.num_heads) ** -0.5
            query_weight, query_bias, key_weight, key_bias, value_weight, value_bias = tensors
            with torch.no_grad():
                self._fused = (
                    stamp,
                    query_weight * scale,
                    query_bias * scale,
                    torch.cat([key_weight, value_weight]),
                    torch.cat([key_bias, value_bias]),
                )
        return self._fused[1:]  # type: ignore[return-value]

    def _pooled_fused(self, narrowed: Tensor, attention_mask: Tensor | None) -> Tensor:
        """``[B, d]`` attention output at ``[CLS]``: the unfused computation with two projection matmuls."""
        query_weight, query_bias, key_value_weight, key_value_bias = self._fused_weights()
        batch_size, length, _ = narrowed.shape
        query = functional.linear(narrowed[:, :1], query_weight, query_bias)  # [B, 1, d], already scaled
        query = query.view(batch_size, self.num_heads, 1, -1)  # one query position: no transpose needed
        key_value = functional.linear(narrowed, key_value_weight, key_value_bias)  # [B, N, 2d]
        key_value = key_value.view(batch_size, length, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(query, key_value[0].transpose(-1, -2))  # [B, heads, 1, N]
        if attention_mask is not None:
            is_padding = ~attention_mask.bool()
            scores = scores.masked_fill(is_padding[:, None, None, :], torch.finfo(scores.dtype).min)
        return torch.matmul(scores.softmax(dim=-1), key_value[1]).view(batch_size, self.inner_size)

    def _split_heads(self, states: Tensor) -> Tensor:
        """``[B, n, d]`` -> ``[B, heads, n, d / heads]``."""
        batch_size, length, _ = states.shape
        return states.view(batch_size, length, self.num_heads, -1).transpose(1, 2)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        return_token_states: bool = False,
    ) -> NarrowAttentionOutput:
        """Attend over the sequence and pool at ``[CLS]``.

        Args:
            hidden_states: ``[B, N, H]``.
            attention_mask: ``[B, N]``, 1 (or True) for real tokens, 0 for padding; ``None``
                means no padding.
            return_token_states: also return the attention output at every position.

        Returns:
            :class:`NarrowAttentionOutput`.
        """
        narrowed = torch.tanh(self.narrow(hidden_states))
        if (
            self.fuse_at_inference
            and not (self.training or return_token_states or torch.is_grad_enabled())
            and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
        ):
            return NarrowAttentionOutput(pooled=self._pooled_fused(narrowed, attention_mask))
        queries_from = narrowed if return_token_states else narrowed[:, :1]
        query = self._split_heads(self.query(queries_from))
        key = self._split_heads(self.key(narrowed))
        value = self._split_heads(self.value(narrowed))
        # Explicit matmuls rather than SDPA: the query is one position on the hot path, and
        # FlopCounterMode counts CPU SDPA as zero, which would hide this block's cost.
        scores = torch.matmul(query, key.transpose(-1, -2)) * (query.shape[-1] ** -0.5)
        if attention_mask is not None:
            is_padding = ~attention_mask.bool()
            scores = scores.masked_fill(is_padding[:, None, None, :], torch.finfo(scores.dtype).min)
        probabilities = scores.softmax(dim=-1)
        if self.training:
            probabilities = self.dropout(probabilities)
        attended = torch.matmul(probabilities, value).transpose(1, 2).flatten(2)  # [B, q, d]
        return NarrowAttentionOutput(
            pooled=attended[:, 0],
            token_states=attended if return_token_states else None,
        )
