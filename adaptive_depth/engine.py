"""Batched adaptive inference: per-sample layer skipping and early exit (paper eq. 9-10).

The paper's algorithm (its Appendix A) runs one sample at a time. :class:`AdaptiveInferenceEngine`
runs it on a whole batch by keeping only the rows still active: at every step

1. each active row's gate scores the hidden states entering the layer;
2. only the rows whose gate says "run" (``p_skip < gate_threshold``; threshold 1 never skips) go through the layer,
   selected with ``index_select`` and written back with ``index_copy``;
3. exit heads run only for rows whose layer ran; the criterion decides who leaves;
4. rows that left are dropped from every tensor the loop carries.

The last step's head always answers for the rows still there (its layer may have been
skipped: then it reads ``X^L = X^{L-1}``). Each row's work is the same as if it were alone,
so batch size 1 is exactly the paper's algorithm. The per-sample trace records what ran and
what it cost in both FLOPs conventions of :mod:`adaptive_depth.flops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from adaptive_depth.encoder import AdaptiveEncoder
from adaptive_depth.exits import EntropyExit, ExitCriterion
from adaptive_depth.flops import Convention, encoder_cost
from adaptive_depth.gates import skip_decision

__all__ = ["AdaptiveInferenceEngine", "CostAccumulator", "EngineMode", "EngineOutput"]

EngineMode = Literal["adaptive", "skip_only", "exit_only", "full"]


@dataclass
class EngineOutput:
    """What the engine returns for a batch of ``B`` rows over ``L`` steps.

    Attributes:
        logits: ``[B, C]`` logits of the head each row exited at.
        predictions: ``[B]`` argmax class (classification) or the score (regression).
        exit_layer: ``[B]`` 1-based step whose head answered.
        layers_run: ``[B, L]`` bool, layer ``i`` ran for the row.
        layers_skipped: ``[B, L]`` bool, the row's gate skipped layer ``i``.
        heads_run: ``[B, L]`` bool, exit head ``i`` ran for the row.
        gates_run: ``[B, L]`` bool, gate ``i`` ran for the row.
        num_tokens: ``[B]`` real (unpadded) length of each row.
        macs_exact: ``[B]`` int64 MACs of what ran, every matmul at the row's real length.
        macs_paper: ``[B]`` int64 MACs of what ran, Linear layers only at ``padded_length``
            (the paper reports FLOPs = 2 x this).
        full_macs_exact, full_macs_paper: ``[B]`` the same rows at full depth (every layer and
            the last head, no gate), the denominator of relative cost.
    """

    logits: Tensor
    predictions: Tensor
    exit_layer: Tensor
    layers_run: Tensor
    layers_skipped: Tensor
    heads_run: Tensor
    gates_run: Tensor
    num_tokens: Tensor
    macs_exact: Tensor
    macs_paper: Tensor
    full_macs_exact: Tensor
    full_macs_paper: Tensor


class AdaptiveInferenceEngine:
    """Runs an :class:`AdaptiveEncoder` with real skipping and exiting, on any batch size.

    Args:
        encoder: the wrapped model (put it in eval mode and on its device first).
        criterion: the exit criterion for ``mode="adaptive"``; entropy ``S = 0.3`` by default.
        gate_threshold: a layer is skipped when ``p_skip >= gate_threshold`` (0.5 in the paper);
            1.0 never skips, 0.0 skips every layer (see :func:`adaptive_depth.gates.skip_decision`).
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
        gate_threshold: float = 0.5,
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
        if not 0.0 <= gate_threshold <= 1.0:
            raise ValueError(f"gate_threshold must be in [0, 1], got {gate_threshold}.")
        if padded_length is not None and padded_length < 1:
            raise ValueError(f"padded_length must be >= 1, got {padded_length}.")
        self.encoder = encoder
        self.criterion: ExitCriterion = criterion if criterion is not None else EntropyExit(0.3)
        self.gate_threshold = gate_threshold
        self.mode: EngineMode = mode
        self.padded_length = padded_length
        self._cost_tables: dict[tuple[int, Convention], Tensor] = {}

    @torch.inference_mode()
    def __call__(
        self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **model_inputs: Any
    ) -> EngineOutput:
        """Classify a batch, skipping and exiting per row.

        Args:
            input_ids: ``[B, N]`` token ids.
            attention_mask: ``[B, N]``, 1 for tokens, 0 for padding.
            **model_inputs: other inputs of the HF model (``token_type_ids``...).
        """
        encoder = self.encoder
        runner, token_mask = encoder.prepare(input_ids, attention_mask, **model_inputs)
        batch_size, num_tokens = token_mask.shape
        if self.padded_length is not None and num_tokens > self.padded_length:
            raise ValueError(
                f"inputs have {num_tokens} positions but padded_length is {self.padded_length}; "
                "truncate the inputs or raise padded_length."
            )
        device, steps = token_mask.device, encoder.num_steps
        use_gates = self.mode in ("adaptive", "skip_only")
        use_exits = self.mode in ("adaptive", "exit_only")

        # Per-step records as [L, B] rows, filled with index_fill_/index_copy_: tensor-indexed
        # __setitem__ costs tens of microseconds a call, which shows at batch size 1.
        layers_run = torch.zeros(steps, batch_size, dtype=torch.bool, device=device)
        gates_run = torch.zeros_like(layers_run)
        heads_run = torch.zeros_like(layers_run)
        exit_layer = torch.zeros(batch_size, dtype=torch.long, device=device)
        logits = torch.zeros(batch_size, encoder.num_labels, device=device, dtype=runner.hidden_states.dtype)

        # Everything below is carried for the active rows only; `active` maps them to the batch.
        active = torch.arange(batch_size, device=device)
        hidden = runner.hidden_states
        # Without padding, gates and heads need no mask (a few ops less per call at batch size 1).
        mask = token_mask if not bool(token_mask.all()) else None
        state = self.criterion.initial_state(batch_size, device) if use_exits else None
        for step in range(steps):
            last_step = step == steps - 1
            if use_gates:
                gates_run[step].index_fill_(0, active, True)
                p_skip = encoder.gates[step](hidden, mask).p_skip
                running = (~skip_decision(p_skip, self.gate_threshold)).nonzero().flatten()
                all_run = len(running) == len(active)
            else:
                running, all_run = active, True  # only its length and "all rows" are used below
            if all_run:
                hidden = runner.run_layer(step, hidden)
                layers_run[step].index_fill_(0, active, True)
            elif len(running) > 0:
                layer_output = runner.select_rows(running).run_layer(step, hidden.index_select(0, running))
                hidden = hidden.index_copy(0, running, layer_output)
                layers_run[step].index_fill_(0, active.index_select(0, running), True)

            if last_step or (use_exits and all_run):  # the last head answers for every row still here
                answering, answering_rows, answering_hidden, answering_mask = None, active, hidden, mask
            elif use_exits and len(running) > 0:
                answering, answering_rows = running, active.index_select(0, running)
                answering_hidden = hidden.index_select(0, running)
                answering_mask = mask.index_select(0, running) if mask is not None else None
            else:
                continue
            head_logits = encoder.exit_heads[step](answering_hidden, answering_mask).logits
            heads_run[step].index_fill_(0, answering_rows, True)
            if last_step:
                leaving_rows, leaving_logits = answering_rows, head_logits
            else:
                answering_state = state if answering is None else state.index_select(0, answering)
                decision = self.criterion.decide(head_logits, answering_state)
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
            active, hidden = active.index_select(0, keep), hidden.index_select(0, keep)
            mask = mask.index_select(0, keep) if mask is not None else None
            runner = runner.select_rows(keep)
            state = state.index_select(0, keep)
        layers_run, gates_run, heads_run = layers_run.T, gates_run.T, heads_run.T

        lengths = token_mask.sum(dim=-1)
        macs = self._trace_macs(lengths, self.padded_length or num_tokens, layers_run, gates_run, heads_run)
        predictions = logits[:, 0] if encoder.num_labels == 1 else logits.argmax(dim=-1)
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


