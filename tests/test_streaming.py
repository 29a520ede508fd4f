"""AdaptiveInferenceEngine.stream: the batch engine's results, row by row, with every layer run on full groups."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_depth import AdaptiveEncoder, EntropyExit, MaxProbExit, PatienceExit, ToleranceExit, streaming
from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.streaming import length_runs
from tests.conftest import FAMILIES, random_encoder, tiny_model

FIELDS = ("exit_layer", "layers_run", "layers_skipped", "heads_run", "gates_run", "num_tokens", "macs_exact",
          "macs_paper", "full_macs_exact", "full_macs_paper")


def make_batches(shapes: list[tuple[int, int]], seed: int, vocab: int = 99) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of ``(rows, positions)``: random real lengths, one row per batch unpadded."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for rows, positions in shapes:
        input_ids = torch.randint(5, vocab, (rows, positions), generator=generator)
        lengths = torch.randint(1, positions + 1, (rows,), generator=generator)
        lengths[int(torch.randint(0, rows, (1,), generator=generator))] = positions
        attention_mask = (torch.arange(positions)[None, :] < lengths[:, None]).long()
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


def assert_same_as_batch_engine(engine: AdaptiveInferenceEngine, batches, outputs) -> None:
    assert len(outputs) == len(batches)
    for batch, streamed in zip(batches, outputs):  # zip in input order: the order is checked too
        expected = engine(**batch)
        for field in FIELDS:
            assert torch.equal(getattr(streamed, field), getattr(expected, field)), field
        torch.testing.assert_close(streamed.logits, expected.logits, rtol=0.0, atol=1e-5)
        if expected.predictions.is_floating_point():  # regression: the scores themselves
            torch.testing.assert_close(streamed.predictions, expected.predictions, rtol=0.0, atol=1e-5)
        else:
            assert torch.equal(streamed.predictions, expected.predictions)


@contextlib.contextmanager
def cpu_run_cost(positions: int):
    """Streams started inside run their groups in length runs as if one more call cost ``positions``."""
    saved = streaming.CPU_RUN_COST_POSITIONS
    streaming.CPU_RUN_COST_POSITIONS = positions
    try:
        yield
    finally:
        streaming.CPU_RUN_COST_POSITIONS = saved


def regression_encoder(seed: int) -> AdaptiveEncoder:
    encoder = AdaptiveEncoder(tiny_model("bert", seed=seed, num_layers=4), num_labels=1, gate_inner_size=16,
                              head_inner_size=16).double().eval()
    generator = torch.Generator().manual_seed(seed)
    for gate in encoder.gates:
        gate.score.bias.data.uniform_(-3.0, 3.0, generator=generator)
    for head in encoder.exit_heads:
        head.classifier.weight.data.normal_(0.0, 0.3, generator=generator)
    return encoder


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model_type=st.sampled_from(FAMILIES),
    seed=st.integers(0, 1000),
    mode=st.sampled_from(["adaptive", "skip_only", "exit_only", "full"]),
    criterion=st.sampled_from(["entropy", "maxprob", "patience"]),
    threshold=st.floats(0.0, 1.2),
    gate_threshold=st.floats(0.2, 1.0),
    shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 12)), min_size=1, max_size=5),
    max_rows=st.one_of(st.none(), st.integers(1, 9)),
    run_cost=st.sampled_from([streaming.CPU_RUN_COST_POSITIONS, 0, 4]),
)
def test_stream_equals_the_batch_engine_row_by_row(model_type, seed, mode, criterion, threshold, gate_threshold,
                                                   shapes, max_rows, run_cost) -> None:
    encoder = random_encoder(model_type, seed, num_layers=3)
    exit_criterion = {"entropy": EntropyExit(threshold), "maxprob": MaxProbExit(min(threshold, 1.0)),
                      "patience": PatienceExit(int(threshold * 2))}[criterion]
    engine = AdaptiveInferenceEngine(encoder, exit_criterion, gate_threshold=gate_threshold, mode=mode)
    batches = make_batches(shapes, seed)
    with cpu_run_cost(run_cost):  # 0 and 4: groups split into length runs wherever they hold padding
        outputs = list(engine.stream(batches, max_rows=max_rows))
    assert_same_as_batch_engine(engine, batches, outputs)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1000), tolerance=st.floats(0.0, 2.0), patience=st.integers(1, 2),
       shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 10)), min_size=1, max_size=4),
       max_rows=st.one_of(st.none(), st.integers(1, 6)))
def test_stream_carries_the_state_of_a_regression_criterion(seed, tolerance, patience, shapes, max_rows) -> None:
    encoder = regression_encoder(seed)
    engine = AdaptiveInferenceEngine(encoder, ToleranceExit(tolerance, patience))
    batches = make_batches(shapes, seed)
    assert_same_as_batch_engine(engine, batches, list(engine.stream(batches, max_rows=max_rows)))


def test_the_patterns_really_vary() -> None:
    """Guards the property tests against degenerate models: rows skip, exit early and run long in one stream."""
    encoder = random_encoder("bert", 3, num_layers=3)
    engine = AdaptiveInferenceEngine(encoder, EntropyExit(0.6))
    outputs = list(engine.stream(make_batches([(6, 9)] * 6, seed=1), max_rows=4))
    exits = torch.cat([out.exit_layer for out in outputs])
    assert len(exits.unique()) == 3 and bool(torch.cat([out.layers_skipped for out in outputs]).any())


def test_layers_run_on_full_groups_and_partial_ones_only_at_the_end() -> None:
    """exit_only, rows exiting at every depth: each step runs on exactly max_rows rows, except at most one
    partial group per step once the input has ended (FastBERT #35: a hard row does not hold a batch back)."""
    encoder = random_encoder("bert", 0, num_layers=4)
    engine = AdaptiveInferenceEngine(encoder, EntropyExit(0.5), mode="exit_only")
    batches = make_batches([(5, 8)] * 12, seed=2)
    rows_per_call: dict[int, list[int]] = {step: [] for step in range(4)}
    layers = encoder.backbone.encoder.layer
    # Forward (not pre-) hooks: embedding a batch stops at layer 0's pre-hooks without running it.
    hooks = [layer.register_forward_hook(lambda module, args, out, step=step: rows_per_call[step].append(len(args[0])))
             for step, layer in enumerate(layers)]
    try:
        with cpu_run_cost(10**6):  # no length runs (test_length_runs_cut_the_padding_of_mixed_groups)
            outputs = list(engine.stream(batches, max_rows=8))
    finally:
        for hook in hooks:
            hook.remove()
    assert_same_as_batch_engine(engine, batches, outputs)
    assert len(torch.cat([out.exit_layer for out in outputs]).unique()) > 2
    for step, sizes in rows_per_call.items():
        assert sum(size < 8 for size in sizes) <= 1, (step, sizes)
        assert all(size == 8 for size in sizes[:-1]), (step, sizes)


def test_a_hard_first_row_does_not_change_the_order_of_the_outputs() -> None:
    """A first batch whose rows run to the end comes out first, after later batches whose rows exited early."""
    encoder = random_encoder("bert", 6, num_layers=3)
    engine = AdaptiveInferenceEngine(encoder, EntropyExit(0.9), mode="exit_only")
    batches = make_batches([(1, 12), (3, 3), (2, 7), (4, 5)], seed=3)
    streamed = engine.stream(batches, max_rows=2)
    assert iter(streamed) is streamed  # a generator: nothing runs before the first output is asked for
    assert_same_as_batch_engine(engine, batches, list(streamed))


def test_empty_input_one_row_and_unpadded_batches() -> None:
    encoder = random_encoder("roberta", 7, num_layers=2)
    engine = AdaptiveInferenceEngine(encoder, EntropyExit(0.5))
    assert list(engine.stream([])) == []
    one = [{"input_ids": torch.randint(5, 99, (1, 6))}]  # no attention mask: no padding anywhere
    assert_same_as_batch_engine(engine, one, list(engine.stream(one)))
    unpadded = [{"input_ids": torch.randint(5, 99, (3, length))} for length in (4, 9, 2)]
    assert_same_as_batch_engine(engine, unpadded, list(engine.stream(iter(unpadded), max_rows=5)))


def test_a_generator_may_refill_its_buffers_and_keeps_building_graphs() -> None:
    """A generator that reuses one bool mask buffer (and one ids buffer) for every batch gets each batch's own
    results, though rows of a batch wait in the queues while later batches overwrite the buffers; and the
    generator's own code runs outside inference mode (its tensors are ordinary ones)."""
    encoder = random_encoder("bert", 3, num_layers=3)
    engine = AdaptiveInferenceEngine(encoder, EntropyExit(0.6))
    batches = make_batches([(4, 9)] * 4, seed=1)
    ids, mask = torch.zeros(4, 9, dtype=torch.long), torch.zeros(4, 9, dtype=torch.bool)
    made_inside_inference_mode = []

    def refilled():
        for batch in batches:
            ids.copy_(batch["input_ids"])
            mask.copy_(batch["attention_mask"].bool())
            made_inside_inference_mode.append(torch.ones(1).is_inference())
            yield {"input_ids": ids, "attention_mask": mask}

    outputs = list(engine.stream(refilled(), max_rows=8))
    assert len(torch.cat([out.exit_layer for out in outputs]).unique()) > 1  # rows did wait in the queues
    assert_same_as_batch_engine(engine, batches, outputs)
    assert made_inside_inference_mode == [False] * len(batches)


def test_the_operating_point_is_the_one_at_the_call() -> None:
    """Changing the engine between stream() and the first output does not mix two operating points."""
    batches = make_batches([(4, 9), (3, 5), (4, 7)], seed=1)
    engine = AdaptiveInferenceEngine(random_encoder("bert", 3, num_layers=3), EntropyExit(0.6))
    expected = [engine(**batch) for batch in batches]
    streamed = engine.stream(batches, max_rows=4)
    engine.mode, engine.gate_threshold, engine.criterion = "exit_only", 1.0, EntropyExit(0.01)
    for batch, out, before in zip(batches, streamed, expected):
        for field in FIELDS:
            assert torch.equal(getattr(out, field), getattr(before, field)), field
    assert not torch.equal(torch.cat([engine(**b).exit_layer for b in batches]),
                           torch.cat([out.exit_layer for out in expected]))  # the change would have mattered


def test_bad_input_is_refused_clearly() -> None:
    engine = AdaptiveInferenceEngine(random_encoder("bert", 0), EntropyExit(0.5))
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        engine.stream([], max_rows=0)
    for max_rows in (2.0, 2.5, "4", True):
        with pytest.raises(TypeError, match="max_rows must be an int"):
            engine.stream([], max_rows=max_rows)
    with pytest.raises(TypeError, match="a mapping"):
        list(engine.stream([torch.ones(2, 3, dtype=torch.long)]))
    with pytest.raises(ValueError, match="padding before a real token"):
        list(engine.stream([{"input_ids": torch.ones(1, 3, dtype=torch.long),
                             "attention_mask": torch.tensor([[0, 1, 1]])}]))


@pytest.mark.parametrize("failure", ["invalid batch", "iterator raises"])
def test_an_error_mid_stream_comes_after_the_batches_before_it(failure: str) -> None:
    """The batches read before an invalid one (or before the caller's iterator fails) are finished and
    yielded, in order and as the batch engine answers them; then the error is raised, and nothing after it runs."""
    encoder = random_encoder("bert", 2, num_layers=3)
    engine = AdaptiveInferenceEngine(encoder, EntropyExit(0.6))
    good = make_batches([(3, 7), (2, 5), (4, 6)], seed=4)
    bad = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.tensor([[0, 1, 1]])}
    read = []

    def batches():
        for batch in good:
            read.append(batch)
            yield batch
        if failure == "invalid batch":
            yield bad
        else:
            raise OSError("the corpus file went away")
        read.append("after the failure")
        yield good[0]

    outputs = []
    with pytest.raises(ValueError if failure == "invalid batch" else OSError,
                       match="padding before a real token" if failure == "invalid batch" else "went away"):
        for output in engine.stream(batches(), max_rows=8):  # rows of all three batches wait in the queues
            outputs.append(output)
    assert read == good
    assert_same_as_batch_engine(engine, good, outputs)


