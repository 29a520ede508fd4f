"""Analytic multiply-accumulate (MAC) counts of encoders, skip gates and exit heads.

Every function returns MACs (an ``int``). One multiply-accumulate is two floating-point
operations, which is how the SmartBERT paper and ``torch.utils.flop_counter.FlopCounterMode``
count "FLOPs": use :func:`macs_to_flops` to compare with them.

Two conventions (:data:`Convention`):

``"paper"``
    Only ``nn.Linear`` MACs, at the (padded) length passed in: the paper uses 128. Attention
    score and weighted-sum matmuls, softmax, LayerNorm and embedding lookups are not counted.
    The gate's and head's narrow self-attention computes its query for *all* tokens, as the
    official code does. This reproduces paper Table 2 for BERT-base at length 128:
    1811.8M FLOPs per layer and 21744M for the whole model exactly, the 37.6M classifier
    within 0.5%; the official gate's own structure gives 37.75M FLOPs, 0.9% above the 37.4M
    printed in the paper (the paper's small-module figures are not exactly reproducible;
    nothing here is tuned to hit them).

``"exact"``
    Every matmul at the given (real) length: the Linear layers plus, per transformer layer,
    the attention scores (``n * n * H``) and the attention-weighted sum (``n * n * H``). For
    gates and heads, exactly what this repository's modules compute at inference: one
    ``[CLS]`` query with the key projection folded into it and the value projection applied
    after the pooling (:mod:`adaptive_depth.narrow_attention`); when the encoder is fused for
    inference (:mod:`adaptive_depth.fused_pool`), the fused matmuls; when token states are asked
    for (training stage 2), every token's query, key and value. Matches ``FlopCounterMode`` on
    eager-attention models (on CPU it counts SDPA as zero).

Symbols: ``n`` tokens, ``H`` hidden size, ``I`` intermediate size, ``E`` embedding size,
``d`` gate / head inner size, ``C`` labels, ``L`` layer steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from adaptive_depth.backbones import EncoderDims, get_backbone
from adaptive_depth.exits import ClassifierExitHead, PoolerExitHead

if TYPE_CHECKING:
    from adaptive_depth.encoder import AdaptiveEncoder

__all__ = [
    "Convention",
    "EncoderCost",
    "EncoderDims",
    "embedding_macs",
    "encoder_cost",
    "encoder_dims",
    "full_model_macs",
    "gate_macs",
    "head_macs",
    "layer_macs",
    "macs_to_flops",
    "pooler_macs",
    "step_macs",
]

Convention = Literal["paper", "exact"]
_CONVENTIONS = ("paper", "exact")


def _check(seq_len: int, convention: str) -> None:
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be 'paper' or 'exact', got {convention!r}.")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}.")


def macs_to_flops(macs: int) -> int:
    """FLOPs as the paper and ``FlopCounterMode`` count them: 2 per multiply-accumulate.

    Args:
        macs: multiply-accumulates.

    Returns:
        FLOPs, ``2 * macs``.

    Example:
        >>> macs_to_flops(905_969_664)
        1811939328
    """
    return 2 * int(macs)


def encoder_dims(config: Any) -> EncoderDims:
    """Read :class:`EncoderDims` from a Hugging Face config.

    The sizes come from the family's entry in :data:`adaptive_depth.backbones.BACKBONES` (one
    table per family: layer layout and sizes).

    Args:
        config: a ``transformers.PretrainedConfig``.

    Returns:
        :class:`EncoderDims`.

    Raises:
        UnsupportedModelError: for any other ``model_type``.

    Example:
        >>> from transformers import BertConfig
        >>> dims = encoder_dims(BertConfig())
        >>> dims.hidden_size, dims.intermediate_size, dims.num_layers, dims.embedding_size
        (768, 3072, 12, None)
    """
    return get_backbone(config).dims(config)


def layer_macs(dims: EncoderDims, seq_len: int, convention: Convention) -> int:
    """MACs of one transformer layer on one sequence.

    ``4 n H^2`` (query, key, value, output projections) ``+ 2 n H I`` (feed-forward), plus
    ``2 n^2 H`` (scores and weighted sum, summed over heads) in the ``"exact"`` convention.

    Args:
        dims: the encoder's sizes.
        seq_len: ``n``, tokens (the padded length for ``"paper"``).
        convention: ``"paper"`` or ``"exact"``.

    Returns:
        MACs.

    Example:
        >>> from transformers import BertConfig
        >>> layer_macs(encoder_dims(BertConfig()), 128, "paper")  # paper: 1811.8M FLOPs
        905969664
    """
    _check(seq_len, convention)
    hidden, intermediate = dims.hidden_size, dims.intermediate_size
    linear = 4 * seq_len * hidden * hidden + 2 * seq_len * hidden * intermediate
    if convention == "paper":
        return linear
    return linear + 2 * seq_len * seq_len * hidden


def step_macs(dims: EncoderDims, seq_len: int, convention: Convention) -> int:
    """MACs of one layer step on ``seq_len`` tokens in ``convention``: ``dims.layers_per_step``
    layers (more than one only for ALBERT)."""
    return dims.layers_per_step * layer_macs(dims, seq_len, convention)


def embedding_macs(dims: EncoderDims, seq_len: int, convention: Convention) -> int:
    """MACs of the embedding projection ``E -> H`` on ``seq_len`` tokens (``n E H``), or 0 when there
    is none; the same in both conventions. Embedding lookups and LayerNorm are not
    multiply-accumulates and count 0."""
    _check(seq_len, convention)
    if dims.embedding_size is None:
        return 0
    return seq_len * dims.embedding_size * dims.hidden_size


def pooler_macs(dims: EncoderDims, convention: Convention) -> int:
    """MACs of the base model's pooler: ``H^2`` (it reads ``[CLS]`` only), or 0 without one; the
    same in both conventions."""
    _check(1, convention)
    return dims.hidden_size * dims.hidden_size if dims.has_pooler else 0


def _narrow_attention_macs(
    hidden_size: int, inner_size: int, seq_len: int, convention: Convention, token_states: bool, num_heads: int,
    post_size: int, fused: bool = False,
) -> int:
    """MACs of :class:`~adaptive_depth.narrow_attention.NarrowAttentionPool` and the ``d -> post_size``
    linear layer after it (a gate's score, a head's ``prelim``).

    ``"paper"``: ``n H d + 3 n d^2`` (narrow, then query/key/value for every token). ``"exact"``:
    ``n H d + 3 d^2 + 2 heads n d`` at inference (narrow; the ``[CLS]`` query, the key folded into
    it and the value of each head's pooled vector; scores and pooling per head), or with token
    states ``n H d + 3 n d^2 + 2 n^2 d`` (every position's query, key and value); then ``d post``.
    Fused (:mod:`adaptive_depth.fused_pool`): ``n H d + heads d^2 + 2 heads n d + heads d post``.
    """
    narrow = seq_len * hidden_size * inner_size
    post = inner_size * post_size
    if convention == "paper":
        return narrow + 3 * seq_len * inner_size * inner_size + post
    if token_states:
        return narrow + 3 * seq_len * inner_size * inner_size + 2 * seq_len * seq_len * inner_size + post
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}.")
    if fused:
        return narrow + num_heads * inner_size * inner_size + 2 * num_heads * seq_len * inner_size + num_heads * post
    return narrow + 3 * inner_size * inner_size + 2 * num_heads * seq_len * inner_size + post


def gate_macs(
    hidden_size: int,
    seq_len: int,
    convention: Convention,
    inner_size: int = 128,
    pooling: Literal["attention", "cls", "mean"] = "attention",
    num_heads: int = 2,
    fused: bool = False,
) -> int:
    """MACs of one :class:`~adaptive_depth.gates.SkipGate` on one sequence.

    - ``"attention"``: the narrow self-attention (see the module docstring) plus the score
      ``d * 1``. Paper convention: ``n H d + 3 n d^2 + d``; exact (key folded into the
      query, value after the pooling): ``n H d + 3 d^2 + 2 heads n d + d``.
    - ``"cls"`` and ``"mean"``: ``H d + d`` in both conventions (one narrowed vector; the
      mean's additions are not multiply-accumulates).

    For BERT-base at length 128 the attention gate is 18,874,496 MACs = 37.75M FLOPs in the
    paper convention: 0.9% above the 37.4M of paper Table 2. That figure is what the official
    gate's layers (Linear 768->128, three 128->128 projections over 128 tokens, Linear 128->1)
    amount to; the paper's small-module numbers are not exactly reproducible, and this count
    is deliberately not adjusted to match.

    Args:
        hidden_size: ``H``.
        seq_len: ``n``, tokens (the padded length for ``"paper"``).
        convention: ``"paper"`` or ``"exact"``.
        inner_size: ``d``.
        pooling: the gate's pooling.
        num_heads: attention heads of ``"attention"`` pooling (only the ``"exact"`` count
            depends on it).
        fused: the gate runs fused (:mod:`adaptive_depth.fused_pool`); only changes the ``"exact"``
            count of ``"attention"`` pooling.

    Returns:
        MACs.

    Example:
        >>> macs_to_flops(gate_macs(768, 128, "paper"))  # paper Table 2 prints 37.4M
        37748992
        >>> gate_macs(384, 24, "exact")  # MiniLM's width, 24 tokens (unfolded: 1,988,736)
        1241216
    """
    _check(seq_len, convention)
    if pooling == "attention":
        return _narrow_attention_macs(hidden_size, inner_size, seq_len, convention, False, num_heads, 1, fused)
    if pooling in ("cls", "mean"):
        return hidden_size * inner_size + inner_size
    raise ValueError(f"pooling must be 'attention', 'cls' or 'mean', got {pooling!r}.")


def head_macs(
    hidden_size: int,
    num_labels: int,
    seq_len: int,
    convention: Convention,
    inner_size: int = 128,
    token_states: bool = False,
    num_heads: int = 4,
    fused: bool = False,
) -> int:
    """MACs of one :class:`~adaptive_depth.exits.ExitHead` on one sequence.

    Narrow self-attention (see the module docstring) ``+ d^2`` (prelim) ``+ d C``
    (classifier). BERT-base, 2 labels, length 128, paper convention: 18,891,008 MACs =
    37.78M FLOPs, 0.48% above the 37.6M of paper Table 2.

    Args:
        hidden_size: ``H``.
        num_labels: ``C``.
        seq_len: ``n``, tokens (the padded length for ``"paper"``).
        convention: ``"paper"`` or ``"exact"``.
        inner_size: ``d``.
        token_states: the head also computes every token's attention output
            (``return_token_states=True``); only changes the ``"exact"`` count.
        num_heads: attention heads (only the inference ``"exact"`` count depends on it).
        fused: the head runs fused (:mod:`adaptive_depth.fused_pool`); only changes the inference
            ``"exact"`` count.

    Returns:
        MACs.

    Example:
        >>> head_macs(384, 2, 24, "exact")  # MiniLM's width, 24 tokens (unfolded: 2,005,248)
        1270016
    """
    _check(seq_len, convention)
    pool = _narrow_attention_macs(hidden_size, inner_size, seq_len, convention, token_states, num_heads, inner_size,
                                  fused and not token_states)
    return pool + inner_size * num_labels


def pooler_head_macs(hidden_size: int, num_labels: int) -> int:
    """MACs of one :class:`~adaptive_depth.exits.PoolerExitHead`: ``H^2 + H C`` on ``[CLS]``.

    The same in both conventions (it reads one position, whatever the length).
    """
    return hidden_size * hidden_size + hidden_size * num_labels


def full_model_macs(config: Any, seq_len: int, convention: Convention, num_labels: int = 2) -> int:
    """MACs of the plain Hugging Face sequence classifier of ``config``'s family.

    Embedding projection ``+ L`` steps ``+ H^2 + H C``. The ``H^2`` term is the pooler
    (BERT, ALBERT), the classification head's dense layer (RoBERTa, ELECTRA, whose
    ``*ForSequenceClassification`` have no pooler) or ``pre_classifier`` (DistilBERT); all
    read ``[CLS]`` only. ``H C`` is the final classifier.

    Args:
        config: a ``transformers.PretrainedConfig`` of a supported family.
        seq_len: ``n``, tokens (the padded length for ``"paper"``).
        convention: ``"paper"`` or ``"exact"``.
        num_labels: ``C``.

    Returns:
        MACs.

    Example:
        >>> from transformers import BertConfig
        >>> macs_to_flops(full_model_macs(BertConfig(), 128, "paper"))  # paper: 21744M
        21744454656
    """
    dims = encoder_dims(config)
    hidden = dims.hidden_size
    return (
        embedding_macs(dims, seq_len, convention)
        + dims.num_layers * step_macs(dims, seq_len, convention)
        + hidden * hidden
        + hidden * num_labels
    )


@dataclass
class EncoderCost:
    """Per-component MACs of one sequence through an :class:`~adaptive_depth.AdaptiveEncoder`.

    Attributes:
        embedding: MACs of the embedding projection (0 when there is none); always paid.
        layers: ``L`` entries, MACs of layer step ``i``.
        gates: ``L`` entries, MACs of skip gate ``i``.
        heads: ``L`` entries, MACs of exit head ``i``.
        convention: the convention the counts follow.
        seq_len: the sequence length they were counted at.
    """

    embedding: int
    layers: list[int]
    gates: list[int]
    heads: list[int]
    convention: Convention
    seq_len: int

    @property
    def num_steps(self) -> int:
        """``L``."""
        return len(self.layers)

    def sample_macs(
        self, layers_run: Sequence[bool], gates_run: Sequence[bool], heads_run: Sequence[bool]
    ) -> int:
        """MACs one sample spent: the embedding plus every component that ran (``layers_run``,
        ``gates_run``, ``heads_run``: ``L`` flags each, True where step ``i``'s component ran).

        Raises:
            ValueError: if a sequence does not have ``L`` entries.
        """
        total = self.embedding
        for name, flags, costs in (("layers_run", layers_run, self.layers), ("gates_run", gates_run, self.gates),
                                   ("heads_run", heads_run, self.heads)):
            if len(flags) != len(costs):
                raise ValueError(f"{name} must have {len(costs)} entries (one per step), got {len(flags)}.")
            total += sum(cost for cost, ran in zip(costs, flags) if ran)
        return total

    def full_depth_macs(self) -> int:
        """MACs of the model at full depth: the embedding, every layer and the last head, no gate
        (what every relative cost divides by)."""
        steps = self.num_steps
        return self.sample_macs([True] * steps, [False] * steps, [False] * (steps - 1) + [True])


def encoder_cost(encoder: AdaptiveEncoder, seq_len: int, convention: Convention,
                 fused: bool | None = None) -> EncoderCost:
    """Per-component MACs of a wrapped model, read from its config, gates and heads.

    The base model's pooler is not counted: the encoder classifies with its exit heads.
    Heads are counted without token states (the inference path).

    Args:
        encoder: the :class:`~adaptive_depth.AdaptiveEncoder`.
        seq_len: ``n``, tokens (the padded length for ``"paper"``).
        convention: ``"paper"`` or ``"exact"``.
        fused: count the attention gates and heads fused (:mod:`adaptive_depth.fused_pool`); ``None``:
            as the encoder runs them now (``encoder.fused_for_inference``).

    Returns:
        :class:`EncoderCost`.
    """
    _check(seq_len, convention)
    dims = encoder_dims(encoder.config)
    fused = encoder.fused_for_inference if fused is None else fused
    gates = []
    for gate in encoder.gates:
        if gate.pooling == "attention":
            hidden_size, inner_size, num_heads = gate.pool.hidden_size, gate.pool.inner_size, gate.pool.num_heads
        else:
            hidden_size, inner_size, num_heads = gate.narrow.in_features, gate.narrow.out_features, 1
        gates.append(gate_macs(hidden_size, seq_len, convention, inner_size, gate.pooling, num_heads, fused))
    if not encoder.has_gates:
        gates = [0] * encoder.num_steps
    heads = [
        pooler_head_macs(head.pooler.in_features, head.num_labels) if isinstance(head, PoolerExitHead)
        else head.linear_macs() if isinstance(head, ClassifierExitHead)  # a fine-tuned model's own classifier
        else head_macs(head.pool.hidden_size, head.num_labels, seq_len, convention, head.pool.inner_size,
                       num_heads=head.pool.num_heads, fused=fused)
        for head in encoder.exit_heads
    ]
    return EncoderCost(
        embedding=embedding_macs(dims, seq_len, convention),
        layers=[step_macs(dims, seq_len, convention)] * encoder.num_steps,
        gates=gates,
        heads=heads,
        convention=convention,
        seq_len=seq_len,
    )
