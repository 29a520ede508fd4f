"""Where the engine's time goes at batch size 1: embedding, layers, gates, heads and the loop's own work.

Runs the engine one row at a time over the first ``--samples`` dev rows of a GLUE task, at full depth,
skipping only and at each entropy threshold, on a saved model (``--model``, e.g. ``<run>/model``) or
on the shipped all-MiniLM-L6-v2 with random gates and heads (``--seed``; their exits spread with
``--spread`` so that rows leave at every depth). Each engine call is split by timers around its
parts: ``prepare`` (input checks, embeddings, the layer-call capture), ``layers``, ``gates``,
``heads``, ``output`` (predictions and the MACs trace) and ``loop`` (the rest: decisions and
bookkeeping). Beside each part's share of the time is its share of the exact MACs; a part whose
time share exceeds its MACs share is where wall-clock falls behind FLOPs. The plain Hugging Face
model, timed in the same rounds, gives the wall/FLOPs ratio. ``--clock cpu`` times with the process's
CPU time instead of elapsed time (steadier on a machine shared with other jobs; use it with one
thread). ``--ops`` adds ``torch.profiler``'s table of operators for the last threshold.

    python -m benchmarks.batch1_profile --task mrpc --data-dir ../shared/data/glue --samples 64 --threads 1
    python -m benchmarks.batch1_profile --model runs/smartbert-mrpc/model --samples 128 --threads 2 --ops
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from adaptive_depth import AdaptiveEncoder, EntropyExit
from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.flops import full_model_macs
from adaptive_depth.metrics import CostAccumulator
from benchmarks.engine_latency import make_batches
from recipes.glue import EncodedDataset, encode_examples, get_task, read_split, resolve_data_dir
from recipes.run.models import load_model_and_tokenizer

PARTS = ("prepare", "layers", "gates", "heads", "output", "loop")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = time.perf_counter  # set by --clock


class _Timed:
    """A :class:`~adaptive_depth.loop.StepRows` that adds the time of each call to ``seconds[part]``."""

    def __init__(self, rows: Any, seconds: dict[str, float]) -> None:
        self.rows, self.seconds = rows, seconds

    def _time(self, part: str, call: Callable[..., Any], *args: Any) -> Any:
        start = CLOCK()
        result = call(*args)
        self.seconds[part] += CLOCK() - start
        return result

    def select(self, rows: Any) -> _Timed:
        return _Timed(self.rows.select(rows), self.seconds)

    def gate(self, step: int, hidden: Any) -> Any:
        return self._time("gates", self.rows.gate, step, hidden)

    def layer(self, step: int, hidden: Any) -> Any:
        return self._time("layers", self.rows.layer, step, hidden)

    def head(self, step: int, hidden: Any) -> Any:
        return self._time("heads", self.rows.head, step, hidden)


class TimedEngine(AdaptiveInferenceEngine):
    """The engine with timers around its parts (``seconds``, summed over calls)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = CLOCK()
        output = super().__call__(*args, **kwargs)
        self.seconds["total"] += CLOCK() - start
        return output

    def _prepare(self, *args: Any) -> Any:
        start = CLOCK()
        prepared = super()._prepare(*args)
        self.seconds["prepare"] += CLOCK() - start
        return prepared

    def _rows(self, runner: Any, mask: Any) -> Any:
        return _Timed(super()._rows(runner, mask), self.seconds)

    def _output(self, *args: Any, **kwargs: Any) -> Any:
        start = CLOCK()
        output = super()._output(*args, **kwargs)
        self.seconds["output"] += CLOCK() - start
        return output


