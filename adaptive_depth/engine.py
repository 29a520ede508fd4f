"""Batched adaptive inference: per-sample layer skipping and early exit (paper eq. 9-10).

The paper's algorithm (its Appendix A) runs one sample at a time. :class:`AdaptiveInferenceEngine`
runs it on a whole batch by keeping only the rows still active: at every step

1. each active row's gate scores the hidden states entering the layer;
2. only the rows whose gate says "run" (``p_skip < gate_threshold``) go through the layer,
   selected with ``index_select`` and written back with ``index_copy``; at threshold 1, which
   never skips, the gates are not run at all (nor counted: the run is then ``exit_only``'s);
3. exit heads run only for rows whose layer ran; the criterion decides who leaves;
4. rows that left are dropped from every tensor the loop carries.

The last step's head always answers for the rows still there (its layer may have been
skipped: then it reads ``X^L = X^{L-1}``). Each row's work is the same as if it were alone,
so batch size 1 is exactly the paper's algorithm. The per-sample trace records what ran and
what it cost in both FLOPs conventions of :mod:`adaptive_depth.flops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from adaptive_depth.backbones import LayerRunner
from adaptive_depth.config import check_gate_threshold
from adaptive_depth.encoder import AdaptiveEncoder
from adaptive_depth.exits import EntropyExit, ExitCriterion, predictions_from_logits
from adaptive_depth.flops import Convention, encoder_cost
from adaptive_depth.gates import skip_decision

__all__ = ["AdaptiveInferenceEngine", "EngineMode", "EngineOutput", "ExitTrace", "LoopTrace", "StepRows",
           "skip_exit_loop"]

EngineMode = Literal["adaptive", "skip_only", "exit_only", "full"]


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


class StepRows(Protocol):
    """What the skip/exit loop calls for the rows it carries (the engine's modules, or exported graphs).

    ``select`` narrows the context to some of its rows (``[R']`` indices); the three step functions
    take the hidden states ``[R, N, H]`` of exactly those rows.
    """

    def select(self, rows: Tensor) -> StepRows: ...

    def gate(self, step: int, hidden: Tensor) -> Tensor: ...  # p_skip [R]

    def layer(self, step: int, hidden: Tensor) -> Tensor: ...  # [R, N, H]

    def head(self, step: int, hidden: Tensor) -> Tensor: ...  # logits [R, C]


@dataclass
class LoopTrace:
    """What :func:`skip_exit_loop` decided: ``logits`` ``[B, C]``, ``exit_layer`` ``[B]`` (1-based) and
    ``[B, L]`` bool records ``layers_run``, ``gates_run``, ``heads_run``."""

    logits: Tensor
    exit_layer: Tensor
    layers_run: Tensor
    gates_run: Tensor
    heads_run: Tensor


def skip_exit_loop(rows: StepRows, hidden: Tensor, *, num_steps: int, num_labels: int, mode: EngineMode,
                   criterion: ExitCriterion, gate_threshold: float) -> LoopTrace:
    """The per-sample skip and exit loop (paper eq. 9-10) on a batch, keeping only the active rows.

    At every step the gates of the active rows decide who runs the layer (``index_select`` /
    ``index_copy``), the heads of the rows whose layer ran decide who leaves, and rows that left
    are dropped from every carried tensor. The last head answers for every row still there.

    Args:
        rows: the step functions for the batch (:class:`StepRows`).
        hidden: ``[B, N, H]`` input of the first layer.
        num_steps, num_labels: ``L`` and ``C``.
        mode, criterion, gate_threshold: as in :class:`AdaptiveInferenceEngine`. At
            ``gate_threshold >= 1`` no gate could skip, so none runs (``gates_run`` stays false).

    Raises:
        FloatingPointError: an exit head gave NaN or infinite logits (such rows would never exit).
    """
    device, batch_size = hidden.device, hidden.shape[0]
    # Threshold 1 never skips (skip_decision): running the gates would only cost their MACs.
    use_gates = mode in ("adaptive", "skip_only") and gate_threshold < 1.0
    use_exits = mode in ("adaptive", "exit_only")
    # Per-step records as [L, B] rows, filled with index_fill_/index_copy_: tensor-indexed
    # __setitem__ costs tens of microseconds a call, which shows at batch size 1.
    layers_run = torch.zeros(num_steps, batch_size, dtype=torch.bool, device=device)
    gates_run = torch.zeros_like(layers_run)
    heads_run = torch.zeros_like(layers_run)
    exit_layer = torch.zeros(batch_size, dtype=torch.long, device=device)
    logits = torch.zeros(batch_size, num_labels, device=device, dtype=hidden.dtype)
    # Everything below is carried for the active rows only; `active` maps them to the batch.
    active = torch.arange(batch_size, device=device)
    state = criterion.initial_state(batch_size, device) if use_exits else None
    for step in range(num_steps):
        last_step = step == num_steps - 1
        if use_gates:
            gates_run[step].index_fill_(0, active, True)
            running = (~skip_decision(rows.gate(step, hidden), gate_threshold)).nonzero().flatten()
            all_run = len(running) == len(active)
        else:
            running, all_run = active, True  # only its length and "all rows" are used below
        running_rows = None
        if all_run:
            hidden = rows.layer(step, hidden)
            layers_run[step].index_fill_(0, active, True)
        elif len(running) > 0:
            running_rows = rows.select(running)
            hidden = hidden.index_copy(0, running, running_rows.layer(step, hidden.index_select(0, running)))
            layers_run[step].index_fill_(0, active.index_select(0, running), True)

        if last_step or (use_exits and all_run):  # the last head answers for every row still here
            answering, answering_rows, head_logits = None, active, rows.head(step, hidden)
        elif use_exits and running_rows is not None:
            answering, answering_rows = running, active.index_select(0, running)
            head_logits = running_rows.head(step, hidden.index_select(0, running))
        else:
            continue
        if not bool(torch.isfinite(head_logits).all()):
            # A NaN entropy is never below the threshold: these rows would silently never exit.
            bad = int((~torch.isfinite(head_logits)).any(dim=-1).sum())
            raise FloatingPointError(
                f"exit head {step + 1} gave NaN or infinite logits for {bad} of {len(answering_rows)} rows; the "
                "model's weights (or inputs_embeds) hold NaN/inf, e.g. from a diverged training run."
            )
        heads_run[step].index_fill_(0, answering_rows, True)
        if last_step:
            leaving_rows, leaving_logits = answering_rows, head_logits
        else:
            answering_state = state if answering is None else state.index_select(0, answering)
            decision = criterion.decide(head_logits, answering_state)
            state = decision.state if answering is None else state.index_copy(0, answering, decision.state)
            exiting = decision.should_exit.nonzero().flatten()
            if len(exiting) == 0:
                continue
            leaving_rows = answering_rows.index_select(0, exiting)
            leaving_logits = head_logits.index_select(0, exiting)
        logits.index_copy_(0, leaving_rows, leaving_logits.to(logits.dtype))
        exit_layer.index_fill_(0, leaving_rows, step + 1)
        if last_step:
            break
        local = exiting if answering is None else answering.index_select(0, exiting)
        staying = torch.ones(len(active), dtype=torch.bool, device=device).index_fill_(0, local, False)
        keep = staying.nonzero().flatten()
        if len(keep) == 0:
            break
        active, hidden, rows = active.index_select(0, keep), hidden.index_select(0, keep), rows.select(keep)
        state = state.index_select(0, keep)
    return LoopTrace(logits=logits, exit_layer=exit_layer, layers_run=layers_run.T, gates_run=gates_run.T,
                     heads_run=heads_run.T)


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
    """:class:`StepRows` over an encoder's own modules; the layer runner is narrowed only when a
    layer runs on the selected rows (heads need only the token mask)."""

    def __init__(self, encoder: AdaptiveEncoder, runner: LayerRunner, mask: Tensor | None,
                 pending: Tensor | None = None) -> None:
        self.encoder, self.runner, self.mask, self.pending = encoder, runner, mask, pending

    def select(self, rows: Tensor) -> _EngineRows:
        mask = self.mask.index_select(0, rows) if self.mask is not None else None
        pending = rows if self.pending is None else self.pending.index_select(0, rows)
        return _EngineRows(self.encoder, self.runner, mask, pending)

    def gate(self, step: int, hidden: Tensor) -> Tensor:
        return self.encoder.gates[step](hidden, self.mask).p_skip

    def layer(self, step: int, hidden: Tensor) -> Tensor:
        if self.pending is not None:  # narrow once, then keep the narrowed runner
            self.runner, self.pending = self.runner.select_rows(self.pending), None
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
        self._cost_tables: dict[tuple[int, Convention], Tensor] = {}

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
        encoder = self.encoder
        _check_attention(encoder)  # the implementation may have been switched since
        runner, token_mask = encoder.prepare(input_ids, attention_mask, **model_inputs)
        batch_size, num_tokens = token_mask.shape
        if self.padded_length is not None and num_tokens > self.padded_length:
            raise ValueError(
                f"inputs have {num_tokens} positions but padded_length is {self.padded_length}; "
                "truncate the inputs or raise padded_length."
            )
        # Without padding, gates and heads need no mask (a few ops less per call at batch size 1).
        mask = token_mask if not bool(token_mask.all()) else None
        trace = skip_exit_loop(_EngineRows(encoder, runner, mask), runner.hidden_states, num_steps=encoder.num_steps,
                               num_labels=encoder.num_labels, mode=self.mode, criterion=self.criterion,
                               gate_threshold=self.gate_threshold)
        logits, exit_layer = trace.logits, trace.exit_layer
        layers_run, gates_run, heads_run = trace.layers_run, trace.gates_run, trace.heads_run

        lengths = token_mask.sum(dim=-1)
        macs = self._trace_macs(lengths, self.padded_length or num_tokens, layers_run, gates_run, heads_run)
        predictions = predictions_from_logits(logits)
        return EngineOutput(
            logits=logits,
            predictions=predictions,
            exit_layer=exit_layer,
            layers_run=layers_run,
            layers_skipped=gates_run & ~layers_run,
            heads_run=heads_run,
            gates_run=gates_run,
            num_tokens=lengths,
            macs_exact=macs[:, 0],
            macs_paper=macs[:, 1],
            full_macs_exact=macs[:, 2],
            full_macs_paper=macs[:, 3],
        )

    def _cost_table(self, length: int, convention: Convention) -> Tensor:
        """``[4, L]`` int64 MACs at ``length``: rows embedding (in column 0), layer, gate, head."""
        key = (length, convention)
        if key not in self._cost_tables:
            cost = encoder_cost(self.encoder, length, convention)
            embedding = [cost.embedding] + [0] * (self.encoder.num_steps - 1)
            self._cost_tables[key] = torch.tensor([embedding, cost.layers, cost.gates, cost.heads], dtype=torch.long)
        return self._cost_tables[key]

    def _trace_macs(
        self, lengths: Tensor, padded_length: int, layers_run: Tensor, gates_run: Tensor, heads_run: Tensor
    ) -> Tensor:
        """``[B, 4]`` MACs per row: what ran (exact, paper), full depth (exact, paper).

        "exact" is at each row's real length, "paper" at ``padded_length`` (or the batch's
        padded length). One cost table per distinct length, no loop over rows.
        """
        lengths_cpu = lengths.cpu()
        distinct, index = lengths_cpu.unique(return_inverse=True)
        exact = torch.stack([self._cost_table(int(n), "exact") for n in distinct])[index]  # [B, 4, L]
        paper = self._cost_table(padded_length, "paper")  # [4, L], one length for every row
        ran = torch.stack([torch.ones_like(layers_run), layers_run, gates_run, heads_run], dim=1).cpu()
        full = torch.zeros_like(ran[0])
        full[:2] = True  # embedding and every layer
        full[3, -1] = True  # the last head
        columns = [(exact * ran).sum((1, 2)), (paper * ran).sum((1, 2)),
                   (exact * full).sum((1, 2)), (paper * full).sum().expand(len(lengths_cpu))]
        return torch.stack(columns, dim=1).to(lengths.device)