def test_a_stop_inside_a_batch_is_not_the_end_of_the_input_and_a_later_error_keeps_the_first() -> None:
    """A ``StopIteration`` raised while a batch is read (by a lazy mapping) is an error, not the end of the
    input; and an error while the queued batches are finished names the failure that ended the input."""
    from collections.abc import Mapping

    engine = AdaptiveInferenceEngine(random_encoder("bert", 2, num_layers=3), EntropyExit(0.6))
    good = make_batches([(3, 7), (2, 5)], seed=4)

    class Exhausted(Mapping):  # a mapping whose values come from an iterator that has run dry
        def __iter__(self):
            return iter(["input_ids"])

        def __len__(self) -> int:
            return 1

        def __getitem__(self, key):
            return next(iter([]))

    with pytest.raises(RuntimeError, match="raised StopIteration"):
        list(engine.stream([good[0], Exhausted(), good[1]], max_rows=8))

    def poisoned():
        yield good[0]
        for parameter in engine.encoder.exit_heads.parameters():
            parameter.data.fill_(float("nan"))  # the rows still queued now give NaN logits
        raise OSError("the corpus file went away")

    with pytest.raises(FloatingPointError) as error:
        list(engine.stream(poisoned(), max_rows=8))
    assert isinstance(error.value.__context__, OSError) and "went away" in str(error.value.__context__)