def load(args: argparse.Namespace, num_labels: int) -> tuple[AdaptiveEncoder, Any]:
    if args.model:
        encoder = AdaptiveEncoder.from_pretrained(args.model)
        from transformers import AutoTokenizer

        return encoder.eval(), AutoTokenizer.from_pretrained(args.model)
    backbone, tokenizer, _ = load_model_and_tokenizer(None)
    torch.manual_seed(args.seed)
    encoder = AdaptiveEncoder(backbone, num_labels=num_labels).eval()
    with torch.no_grad():  # random heads whose entropies spread, so that rows exit at every depth
        for head in encoder.exit_heads:
            head.classifier.weight.mul_(args.spread)
    return encoder, tokenizer


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    encoder, tokenizer = load(args, task.num_labels)
    encoder.fuse_for_inference()  # as AdaptivePipeline runs it
    examples = read_split(resolve_data_dir(args.data_dir), task, task.dev_splits[0]).examples[: args.samples]
    dataset = EncodedDataset(encode_examples(examples, tokenizer, args.max_length))
    batches = make_batches(dataset, 1, tokenizer.pad_token_id, torch.device("cpu"))
    plain = encoder.unwrap().eval()
    lengths = [len(ids) for ids in dataset.encoded.input_ids]
    plain_macs = statistics.fmean(full_model_macs(encoder.config, n, "exact", task.num_labels) for n in lengths)
    settings = [("full", "full", 0.0), ("skip_only", "skip_only", 0.0)]
    settings += [(f"entropy S={s:g}", "adaptive", s) for s in args.thresholds]
    engines = {name: TimedEngine(encoder, EntropyExit(threshold), mode=mode) for name, mode, threshold in settings}

    def plain_pass() -> None:
        with torch.inference_mode():
            for batch in batches:
                plain(**batch)

    passes: dict[str, Callable[[], None]] = {"plain": plain_pass}
    passes |= {name: (lambda engine=engine: [engine(**batch) for batch in batches] and None)
               for name, engine in engines.items()}
    seconds = _interleaved_medians(passes, args.repeats)
    rows = []
    print(f"{'setting':<15} {'ms/row':>7} {'wall/FLOPs':>10}  " + "  ".join(f"{part:>14}" for part in PARTS))
    for name, engine in engines.items():
        accumulator = CostAccumulator(encoder.num_steps)
        engine.seconds.clear()
        outputs = [engine(**batch) for batch in batches]
        for output in outputs:
            accumulator.update(output)
        stats, timed = accumulator.compute(), dict(engine.seconds)
        timed["loop"] = timed["total"] - sum(timed.get(part, 0.0) for part in PARTS[:-1])
        shares = {part: timed.get(part, 0.0) / timed["total"] for part in PARTS}
        macs = _macs_shares(engine, outputs)
        ratio = (seconds["plain"] / seconds[name]) / (plain_macs / stats["mean_macs_exact"])
        rows.append({"setting": name, "ms_per_row": 1000 * seconds[name] / len(batches), "wall_over_flops": ratio,
                     "time_share": shares, "macs_share": macs})
        print(f"{name:<15} {rows[-1]['ms_per_row']:>7.2f} {ratio:>10.2f}  " + "  ".join(
            f"{100 * shares[part]:>5.1f}% ({100 * macs.get(part, 0.0):>4.1f}%)" for part in PARTS))
    print(f"{'plain HF model':<15} {1000 * seconds['plain'] / len(batches):>7.2f}   (time share, MACs share)")
    if args.ops:
        engine = engines[settings[-1][0]]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            for batch in batches:
                engine(**batch)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return rows


def _interleaved_medians(passes: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds (of ``CLOCK``) of each pass over ``repeats`` rounds that run every pass in turn, after a warm-up."""
    for run_pass in passes.values():
        run_pass()
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(repeats):
        for name, run_pass in passes.items():
            start = CLOCK()
            run_pass()
            times[name].append(CLOCK() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _macs_shares(engine: AdaptiveInferenceEngine, outputs: list[Any]) -> dict[str, float]:
    """Exact MACs of layers, gates and heads (and the embedding, as ``prepare``) over the rows, as shares."""
    totals: dict[str, float] = defaultdict(float)
    for output in outputs:
        cost = engine._cost(int(output.num_tokens[0]), "exact")
        totals["prepare"] += cost.embedding
        for part, flags, costs in (("layers", output.layers_run, cost.layers),
                                   ("gates", output.gates_run, cost.gates), ("heads", output.heads_run, cost.heads)):
            totals[part] += sum(c for c, ran in zip(costs, flags[0].tolist()) if ran)
    everything = sum(totals.values())
    return {part: value / everything for part, value in totals.items()}


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option's help names its default."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch1_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="saved model folder (default: MiniLM, random gates and heads)")
    parser.add_argument("--task", default="mrpc", help="GLUE task whose dev rows are run (default: mrpc)")
    parser.add_argument("--data-dir", default=None, help="glue_data folder (default: $GLUE_DIR)")
    parser.add_argument("--samples", type=int, default=64, help="dev rows, the first ones (default: 64)")
    parser.add_argument("--max-length", type=int, default=128, help="truncation length in tokens (default: 128)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.6],
                        help="entropy exit thresholds (default: 0.3 0.6)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after a warm-up; medians (default: 5)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random gates and heads (default: 0)")
    parser.add_argument("--spread", type=float, default=8.0,
                        help="factor on the random heads' classifier weights, without --model (default: 8.0)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time, steadier on a shared machine "
                             "(with one thread; default: wall)")
    parser.add_argument("--ops", action="store_true", help="also print torch.profiler's operator table (default: off)")
    return parser


def main(argv: Iterable[str] | None = None) -> list[dict[str, Any]]:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else sys.argv[1:])
    for name in ("samples", "max_length", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    return run(args)


if __name__ == "__main__":
    main()
