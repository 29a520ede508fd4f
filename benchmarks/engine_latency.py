"""How much of the FLOPs saving of adaptive inference becomes wall-clock saving, per runtime.

Times, in one interleaved run on real GLUE dev inputs, one model:

- the plain HF model (the baseline, at each batch size and thread count);
- the engine in each runtime: eager (``AdaptiveInferenceEngine``, its gates and heads fused for
  inference as ``AdaptivePipeline`` runs them), ONNX Runtime and ``torch.export`` (``ExportedEngine``
  over one adaptive export of the model, not timed; the exports trace the unfused gates and heads),
  each in full, skip-only and entropy-exit modes;
- "plain HF model after an ORT call": the plain model timed right after each batch went through
  ONNX Runtime, which shows whether ORT's threads slow the torch work beside them;

at batch 1 and ``--batch-sizes``, at each of ``--threads``. Each round runs every setting once, in
turn, thread counts included, so that drift in the machine's speed falls on all alike; medians of
``--repeats`` rounds after a warm-up. It reports exact MACs per sample, ms per sample, the FLOPs
and wall-clock speed-ups against the plain model at the same batch size and threads, and their
ratio (1.0 = every FLOP saved is time saved) with its range over the rounds ("rounds": each round's plain
seconds over the setting's, the noise one run's median carries), and the same ratio against the runtime's own full depth
("vs own full": how much of the saving each runtime turns into time, whatever its speed at full depth:
ONNX Runtime is faster than torch at every depth, which the ratio against the plain HF model mixes in).
For the exported runtimes it also checks, on the timed rows, that they take the eager engine's
decisions (exit layers and skipped layers equal, logits allclose). It prints a table and the share of
CPU time the hypervisor stole during the run, and writes JSON (command, machine, date, versions), by
default to a new file under ``runs/``.

    python -m benchmarks.engine_latency --task mrpc --data-dir ../shared/data/glue --model-dir runs/smartbert-mrpc/model
    python -m benchmarks.engine_latency --task mrpc --run runs/smartbert-mrpc-<stamp> --threads 1 2
    python -m benchmarks.engine_latency --smoke          # a tiny random model, seconds, no data needed

Without ``--model-dir`` or ``--run`` the gates and heads are untrained (``--model``, default
all-MiniLM-L6-v2): their skip and exit patterns are arbitrary, but the MACs and times are real.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from adaptive_depth import AdaptiveEncoder, AdaptiveInferenceEngine
from adaptive_depth.files import check_output_path
from benchmarks.timing import (Setting, StolenTime, cpu_name, interleaved_rounds, machine_record,
                               ratio_range, round_ratios, settings_for, steal_line,
                               smoke_batches, smoke_encoder, write_json)

__all__ = ["cpu_name", "load_encoder", "main", "make_batches", "run"]

RUNTIMES = ("eager", "onnx", "torch-export")
PLAIN, AFTER_ORT = "plain HF model", "plain HF model after an ORT call"


def load_encoder(run_dir: str | None, model: str | None, num_labels: int,
                 model_dir: str | None = None) -> tuple[AdaptiveEncoder, Any, str]:
    """A saved model folder (``--model-dir``), a trained SmartBERT run (``--run``: its ``model/``, else
    its last checkpoint), or an untrained wrapper around ``--model``."""
    if run_dir is not None and (Path(run_dir) / "model" / "adaptive_config.json").is_file():
        model_dir = str(Path(run_dir) / "model")
    if model_dir is not None:
        from transformers import AutoTokenizer

        return AdaptiveEncoder.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir), model_dir
    if run_dir is not None:
        from recipes.smartbert import load_trained

        encoder, tokenizer, _ = load_trained(run_dir)
        return encoder, tokenizer, run_dir
    from recipes.run.models import load_model_and_tokenizer

    backbone, tokenizer, name = load_model_and_tokenizer(model)
    return AdaptiveEncoder(backbone, num_labels=num_labels).eval(), tokenizer, name


def make_batches(dataset: Any, batch_size: int, pad_token_id: int, device: torch.device) -> list[dict]:
    """Batches of ``dataset`` (a ``recipes.glue.EncodedDataset``) in order, padded per batch, without labels."""
    from recipes.glue import collate

    batches = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[index] for index in range(start, min(start + batch_size, len(dataset)))]
        batch = collate(items, pad_token_id)
        batch.pop("labels")
        batches.append({key: value.to(device) for key, value in batch.items()})
    return batches


def onnx_runtime_available() -> bool:
    """Whether the ONNX Runtime rows can run (onnxruntime to run, onnx and onnxscript to export)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


