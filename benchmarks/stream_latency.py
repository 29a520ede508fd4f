"""Streaming over a corpus against the batch engine and the plain model: how much FLOPs saving becomes time.

On a saved model folder (``--model``, written by ``AdaptiveEncoder.save_pretrained``, e.g. a recipe
run's ``<run>/model``) at its saved operating point (criterion, threshold, gate threshold, mode), over
the first ``--rows`` texts of a GLUE split (SST-2 train by default), tokenized and batched as
``AdaptivePipeline`` does (rows of similar length together, ``--batch-size`` rows per batch), with the
pipeline's engine (gates and heads fused for inference), in ``--dtype`` (fp32; bf16 or fp16 on a GPU). Three passes, timed in turn within every round (one warm-up round, the median of ``--repeats``):

- the plain Hugging Face model at full depth, batch after batch;
- the batch engine, one ``engine(**batch)`` per batch (rows leave the batch as they exit);
- the streaming engine, ``engine.stream(batches)``: every layer runs on full groups of rows.

For each: rows per second, exact MACs per row, the FLOPs speed-up and the wall-clock speed-up over the
plain model, and their ratio (1.0: every FLOP saved is time saved) with its range over the rounds. It checks that the stream takes the
batch engine's decisions on every row, prints a table and writes JSON (command, machine, date, torch
version and threads), by default to a new file under ``runs/``.

    python -m benchmarks.stream_latency --model runs/smartbert-mrpc/model --data-dir ../shared/data/glue \
        --rows 5000 --batch-size 32 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from adaptive_depth import AdaptivePipeline
from adaptive_depth.config import criterion_spec
from adaptive_depth.files import OutputPathError, check_output_path
from adaptive_depth.flops import full_model_macs
from adaptive_depth.metrics import CostAccumulator
from benchmarks.timing import StolenTime, interleaved_rounds, machine_record, ratio_range, round_ratios, steal_line, write_json
from recipes.glue import get_task, read_split, resolve_data_dir

PASSES = ("plain HF model", "batch engine", "stream")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_texts(data_dir: str | None, task_name: str, split: str, rows: int) -> tuple[list[str], list[str] | None]:
    """The first ``rows`` texts (and second texts of a pair task) of ``split``."""
    task = get_task(task_name)
    examples = read_split(resolve_data_dir(data_dir), task, split).examples[:rows]
    pairs = [example.text_b or "" for example in examples] if task.is_pair else None
    return [example.text_a for example in examples], pairs


def rows_with_other_decisions(first: Iterable[Any], second: Iterable[Any]) -> int:
    """How many rows differ in exit layer, layers run or prediction between two runs' outputs, batch by batch
    (:class:`~adaptive_depth.engine.EngineOutput` s of the same batches)."""
    return sum(int(((one.exit_layer != other.exit_layer) | (one.layers_run != other.layers_run).any(dim=-1)
                    | (one.predictions != other.predictions)).sum()) for one, other in zip(first, second, strict=True))


def run(args: argparse.Namespace) -> dict[str, Any]:
    stolen = StolenTime()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    texts, pairs = load_texts(args.data_dir, args.task, args.split, args.rows)
    # A pair model (e.g. MRPC's) timed on single texts (SST-2's, the documented corpus): its answers
    # mean nothing there, but what runs and what it costs is what this benchmark measures.
    pipeline = AdaptivePipeline.from_pretrained(args.model, device=device, dtype=DTYPES[args.dtype],
                                                batch_size=args.batch_size, allow_single_texts=pairs is None)
    engine, encoder = pipeline.engine, pipeline.encoder
    batches = [inputs for _, inputs in pipeline.batches(texts, pairs)]
    plain = encoder.unwrap().eval()

    with torch.inference_mode():
        batched = [engine(**batch) for batch in batches]
        streamed = list(engine.stream(batches, max_rows=args.batch_size))
    differing = rows_with_other_decisions(batched, streamed)
    costs = {}
    for name, outputs in (("batch engine", batched), ("stream", streamed)):
        accumulator = CostAccumulator(encoder.num_steps)
        for output in outputs:
            accumulator.update(output)
        costs[name] = accumulator.compute()
    lengths = torch.cat([batch["attention_mask"].sum(dim=-1) for batch in batches]).tolist()
    plain_macs = statistics.fmean(full_model_macs(encoder.config, n, "exact", encoder.num_labels) for n in lengths)

    def plain_pass() -> None:
        with torch.inference_mode():
            for batch in batches:
                plain(**batch)

    def engine_pass() -> None:
        with torch.inference_mode():
            for batch in batches:
                engine(**batch)

    def stream_pass() -> None:
        for _ in engine.stream(batches, max_rows=args.batch_size):
            pass

    rounds = interleaved_rounds({0: dict(zip(PASSES, (plain_pass, engine_pass, stream_pass)))}, args.repeats, device)[0]
    seconds = {name: statistics.median(values) for name, values in rounds.items()}
    count = len(lengths)
    rows = []
    for name in PASSES:
        macs = plain_macs if name == PASSES[0] else costs[name]["mean_macs_exact"]
        flops_speedup, wall_speedup = plain_macs / macs, seconds[PASSES[0]] / seconds[name]
        rows.append({
            "setting": name, "rows_per_second": count / seconds[name], "seconds": seconds[name],
            "mean_macs_exact": macs, "flops_speedup": flops_speedup, "wall_speedup": wall_speedup,
            "wall_over_flops": wall_speedup / flops_speedup,
            "wall_over_flops_rounds": None if name == PASSES[0] else round_ratios(rounds[PASSES[0]], rounds[name],
                                                                                  flops_speedup),
            "mean_layers_run": None if name == PASSES[0] else costs[name]["mean_layers_run"],
        })
        print(_format(rows[-1]), flush=True)
    criterion, threshold, options = criterion_spec(engine.criterion)
    return {
        "command": "python -m benchmarks.stream_latency " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_record(device, stolen), "torch_threads": torch.get_num_threads()},
        "model": str(args.model),
        "data": {"task": args.task, "split": args.split, "rows": count, "mean_tokens": statistics.fmean(lengths)},
        "batch_size": args.batch_size,
        "dtype": str(next(encoder.parameters()).dtype).removeprefix("torch."),  # what ran, e.g. "bfloat16"
        "operating_point": {"mode": engine.mode, "criterion": criterion, "threshold": threshold,
                            "criterion_options": options, "gate_threshold": engine.gate_threshold},
        "exit_layer_histogram": costs["stream"]["exit_layer_histogram"],
        "stream_equals_batch_engine": differing == 0,
        "rows_with_other_decisions": differing,
        "rows": rows,
    }


HEADER = (f"{'setting':<15} {'rows/s':>9} {'MMACs/row':>10} {'FLOPs x':>8} {'wall x':>7} {'wall/FLOPs':>10} "
          f"{'rounds':>9} {'layers/row':>10}")


def _format(row: dict[str, Any]) -> str:
    layers = "" if row["mean_layers_run"] is None else f"{row['mean_layers_run']:.2f}"
    return (f"{row['setting']:<15} {row['rows_per_second']:>9.1f} {row['mean_macs_exact'] / 1e6:>10.1f} "
            f"{row['flops_speedup']:>8.2f} {row['wall_speedup']:>7.2f} {row['wall_over_flops']:>10.2f} "
            f"{ratio_range(row['wall_over_flops_rounds']):>9} {layers:>10}")


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option's help names its default."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="saved model folder with its tokenizer, e.g. <run>/model (required; no default)")
    parser.add_argument("--data-dir", default=None, help="glue_data folder (default: $GLUE_DIR)")
    parser.add_argument("--task", default="sst2", help="GLUE task whose texts are classified (default: sst2)")
    parser.add_argument("--split", default="train", help="split to read the texts from (default: train)")
    parser.add_argument("--rows", type=int, default=5000, help="texts to classify, the first ones (default: 5000)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="rows per input batch, and per layer run of the stream (default: 32)")
    parser.add_argument("--repeats", type=int, default=9,
                        help="timed rounds after one warm-up round; the median is reported. On the 2-core VM one "
                             "round's wall/FLOPs ranged 0.80-0.96 around a 15-round median of 0.90 (default: 9)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                        help="weights' and activations' dtype; bf16 and fp16 are for a GPU (default: fp32)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads for the whole run; 0 keeps torch's default (default: 0)")
    parser.add_argument("--output", default=None,
                        help="JSON path (default: a new runs/stream_latency-<task>-<UTC time>.json)")
    return parser


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    """Parse and check the options; a bad value exits with ``error: ...`` and status 2."""
    parser = build_parser()
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(argv)
    for name in ("rows", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if not Path(args.model).is_dir():
        parser.error(f"--model {args.model} is not a folder; pass a model saved with save_pretrained (e.g. <run>/model)")
    args.argv = argv
    return args


def main(argv: Iterable[str] | None = None) -> None:
    args = parse_args(argv)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    try:  # before any work: a bad --output costs nothing
        output = check_output_path(args.output or f"runs/stream_latency-{args.task}-{stamp}.json", create_parents=True)
    except OutputPathError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(HEADER, flush=True)
    result = run(args)
    write_json(output, result)
    print(f"\nstream takes the batch engine's decisions on every row: {result['stream_equals_batch_engine']} "
          f"({result['rows_with_other_decisions']} of {result['data']['rows']} rows differ)")
    print(steal_line(result["machine"]["cpu_steal_share"]))
    print(f"wrote {output}")

if __name__ == "__main__":
    main()