def split_cost(lengths: list[int], runs: list[list[int]], run_cost: int) -> int:
    return sum(run_cost + len(run) * max(lengths[row] for row in run) for run in runs)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=9), run_cost=st.integers(0, 60))
def test_length_runs_is_the_cheapest_split_in_length_order(lengths: list[int], run_cost: int) -> None:
    runs = length_runs(lengths, run_cost)
    assert sorted(row for run in runs for row in run) == list(range(len(lengths)))  # every row once
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    cuts = [i for i in range(1, len(order)) if lengths[order[i]] > lengths[order[i - 1]]]
    if len(runs) == 1:  # splitting saves nothing: the rows as they are
        assert runs == [list(range(len(lengths)))]
        assert len(lengths) * max(lengths) - sum(lengths) <= run_cost or split_cost(lengths, runs, run_cost) == min(
            split_cost(lengths, [order[a:b] for a, b in itertools.pairwise([0, *chosen, len(order)])], run_cost)
            for count in range(len(cuts) + 1) for chosen in itertools.combinations(cuts, count))
        return
    run_lengths = [[lengths[row] for row in run] for run in runs]
    assert all(values == sorted(values) for values in run_lengths)
    assert all(one[-1] < other[0] for one, other in itertools.pairwise(run_lengths))  # contiguous, shortest first
    # every split of the length-sorted rows at boundaries between distinct lengths (brute force)
    cheapest = min(split_cost(lengths, [order[a:b] for a, b in itertools.pairwise([0, *chosen, len(order)])], run_cost)
                   for count in range(len(cuts) + 1) for chosen in itertools.combinations(cuts, count))
    assert split_cost(lengths, runs, run_cost) == cheapest
    if len(runs) > 1:  # a split is taken only where it saves something
        assert split_cost(lengths, runs, run_cost) < split_cost(lengths, [list(range(len(lengths)))], run_cost)


def test_length_runs_cut_the_padding_of_mixed_groups() -> None:
    """Rows of very different lengths in one group run in two calls, each padded to its own longest row:
    fewer positions computed, the batch engine's results."""
    engine = AdaptiveInferenceEngine(random_encoder("bert", 5, num_layers=3), EntropyExit(0.6), mode="exit_only")
    short, long = make_batches([(6, 3)], seed=1)[0], make_batches([(2, 30)], seed=2)[0]
    long["attention_mask"][:] = 1
    batches = [short, long]
    calls: list[tuple[int, int]] = []
    hook = engine.encoder.backbone.encoder.layer[0].register_forward_hook(
        lambda module, args, out: calls.append(tuple(args[0].shape[:2])))
    try:
        with cpu_run_cost(8):
            split = list(engine.stream(batches, max_rows=8))
        split_calls, calls[:] = list(calls), []
        with cpu_run_cost(10**6):
            whole = list(engine.stream(batches, max_rows=8))
    finally:
        hook.remove()
    assert split_calls == [(6, 3), (2, 30)] and calls == [(8, 30)]
    assert_same_as_batch_engine(engine, batches, split)
    assert_same_as_batch_engine(engine, batches, whole)
