"""How much of the FLOPs saving of adaptive inference becomes wall-clock saving.

Runs, in one process, on real GLUE dev inputs and the real all-MiniLM-L6-v2:

- the plain HF model, one sample at a time and at each batch size (the baseline);
- the engine at batch size 1: full depth, skip only, and entropy exits at several thresholds;
- the engine at larger batch sizes (32 and 64 on CPU; pass ``--batch-sizes 64 256`` on a GPU);
- when onnxruntime and onnxscript are installed (``pip install adaptive_depth[export]``) and the
  device is the CPU, a peer row: the same model at full depth, exported to ONNX
  (``adaptive_depth.export``) and run by ONNX Runtime through ``ExportedEngine``.

For every setting it reports exact MACs per sample, wall-clock ms per sample (median over
``--repeats`` passes after a warm-up), the FLOPs speedup and the wall-clock speedup against the
plain model at the same batch size, and their ratio (1.0 = every FLOP saved is time saved).
It prints a table and writes JSON, by default to a new file under ``runs/`` (never over a
tracked result in ``benchmarks/results/`` unless ``--output`` names it).

    python -m benchmarks.engine_latency --task mrpc --data-dir ../shared/data/glue
    python -m benchmarks.engine_latency --task mrpc --run runs/smartbert-mrpc-<stamp>
    python -m benchmarks.engine_latency --task mrpc --run runs/smartbert-mrpc-<stamp> --threads 1

Without ``--run`` the gates and heads are untrained: their skip and exit patterns are
arbitrary, but the MACs and times measured for those patterns are real.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from adaptive_depth import AdaptiveEncoder, EntropyExit
from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.metrics import CostAccumulator
from adaptive_depth.export import export_engine
from adaptive_depth.export_runtime import ExportedEngine
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


def onnx_runtime_available() -> bool:
    """Whether the ONNX Runtime peer row can run (onnxruntime to run, onnx and onnxscript to export)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = get_task(args.task)
    torch.manual_seed(args.seed)  # untrained gates and heads: the same skip/exit pattern on every run
    encoder, tokenizer, model_name = load_encoder(args.run, args.model, task.num_labels)
    encoder = encoder.to(device)
    examples = read_split(resolve_data_dir(args.data_dir), task, task.dev_splits[0]).examples[: args.samples]
    dataset = EncodedDataset(encode_examples(examples, tokenizer, args.max_length))
    plain = encoder.unwrap().to(device).eval()
    lengths = [len(ids) for ids in dataset.encoded.input_ids]
    plain_macs = statistics.fmean(full_model_macs(encoder.config, n, "exact", task.num_labels) for n in lengths)

    settings: list[tuple[str, str, float | None]] = [("full", "full", None), ("skip_only", "skip_only", None)]
    settings += [(f"entropy S={s:g}", "adaptive", s) for s in args.thresholds]
    onnx_engine = None
    if args.onnx and device.type == "cpu" and onnx_runtime_available():
        # The peer row: full depth through exported ONNX graphs (the export is not timed).
        onnx_dir = Path(tempfile.mkdtemp(prefix="engine_latency-onnx-")) / "full"
        export_engine(encoder, onnx_dir, "onnx", mode="full")
        onnx_engine = ExportedEngine(onnx_dir, num_threads=torch.get_num_threads())
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
        if onnx_engine is not None:
            passes[ONNX_ROW] = engine_pass(onnx_engine)  # type: ignore[arg-type]
            statistics_by_setting[ONNX_ROW] = statistics_by_setting["full"]  # same work: every layer, last head
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
        "seed": args.seed,
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


ONNX_ROW = "onnxruntime full"
HEADER = f"{'setting':<18} {'batch':>5} {'MMACs/sample':>13} {'ms/sample':>10} {'FLOPs x':>8} {'wall x':>7} {'wall/FLOPs':>10}"


def _format(row: dict) -> str:
    return (
        f"{row['setting']:<18} {row['batch_size']:>5} {row['mean_macs_exact'] / 1e6:>13.1f} {row['ms_per_sample']:>10.3f} "
        f"{row['flops_speedup']:>8.2f} {row['wall_speedup']:>7.2f} {row['wall_over_flops']:>10.2f}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option's help names its default."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.engine_latency",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--task", default="mrpc", help="GLUE task whose dev split is timed (default: mrpc)")
    parser.add_argument("--data-dir", default=None, help="glue_data folder (default: $GLUE_DIR)")
    parser.add_argument("--model", default=None, help="HF model folder (default: the shipped all-MiniLM-L6-v2)")
    parser.add_argument("--run", default=None, help="a trained smartbert run folder (default: none, untrained gates and heads)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the untrained gates and heads when --run is not given (default: 0)")
    parser.add_argument("--samples", type=int, default=256, help="dev samples to time, the first ones (default: 256)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per input after truncation (default: 128)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.6],
                        help="entropy exit thresholds S; batch 1 times all, larger batches every other one "
                             "(default: 0.1 0.3 0.5 0.6)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64], help="batch sizes besides 1 (default: 32 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round; the median is reported (default: 3)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1... (default: cpu)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads for the whole run; 0 keeps torch's default, one per core (default: 0)")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false",
                        help="skip the ONNX Runtime full-depth peer row (it runs when onnxruntime and onnxscript "
                             "are installed and the device is the CPU; default: the row runs)")
    parser.add_argument("--output", default=None,
                        help="JSON path (default: a new runs/engine_latency-<task>-<device>-<UTC time>.json; "
                             "results under benchmarks/results/ are only overwritten when named here)")
    return parser


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    """Parse and check the options; a bad value exits with ``error: ...`` and status 2."""
    parser = build_parser()
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(argv)
    for name in ("samples", "max_length", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(size < 1 for size in args.batch_sizes):
        parser.error(f"--batch-sizes must all be >= 1, got {args.batch_sizes}")
    if any(not threshold >= 0 for threshold in args.thresholds):
        parser.error(f"--thresholds must all be >= 0 (entropy thresholds), got {args.thresholds}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r} is not a torch device ({error})")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for, but torch sees no CUDA device; use --device cpu")
    args.argv = argv
    return args


def default_output(task: str, device: str) -> Path:
    """A new file under ``runs/``: the time in its name, a counter if that name is taken."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = f"runs/engine_latency-{task}-{device.replace(':', '')}-{stamp}"
    output, counter = Path(f"{base}.json"), 1
    while output.exists():
        output, counter = Path(f"{base}-{counter}.json"), counter + 1
    return output


def main(argv: Iterable[str] | None = None) -> None:
    args = parse_args(argv)
    print(HEADER, flush=True)
    result = run(args)
    output = Path(args.output) if args.output else default_output(result["task"], args.device)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