def _inputs(args: argparse.Namespace, device: torch.device) -> tuple[AdaptiveEncoder, str, str, Callable[[int], list]]:
    """The model, its name, the task and ``batch_size -> batches`` of the timed rows."""
    if args.smoke:
        encoder = smoke_encoder().to(device).fuse_for_inference()
        return encoder, "tiny random BERT (smoke)", "synthetic", lambda size: smoke_batches(
            args.samples, size, args.max_length, device)
    from recipes.glue import EncodedDataset, encode_examples, get_task, read_split, resolve_data_dir

    task = get_task(args.task)
    torch.manual_seed(args.seed)  # untrained gates and heads: the same skip/exit pattern on every run
    encoder, tokenizer, name = load_encoder(args.run, args.model, task.num_labels, args.model_dir)
    encoder = encoder.to(device).eval().fuse_for_inference()  # as AdaptivePipeline runs it (exports trace unfused)
    examples = read_split(resolve_data_dir(args.data_dir), task, task.dev_splits[0]).examples[: args.samples]
    dataset = EncodedDataset(encode_examples(examples, tokenizer, args.max_length))
    return encoder, name, task.name, lambda size: make_batches(dataset, size, tokenizer.pad_token_id, device)


def _exported(encoder: AdaptiveEncoder, runtimes: list[str], folder: Path) -> dict[str, Path]:
    """One export per exported runtime, with every graph (so it runs every mode); not timed."""
    from adaptive_depth.export import export_engine

    mode = "adaptive" if encoder.has_gates else "exit_only"
    return {runtime: export_engine(encoder, folder / runtime, runtime, mode=mode)  # type: ignore[arg-type]
            for runtime in runtimes if runtime != "eager"}


def _compare(expected: Any, got: Any) -> dict[str, Any]:
    """How far an exported runtime's outputs are from the eager engine's on the same rows."""
    return {"rows": int(expected.exit_layer.numel()),
            "same_exit_layer": int((expected.exit_layer == got.exit_layer).sum()),
            "same_skipped_layers": int((expected.layers_skipped == got.layers_skipped).all(dim=-1).sum()),
            "max_logit_difference": float((expected.logits.float() - got.logits.float()).abs().max()),
            "logits_allclose": bool(torch.allclose(got.logits.float(), expected.logits.float(), rtol=1e-3, atol=1e-4))}


