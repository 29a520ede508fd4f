"""How much of the FLOPs saving of adaptive inference becomes wall-clock saving.

Runs, in one process, on real GLUE dev inputs and the real all-MiniLM-L6-v2:

- the plain HF model, one sample at a time and at each batch size (the baseline);
- the engine at batch size 1: full depth, skip only, and entropy exits at several thresholds;
- the engine at larger batch sizes (32 and 64 on CPU; pass ``--batch-sizes 64 256`` on a GPU).

For every setting it reports exact MACs per sample, wall-clock ms per sample (median over
``--repeats`` passes after a warm-up), the FLOPs speedup and the wall-clock speedup against the
plain model at the same batch size, and their ratio (1.0 = every FLOP saved is time saved).
It prints a table and writes JSON.

    python -m benchmarks.engine_latency --task mrpc --data-dir ../shared/data/glue
    python -m benchmarks.engine_latency --task mrpc --run runs/smartbert-mrpc-<stamp>
    python -m benchmarks.engine_latency --task mrpc --run runs/smartbert-mrpc-<stamp> --threads 1

Without ``--run`` the gates and heads are untrained: their skip and exit patterns are
arbitrary, but the MACs and times measured for those patterns are real.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from adaptive_depth import AdaptiveEncoder, EntropyExit
from adaptive_depth.engine import AdaptiveInferenceEngine, CostAccumulator
from adaptive_depth.flops import full_model_macs
from recipes.loading import load_model_and_tokenizer
from recipes.smartbert import load_trained
from recipes.glue import EncodedDataset, collate, encode_examples, get_task, read_split, resolve_data_dir


def load_encoder(run_dir: str | None, model: str | None, num_labels: int) -> tuple[AdaptiveEncoder, Any, str]:
    """A trained SmartBERT run (``--run``), or an untrained wrapper around ``--model``."""
    if run_dir is not None:
        encoder, tokenizer, _ = load_trained(run_dir)
        return encoder, tokenizer, run_dir
    backbone, tokenizer, name = load_model_and_tokenizer(model)
    return AdaptiveEncoder(backbone, num_labels=num_labels).eval(), tokenizer, name


def make_batches(dataset: EncodedDataset, batch_size: int, pad_token_id: int, device: torch.device) -> list[dict]:
    batches = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[index] for index in range(start, min(start + batch_size, len(dataset)))]
        batch = collate(items, pad_token_id)
        batch.pop("labels")
        batches.append({key: value.to(device) for key, value in batch.items()})
    return batches


def interleaved_medians(passes: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall seconds of each pass over ``repeats`` rounds, after one warm-up round.

    Each round runs every pass once, in turn, so that drift in the machine's speed (other
    processes, frequency changes) falls on all settings alike instead of on whichever ran last.
    """
    for run_pass in passes.values():
        run_pass()
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(repeats):
        for name, run_pass in passes.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run_pass()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = get_task(args.task)
    encoder, tokenizer, model_name = load_encoder(args.run, args.model, task.num_labels)
    encoder = encoder.to(device)
    examples = read_split(resolve_data_dir(args.data_dir), task, task.dev_splits[0]).examples[: args.samples]
    dataset = EncodedDataset(encode_examples(examples, tokenizer, args.max_length))
    plain = encoder.unwrap().to(device).eval()
    lengths = [len(ids) for ids in dataset.encoded.input_ids]
    plain_macs = statistics.fmean(full_model_macs(encoder.config, n, "exact", task.num_labels) for n in lengths)

    settings: list[tuple[str, str, float | None]] = [("full", "full", None), ("skip_only", "skip_only", None)]
    settings += [(f"entropy S={s:g}", "adaptive", s) for s in args.thresholds]
    rows = []
    for batch_size in [1, *args.batch_sizes]:
        batches = make_batches(dataset, batch_size, tokenizer.pad_token_id, device)
        chosen = settings if batch_size == 1 else [settings[0], settings[1], *settings[2:][1::2]]
        engines = {
            name: AdaptiveInferenceEngine(
                encoder, EntropyExit(threshold if threshold is not None else 0.0), mode=mode,  # type: ignore[arg-type]
                padded_length=args.max_length,
            )
            for name, mode, threshold in chosen
        }
        statistics_by_setting = {}
        for name, engine in engines.items():
            accumulator = CostAccumulator(encoder.num_steps)
            for batch in batches:
                accumulator.update(engine(**batch))
            statistics_by_setting[name] = accumulator.compute()

        def plain_pass() -> None:
            with torch.inference_mode():
                for batch in batches:
                    plain(**batch)

        def engine_pass(engine: AdaptiveInferenceEngine) -> Callable[[], None]:
            return lambda: [engine(**batch) for batch in batches] and None

        passes = {"plain HF model": plain_pass} | {name: engine_pass(engine) for name, engine in engines.items()}
        seconds = interleaved_medians(passes, args.repeats, device)
        plain_seconds = seconds.pop("plain HF model")
        rows.append(_row("plain HF model", batch_size, plain_macs, plain_seconds, plain_macs, plain_seconds, len(dataset)))
        print(_format(rows[-1]), flush=True)
        for name, stats in statistics_by_setting.items():
            rows.append(
                _row(name, batch_size, stats["mean_macs_exact"], seconds[name], plain_macs, plain_seconds, len(dataset))
                | {"mean_layers_run": stats["mean_layers_run"], "exit_layer_histogram": stats["exit_layer_histogram"]}
            )
            print(_format(rows[-1]), flush=True)
    return {
        "command": "python -m benchmarks.engine_latency " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "task": task.name,
        "samples": len(dataset),
        "model": model_name,
        "trained": args.run is not None,
        "rows": rows,
    }


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _row(name: str, batch_size: int, macs: float, seconds: float, plain_macs: float, plain_seconds: float, count: int) -> dict:
    flops_speedup = plain_macs / macs
    wall_speedup = plain_seconds / seconds
    return {
        "setting": name,
        "batch_size": batch_size,
        "mean_macs_exact": macs,
        "ms_per_sample": 1000 * seconds / count,
        "flops_speedup": flops_speedup,
        "wall_speedup": wall_speedup,
        "wall_over_flops": wall_speedup / flops_speedup,
    }


