"""What the latency benchmarks share: interleaved timing (CPU wall clock or CUDA events), the
machine record, output paths checked before any work and written atomically, and the tiny random
model and synthetic token batches of their ``--smoke`` runs."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from adaptive_depth.files import write_atomically

__all__ = ["Setting", "StolenTime", "cpu_name", "interleaved_rounds", "interleaved_times", "machine_record", "ratio_range",
           "round_ratios", "settings_for", "smoke_batches", "smoke_encoder", "spread_decisions", "steal_line", "timed",
           "write_json"]

# A pass runs one setting over every batch once; it may return its own timed seconds (for a pass
# that does untimed work between the timed calls), else the whole call is timed.
Pass = Callable[[], "float | None"]


@dataclass(frozen=True)
class Setting:
    """One engine setting: ``mode`` and, for exits, the entropy threshold."""

    name: str
    mode: str
    threshold: float | None = None

    def criterion(self) -> Any:
        """The entropy exit at ``threshold`` (0 for the modes without exits: never exits early)."""
        from adaptive_depth import EntropyExit

        return EntropyExit(self.threshold if self.threshold is not None else 0.0)


def settings_for(thresholds: list[float], has_gates: bool, batch_size: int) -> list[Setting]:
    """full, skip_only (with gates) and exits at each threshold (every other one above batch 1)."""
    exits = thresholds if batch_size == 1 else thresholds[1::2] or thresholds
    mode = "adaptive" if has_gates else "exit_only"
    return [Setting("full", "full"), *([Setting("skip_only", "skip_only")] if has_gates else []),
            *(Setting(f"entropy S={value:g}", mode, value) for value in exits)]


def timed(run_pass: Pass, device: torch.device) -> float:
    """Seconds one pass takes: CUDA events around it on a GPU (the queue drained before and after),
    the wall clock on a CPU; seconds a pass returns itself (a float) win."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        own = run_pass()
        end.record()
        torch.cuda.synchronize(device)
        return own if isinstance(own, float) else start.elapsed_time(end) / 1000
    start_time = time.perf_counter()
    own = run_pass()
    return own if isinstance(own, float) else time.perf_counter() - start_time


def interleaved_rounds(groups: Mapping[int, Mapping[str, Pass]], repeats: int, device: torch.device,
                       warmup: int = 1) -> dict[int, dict[str, list[float]]]:
    """Seconds of each pass in each of ``repeats`` rounds (in round order), after ``warmup`` rounds.

    ``groups`` maps a torch thread count (0: leave it) to its passes. Each round runs every pass of
    every group once, in turn (the thread count set between groups, outside the timings), so drift
    in the machine's speed (other processes, clock changes) falls on all settings alike.
    """
    def set_threads(threads: int) -> None:
        if threads:
            torch.set_num_threads(threads)

    for threads, passes in groups.items():
        set_threads(threads)
        for _ in range(warmup):
            for run_pass in passes.values():
                run_pass()
    times: dict[int, dict[str, list[float]]] = {threads: {name: [] for name in passes} for threads, passes in groups.items()}
    for _ in range(repeats):
        for threads, passes in groups.items():
            set_threads(threads)
            for name, run_pass in passes.items():
                times[threads][name].append(timed(run_pass, device))
    return times


def interleaved_times(groups: Mapping[int, Mapping[str, Pass]], repeats: int, device: torch.device,
                      warmup: int = 1) -> dict[int, dict[str, float]]:
    """Median seconds of each pass over the rounds of :func:`interleaved_rounds`."""
    return {threads: {name: statistics.median(values) for name, values in by_name.items()}
            for threads, by_name in interleaved_rounds(groups, repeats, device, warmup).items()}


def round_ratios(reference: Sequence[float], seconds: Sequence[float], flops_speedup: float) -> list[float]:
    """wall/FLOPs of each round: the reference pass's seconds over this pass's in the same round,
    divided by the FLOPs speed-up. Their range shows how far one run's median can be trusted on a
    noisy machine (the median of a run is the ratio of the passes' median seconds)."""
    return [reference_seconds / own / flops_speedup for reference_seconds, own in zip(reference, seconds)]


