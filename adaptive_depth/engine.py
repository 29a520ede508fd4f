"""Batched adaptive inference: per-sample layer skipping and early exit (paper eq. 9-10).

The paper's algorithm (its Appendix A) runs one sample at a time. :class:`AdaptiveInferenceEngine`
runs it on a whole batch by keeping only the rows still active: at every step

1. each active row's gate scores the hidden states entering the layer;
2. only the rows whose gate says "run" (``p_skip < gate_threshold``) go through the layer,
   selected with ``index_select`` and written back with ``index_copy``; at threshold 1, which
   never skips, the gates are not run at all (nor counted: the run is then ``exit_only``'s);
3. exit heads run only for rows whose layer ran; the criterion decides who leaves;
4. rows that left are dropped from every tensor the loop carries; in a padded batch, once the
   longest rows have left, the others run at the longest real length among them (the padding
   only the rows that left needed is cut, so it costs neither time nor memory).

The last step's head always answers for the rows still there (its layer may have been
skipped: then it reads ``X^L = X^{L-1}``). Each row's work is the same as if it were alone,
so batch size 1 is exactly the paper's algorithm. The per-sample trace records what ran and
what it cost in both FLOPs conventions of :mod:`adaptive_depth.flops`. The loop itself is in
:mod:`adaptive_depth.loop`; :meth:`AdaptiveInferenceEngine.stream` runs it over a corpus with
one queue of rows per layer, so that every layer runs on full groups (:mod:`adaptive_depth.streaming`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adaptive_depth.backbones import LayerRunner
from adaptive_depth.config import check_gate_threshold
from adaptive_depth.encoder import AdaptiveEncoder
from adaptive_depth.exits import EntropyExit, ExitCriterion, predictions_from_logits
from adaptive_depth.flops import Convention, EncoderCost, encoder_cost
from adaptive_depth.head_trace import HeadTrace, record_heads
from adaptive_depth.loop import EngineMode, LoopTrace, StepRows, skip_exit_loop
from adaptive_depth.streaming import stream_batches

__all__ = ["AdaptiveInferenceEngine", "EngineMode", "EngineOutput", "ExitTrace", "HeadTrace", "LoopTrace", "StepRows",
           "skip_exit_loop"]

@dataclass
class ExitTrace:
    """What the skip/exit loop decided for a batch of ``B`` rows over ``L`` steps.

    Attributes:
        logits: ``[B, C]`` logits of the head each row exited at.
        predictions: ``[B]`` argmax class (classification) or the score (regression).
        exit_layer: ``[B]`` 1-based step whose head answered.
        layers_run: ``[B, L]`` bool, layer ``i`` ran for the row.
        layers_skipped: ``[B, L]`` bool, the row's gate skipped layer ``i``.
        heads_run: ``[B, L]`` bool, exit head ``i`` ran for the row.
        gates_run: ``[B, L]`` bool, gate ``i`` ran for the row.
    """

    logits: Tensor
    predictions: Tensor
    exit_layer: Tensor
    layers_run: Tensor
    layers_skipped: Tensor
    heads_run: Tensor
    gates_run: Tensor


@dataclass
class EngineOutput(ExitTrace):
    """What the engine returns: the :class:`ExitTrace` fields and what the rows cost.

    Attributes:
        num_tokens: ``[B]`` real (unpadded) length of each row.
        macs_exact: ``[B]`` int64 MACs of what ran, every matmul at the row's real length.
        macs_paper: ``[B]`` int64 MACs of what ran, Linear layers only at ``padded_length``
            (the paper reports FLOPs = 2 x this).
        full_macs_exact, full_macs_paper: ``[B]`` the same rows at full depth (every layer and
            the last head, no gate), the denominator of relative cost.
    """

    num_tokens: Tensor
    macs_exact: Tensor
    macs_paper: Tensor
    full_macs_exact: Tensor
    full_macs_paper: Tensor


def _check_attention(encoder: AdaptiveEncoder) -> None:
    """Refuse a backbone whose attention mask cannot follow the batch as rows leave it: the engine
    narrows the mask to the rows still running, and flex attention's ``BlockMask`` would have to be
    rebuilt for them (which also recompiles its kernel for every new number of rows)."""
    implementation = getattr(encoder.config, "_attn_implementation", None)
    if implementation == "flex_attention":
        raise ValueError(
            "the inference engine does not run a backbone with attn_implementation='flex_attention' (its BlockMask "
            "cannot be narrowed to the rows that keep running); load it with attn_implementation='sdpa' or 'eager', "
            "e.g. AdaptiveEncoder.from_pretrained(folder, attn_implementation='sdpa')."
        )


class _EngineRows:
    """:class:`StepRows` over an encoder's own modules; the layer runner is narrowed (to the selected
    rows, and to ``length`` positions once trimmed) only when a layer runs on them (heads need only
    the token mask)."""

    def __init__(self, encoder: AdaptiveEncoder, runner: LayerRunner, mask: Tensor | None,
                 pending: Tensor | None = None, length: int | None = None) -> None:
        self.encoder, self.runner, self.mask, self.pending, self.length = encoder, runner, mask, pending, length

    def select(self, rows: Tensor) -> _EngineRows:
        mask = self.mask.index_select(0, rows) if self.mask is not None else None
        pending = rows if self.pending is None else self.pending.index_select(0, rows)
        return _EngineRows(self.encoder, self.runner, mask, pending, self.length)

    def trim(self, length: int) -> _EngineRows:
        mask = self.mask[:, :length] if self.mask is not None else None
        if mask is not None and bool(mask.all()):
            mask = None  # no padding left: gates, heads and layers run unmasked, as for such a batch
        return _EngineRows(self.encoder, self.runner, mask, self.pending, length)

    def gate(self, step: int, hidden: Tensor) -> Tensor:
        return self.encoder.gates[step](hidden, self.mask).p_skip

    def layer(self, step: int, hidden: Tensor) -> Tensor:
        if self.pending is not None or self.length is not None:  # narrow once, then keep the narrowed runner
            runner = self.runner if self.pending is None else self.runner.select_rows(self.pending)
            self.runner = runner if self.length is None else runner.trim(self.length, padded=self.mask is not None)
            self.pending = self.length = None
        return self.runner.run_layer(step, hidden)

    def head(self, step: int, hidden: Tensor) -> Tensor:
        return self.encoder.exit_heads[step](hidden, self.mask).logits


class AdaptiveInferenceEngine:
    """Runs an :class:`AdaptiveEncoder` with real skipping and exiting, on any batch size.

    Args:
        encoder: the wrapped model (put it in eval mode and on its device first).
        criterion: the exit criterion for ``mode="adaptive"``; entropy ``S = 0.3`` by default.
        gate_threshold: a layer is skipped when ``p_skip >= gate_threshold``; ``None`` (default):
            the encoder's own, ``encoder.adaptive_config.gate_threshold`` (0.5, the paper's, unless
            calibrated or set otherwise). 1.0 never skips, so the gates are then not run or counted (``"adaptive"`` becomes
            ``"exit_only"``, ``"skip_only"`` becomes ``"full"``); 0.0 skips every layer (see
            :func:`adaptive_depth.gates.skip_decision`).
        mode: ``"adaptive"`` (skip and exit), ``"skip_only"`` (skip, answer at the last step),
            ``"exit_only"`` (every layer runs, heads exit: DeeBERT, FastBERT, PABEE) or ``"full"``
            (the baseline: every layer, the last head, no gate).
        padded_length: the length the "paper" FLOPs convention counts at (128 in the paper);
            ``None`` uses each batch's padded length.

    Speed: on a CPU it turns most of the FLOPs saving into time (docs/benchmarks.md). On a GPU the
    loop is host-bound: every step dispatches its gate, layer, head and row-selection operators and
    reads its decisions on the host, so it pays off with large fp32 batches of a base-size model and
    can be slower than the plain model in bf16 or at small batches (measured on an H200,
    docs/benchmarks.md "GPU").

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
        ...                             num_attention_heads=4, intermediate_size=37))
        >>> engine = AdaptiveInferenceEngine(AdaptiveEncoder(bert, num_labels=2).eval(), EntropyExit(0.5))
        >>> out = engine(torch.randint(0, 99, (4, 6)))
        >>> tuple(out.logits.shape), tuple(out.layers_run.shape)
        ((4, 2), (4, 2))
    """

    def __init__(
        self,
        encoder: AdaptiveEncoder,
        criterion: ExitCriterion | None = None,
        gate_threshold: float | None = None,
        mode: EngineMode = "adaptive",
        padded_length: int | None = None,
    ) -> None:
        if not isinstance(encoder, AdaptiveEncoder):
            raise TypeError(
                f"the engine runs an AdaptiveEncoder, got {type(encoder).__name__}; wrap the model "
                "first: AdaptiveEncoder(model, num_labels=...)."
            )
        if mode not in ("adaptive", "skip_only", "exit_only", "full"):
            raise ValueError(f"mode must be 'adaptive', 'skip_only', 'exit_only' or 'full', got {mode!r}.")
        if mode in ("adaptive", "skip_only") and not encoder.has_gates:
            raise ValueError(f"mode {mode!r} needs skip gates, but the encoder was built with_gates=False.")
        if padded_length is not None and padded_length < 1:
            raise ValueError(f"padded_length must be >= 1, got {padded_length}.")
        _check_attention(encoder)
        self.encoder = encoder
        self.criterion: ExitCriterion = criterion if criterion is not None else EntropyExit(0.3)
        self.gate_threshold = encoder.adaptive_config.gate_threshold if gate_threshold is None else gate_threshold
        self.mode: EngineMode = mode
        self.padded_length = padded_length
        self._cost_tables: dict[tuple[int, Convention, bool], Tensor] = {}
        self._costs: dict[tuple[int, Convention, bool], EncoderCost] = {}
        self._full_mask: Tensor | None = None

    @property
    def gate_threshold(self) -> float:
        """A layer is skipped when ``p_skip >= gate_threshold``; setting it checks the range."""
        return self._gate_threshold

    @gate_threshold.setter
    def gate_threshold(self, value: float) -> None:
        self._gate_threshold = check_gate_threshold(value)

    @torch.inference_mode()
    def __call__(
        self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **model_inputs: Any
    ) -> EngineOutput:
        """Classify a batch, skipping and exiting per row.

        Args:
            input_ids: ``[B, N]`` token ids.
            attention_mask: ``[B, N]``, 1 for tokens, 0 for padding.
            **model_inputs: other inputs of the HF model (``token_type_ids``...).

        Raises:
            ValueError: invalid inputs (see :meth:`AdaptiveEncoder.prepare`).
            FloatingPointError: an exit head gave NaN or infinite logits.
            ValueError: the backbone runs flex attention (load it with ``"sdpa"`` or ``"eager"``).
        """
        runner, token_mask = self._prepare(input_ids, attention_mask, model_inputs)
        # Without padding, gates and heads need no mask (a few ops less per call at batch size 1).
        mask = token_mask if not bool(token_mask.all()) else None
        lengths = token_mask.sum(dim=-1).tolist() if mask is not None else None  # padding to cut as rows leave
        trace = skip_exit_loop(self._rows(runner, mask), runner.hidden_states, num_steps=self.encoder.num_steps,
                               num_labels=self.encoder.num_labels, mode=self.mode, criterion=self.criterion,
                               gate_threshold=self.gate_threshold, lengths=lengths)
        return self._output(trace, token_mask, row_length=token_mask.shape[1] if lengths is None else lengths[0])

    def stream(self, batches: Iterable[Mapping[str, Tensor]], max_rows: int | None = None) -> Iterator[EngineOutput]:
        """Classify a corpus batch after batch, running every layer on full groups of rows.

        The rows still running wait in a queue per layer, across input batches; a layer runs when
        its queue holds ``max_rows`` rows (or the input has ended), so a hard row does not hold a
        batch back and each layer runs at full batch size even when most rows exit early. Rows of
        different lengths share a group, padded to the longest real length among them (with
        padding masked, as in any padded batch). See :mod:`adaptive_depth.streaming`.

        Args:
            batches: model inputs per batch, each a mapping like ``engine(**batch)`` takes
                (``input_ids``, ``attention_mask``, ``token_type_ids``...).
            max_rows: rows per layer run; ``None``: the first batch's row count.

        Yields:
            One :class:`EngineOutput` per input batch, in input order, equal to ``engine(**batch)``
            row by row (the same decisions, the same MACs, logits within float rounding).

        The engine's mode, criterion and gate threshold are read when ``stream`` is called; the
        batches are drawn lazily, outside inference mode, and the token masks are copied, so a
        generator may reuse its buffers. An invalid batch (or an exception from ``batches`` itself)
        ends the input there: the batches before it are finished and yielded, then the error is raised.

        Raises:
            ValueError: ``max_rows < 1``, or an invalid batch (as :meth:`__call__`).
            TypeError: ``max_rows`` not an integer, or a batch that is not a mapping of model inputs.

        Example:
            >>> from transformers import BertConfig, BertModel
            >>> bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
            ...                             num_attention_heads=4, intermediate_size=37))
            >>> engine = AdaptiveInferenceEngine(AdaptiveEncoder(bert, num_labels=2).eval(), EntropyExit(0.5))
            >>> batches = [{"input_ids": torch.randint(0, 99, (4, 6))}, {"input_ids": torch.randint(0, 99, (3, 9))}]
            >>> [tuple(out.logits.shape) for out in engine.stream(batches)]
            [(4, 2), (3, 2)]
        """
        return stream_batches(self, batches, max_rows)

    @torch.inference_mode()
    def trace_heads(
        self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **model_inputs: Any
    ) -> HeadTrace:
        """Run the batch with no row exiting and record every exit head's logits at every step it ran.

        The gates skip as in :meth:`__call__` (they do not depend on the exit threshold), and each
        head runs where it would run before any exit, so the :class:`HeadTrace` holds everything any
        exit threshold of this engine's criterion family would decide from: replay it with
        :func:`adaptive_depth.replay.replay_exits` instead of running the engine once per threshold.
        The engine's own criterion is not used.

        Args:
            input_ids, attention_mask, **model_inputs: as :meth:`__call__`.

        Raises:
            ValueError: invalid inputs (as :meth:`__call__`), or a mode without exits (``"full"``,
                ``"skip_only"``: they answer at the last step, and a plain call gives that answer).
            FloatingPointError: an exit head gave NaN or infinite logits.

        Example:
            >>> from transformers import BertConfig, BertModel
            >>> bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3,
            ...                             num_attention_heads=4, intermediate_size=37))
            >>> engine = AdaptiveInferenceEngine(AdaptiveEncoder(bert, num_labels=2).eval(), mode="exit_only")
            >>> trace = engine.trace_heads(torch.randint(0, 99, (4, 6)))
            >>> tuple(trace.head_logits.shape), bool(trace.heads_run.all())
            ((4, 3, 2), True)
        """
        runner, token_mask = self._prepare(input_ids, attention_mask, model_inputs)
        return record_heads(self, runner, token_mask)

    def _prepare(self, input_ids: Tensor | None, attention_mask: Tensor | None,
                 model_inputs: dict[str, Any]) -> tuple[LayerRunner, Tensor]:
        """Check and embed one batch: the layer runner and the ``[B, N]`` bool token mask."""
        _check_attention(self.encoder)  # the implementation may have been switched since
        runner, token_mask = self.encoder.prepare(input_ids, attention_mask, **model_inputs)
        num_tokens = token_mask.shape[1]
        if self.padded_length is not None and num_tokens > self.padded_length:
            raise ValueError(
                f"inputs have {num_tokens} positions but padded_length is {self.padded_length}; "
                "truncate the inputs or raise padded_length."
            )
        return runner, token_mask

    def _rows(self, runner: LayerRunner, mask: Tensor | None) -> StepRows:
        """The step functions over the encoder's modules for the rows of ``runner``."""
        return _EngineRows(self.encoder, runner, mask)

    def _output(self, trace: LoopTrace, token_mask: Tensor, row_length: int | None = None) -> EngineOutput:
        """The :class:`EngineOutput` of a batch: the loop's decisions and what they cost.

        ``row_length``: the first row's real length, known on the host; with a one-row trace's ``flags``
        the lengths and MACs then come from host values as one tensor (a few operators at batch size 1).
        """
        layers_run, gates_run, heads_run = trace.layers_run, trace.gates_run, trace.heads_run
        padded_length = self.padded_length or token_mask.shape[1]
        if trace.flags is not None and row_length is not None:
            counts = torch.tensor([[row_length, *self._row_macs(row_length, padded_length, trace.flags)]],
                                  device=token_mask.device)
            lengths, *macs = counts.unbind(1)
        else:
            lengths = token_mask.sum(dim=-1)
            macs = self._trace_macs(lengths, padded_length, layers_run, gates_run, heads_run).unbind(1)
        return EngineOutput(
            logits=trace.logits,
            predictions=predictions_from_logits(trace.logits),
            exit_layer=trace.exit_layer,
            layers_run=layers_run,
            layers_skipped=gates_run & ~layers_run,
            heads_run=heads_run,
            gates_run=gates_run,
            num_tokens=lengths,
            macs_exact=macs[0],
            macs_paper=macs[1],
            full_macs_exact=macs[2],
            full_macs_paper=macs[3],
        )

    def _cost(self, length: int, convention: Convention) -> EncoderCost:
        """The encoder's per-component MACs at ``length`` as it runs now (cached per length and fusion)."""
        key = (length, convention, self.encoder.fused_for_inference)
        cost = self._costs.get(key)
        if cost is None:
            cost = self._costs[key] = encoder_cost(self.encoder, length, convention, key[2])
        return cost

    def _row_macs(self, length: int, padded_length: int,
                  flags: tuple[list[bool], list[bool], list[bool]]) -> list[int]:
        """One row's MACs, summed in Python from its ``layers_run``, ``gates_run``, ``heads_run`` flags:
        what ran (exact at ``length``, paper at ``padded_length``), then full depth (exact, paper)."""
        exact, paper = self._cost(length, "exact"), self._cost(padded_length, "paper")
        return [exact.sample_macs(*flags), paper.sample_macs(*flags), exact.full_depth_macs(), paper.full_depth_macs()]

    def _cost_table(self, length: int, convention: Convention) -> Tensor:
        """``[4, L]`` int64 MACs at ``length``: rows embedding (in column 0), layer, gate, head."""
        key = (length, convention, self.encoder.fused_for_inference)
        table = self._cost_tables.get(key)
        if table is None:
            cost = self._cost(length, convention)
            embedding = [cost.embedding] + [0] * (self.encoder.num_steps - 1)
            table = self._cost_tables[key] = torch.tensor([embedding, cost.layers, cost.gates, cost.heads],
                                                          dtype=torch.long)
        return table

    def _trace_macs(
        self, lengths: Tensor, padded_length: int, layers_run: Tensor, gates_run: Tensor, heads_run: Tensor
    ) -> Tensor:
        """``[B, 4]`` MACs per row: what ran (exact, paper), full depth (exact, paper).

        "exact" is at each row's real length, "paper" at ``padded_length`` (or the batch's
        padded length). One cost table per distinct length, no loop over rows; one row is summed
        in Python (a handful of integers, no tensor ops).
        """
        lengths_cpu = lengths.cpu()
        if len(lengths_cpu) == 1:
            flags = (layers_run[0].tolist(), gates_run[0].tolist(), heads_run[0].tolist())
            row = self._row_macs(int(lengths_cpu[0]), padded_length, flags)
            return torch.tensor([row], dtype=torch.long, device=lengths.device)
        exact_tables, paper_table, ran = self._row_tables(lengths_cpu, padded_length, layers_run, gates_run, heads_run)
        full = self._full_depth_mask()
        columns = [(exact_tables * ran).sum((1, 2)), (paper_table * ran).sum((1, 2)),
                   (exact_tables * full).sum((1, 2)), (paper_table * full).sum().expand(len(lengths_cpu))]
        return torch.stack(columns, dim=1).to(lengths.device)

    def _step_macs(
        self, lengths: Tensor, padded_length: int, layers_run: Tensor, gates_run: Tensor, heads_run: Tensor
    ) -> Tensor:
        """``[B, 2, L]`` int64 MACs (exact, paper) of what ran up to and including each step: what a
        row that stops after step ``i`` costs (column ``L - 1``: :meth:`_trace_macs`' first two)."""
        exact_tables, paper_table, ran = self._row_tables(lengths.cpu(), padded_length, layers_run, gates_run,
                                                          heads_run)
        per_step = torch.stack([(exact_tables * ran).sum(1), (paper_table * ran).sum(1)], dim=1)
        return per_step.cumsum(dim=-1).to(lengths.device)

    def _row_tables(self, lengths_cpu: Tensor, padded_length: int, layers_run: Tensor, gates_run: Tensor,
                    heads_run: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, 4, L]`` exact cost tables (each row's length), the ``[4, L]`` paper table and the
        ``[B, 4, L]`` bool record of what ran, in the order of :meth:`_cost_table`'s rows."""
        distinct, index = lengths_cpu.unique(return_inverse=True)
        exact_tables = torch.stack([self._cost_table(int(n), "exact") for n in distinct])[index]  # [B, 4, L]
        paper_table = self._cost_table(padded_length, "paper")  # [4, L], one length for every row
        ran = torch.stack([torch.ones_like(layers_run), layers_run, gates_run, heads_run], dim=1).cpu()
        return exact_tables, paper_table, ran

    def _full_depth_mask(self) -> Tensor:
        """``[4, L]`` bool: what full depth runs (the embedding, every layer, the last head; no gate)."""
        if self._full_mask is None:
            full = torch.zeros(4, self.encoder.num_steps, dtype=torch.bool)
            full[:2] = True
            full[3, -1] = True
            self._full_mask = full
        return self._full_mask
