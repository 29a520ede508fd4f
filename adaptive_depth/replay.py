"""What the engine returns at any exit threshold, from one recorded pass, without running the model.

An engine at exit threshold ``t`` runs each row's gates, layers and heads exactly as a pass in
which no row exits (:meth:`~adaptive_depth.engine.AdaptiveInferenceEngine.trace_heads`) does, up
to the step where the row leaves; the gates do not depend on ``t``, and the criterion decides
for each row from that row's head logits and its own state. :func:`replay_exits` therefore
applies the criterion to the recorded logits step by step, for all rows at once, and cuts each
row's record at its exit: the exit layer, logits, prediction, what ran and the MACs (both
conventions, from the engine's own cost tables) equal the engine's at that threshold.

Equal up to one thing: the recording pass runs each layer and head on a different set of rows
than the engine at ``t`` (rows that would have left are still there), and a batched matmul may
round a row's result differently in the last bit depending on its batch. A row whose score lies
within that rounding of the threshold can then decide differently; everywhere else the
decisions, predictions and MACs are identical and the logits equal within float rounding
(``tests/test_replay.py`` checks this against the engine on every family).
"""

from __future__ import annotations

import torch

from adaptive_depth.engine import EngineOutput
from adaptive_depth.exits import ExitCriterion, predictions_from_logits
from adaptive_depth.head_trace import HeadTrace

__all__ = ["HeadTrace", "exit_layers", "replay_exits"]


def exit_layers(trace: HeadTrace, criterion: ExitCriterion) -> torch.Tensor:
    """``[B]`` 1-based step at which each row of ``trace`` exits under ``criterion``.

    Step by step, the criterion decides for the rows still there whose head ran, with their
    state, exactly as the engine's loop calls it; the last step answers for every row left.

    Raises:
        TypeError: ``criterion`` is not an :class:`~adaptive_depth.exits.ExitCriterion`.

    Example:
        >>> from adaptive_depth import EntropyExit
        >>> logits = torch.tensor([[[4.0, -4.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, -1.0]]])
        >>> flags = torch.ones(2, 2, dtype=torch.bool)
        >>> macs = torch.tensor([[10, 20], [10, 20]])
        >>> trace = HeadTrace(logits, flags, ~flags, flags, torch.tensor([3, 3]), macs, macs, macs[:, 1], macs[:, 1])
        >>> exit_layers(trace, EntropyExit(0.1)).tolist()
        [1, 2]
    """
    if not isinstance(criterion, ExitCriterion):
        raise TypeError(f"criterion must be an ExitCriterion (initial_state and decide), got "
                        f"{type(criterion).__name__}; e.g. EntropyExit(0.3).")
    rows, steps = trace.heads_run.shape
    device = trace.head_logits.device
    exit_layer = torch.full((rows,), steps, dtype=torch.long, device=device)
    active = torch.ones(rows, dtype=torch.bool, device=device)
    state = criterion.initial_state(rows, device)
    for step in range(steps - 1):
        answering = (trace.heads_run[:, step] & active).nonzero().flatten()
        if len(answering) == 0:
            continue
        decision = criterion.decide(trace.head_logits[:, step].index_select(0, answering),
                                    state.index_select(0, answering))
        state = state.index_copy(0, answering, decision.state)
        leaving = answering[decision.should_exit]
        exit_layer.index_fill_(0, leaving, step + 1)
        active.index_fill_(0, leaving, False)
    return exit_layer


def replay_exits(trace: HeadTrace, criterion: ExitCriterion) -> EngineOutput:
    """The engine's output at ``criterion`` for the rows of ``trace``, without running the model.

    Args:
        trace: from :meth:`~adaptive_depth.engine.AdaptiveInferenceEngine.trace_heads` (or
            :meth:`HeadTrace.cat` of several), of an engine with the mode, gate threshold and
            padded length to replay.
        criterion: any criterion whose decision for a row depends only on that row's logits
            and state (the :class:`~adaptive_depth.exits.ExitCriterion` contract, which the
            engine's batching relies on too; every built-in one), at any threshold.

    Returns:
        :class:`~adaptive_depth.engine.EngineOutput`: what ``engine(**batch)`` returns with
        ``criterion`` (up to float rounding of batched matmuls: see the module docstring), with
        ``layers_run``, ``gates_run`` and ``heads_run`` cut at each row's exit.

    Example:
        >>> from adaptive_depth import AdaptiveEncoder, AdaptiveInferenceEngine, EntropyExit
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3,
        ...                             num_attention_heads=4, intermediate_size=37))
        >>> engine = AdaptiveInferenceEngine(AdaptiveEncoder(bert, num_labels=2).eval(), EntropyExit(0.6))
        >>> input_ids = torch.randint(0, 99, (5, 7))
        >>> replayed = replay_exits(engine.trace_heads(input_ids), EntropyExit(0.6))
        >>> torch.equal(replayed.exit_layer, engine(input_ids).exit_layer)
        True
    """
    exit_layer = exit_layers(trace, criterion)
    rows, steps = trace.heads_run.shape
    device = exit_layer.device
    last = (exit_layer - 1)[:, None]
    logits = trace.head_logits[torch.arange(rows, device=device), exit_layer - 1]
    within = torch.arange(steps, device=device)[None, :] < exit_layer[:, None]
    layers_run, gates_run, heads_run = trace.layers_run & within, trace.gates_run & within, trace.heads_run & within
    return EngineOutput(
        logits=logits,
        predictions=predictions_from_logits(logits),
        exit_layer=exit_layer,
        layers_run=layers_run,
        layers_skipped=gates_run & ~layers_run,
        heads_run=heads_run,
        gates_run=gates_run,
        num_tokens=trace.num_tokens,
        macs_exact=trace.macs_exact.gather(1, last)[:, 0],
        macs_paper=trace.macs_paper.gather(1, last)[:, 0],
        full_macs_exact=trace.full_macs_exact,
        full_macs_paper=trace.full_macs_paper,
    )