def ratio_range(ratios: Sequence[float] | None) -> str:
    """``"lo-hi"`` of per-round ratios for a table (empty for none)."""
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else ""


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_ticks() -> tuple[int, int] | None:
    """``(all, stolen)`` CPU ticks since boot from the ``cpu`` line of /proc/stat (Linux), else ``None``."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already counted in user and nice]
    return (sum(fields[:8]), fields[7]) if len(fields) >= 8 else None


class StolenTime:
    """The share of CPU time the hypervisor gave to other guests (``steal`` in /proc/stat) since creation.

    On a shared virtual machine this is the main source of noise in wall-clock timings, and it hurts
    multi-threaded small operations most (a stolen core stalls the other thread at the join).
    :meth:`share` is ``None`` where /proc/stat is not there (not Linux).
    """

    def __init__(self) -> None:
        self._start = _cpu_ticks()

    def share(self) -> float | None:
        """Stolen ticks over all ticks since creation, in ``[0, 1]``; ``None`` when unknown."""
        end = _cpu_ticks()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        return (end[1] - self._start[1]) / (end[0] - self._start[0])


def steal_line(share: float | None) -> str:
    """The line a benchmark prints about :class:`StolenTime` (above a few percent, timings are noisy)."""
    if share is None:
        return "CPU time stolen by the hypervisor during the run: unknown (no /proc/stat)"
    return f"CPU time stolen by the hypervisor during the run: {100 * share:.1f}% (0 on a dedicated machine)"


def machine_record(device: torch.device, stolen: StolenTime | None = None) -> dict[str, Any]:
    """Where and with what a benchmark ran: device, CPU, cores, load, library versions, the date (UTC),
    and with ``stolen`` the share of CPU time the hypervisor took during the run (``cpu_steal_share``)."""
    return {
        "cpu_steal_share": stolen.share() if stolen is not None else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime"),
        "python": platform.python_version(),
    }


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a temporary file renamed over it)."""
    write_atomically(path, [json.dumps(data, indent=2) + "\n"])


def spread_decisions(encoder: Any, seed: int) -> Any:
    """Give ``encoder``'s random gates and heads weights that skip some layers and exit some rows
    early (an untrained head barely exits, an untrained gate barely skips); returns it in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in encoder.gates:
            gate.score.weight.normal_(0.0, 2.0, generator=generator)
            gate.score.bias.uniform_(-2.0, 2.0, generator=generator)
        for head in encoder.exit_heads:
            head.classifier.weight.normal_(0.0, 3.0, generator=generator)
    return encoder.eval()


def smoke_encoder(num_layers: int = 2, seed: int = 0) -> Any:
    """A tiny random BERT (vocabulary 99, hidden 32) whose random gates skip and heads exit somewhere."""
    from transformers import BertConfig, BertModel

    from adaptive_depth import AdaptiveEncoder

    torch.manual_seed(seed)
    bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                                intermediate_size=37, max_position_embeddings=64))
    return spread_decisions(AdaptiveEncoder(bert, num_labels=2, gate_inner_size=16, head_inner_size=16), seed)


def smoke_batches(samples: int, batch_size: int, max_length: int, device: torch.device,
                  seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random token ids (5..98) of random lengths 4..``max_length``, right-padded per batch."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, max_length + 1, (samples,), generator=generator).tolist()
    batches = []
    for start in range(0, samples, batch_size):
        rows = lengths[start:start + batch_size]
        width = max(rows)
        input_ids = torch.randint(5, 99, (len(rows), width), generator=generator)
        attention_mask = (torch.arange(width)[None, :] < torch.tensor(rows)[:, None]).long()
        batches.append({"input_ids": (input_ids * attention_mask).to(device), "attention_mask": attention_mask.to(device)})
    return batches
