"""A gate's or head's attention and the linear layer after it, fused for inference.

:class:`~adaptive_depth.narrow_attention.NarrowAttentionPool` at inference already folds the key into
the ``[CLS]`` query and applies the value after the pooling, reading its parameters at every call.
What is left is a dozen small operators per gate or head, and on a CPU ``tanh`` is slow (torch 2.13:
about 2.8 ns per element against 0.6 for ``sigmoid``, 150 us on MiniLM's ``[416, 128]`` narrowed
states at batch 32 and one thread). With weights derived once, everything between the narrowing and
the decision becomes four small matmuls and a softmax:

- the narrowing runs as ``z = alpha s + beta`` with ``s = sigmoid(2 (x W_n^T + b_n))``, ``alpha = 2``,
  ``beta = -1`` (``tanh y = 2 sigmoid(2y) - 1``; float32 and float64). The factor 2 is folded into the
  narrowing weight, and ``alpha``, ``beta`` into the weights after it, so only ``s`` is ever formed.
  In float16 and bfloat16, whose coarse ``sigmoid`` near 0.5 would cost precision, it stays ``tanh``
  (``alpha = 1``, ``beta = 0``);
- head ``h``'s query, with the key folded in and the ``[CLS]`` state read as ``alpha s_0 + beta``:
  ``u_h = s_0 A_h + c_h`` with ``A_h = alpha^2 k W_q,h^T W_k,h`` (``k = d_h^-1/2``) and
  ``c_h = alpha k (b_q,h + beta W_q,h 1)^T W_k,h``; the scores are ``u_h . s_n`` (the ``beta`` term is the
  same at every position and cancels in the softmax). All heads at once: ``s_0 @ A`` with ``A``
  ``[d, heads * d]``;
- the pooled ``s`` of each head, ``P_h``, gives ``z``'s as ``alpha P_h + beta`` (the probabilities sum to
  one); the value projection and the linear layer after the attention (the gate's score, the head's
  ``prelim``), both linear, fold into ``out = P @ F + e`` with ``F_h = alpha (W_o,h W_v,h)^T`` and
  ``e = W_o (b_v + beta W_v 1) + b_o``.

MACs (the ``exact`` convention of :mod:`adaptive_depth.flops` counts these when fused):
``n H d + heads d^2 + 2 heads n d + heads d out``, against the unfused inference path's
``n H d + 3 d^2 + 2 heads n d + d out``; fewer for a gate (two heads, ``out = 1``), ``4 d^2`` more for a
head (four heads, ``out = d``: 0.2% of an engine call's MACs on MiniLM), for three to five operators
fewer and no ``tanh`` over the sequence. The result equals the unfused path within float rounding
(``tests/test_fused_pool.py``). In float16 and bfloat16 that rounding is coarse: the derived weights are
rounded once where the unfused path rounds after each projection, so a row whose entropy or ``p_skip`` lies
within it of a threshold can take another decision (some rows did on an H200, docs/benchmarks.md "GPU").

The derived weights are a snapshot, stamped with each source parameter's storage and version counter:
an optimizer step, ``load_state_dict``, ``.to()`` or a replaced parameter is seen at the next call and the
snapshot is rebuilt; so is anything done in training mode (``.train()`` marks the snapshot stale, for fused
optimizers, whose in-place updates leave version counters alone). Not seen: an in-place edit through
``.data``, and one of a parameter created under ``torch.inference_mode`` (it has no version counter), both
outside training mode; call
:meth:`AdaptiveEncoder.fuse_for_inference <adaptive_depth.encoder.AdaptiveEncoder.fuse_for_inference>`
again after one.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adaptive_depth.narrow_attention import NarrowAttentionPool

__all__ = ["FusedPool", "FusedSnapshot", "fused_call_allowed"]


def _parameter(module: nn.Module, name: str) -> Tensor:
    """``module.<name>``, read from the parameter dict (``nn.Module.__getattr__`` costs about 1 us a call,
    which matters at nine per gate call); a parametrized module's computed weight falls back to ``getattr``."""
    parameter = module._parameters.get(name)
    return parameter if parameter is not None else getattr(module, name)


def _sources(pool: NarrowAttentionPool, post: nn.Linear) -> tuple[Tensor, ...]:
    """The parameters the fused weights are derived from (the key's bias cancels in the softmax)."""
    modules = pool._modules
    narrow, query, key, value = (modules[name] for name in ("narrow", "query", "key", "value"))
    return (_parameter(narrow, "weight"), _parameter(narrow, "bias"), _parameter(query, "weight"),
            _parameter(query, "bias"), _parameter(key, "weight"), _parameter(value, "weight"),
            _parameter(value, "bias"), _parameter(post, "weight"), _parameter(post, "bias"))


def _stamp(tensors: tuple[Tensor, ...]) -> list[int]:
    """Each tensor's version counter, then each one's storage address (one flat list: cheap to compare).
    An inference tensor (a parameter created under ``torch.inference_mode``) has no version counter: -1."""
    try:
        versions = [tensor._version for tensor in tensors]
    except RuntimeError:  # "Inference tensors do not track version counter"
        versions = [-1 if tensor.is_inference() else tensor._version for tensor in tensors]
    return versions + [tensor.data_ptr() for tensor in tensors]


