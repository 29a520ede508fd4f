"""Streaming over a corpus: every layer runs on full groups of rows, whatever exits early.

The batch engine runs a batch's layers on fewer and fewer rows as rows skip and exit, so on a
corpus most layer calls run far below the batch size (FastBERT issue #35: "a hard row holds the
batch back"). :func:`stream_batches` (``AdaptiveInferenceEngine.stream``) keeps the rows still
running in one queue per layer, across input batches:

- a step runs when its queue holds ``max_rows`` rows (the deepest such queue first, so rows leave
  soon), else the next input batch is embedded into the first queue; once the input has ended,
  the shallowest non-empty queue runs with what it has;
- a step is :func:`adaptive_depth.loop.run_step`, the batch engine's own step; rows that exit
  leave, the others join the next step's queue with their hidden states and criterion state;
- rows of different input batches have different padded lengths: a group is cut or padded to the
  longest real length among its rows, with padding masked (the layer mask is rebuilt from the
  token mask, as transformers builds it; :func:`adaptive_depth.export_steps.layer_attention_mask`).
  Padding is masked everywhere, so a row's result does not depend on its group (up to float rounding);
- on a CPU, a group whose rows differ much in length runs as several calls, each padded to its own
  longest row, where the padding saved is worth more than the extra calls (:func:`length_runs`);
- results are yielded in input order, one :class:`~adaptive_depth.engine.EngineOutput` per input
  batch, as soon as all its rows and all earlier batches' rows are done.

A family whose layers take per-batch tensors besides the mask (MPNet's relative position bias
``[B, heads, N, N]``, the same for every row) gets that tensor cut to the group's length.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from adaptive_depth.backbones import LayerRunner
from adaptive_depth.export_steps import layer_attention_mask
from adaptive_depth.loop import LoopTrace, loop_plan, run_step

if TYPE_CHECKING:
    from adaptive_depth.engine import AdaptiveInferenceEngine, EngineOutput

__all__ = ["CPU_RUN_COST_POSITIONS", "length_runs", "stream_batches"]


# A layer step on a CPU costs about as much per call as this many row-positions do (reading the layer's
# weights, dispatching its operators): a group is run in length runs only where that saves more padding.
# Measured on MiniLM (hidden 384) at two threads: about 2.06 ms a call and 25 us a row-position, so 82
# (2026-12-04, docs/lab/2026-12-04.md); at one thread a row-position costs more, so fewer. 64 lies between;
# the split found changes little around it, since most of what it saves is groups many times more padded.
CPU_RUN_COST_POSITIONS = 64


def length_runs(lengths: list[int], run_cost: int) -> list[list[int]]:
    """Split a group's rows into runs of similar length, each to be padded only to its own longest row.

    Minimizes ``sum over runs of (run_cost + rows in the run * longest length in the run)``: the positions a
    layer step computes, plus ``run_cost`` positions' worth for each extra call. Runs are contiguous in
    length order (an optimal split always is), found by dynamic programming over the distinct lengths.

    Args:
        lengths: the real length of each row (``R`` positive ints).
        run_cost: what one more call costs, in row-positions.

    Returns:
        lists of row indices (into ``lengths``), each sorted by length, shortest run first; or one list
        of every row in their order when splitting saves nothing.

    Example:
        >>> length_runs([3, 40, 4, 41, 3], run_cost=10)
        [[0, 4, 2], [1, 3]]
        >>> length_runs([3, 5, 4], run_cost=10)
        [[0, 1, 2]]
    """
    rows, longest = len(lengths), max(lengths, default=0)
    if rows * longest - sum(lengths) <= run_cost:  # padding worth less than one more call
        return [list(range(rows))]
    order = sorted(range(rows), key=lengths.__getitem__)
    distinct = sorted(set(lengths))
    below = [0]  # rows shorter than or as long as each distinct length
    counts: dict[int, int] = {}
    for length in lengths:
        counts[length] = counts.get(length, 0) + 1
    for length in distinct:
        below.append(below[-1] + counts[length])
    # best[j]: the cheapest split of the rows up to distinct length j - 1; cut[j]: where its last run starts
    best, cut = [0] + [0] * len(distinct), [0] * (len(distinct) + 1)
    for end in range(1, len(distinct) + 1):
        length = distinct[end - 1]
        best[end], cut[end] = min((best[start] + run_cost + (below[end] - below[start]) * length, start)
                                  for start in range(end))
    bounds, end = [], len(distinct)
    while end > 0:
        bounds.append((below[cut[end]], below[end]))
        end = cut[end]
    if len(bounds) == 1:
        return [list(range(rows))]
    return [order[first:last] for first, last in reversed(bounds)]


@dataclass
class _Chunk:
    """Rows waiting for a step: ``hidden`` ``[R, N, H]``, ``tokens`` ``[R, N]`` bool, ``lengths`` (real, a
    list of ``R`` ints), criterion ``state`` ``[R, k]``, global row ``ids`` ``[R]`` and the batched
    extra layer arguments of one row (``[1, ..., M, M]``, ``M >= N``)."""

    hidden: Tensor
    tokens: Tensor
    lengths: list[int]
    state: Tensor
    ids: Tensor
    extra: tuple[Tensor, ...]

    def __len__(self) -> int:
        return len(self.lengths)

    def split(self, count: int) -> tuple[_Chunk, _Chunk]:
        """The first ``count`` rows and the rest."""
        def part(rows: slice) -> _Chunk:
            return _Chunk(self.hidden[rows], self.tokens[rows], self.lengths[rows], self.state[rows], self.ids[rows],
                          self.extra)
        return part(slice(0, count)), part(slice(count, None))

    def fitted(self, length: int) -> tuple[Tensor, Tensor]:
        """``hidden`` and ``tokens`` cut or padded (zeros, masked) to ``length`` positions."""
        num_tokens = self.tokens.shape[1]
        if num_tokens >= length:
            return self.hidden[:, :length], self.tokens[:, :length]
        rows, missing = len(self), length - num_tokens
        hidden = torch.cat([self.hidden, self.hidden.new_zeros(rows, missing, self.hidden.shape[2])], dim=1)
        return hidden, torch.cat([self.tokens, self.tokens.new_zeros(rows, missing)], dim=1)


class _Records:
    """The trace of the rows not yet yielded, by global row id, in buffers that grow and drop what was yielded."""

    def __init__(self, num_steps: int, num_labels: int, dtype: torch.dtype, device: torch.device) -> None:
        self.base = 0  # global id of buffer row 0
        self.logits = torch.zeros(0, num_labels, dtype=dtype, device=device)
        self.exit_layer = torch.zeros(0, dtype=torch.long, device=device)
        self.flags = torch.zeros(3, 0, num_steps, dtype=torch.bool, device=device)  # layers, gates, heads

    def reserve(self, end: int, first_open: int) -> None:
        """Room for global ids below ``end``; ids below ``first_open`` (yielded) may be dropped."""
        if end - self.base <= len(self.exit_layer):
            return
        live = slice(first_open - self.base, None)
        capacity = max(2 * (end - first_open), 64)
        logits = self.logits.new_zeros(capacity, self.logits.shape[1])
        exit_layer = self.exit_layer.new_zeros(capacity)
        flags = self.flags.new_zeros(3, capacity, self.flags.shape[2])
        kept = len(self.exit_layer[live])
        logits[:kept], exit_layer[:kept], flags[:, :kept] = self.logits[live], self.exit_layer[live], self.flags[:, live]
        self.logits, self.exit_layer, self.flags, self.base = logits, exit_layer, flags, first_open

    def trace(self, start: int, size: int) -> LoopTrace | None:
        """The trace of global ids ``start .. start + size - 1`` once every one of them has exited."""
        rows = slice(start - self.base, start - self.base + size)
        exit_layer = self.exit_layer[rows]
        if not bool((exit_layer > 0).all()):
            return None
        layers, gates, heads = self.flags[:, rows].clone()
        return LoopTrace(logits=self.logits[rows].clone(), exit_layer=exit_layer.clone(), layers_run=layers,
                         gates_run=gates, heads_run=heads)


class _InputFailure(Exception):
    """Carries an exception from the caller's iterator or an invalid batch out of :meth:`_Stream._steps`."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class _Stream:
    """The queues of one :func:`stream_batches` call."""

    def __init__(self, engine: AdaptiveInferenceEngine, max_rows: int | None) -> None:
        self.engine, self.max_rows = engine, max_rows
        self.num_steps = engine.encoder.num_steps
        # The operating point when stream() was called; changing the engine while it runs does not mix two.
        self.criterion, self.gate_threshold = engine.criterion, engine.gate_threshold
        self.use_gates, self.use_exits = loop_plan(engine.mode, engine.gate_threshold)
        # Length runs pay on a CPU; on a GPU a call costs far more than padding (the host dispatches), so never.
        on_cpu = next(engine.encoder.parameters()).device.type == "cpu"
        self.run_cost = CPU_RUN_COST_POSITIONS if on_cpu else None
        self.queues: list[deque[_Chunk]] = [deque() for _ in range(self.num_steps)]
        self.counts = [0] * self.num_steps
        self.pending: deque[tuple[int, int, Tensor]] = deque()  # (first global id, rows, token mask) per batch
        self.next_id = 0
        self.template: LayerRunner | None = None
        self.records: _Records | None = None

    def run(self, batches: Iterable[Mapping[str, Tensor]]) -> Iterator[EngineOutput]:
        """The stream. The engine's work runs in inference mode; the caller's iterator does not.

        An invalid batch, or an exception from the caller's iterator, ends the input there: the rows
        of the batches before it are finished and their outputs yielded, then the error is raised (an
        error while finishing them is raised instead, with the first one as its context)."""
        try:
            yield from self._steps(iter(batches))
            return
        except _InputFailure as stop:
            failure = stop.error
        try:
            yield from self._steps(None)
        except BaseException as error:
            error.__context__ = error.__context__ or failure
            raise
        raise failure

    def _steps(self, iterator: Iterator[Mapping[str, Tensor]] | None) -> Iterator[EngineOutput]:
        """Run steps and draw batches from ``iterator`` until every row is done (``None``: the input has
        ended). An exception from the iterator or an invalid batch is raised as :class:`_InputFailure`
        before anything of that batch is queued."""
        while True:
            full = [step for step, count in enumerate(self.counts) if count >= self.max_rows] if self.max_rows else []
            if full:
                step = full[-1]
            elif iterator is not None:
                try:
                    batch = next(iterator)
                except StopIteration:
                    iterator = None
                    continue
                except Exception as error:  # the batches before it are not lost: they are finished first
                    raise _InputFailure(error) from None
                try:
                    with torch.inference_mode():
                        prepared = self._prepare(batch)
                except Exception as error:
                    raise _InputFailure(error) from None
                with torch.inference_mode():
                    self._add(*prepared)
                continue
            else:
                waiting = [step for step, count in enumerate(self.counts) if count > 0]
                if not waiting:
                    break
                step = waiting[0]
            with torch.inference_mode():
                self._run_step(step)
                finished = list(self._finished())
            yield from finished
        if self.pending:  # every row leaves at the last step at the latest
            raise RuntimeError(f"stream ended with {len(self.pending)} batch(es) unfinished; this is a bug.")

    def _prepare(self, batch: Mapping[str, Tensor]) -> tuple[LayerRunner, Tensor]:
        """Check and embed one input batch (no queue changes): its layer runner and bool token mask."""
        if not isinstance(batch, Mapping):
            raise TypeError(f"stream() takes batches of model inputs (a mapping such as {{'input_ids': ..., "
                            f"'attention_mask': ...}}), got a {type(batch).__name__}.")
        inputs = dict(batch)
        input_ids, attention_mask = inputs.pop("input_ids", None), inputs.pop("attention_mask", None)
        runner, token_mask = self.engine._prepare(input_ids, attention_mask, inputs)
        if self.template is None:
            self._check_extra_args(runner)
        return runner, token_mask

    def _add(self, runner: LayerRunner, token_mask: Tensor) -> None:
        """Put one checked, embedded input batch into the first step's queue."""
        token_mask = token_mask.clone()  # may be the caller's own bool mask, which it may refill before rows finish
        hidden = runner.hidden_states
        rows = token_mask.shape[0]
        if self.template is None:
            self.template = runner
            self.records = _Records(self.num_steps, self.engine.encoder.num_labels, hidden.dtype, hidden.device)
            self.max_rows = self.max_rows or rows
        first_open = self.pending[0][0] if self.pending else self.next_id
        self.records.reserve(self.next_id + rows, first_open)  # type: ignore[union-attr]
        ids = torch.arange(self.next_id, self.next_id + rows, device=hidden.device)
        self.pending.append((self.next_id, rows, token_mask))
        self.next_id += rows
        state = (self.criterion.initial_state(rows, hidden.device) if self.use_exits
                 else hidden.new_zeros(rows, 0))
        extra = tuple(runner.extra_args[index][:1] for index in runner.adapter.batched_extra_args)
        self.queues[0].append(_Chunk(hidden, token_mask, token_mask.sum(dim=-1).tolist(), state, ids, extra))
        self.counts[0] += rows

    @staticmethod
    def _check_extra_args(runner: LayerRunner) -> None:
        num_tokens = runner.hidden_states.shape[1]
        for index in runner.adapter.batched_extra_args:
            arg = runner.extra_args[index]
            if not (isinstance(arg, Tensor) and arg.ndim >= 2 and tuple(arg.shape[-2:]) == (num_tokens, num_tokens)):
                raise NotImplementedError(
                    f"stream() regroups rows of different lengths and can cut only [B, ..., N, N] position "
                    f"biases; {runner.adapter.model_type} layer argument {index + 2} is "
                    f"{type(arg).__name__} {tuple(getattr(arg, 'shape', ()))}. Use engine(**batch) per batch."
                )

    def _gather(self, step: int) -> tuple[_Chunk, bool]:
        """Up to ``max_rows`` of step ``step``'s oldest rows as one group, and whether it holds padding."""
        queue, count = self.queues[step], min(self.counts[step], self.max_rows)  # type: ignore[type-var]
        self.counts[step] -= count
        parts: list[_Chunk] = []
        while count > 0:
            chunk = queue.popleft()
            if len(chunk) > count:
                chunk, rest = chunk.split(count)
                queue.appendleft(rest)
            parts.append(chunk)
            count -= len(chunk)
        length = max(max(part.lengths) for part in parts)
        padded = any(min(part.lengths) < length for part in parts)
        fitted = [part.fitted(length) for part in parts]
        source = next(part for part in parts if part.tokens.shape[1] >= length)  # its extra args cover the length
        extra = tuple(arg[..., :length, :length] for arg in source.extra)
        if len(parts) == 1:
            (hidden, tokens), (part,) = fitted[0], parts
            return _Chunk(hidden, tokens, part.lengths, part.state, part.ids, extra), padded
        return _Chunk(torch.cat([hidden for hidden, _ in fitted]), torch.cat([tokens for _, tokens in fitted]),
                      [length for part in parts for length in part.lengths], torch.cat([part.state for part in parts]),
                      torch.cat([part.ids for part in parts]), extra), padded

    def _layer_runner(self, group: _Chunk, padded: bool) -> LayerRunner:
        template, rows = self.template, len(group)
        assert template is not None
        layer_mask = None
        if padded:
            layer_mask = layer_attention_mask(group.tokens, self.engine.encoder.config._attn_implementation,
                                              group.hidden.dtype)
        extra_args = list(template.extra_args)
        for index, arg in zip(template.adapter.batched_extra_args, group.extra):
            extra_args[index] = arg.expand(rows, *arg.shape[1:])
        return LayerRunner(base_model=template.base_model, adapter=template.adapter, hidden_states=group.hidden,
                           layer_mask=layer_mask, extra_args=tuple(extra_args), extra_kwargs=template.extra_kwargs)

    def _run_step(self, step: int) -> None:
        """Run step ``step`` on a group from its queue, in length runs where that saves padding
        (:func:`length_runs`)."""
        group, padded = self._gather(step)
        runs = length_runs(group.lengths, self.run_cost) if padded and self.run_cost is not None else None
        if runs is None or len(runs) == 1:
            self._run_group(step, group, padded)
            return
        for rows in runs:
            length = group.lengths[rows[-1]]
            index = torch.tensor(rows, device=group.ids.device)
            run = _Chunk(group.hidden.index_select(0, index)[:, :length],
                         group.tokens.index_select(0, index)[:, :length], [group.lengths[row] for row in rows],
                         group.state.index_select(0, index), group.ids.index_select(0, index),
                         tuple(arg[..., :length, :length] for arg in group.extra))
            self._run_group(step, run, run.lengths[0] < length)

    def _run_group(self, step: int, group: _Chunk, padded: bool) -> None:
        """Run step ``step`` on one group; record it; pass the rows that stay on."""
        rows = self.engine._rows(self._layer_runner(group, padded), group.tokens if padded else None)
        last_step = step == self.num_steps - 1
        result = run_step(rows, step, group.hidden.contiguous(), group.state, last_step=last_step,
                          use_gates=self.use_gates, use_exits=self.use_exits, criterion=self.criterion,
                          gate_threshold=self.gate_threshold)
        records = self.records
        assert records is not None
        local = group.ids - records.base
        layers, gates, heads = records.flags
        if self.use_gates:
            gates[:, step].index_fill_(0, local, True)
        if result.ran is None or len(result.ran) > 0:
            layers[:, step].index_fill_(0, local if result.ran is None else local.index_select(0, result.ran), True)
        if result.heads_ran:
            heads[:, step].index_fill_(0, local if result.answered is None else local.index_select(0, result.answered),
                                       True)
        keep = None
        if result.leaving_logits is not None:
            leaving = local if result.leaving is None else local.index_select(0, result.leaving)
            records.logits.index_copy_(0, leaving, result.leaving_logits.to(records.logits.dtype))
            records.exit_layer.index_fill_(0, leaving, step + 1)
            if result.leaving is None:
                return
            staying = torch.ones(len(group), dtype=torch.bool, device=local.device).index_fill_(0, result.leaving, False)
            keep = staying.nonzero().flatten()
            if len(keep) == 0:
                return
        group.hidden, group.state = result.hidden, result.state
        if keep is not None:
            kept = keep.tolist()
            group = _Chunk(group.hidden.index_select(0, keep), group.tokens.index_select(0, keep),
                           [group.lengths[row] for row in kept], group.state.index_select(0, keep),
                           group.ids.index_select(0, keep), group.extra)
        self.queues[step + 1].append(group)
        self.counts[step + 1] += len(group)

    def _finished(self) -> Iterator[EngineOutput]:
        """The outputs of the oldest batches whose rows are all done, in input order."""
        while self.pending:
            start, size, token_mask = self.pending[0]
            trace = self.records.trace(start, size)  # type: ignore[union-attr]
            if trace is None:
                return
            self.pending.popleft()
            yield self.engine._output(trace, token_mask)


def stream_batches(engine: AdaptiveInferenceEngine, batches: Iterable[Mapping[str, Any]],
                   max_rows: int | None = None) -> Iterator[EngineOutput]:
    """:meth:`AdaptiveInferenceEngine.stream <adaptive_depth.engine.AdaptiveInferenceEngine.stream>`.

    Raises:
        TypeError: ``max_rows`` is not an integer (at once, before any batch is read).
        ValueError: ``max_rows < 1`` (at once).
    """
    if max_rows is not None:
        if isinstance(max_rows, bool) or not hasattr(max_rows, "__index__"):
            raise TypeError(f"max_rows must be an int (rows per layer run) or None, got {max_rows!r}.")
        max_rows = operator.index(max_rows)
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 (rows per layer run), got {max_rows}.")
    return _Stream(engine, max_rows).run(batches)