class CostAccumulator(Metric):
    """Aggregates :class:`EngineOutput` traces over a data set (``update`` / ``compute`` / ``reset``).

    ``compute()`` returns a dict: ``count``; ``mean_macs_exact`` and ``mean_macs_paper`` per
    sample; ``relative_cost_exact`` and ``relative_cost_paper`` (mean MACs over the mean MACs of
    the same samples at full depth); ``exit_layer_histogram`` (samples per 1-based exit step,
    list of ``L``); ``skip_rate_per_layer`` (fraction of the samples whose gate ran at step
    ``i`` that skipped it, NaN where no gate ran); ``mean_layers_run``.

    Being a torchmetrics ``Metric``, it also sums across processes under DDP.

    Args:
        num_steps: ``L``, the encoder's number of steps.
    """

    full_state_update = False

    def __init__(self, num_steps: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_steps = num_steps
        for name in ("count", "macs_exact", "macs_paper", "full_exact", "full_paper", "layers_run"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("exit_histogram", "skips", "gate_runs"):
            self.add_state(name, default=torch.zeros(num_steps, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, output: EngineOutput) -> None:  # type: ignore[override]
        """Add one batch's traces."""
        if output.layers_run.shape[1] != self.num_steps:
            raise ValueError(
                f"trace has {output.layers_run.shape[1]} steps, the accumulator expects {self.num_steps}."
            )
        self.count += output.exit_layer.numel()
        self.macs_exact += output.macs_exact.sum().double()
        self.macs_paper += output.macs_paper.sum().double()
        self.full_exact += output.full_macs_exact.sum().double()
        self.full_paper += output.full_macs_paper.sum().double()
        self.layers_run += output.layers_run.sum().double()
        self.exit_histogram += torch.bincount(output.exit_layer - 1, minlength=self.num_steps).double()
        self.skips += output.layers_skipped.sum(dim=0).double()
        self.gate_runs += output.gates_run.sum(dim=0).double()

    def compute(self) -> dict[str, Any]:  # type: ignore[override]
        """The aggregate statistics (see the class docstring)."""
        count = max(float(self.count), 1.0)
        return {
            "count": int(self.count),
            "mean_macs_exact": float(self.macs_exact) / count,
            "mean_macs_paper": float(self.macs_paper) / count,
            "relative_cost_exact": float(self.macs_exact) / max(float(self.full_exact), 1.0),
            "relative_cost_paper": float(self.macs_paper) / max(float(self.full_paper), 1.0),
            "mean_layers_run": float(self.layers_run) / count,
            "exit_layer_histogram": [int(value) for value in self.exit_histogram.tolist()],
            "skip_rate_per_layer": (self.skips / self.gate_runs).tolist(),
        }
