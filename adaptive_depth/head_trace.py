"""One engine pass that records every exit head's logits, for replaying any exit threshold.

The skip gates do not depend on the exit threshold, and an exit criterion decides for each row
from the logits of that row's heads that ran (and its own per-row state, for patience and
tolerance). So a pass in which no row exits, but every gate, layer and head runs where it would
run before any exit, holds everything every exit threshold decides from.
:meth:`AdaptiveInferenceEngine.trace_heads <adaptive_depth.engine.AdaptiveInferenceEngine.trace_heads>`
makes that pass (:func:`record_heads`: the engine's own loop, with a criterion that never exits
and step functions that write down each head's logits); :func:`adaptive_depth.replay.replay_exits`
turns the :class:`HeadTrace` into what the engine returns at any threshold, without the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from adaptive_depth.backbones import LayerRunner
from adaptive_depth.exits import ExitDecision
from adaptive_depth.loop import StepRows, skip_exit_loop

if TYPE_CHECKING:
    from adaptive_depth.engine import AdaptiveInferenceEngine

__all__ = ["HeadTrace", "record_heads"]


@dataclass
class HeadTrace:
    """What an engine did for ``B`` rows over ``L`` steps when no row exited, head by head.

    Attributes:
        head_logits: ``[B, L, C]`` logits of exit head ``i`` for each row, in the heads' dtype;
            NaN where the head did not run (its layer was skipped; the last head always runs).
        layers_run, gates_run, heads_run: ``[B, L]`` bool, what ran for the row (no exit).
        num_tokens: ``[B]`` real (unpadded) length of each row.
        macs_exact, macs_paper: ``[B, L]`` int64 MACs of what ran up to and including step ``i``
            (embedding, layers, gates, heads): the row's MACs if it exits at head ``i + 1``.
        full_macs_exact, full_macs_paper: ``[B]`` int64 MACs of the rows at full depth.

    Rows are independent, so traces of several batches concatenate (:meth:`cat`).
    """

    head_logits: Tensor
    layers_run: Tensor
    gates_run: Tensor
    heads_run: Tensor
    num_tokens: Tensor
    macs_exact: Tensor
    macs_paper: Tensor
    full_macs_exact: Tensor
    full_macs_paper: Tensor

    def __len__(self) -> int:
        return self.head_logits.shape[0]

    @classmethod
    def cat(cls, traces: Sequence[HeadTrace]) -> HeadTrace:
        """The rows of ``traces``, in order, as one trace (all on one device, same ``L`` and ``C``).

        Raises:
            ValueError: no trace, or traces of different numbers of steps or outputs.
        """
        if not traces:
            raise ValueError("no trace to concatenate: record at least one batch.")
        shapes = {tuple(trace.head_logits.shape[1:]) for trace in traces}
        if len(shapes) > 1:
            raise ValueError(f"traces of different models cannot be joined: [L, C] shapes {sorted(shapes)}.")
        return cls(**{field.name: torch.cat([getattr(trace, field.name) for trace in traces])
                      for field in fields(cls)})


class _NeverExit:
    """The criterion of the recording pass: every row stays to the last step."""

    def initial_state(self, batch_size: int, device: torch.device) -> Tensor:
        return torch.zeros(batch_size, 0, device=device)

    def decide(self, logits: Tensor, state: Tensor) -> ExitDecision:
        stay = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        return ExitDecision(should_exit=stay, state=state, score=stay.float())


class _HeadRecord:
    """The ``[L, B, C]`` logits written so far (NaN elsewhere), allocated at the first head call in its dtype."""

    def __init__(self, num_steps: int, batch_size: int) -> None:
        self.num_steps, self.batch_size = num_steps, batch_size
        self.logits: Tensor | None = None

    def write(self, step: int, rows: Tensor, logits: Tensor) -> None:
        if self.logits is None:
            self.logits = logits.new_full((self.num_steps, self.batch_size, logits.shape[-1]), float("nan"))
        self.logits[step].index_copy_(0, rows, logits)


class _RecordingRows:
    """:class:`~adaptive_depth.loop.StepRows` that pass every call on to ``inner`` and record each
    head's logits under the batch rows (``ids``) the call was for."""

    def __init__(self, inner: StepRows, ids: Tensor, record: _HeadRecord) -> None:
        self.inner, self.ids, self.record = inner, ids, record

    def select(self, rows: Tensor) -> _RecordingRows:
        return _RecordingRows(self.inner.select(rows), self.ids.index_select(0, rows), self.record)

    def trim(self, length: int) -> _RecordingRows:
        return _RecordingRows(self.inner.trim(length), self.ids, self.record)

    def gate(self, step: int, hidden: Tensor) -> Tensor:
        return self.inner.gate(step, hidden)

    def layer(self, step: int, hidden: Tensor) -> Tensor:
        return self.inner.layer(step, hidden)

    def head(self, step: int, hidden: Tensor) -> Tensor:
        logits = self.inner.head(step, hidden)
        self.record.write(step, self.ids, logits)
        return logits


def record_heads(engine: AdaptiveInferenceEngine, runner: LayerRunner, token_mask: Tensor) -> HeadTrace:
    """The :class:`HeadTrace` of one embedded batch (``runner``, ``[B, N]`` bool ``token_mask``):
    the engine's loop in its mode and gate threshold, with no exit.

    Raises:
        ValueError: an engine whose mode has no exits (``"full"``, ``"skip_only"``).
        FloatingPointError: an exit head gave NaN or infinite logits.
    """
    if engine.mode not in ("adaptive", "exit_only"):
        raise ValueError(f"mode {engine.mode!r} has no exits, so there are no heads to record; its answer is the "
                         "last head's, which engine(**batch) gives. Record an 'adaptive' or 'exit_only' engine.")
    batch_size, num_steps = token_mask.shape[0], engine.encoder.num_steps
    mask = token_mask if not bool(token_mask.all()) else None  # as __call__: no mask without padding
    record = _HeadRecord(num_steps, batch_size)
    rows = _RecordingRows(engine._rows(runner, mask), torch.arange(batch_size, device=token_mask.device), record)
    trace = skip_exit_loop(rows, runner.hidden_states, num_steps=num_steps, num_labels=engine.encoder.num_labels,
                           mode=engine.mode, criterion=_NeverExit(), gate_threshold=engine.gate_threshold)
    assert record.logits is not None  # the last head runs for every row
    lengths = token_mask.sum(dim=-1)
    padded_length = engine.padded_length or token_mask.shape[1]
    flags = (trace.layers_run, trace.gates_run, trace.heads_run)
    macs = engine._step_macs(lengths, padded_length, *flags)
    full = engine._trace_macs(lengths, padded_length, *flags)
    return HeadTrace(head_logits=record.logits.transpose(0, 1).contiguous(), layers_run=trace.layers_run,
                     gates_run=trace.gates_run, heads_run=trace.heads_run, num_tokens=lengths,
                     macs_exact=macs[:, 0], macs_paper=macs[:, 1], full_macs_exact=full[:, 2],
                     full_macs_paper=full[:, 3])