def _merge(total: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    if total is None:
        return part
    return {"rows": total["rows"] + part["rows"], "same_exit_layer": total["same_exit_layer"] + part["same_exit_layer"],
            "same_skipped_layers": total["same_skipped_layers"] + part["same_skipped_layers"],
            "max_logit_difference": max(total["max_logit_difference"], part["max_logit_difference"]),
            "logits_allclose": total["logits_allclose"] and part["logits_allclose"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every setting; returns the JSON-ready result (``rows``, one per setting, batch size and threads)."""
    from adaptive_depth.export_runtime import ExportedEngine

    device = torch.device(args.device)
    encoder, model_name, task, batches_of = _inputs(args, device)
    plain = encoder.unwrap().to(device).eval()
    runtimes = [runtime for runtime in args.runtimes if runtime != "onnx" or onnx_runtime_available()]
    if device.type != "cpu":
        runtimes = ["eager"]  # the exported runtimes here run on the CPU
    export_root = Path(tempfile.mkdtemp(prefix="engine_latency-"))
    rows: list[dict[str, Any]] = []
    stolen = StolenTime()
    try:
        folders = _exported(encoder, runtimes, export_root)
        shared = {"torch-export": ExportedEngine(folders["torch-export"])} if "torch-export" in folders else {}
        onnx = {threads: ExportedEngine(folders["onnx"], num_threads=threads) for threads in args.threads} if (
            "onnx" in folders) else {}
        for batch_size in [1, *args.batch_sizes]:
            batches = batches_of(batch_size)
            settings = settings_for(args.thresholds, encoder.has_gates, batch_size)
            groups: dict[int, dict[str, Callable[[], float | None]]] = {}
            stats: dict[int, dict[str, dict[str, Any]]] = {}
            for threads in args.threads:
                torch.set_num_threads(threads)
                engines: dict[tuple[str, Setting], Any] = {}
                for setting in settings:
                    engines["eager", setting] = AdaptiveInferenceEngine(
                        encoder, setting.criterion(), mode=setting.mode, padded_length=args.max_length)  # type: ignore[arg-type]
                    exported = {"torch-export": shared.get("torch-export"), "onnx": onnx.get(threads)}
                    for runtime, base in exported.items():
                        if base is not None:
                            engines[runtime, setting] = base.with_operating_point(mode=setting.mode,
                                                                                  criterion=setting.criterion())
                # MACs and decisions at this thread count, on the timed rows (untimed)
                stats[threads] = _statistics(engines, batches, encoder.num_steps)
                groups[threads] = {PLAIN: _plain_pass(plain, batches)}
                if "onnx" in runtimes:
                    groups[threads][AFTER_ORT] = _plain_pass(plain, batches, before=engines["onnx", settings[0]])
                for (runtime, setting), engine in engines.items():
                    groups[threads][f"{runtime} | {setting.name}"] = _engine_pass(engine, batches)
            rounds = interleaved_rounds(groups, args.repeats, device)
            count = sum(len(batch["input_ids"]) for batch in batches)
            reference_macs = plain_macs(encoder, batches)
            for threads, by_name_rounds in rounds.items():
                by_name = {name: statistics.median(values) for name, values in by_name_rounds.items()}
                reference = by_name[PLAIN]
                for name, value in by_name.items():
                    record = stats[threads].get(name, {"mean_macs_exact": reference_macs})
                    runtime, _, setting = name.partition(" | ")
                    row = {"runtime": runtime if setting else "plain", "setting": setting or name,
                           "batch_size": batch_size, "threads": threads, **record,
                           "ms_per_sample": 1000 * value / count,
                           "flops_speedup": reference_macs / record["mean_macs_exact"], "wall_speedup": reference / value}
                    row["wall_over_flops"] = row["wall_speedup"] / row["flops_speedup"]
                    row["wall_over_flops_rounds"] = round_ratios(by_name_rounds[PLAIN], by_name_rounds[name],
                                                                 row["flops_speedup"]) if setting else None
                    own_full = f"{runtime} | full"
                    row["wall_over_flops_vs_own_full"] = (
                        (by_name[own_full] / value) / (stats[threads][own_full]["mean_macs_exact"] / record["mean_macs_exact"])
                        if setting and own_full in by_name else None)
                    rows.append(row)
                    print(_format(row), flush=True)
    finally:
        shutil.rmtree(export_root, ignore_errors=True)
    return {
        "command": "python -m benchmarks.engine_latency " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_record(device, stolen),
        "task": task, "samples": count, "model": model_name,
        "trained": bool(args.run or args.model_dir), "seed": args.seed, "runtimes": runtimes,
        "threads": args.threads, "max_length": args.max_length,
        "decisions_match_eager": all(row["decisions"]["same"] for row in rows if "decisions" in row),
        "rows": rows,
    }


def _statistics(engines: dict[tuple[str, Setting], Any], batches: list[dict], num_steps: int) -> dict[str, dict[str, Any]]:
    """Per ``"runtime | setting"``: mean exact MACs, mean layers run, the exit histogram and, for the
    exported runtimes, the comparison with the eager engine's outputs on the same batches."""
    eager_outputs = {setting: [engine(**batch) for batch in batches]
                     for (runtime, setting), engine in engines.items() if runtime == "eager"}
    result: dict[str, dict[str, Any]] = {}
    for (runtime, setting), engine in engines.items():
        outputs = eager_outputs[setting] if runtime == "eager" else [engine(**batch) for batch in batches]
        rows = sum(len(out.exit_layer) for out in outputs)
        record: dict[str, Any] = {
            "mode": setting.mode, "threshold": setting.threshold,
            "mean_macs_exact": sum(float(out.macs_exact.double().sum()) for out in outputs) / rows,
            "mean_layers_run": sum(float(out.layers_run.sum()) for out in outputs) / rows,
            "exit_layer_histogram": torch.bincount(torch.cat([out.exit_layer - 1 for out in outputs]).cpu(),
                                                   minlength=num_steps).tolist()}
        if runtime != "eager":
            decisions = None
            for expected, got in zip(eager_outputs[setting], outputs, strict=True):
                decisions = _merge(decisions, _compare(expected, got))
            assert decisions is not None
            decisions["same"] = (decisions["same_exit_layer"] == decisions["same_skipped_layers"] == decisions["rows"]
                                 and decisions["logits_allclose"])
            record["decisions"] = decisions
        result[f"{runtime} | {setting.name}"] = record
    return result


def plain_macs(encoder: AdaptiveEncoder, batches: list[dict]) -> float:
    """Mean exact MACs per row of the plain HF classifier (:func:`adaptive_depth.flops.full_model_macs`)."""
    from adaptive_depth.flops import full_model_macs

    lengths = [int(n) for batch in batches for n in batch["attention_mask"].sum(dim=-1).tolist()]
    return statistics.fmean(full_model_macs(encoder.config, n, "exact", encoder.num_labels) for n in lengths)


def _plain_pass(plain: torch.nn.Module, batches: list[dict], before: Any = None) -> Callable[[], float | None]:
    """The plain model over every batch; with ``before`` (an ONNX Runtime engine, on the CPU), each batch
    first goes through ``before`` (untimed) and only the plain model's calls are timed."""
    def run_pass() -> float | None:
        with torch.inference_mode():
            if before is None:
                for batch in batches:
                    plain(**batch)
                return None
            total = 0.0
            for batch in batches:
                before(**batch)
                start = time.perf_counter()
                plain(**batch)
                total += time.perf_counter() - start
            return total

    return run_pass


def _engine_pass(engine: Any, batches: list[dict]) -> Callable[[], None]:
    def run_pass() -> None:
        for batch in batches:
            engine(**batch)

    return run_pass


HEADER = (f"{'runtime':<12} {'setting':<32} {'batch':>5} {'thr':>3} {'MMACs':>7} {'ms/sample':>9} {'FLOPs x':>7} "
          f"{'wall x':>6} {'wall/FLOPs':>10} {'rounds':>9} {'vs own full':>11}  same as eager")


def _format(row: dict) -> str:
    decisions = row.get("decisions")
    own_full = "" if row["wall_over_flops_vs_own_full"] is None else f"{row['wall_over_flops_vs_own_full']:.2f}"
    same = "" if decisions is None else ("yes" if decisions["same"] else
                                         f"NO ({decisions['same_exit_layer']}/{decisions['rows']} exit layers)")
    return (f"{row['runtime']:<12} {row['setting']:<32} {row['batch_size']:>5} {row['threads']:>3} "
            f"{row['mean_macs_exact'] / 1e6:>7.1f} {row['ms_per_sample']:>9.3f} {row['flops_speedup']:>7.2f} "
            f"{row['wall_speedup']:>6.2f} {row['wall_over_flops']:>10.2f} {ratio_range(row['wall_over_flops_rounds']):>9} "
            f"{own_full:>11}  {same}")


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option's help names its default."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="mrpc", help="GLUE task whose dev split is timed (default: mrpc)")
    parser.add_argument("--data-dir", default=None, help="glue_data folder (default: $GLUE_DIR)")
    parser.add_argument("--model-dir", default=None,
                        help="a saved model folder, AdaptiveEncoder.save_pretrained with its tokenizer (default: none)")
    parser.add_argument("--run", default=None,
                        help="a trained smartbert run folder: its model/, else its last checkpoint (default: none)")
    parser.add_argument("--model", default=None,
                        help="HF model folder wrapped with untrained gates and heads (default: all-MiniLM-L6-v2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of untrained gates and heads (default: 0)")
    parser.add_argument("--samples", type=int, default=None, help="dev samples to time, the first ones (default: 256; "
                                                                  "16 with --smoke)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per input after truncation (default: 128; 16 with --smoke)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.6],
                        help="entropy exit thresholds S; batch 1 times all, larger batches every other one "
                             "(default: 0.1 0.3 0.5 0.6)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32], help="batch sizes besides 1 (default: 32)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch (and ONNX Runtime) thread counts, each timed in the same rounds (default: 1 2; "
                             "1 with --smoke)")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES,
                        help="engines to time; onnx needs pip install 'adaptive_depth[export]' (default: all three)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds after one warm-up round; the median is reported (default: 5; 1 with --smoke)")
    parser.add_argument("--device", default="cpu",
                        help="torch device; on cuda only the eager engine runs (default: cpu)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny random model on synthetic token ids, in seconds: checks the script (default: off)")
    parser.add_argument("--output", default=None,
                        help="JSON path (default: a new runs/engine_latency-<task>-<device>-<UTC time>.json)")
    return parser


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    """Parse and check the options; a bad value exits with ``error: ...`` and status 2."""
    parser = build_parser()
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(argv)
    smoke = {"samples": 16, "max_length": 16, "repeats": 1, "threads": [1]} if args.smoke else {
        "samples": 256, "max_length": 128, "repeats": 5, "threads": [1, 2]}
    for name, value in smoke.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("samples", "max_length", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(size < 1 for size in args.batch_sizes):
        parser.error(f"--batch-sizes must all be >= 1, got {args.batch_sizes}")
    # Batch 1 is always timed; a repeated size (or 1 given again) would be timed twice, as two rows.
    args.batch_sizes = [size for size in dict.fromkeys(args.batch_sizes) if size != 1]
    if any(not threshold >= 0 for threshold in args.thresholds):
        parser.error(f"--thresholds must all be >= 0 (entropy thresholds), got {args.thresholds}")
    if any(threads < 1 for threads in args.threads):
        parser.error(f"--threads must all be >= 1, got {args.threads}")
    if sum(source is not None for source in (args.model_dir, args.run, args.model)) > 1:
        parser.error("give one of --model-dir, --run and --model")
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


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m benchmarks.engine_latency``; returns the exit status (2 on a user error, one line)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        for option, folder in (("--model-dir", args.model_dir), ("--run", args.run)):
            if folder is not None and not Path(folder).is_dir():
                raise ValueError(f"{option} {folder} is not a folder")
        output = check_output_path(args.output or default_output("smoke" if args.smoke else args.task, args.device),
                                   create_parents=True)
        print(HEADER, flush=True)
        result = run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    write_json(output, result)
    print(f"\nexported runtimes take the eager engine's decisions on every timed row: {result['decisions_match_eager']}",
          steal_line(result["machine"]["cpu_steal_share"]), f"wrote {output}", sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
