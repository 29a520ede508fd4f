"""The small attention block that both the skip gate and the exit head are built on.

The official SmartBERT (and FastBERT) gate and classifier narrow the hidden states with
``tanh(Linear(H -> d))``, run one ``d``-dimensional multi-head self-attention over the
(padding-masked) sequence, and read the ``[CLS]`` position. Their attention has query, key
and value projections and no output projection, which is why the paper's Table 2 counts
about 18.9M multiply-accumulates per gate or head on BERT-base at length 128.

Only the ``[CLS]`` output feeds the decision, so the query is computed for the first position
alone: the result is identical to full self-attention read at ``[CLS]``, at a fraction of the
cost. The contrastive loss of training stage 2 needs every token's attention output;
``return_token_states=True`` computes all of them.

At inference (eval mode, gradients off, no token states) the block runs at its algebraic
minimum. With one query, head ``h``'s score of position ``n`` is
``q_h . (W_k,h x_n + b_k,h) / sqrt(d_h) = (W_k,h^T q_h) . x_n / sqrt(d_h) + q_h . b_k,h``; the
last term is the same at every position and cancels in the softmax, so the key projection folds
into the query (``u_h = W_k,h^T q_h``, one ``[d]`` vector per row and head) and the scores are
the narrowed states times ``u``. The probabilities sum to one, so the value projection moves
after the pooling: ``sum_n p_hn (W_v,h x_n + b_v,h) = W_v,h (sum_n p_hn x_n) + b_v,h``. No
projection then runs over the ``N`` positions: ``n H d + 3 d^2 + 2 heads n d`` MACs instead of
``n H d + d^2 + 2 n d^2 + 2 n d`` (about 40% fewer at ``H = 384``, ``d = 128``).

The parameters and state-dict keys stay ``query`` / ``key`` / ``value``, and the folded path
reads them at every call (per-head views, the ``1 / sqrt(d_head)`` scale applied inside the
query's ``addmm``): no derived copy is cached, so weights replaced or edited in place (even
through ``.data``) are used at once, and ``torch.compile`` / ``torch.export`` trace the same
folded ops (the exported gate and head graphs get them too). The result equals the unfolded
path within float rounding (``tests/test_narrow_attention.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

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
        self.fold_at_inference = True

    def _pooled_folded(self, narrowed: Tensor, attention_mask: Tensor | None) -> Tensor:
        """``[B, d]`` attention output at ``[CLS]`` with the key folded into the query and the value
        applied after the pooling (see the module docstring); no projection over the ``N`` positions.

        Everything is read from the parameters at each call (views, and the scale applied by
        ``addmm``), so there is no cache to invalidate and ``torch.export`` traces the same ops.
        """
        batch_size = narrowed.shape[0]
        heads, inner = self.num_heads, self.inner_size
        scale = (inner // heads) ** -0.5
        # scale * (x W_q^T + b_q): one kernel, no scaled copy of the weight to keep in sync.
        query = torch.addmm(self.query.bias, narrowed[:, 0], self.query.weight.t(), beta=scale, alpha=scale)
        # u_h = W_k,h^T q_h for every row: [heads, B, d_h] x [heads, d_h, d] -> [heads, B, d]
        folded = torch.bmm(query.view(batch_size, heads, -1).transpose(0, 1), self.key.weight.view(heads, -1, inner))
        scores = torch.bmm(folded.transpose(0, 1), narrowed.transpose(1, 2))  # [B, heads, N]
        if attention_mask is not None:
            is_padding = ~attention_mask.bool()
            scores = scores.masked_fill(is_padding[:, None, :], torch.finfo(scores.dtype).min)
        pooled = torch.bmm(scores.softmax(dim=-1), narrowed)  # [B, heads, d]
        # W_v,h z_h + b_v,h per head: [heads, B, d] x [heads, d, d_h] -> [heads, B, d_h]
        attended = torch.baddbmm(self.value.bias.view(heads, 1, -1), pooled.transpose(0, 1),
                                 self.value.weight.view(heads, -1, inner).transpose(1, 2))
        return attended.transpose(0, 1).reshape(batch_size, inner)

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
            self.fold_at_inference
            and not (self.training or return_token_states or torch.is_grad_enabled())
        ):
            return NarrowAttentionOutput(pooled=self._pooled_folded(narrowed, attention_mask))
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
