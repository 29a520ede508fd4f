"""The per-sample skip and exit loop (paper eq. 9-10) that every engine runs.

One step of the loop on a group of rows is :func:`run_step`: the gates decide which rows run the
layer, the heads of the rows whose layer ran decide which rows leave. :func:`skip_exit_loop` runs
the steps over one batch, dropping the rows that left (``index_select``); a batch of one row takes
a path with Python booleans instead of index tensors, which is where a batch-1 loop spends its
bookkeeping time. The streaming engine (:mod:`adaptive_depth.streaming`) runs the same
:func:`run_step` on groups of rows gathered across input batches. The step functions come from a
:class:`StepRows`: the encoder's own modules (:mod:`adaptive_depth.engine`) or exported graphs
(:mod:`adaptive_depth.export_runtime`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from adaptive_depth.exits import ExitCriterion
from adaptive_depth.gates import skip_decision

__all__ = ["EngineMode", "LoopTrace", "StepResult", "StepRows", "loop_plan", "run_step", "skip_exit_loop"]

EngineMode = Literal["adaptive", "skip_only", "exit_only", "full"]


class StepRows(Protocol):
    """What the skip/exit loop calls for the rows it carries (the engine's modules, or exported graphs).

    ``select`` narrows the context to some of its rows (``[R']`` indices), ``trim`` to the first
    ``length`` positions (when the rows left hold no token past them); the three step functions take
    the hidden states ``[R, N, H]`` of exactly those rows and positions.
    """

    def select(self, rows: Tensor) -> StepRows: ...

    def trim(self, length: int) -> StepRows: ...

    def gate(self, step: int, hidden: Tensor) -> Tensor: ...  # p_skip [R]

    def layer(self, step: int, hidden: Tensor) -> Tensor: ...  # [R, N, H]

    def head(self, step: int, hidden: Tensor) -> Tensor: ...  # logits [R, C]


@dataclass
class LoopTrace:
    """What :func:`skip_exit_loop` decided: ``logits`` ``[B, C]``, ``exit_layer`` ``[B]`` (1-based) and
    ``[B, L]`` bool records ``layers_run``, ``gates_run``, ``heads_run``; for one row, ``flags`` holds
    the same three records as Python lists (so the output needs no host read of them)."""

    logits: Tensor
    exit_layer: Tensor
    layers_run: Tensor
    gates_run: Tensor
    heads_run: Tensor
    flags: tuple[list[bool], list[bool], list[bool]] | None = None


def loop_plan(mode: EngineMode, gate_threshold: float) -> tuple[bool, bool]:
    """``(use_gates, use_exits)`` of a mode. Threshold 1 never skips (see
    :func:`~adaptive_depth.gates.skip_decision`): running the gates would only cost their MACs."""
    return mode in ("adaptive", "skip_only") and gate_threshold < 1.0, mode in ("adaptive", "exit_only")


@dataclass
class StepResult:
    """What one step did to a group of ``R`` rows; indices are positions in the group.

    Attributes:
        hidden: ``[R, N, H]`` the rows' states after the step (unchanged where the layer was skipped).
        ran: rows whose layer ran (``None``: all of them; may be empty).
        heads_ran: whether any head ran.
        answered: rows whose head ran (``None``: all of them; meaningful only when ``heads_ran``).
        leaving: rows that leave now, among the answered ones (``None``: all of them, the last step).
        leaving_logits: ``[len(leaving), C]`` their logits (``None`` when nobody leaves).
        state: ``[R, k]`` the criterion's per-row state after the step (``None`` without exits).
    """

    hidden: Tensor
    ran: Tensor | None
    heads_ran: bool
    answered: Tensor | None
    leaving: Tensor | None
    leaving_logits: Tensor | None
    state: Tensor | None


def _check_finite(logits: Tensor, step: int) -> list[float] | None:
    """Refuse NaN/inf logits: a NaN entropy is never below the threshold, so such rows would never exit.

    Returns:
        the logits read on the host (flattened) when there are at most 8 of them, else ``None``.
    """
    values = logits.reshape(-1).tolist() if logits.numel() <= 8 else None
    finite = all(map(math.isfinite, values)) if values is not None else bool(torch.isfinite(logits).all())
    if not finite:
        bad = int((~torch.isfinite(logits)).any(dim=-1).sum())
        raise FloatingPointError(
            f"exit head {step + 1} gave NaN or infinite logits for {bad} of {len(logits)} rows; the "
            "model's weights (or inputs_embeds) hold NaN/inf, e.g. from a diverged training run."
        )
    return values


def run_step(rows: StepRows, step: int, hidden: Tensor, state: Tensor | None, *, last_step: bool, use_gates: bool,
             use_exits: bool, criterion: ExitCriterion, gate_threshold: float) -> StepResult:
    """Step ``step`` for a group of rows: gates, the layer for the rows that run it, heads, exit decisions.

    The last step's head answers for every row (its layer may have been skipped: it then reads
    ``X^L = X^{L-1}``); before it, heads run only for rows whose layer ran, and only when exits are on.

    Raises:
        FloatingPointError: an exit head gave NaN or infinite logits.
    """
    running, all_run = None, True
    if use_gates:
        running = (~skip_decision(rows.gate(step, hidden), gate_threshold)).nonzero().flatten()
        all_run = len(running) == hidden.shape[0]
    running_rows = ran_hidden = None
    if all_run:
        hidden, ran = rows.layer(step, hidden), None
    else:
        ran = running
        if len(running) > 0:
            running_rows = rows.select(running)
            ran_hidden = running_rows.layer(step, hidden.index_select(0, running))  # [len(running), N, H]
            hidden = hidden.index_copy(0, running, ran_hidden)
    if last_step or (use_exits and all_run):
        answered, head_logits = None, rows.head(step, hidden)
    elif use_exits and running_rows is not None:
        answered, head_logits = running, running_rows.head(step, ran_hidden)
    else:
        return StepResult(hidden, ran, False, None, None, None, state)
    _check_finite(head_logits, step)
    if last_step:
        return StepResult(hidden, ran, True, answered, None, head_logits, state)
    answering_state = state if answered is None else state.index_select(0, answered)
    decision = criterion.decide(head_logits, answering_state)
    state = decision.state if answered is None else state.index_copy(0, answered, decision.state)
    exiting = decision.should_exit.nonzero().flatten()
    if len(exiting) == 0:
        return StepResult(hidden, ran, True, answered, exiting, None, state)
    leaving = exiting if answered is None else answered.index_select(0, exiting)
    return StepResult(hidden, ran, True, answered, leaving, head_logits.index_select(0, exiting), state)


def skip_exit_loop(rows: StepRows, hidden: Tensor, *, num_steps: int, num_labels: int, mode: EngineMode,
                   criterion: ExitCriterion, gate_threshold: float, lengths: list[int] | None = None) -> LoopTrace:
    """The per-sample skip and exit loop (paper eq. 9-10) on a batch, keeping only the active rows.

    At every step (:func:`run_step`) the gates of the active rows decide who runs the layer
    (``index_select`` / ``index_copy``), the heads of the rows whose layer ran decide who leaves, and
    rows that left are dropped from every carried tensor. The last head answers for every row still there.
    With ``lengths``, the padding the rows left no longer need is cut too: once the longest rows have
    left, the others run at the longest real length among them (the padding positions are masked, so
    only float rounding changes), and every FLOP the exits save is a FLOP not spent on padding.

    Args:
        rows: the step functions for the batch (:class:`StepRows`).
        hidden: ``[B, N, H]`` input of the first layer.
        num_steps, num_labels: ``L`` and ``C``.
        mode, criterion, gate_threshold: as in :class:`~adaptive_depth.engine.AdaptiveInferenceEngine`.
            At ``gate_threshold >= 1`` no gate could skip, so none runs (``gates_run`` stays false).
        lengths: the ``B`` real (unpadded) lengths of a right-padded batch, to cut its padding as rows
            leave (``None``: keep the batch's length throughout).

    Raises:
        FloatingPointError: an exit head gave NaN or infinite logits (such rows would never exit).
    """
    use_gates, use_exits = loop_plan(mode, gate_threshold)
    if hidden.shape[0] == 1:
        return _one_row_loop(rows, hidden, num_steps, use_gates, use_exits, criterion, gate_threshold)
    device, batch_size = hidden.device, hidden.shape[0]
    # Per-step records as [L, B] rows, filled with index_fill_ (tensor-indexed __setitem__ is slower).
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
        result = run_step(rows, step, hidden, state, last_step=last_step, use_gates=use_gates, use_exits=use_exits,
                          criterion=criterion, gate_threshold=gate_threshold)
        hidden, state = result.hidden, result.state
        if use_gates:
            gates_run[step].index_fill_(0, active, True)
        if result.ran is None or len(result.ran) > 0:
            layers_run[step].index_fill_(0, active if result.ran is None else active.index_select(0, result.ran), True)
        if result.heads_ran:
            answering = active if result.answered is None else active.index_select(0, result.answered)
            heads_run[step].index_fill_(0, answering, True)
        if result.leaving_logits is None:
            continue
        leaving = active if result.leaving is None else active.index_select(0, result.leaving)
        logits.index_copy_(0, leaving, result.leaving_logits.to(logits.dtype))
        exit_layer.index_fill_(0, leaving, step + 1)
        if result.leaving is None:
            break
        staying = torch.ones(len(active), dtype=torch.bool, device=device).index_fill_(0, result.leaving, False)
        keep = staying.nonzero().flatten()
        if len(keep) == 0:
            break
        active, rows, state = active.index_select(0, keep), rows.select(keep), state.index_select(0, keep)
        if lengths is not None:
            lengths = [lengths[row] for row in keep.tolist()]
            if max(lengths) < hidden.shape[1]:  # the rows left end earlier: cut their padding
                hidden, rows = hidden[:, :max(lengths)], rows.trim(max(lengths))
        hidden = hidden.index_select(0, keep)
    return LoopTrace(logits=logits, exit_layer=exit_layer, layers_run=layers_run.T, gates_run=gates_run.T,
                     heads_run=heads_run.T)


def _one_row_loop(rows: StepRows, hidden: Tensor, num_steps: int, use_gates: bool, use_exits: bool,
                  criterion: ExitCriterion, gate_threshold: float) -> LoopTrace:
    """:func:`skip_exit_loop` for one row: the same decisions, recorded in Python lists (no index
    tensors, no ``nonzero``); the exit decision comes from the criterion's ``decide_row`` on the logits
    read on the host when it offers one and can decide (see :class:`~adaptive_depth.exits.ExitCriterion`).
    Each operator saved counts: right after a layer the first call of an operator costs several times
    its hot cost (docs/benchmarks.md, "Where the batch-1 time goes")."""
    layers, gates, heads = [False] * num_steps, [False] * num_steps, [False] * num_steps
    state = criterion.initial_state(1, hidden.device) if use_exits else None
    decide_row = getattr(criterion, "decide_row", None)  # a host-side decision saves its tensor operators
    logits = hidden.new_empty(0)
    for step in range(num_steps):
        last_step = step == num_steps - 1
        runs = True
        if use_gates:
            gates[step] = True
            runs = not bool(skip_decision(rows.gate(step, hidden), gate_threshold))
        if runs:
            hidden, layers[step] = rows.layer(step, hidden), True
        if not (last_step or (use_exits and runs)):
            continue
        logits, heads[step] = rows.head(step, hidden), True
        values = _check_finite(logits, step)
        if last_step:
            break
        exits = decide_row(values) if decide_row is not None and values is not None else None
        if exits is None:
            decision = criterion.decide(logits, state)
            state, exits = decision.state, bool(decision.should_exit)
        if exits:
            break
    device = hidden.device
    layers_run, gates_run, heads_run = torch.tensor([[layers], [gates], [heads]], device=device).unbind(0)
    return LoopTrace(logits=logits.to(hidden.dtype), exit_layer=torch.tensor([step + 1], device=device),
                     layers_run=layers_run, gates_run=gates_run, heads_run=heads_run, flags=(layers, gates, heads))