HEADER = f"{'setting':<18} {'batch':>5} {'MMACs/sample':>13} {'ms/sample':>10} {'FLOPs x':>8} {'wall x':>7} {'wall/FLOPs':>10}"


def _format(row: dict) -> str:
    return (
        f"{row['setting']:<18} {row['batch_size']:>5} {row['mean_macs_exact'] / 1e6:>13.1f} {row['ms_per_sample']:>10.3f} "
        f"{row['flops_speedup']:>8.2f} {row['wall_speedup']:>7.2f} {row['wall_over_flops']:>10.2f}"
    )


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="mrpc")
    parser.add_argument("--data-dir", default=None, help="glue_data folder (default: $GLUE_DIR)")
    parser.add_argument("--model", default=None, help="HF model folder (default: the shipped all-MiniLM-L6-v2)")
    parser.add_argument("--run", default=None, help="a trained smartbert run folder (default: untrained gates and heads)")
    parser.add_argument("--samples", type=int, default=256, help="dev samples to time")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.6])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads for the whole run (0: torch's default, one per core)")
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/engine_latency-<task>-<device>.json)")
    argv = list(argv) if argv is not None else None
    args = parser.parse_args(argv)
    import sys

    args.argv = argv if argv is not None else sys.argv[1:]
    return args


def main(argv: Iterable[str] | None = None) -> None:
    args = parse_args(argv)
    print(HEADER, flush=True)
    result = run(args)
    output = Path(args.output or f"benchmarks/results/engine_latency-{result['task']}-{args.device}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