def fused_call_allowed(module: nn.Module) -> bool:
    """Whether a call of ``module`` may take the fused path: eval mode, gradients off, and not inside a
    tracer (``torch.compile``, ``torch.export``, ONNX and TorchScript trace the parameters themselves)."""
    return not (module.training or torch.is_grad_enabled() or torch.compiler.is_compiling()
                or torch.jit.is_tracing() or torch.jit.is_scripting())


class FusedSnapshot:
    """Mixin of the modules that hold a :class:`FusedPool` in ``_fused`` (gates and exit heads): entering
    training mode marks the snapshot stale. Fused optimizers (``torch.optim.Adam(..., fused=True)``) update
    parameters in place without bumping their version counters; a training phase between ``.train()`` and
    ``.eval()`` is then still seen."""

    _fused: FusedPool | None

    def train(self, mode: bool = True):  # noqa: ANN201 (nn.Module.train returns the module)
        if mode and self._fused is not None:
            self._fused.mark_stale()
        return super().train(mode)  # type: ignore[misc]


@dataclass
class FusedPool:
    """``post(pool(hidden, mask).pooled)`` of a :class:`NarrowAttentionPool` and the ``nn.Linear`` after it,
    as derived weights (see the module docstring). Build with :meth:`build`; call on ``[B, N, H]``."""

    narrow_weight: Tensor  # [d, H], times 2 on the sigmoid form
    narrow_bias: Tensor  # [d]
    query: Tensor  # A: [d, heads * d]
    query_bias: Tensor  # c: [heads * d]
    out: Tensor  # F: [heads * d, out]
    out_bias: Tensor  # e: [out]
    num_heads: int
    inner_size: int
    sigmoid: bool
    sources: tuple[Tensor, ...]
    stamp: list[int]

    @classmethod
    @torch.no_grad()
    def build(cls, pool: NarrowAttentionPool, post: nn.Linear) -> FusedPool:
        """Derive the weights from the modules' current parameters (in float64, stored in their dtype)."""
        sources = _sources(pool, post)
        dtype = sources[0].dtype
        sigmoid = dtype in (torch.float32, torch.float64)
        alpha, beta, factor = (2.0, -1.0, 2.0) if sigmoid else (1.0, 0.0, 1.0)
        narrow_w, narrow_b, w_q, b_q, w_k, w_v, b_v, w_o, b_o = (tensor.double() for tensor in sources)
        heads, inner = pool.num_heads, pool.inner_size
        head_size = inner // heads
        scale = head_size ** -0.5
        w_q, b_q = w_q.view(heads, head_size, inner), b_q.view(heads, head_size)
        w_k, w_v = w_k.view(heads, head_size, inner), w_v.view(heads, head_size, inner)
        b_q = b_q + beta * w_q.sum(dim=-1)  # the [CLS] state enters as alpha s_0 + beta
        query = (alpha * alpha * scale) * torch.bmm(w_q.transpose(1, 2), w_k)  # [heads, d, d]: s_0 -> u_h
        query_bias = (alpha * scale) * torch.bmm(b_q.unsqueeze(1), w_k).squeeze(1)  # [heads, d]
        out_bias = w_o @ (b_v + beta * w_v.sum(dim=-1).reshape(-1)) + b_o  # the pooled states enter as alpha P + beta
        out = alpha * torch.bmm(w_o.view(-1, heads, head_size).transpose(0, 1), w_v)  # [heads, out, d]
        out = out.transpose(1, 2)  # [heads, d, out]
        return cls(
            narrow_weight=(factor * narrow_w).to(dtype), narrow_bias=(factor * narrow_b).to(dtype),
            query=query.transpose(0, 1).reshape(inner, heads * inner).to(dtype),
            query_bias=query_bias.reshape(-1).to(dtype), out=out.reshape(heads * inner, -1).contiguous().to(dtype),
            out_bias=out_bias.to(dtype), num_heads=heads, inner_size=inner, sigmoid=sigmoid, sources=sources,
            stamp=_stamp(sources),
        )

    def is_current(self, pool: NarrowAttentionPool, post: nn.Linear) -> bool:
        """Whether the modules hold the parameters it was built from, in the same storage, unchanged in place."""
        sources = _sources(pool, post)
        return all(map(operator.is_, sources, self.sources)) and _stamp(sources) == self.stamp

    def mark_stale(self) -> None:
        """Make the next :meth:`refreshed` rebuild the weights whatever the stamp says."""
        self.stamp = []

    def refreshed(self, pool: NarrowAttentionPool, post: nn.Linear) -> FusedPool:
        """``self`` while :meth:`is_current`, else one built anew from the modules' parameters."""
        return self if self.is_current(pool, post) else FusedPool.build(pool, post)

    def __call__(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``[B, out]`` from ``hidden_states`` ``[B, N, H]`` and the ``[B, N]`` token mask (``None``: no padding)."""
        batch_size = hidden_states.shape[0]
        narrowed = torch.nn.functional.linear(hidden_states, self.narrow_weight, self.narrow_bias)
        narrowed = torch.sigmoid(narrowed) if self.sigmoid else torch.tanh(narrowed)  # [B, N, d]
        query = torch.addmm(self.query_bias, narrowed[:, 0], self.query).view(batch_size, self.num_heads, -1)
        scores = torch.bmm(query, narrowed.transpose(1, 2))  # [B, heads, N]
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask.bool()[:, None, :], torch.finfo(scores.dtype).min)
        pooled = torch.bmm(scores.softmax(dim=-1), narrowed)  # [B, heads, d]
        return torch.addmm(self.out_bias, pooled.view(batch_size, -1), self.out)
