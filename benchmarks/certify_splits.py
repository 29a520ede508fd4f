"""How often a certified threshold breaks its promise, over random calibration/test splits of real rows.

Given a saved model and labelled rows, the engine runs ONCE on all rows with no row exiting,
recording every exit head's logits, and every threshold of the criterion's grid is replayed from
that record (:mod:`adaptive_depth.replay`; plus one full-depth pass for the reference answers
when gates skipped layers); each row's prediction and MACs are cached. Then, for
``--splits`` seeded random splits (at least 500 for a meaningful rate), the rows are cut into a
calibration part and a test part, and three rules choose a threshold on the calibration part,
from the cached results (no engine re-run):

- ``certified``: :func:`adaptive_depth.certify.select_threshold` (Learn-then-Test, the same
  function ``certify_threshold`` calls), at ``max_risk`` and ``delta``;
- ``point estimate``: the cheapest grid threshold whose calibration risk is at most ``max_risk``;
- ``budget B`` (with ``--budget``): ``calibrate_threshold``'s rule on the grid, the least
  aggressive threshold whose calibration relative cost is at most ``B``.

For each rule it reports the violation rate (the share of splits whose test-part risk exceeds
``max_risk``) with its Monte Carlo 95% interval (Clopper-Pearson), the mean test risk and cost,
and how often nothing was chosen (a refusal deploys nothing, so it is no violation). The test
part is finite, so its risk is itself noisy: a rule whose true risk sits just under
``max_risk`` still shows test-part violations, so this rate may exceed ``delta`` although the
guarantee holds (it bounds the risk on the distribution, not on a finite test set).

``--draw bootstrap`` checks the guarantee itself: the rows are the population, each split draws
its calibration rows from them with replacement (i.i.d. from the population, as the guarantee
assumes), and the "test risk" is the chosen threshold's risk on all rows, the population's true
risk, with no test-set noise. A certified rule's violation rate must then be at most ``delta``
(plus Monte Carlo error).

    python -m benchmarks.certify_splits runs/attach-sst2/model --input dev.tsv --label-column label \\
        --max-risk 0.01 0.02 --delta 0.05 --splits 1000 --json benchmarks/results/certify_splits_sst2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from adaptive_depth.certify import check_risk, default_grid, row_losses, select_threshold
from adaptive_depth.config import criterion_with_threshold
from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.measure import batch_labels, record_rows, reference_predictions, replay_rows
from adaptive_depth.predict import InputFileError, add_input_arguments, load_rows_and_pipeline
from adaptive_depth.pvalues import check_risk_level, upper_confidence_bound

__all__ = ["DRAWS", "GridResults", "draw_bootstrap", "draw_split", "main", "run_grid", "split_rates"]


class GridResults:
    """Per-row results of every grid threshold: ``losses`` ``[G, R]`` in ``[0, 1]``, ``macs``
    ``[G, R]`` and ``full_macs`` ``[R]`` (exact convention), ``thresholds`` ``[G]`` safest first."""

    def __init__(self, thresholds: list[float], losses: torch.Tensor, macs: torch.Tensor, full_macs: torch.Tensor,
                 risk: str) -> None:
        self.thresholds, self.losses, self.macs, self.full_macs, self.risk = thresholds, losses, macs, full_macs, risk

    def risk_of(self, index: int, rows: torch.Tensor) -> float:
        """The risk at grid point ``index`` on ``rows``, in the risk's units (error gap in ``[-1, 1]``)."""
        mean = float(self.losses[index, rows].mean())
        return 2.0 * mean - 1.0 if self.risk == "error_gap" else mean

    def cost_of(self, index: int, rows: torch.Tensor) -> float:
        """Total MACs over total full-depth MACs of ``rows`` at grid point ``index``."""
        return float(self.macs[index, rows].double().sum() / self.full_macs[rows].double().sum())


def run_grid(engine: AdaptiveInferenceEngine, batches: list[dict[str, torch.Tensor]], risk: str,
             tolerance: float | None = None, progress: bool = False) -> GridResults:
    """Every threshold of ``engine``'s default grid on ``batches``, from one recorded engine pass
    replayed per threshold (as ``certify_threshold`` does), plus a full-depth pass when needed."""
    if engine.mode not in ("adaptive", "exit_only"):
        raise ValueError(f"mode {engine.mode!r} never exits early: there is no threshold to certify.")
    labels = check_risk(risk, engine.encoder.num_labels, batch_labels(batches), tolerance)
    recorded = record_rows(engine, batches)
    reference = reference_predictions(engine, batches, recorded)
    grid = default_grid(engine)
    losses, macs = [], []
    for threshold in grid if not progress else _bar(grid):
        rows = replay_rows(recorded, criterion_with_threshold(engine.criterion, threshold))
        losses.append(row_losses(risk, rows.predictions, reference, labels, tolerance))
        macs.append(rows.macs_exact)
    return GridResults(grid, torch.stack(losses), torch.stack(macs), recorded.full_macs_exact.cpu(), risk)


def _bar(grid: list[float]) -> Any:
    from tqdm.auto import tqdm

    return tqdm(grid, desc="thresholds replayed", unit="threshold")


def draw_split(seed: int, split: int, num_rows: int, calibration_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(calibration rows, test rows)`` of split number ``split`` (seeded, disjoint, every row)."""
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + split))
    return order[:calibration_rows], order[calibration_rows:]


def draw_bootstrap(seed: int, split: int, num_rows: int, calibration_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(calibration rows drawn with replacement, every row)`` of split number ``split`` (seeded):
    calibration i.i.d. from the rows as a population, tested against the population itself."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + split)
    return torch.randint(num_rows, (calibration_rows,), generator=generator), torch.arange(num_rows)


DRAWS = {"split": draw_split, "bootstrap": draw_bootstrap}


def _interval(count: int, total: int) -> list[float]:
    """The Clopper-Pearson 95% interval of ``count / total``."""
    upper = upper_confidence_bound(count / total, total, 0.025)
    lower = 1.0 - upper_confidence_bound((total - count) / total, total, 0.025)
    return [lower, upper]


def choose(grid: GridResults, calibration: torch.Tensor, *, max_risk: float, delta: float,
           budget: float | None = None) -> dict[str, int | None]:
    """The grid index each rule chooses on the ``calibration`` rows (``None``: nothing chosen)."""
    rows = len(calibration)
    sums = grid.losses[:, calibration].sum(dim=1).tolist()
    costs = (grid.macs[:, calibration].double().sum(dim=1) / grid.full_macs[calibration].double().sum()).tolist()
    indices = range(len(grid.thresholds))
    chosen = {"certified": select_threshold(grid.thresholds, sums.__getitem__, costs.__getitem__, rows,
                                            risk=grid.risk, max_risk=max_risk, delta=delta).index}
    measured = [value / rows if grid.risk != "error_gap" else 2.0 * value / rows - 1.0 for value in sums]
    within = [index for index in indices if measured[index] <= max_risk]
    chosen["point estimate"] = min(within, key=lambda index: (costs[index], index)) if within else None
    if budget is not None:
        chosen[f"budget {budget:g}"] = next((index for index in indices if costs[index] <= budget), None)
    return chosen


def split_rates(grid: GridResults, *, max_risk: float, delta: float, splits: int, calibration_fraction: float,
                seed: int, budget: float | None = None, draw: str = "split") -> list[dict[str, Any]]:
    """One row per rule: violation rate (test risk > ``max_risk``) with its 95% interval, refusals,
    mean test risk and cost over the ``splits`` random splits (``draw``: a key of :data:`DRAWS`)."""
    num_rows = grid.losses.shape[1]
    calibration_rows = round(calibration_fraction * num_rows)
    if not 0 < calibration_rows < num_rows:
        raise ValueError(f"--calibration-fraction {calibration_fraction} leaves no calibration or no test row of "
                         f"{num_rows}.")
    outcomes: dict[str, list[int | None]] = {}
    tests = []
    for split in range(splits):
        calibration, test = DRAWS[draw](seed, split, num_rows, calibration_rows)
        for rule, index in choose(grid, calibration, max_risk=max_risk, delta=delta, budget=budget).items():
            outcomes.setdefault(rule, []).append(index)
        tests.append(test)
    rows = []
    for rule, chosen in outcomes.items():
        deployed = [(index, test) for index, test in zip(chosen, tests) if index is not None]
        risks = [grid.risk_of(index, test) for index, test in deployed]
        violations = sum(value > max_risk for value in risks)
        rows.append({
            "rule": rule, "draw": draw, "max_risk": max_risk, "delta": delta, "splits": splits, "refused": splits - len(deployed),
            "violations": violations, "violation_rate": violations / splits,
            "violation_rate_95": _interval(violations, splits),
            "mean_test_risk": sum(risks) / len(risks) if risks else None,
            "mean_test_relative_cost": (sum(grid.cost_of(index, test) for index, test in deployed) / len(deployed)
                                        if deployed else None),
        })
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`split_rates` rows."""
    lines = ["| rule | max risk | delta | violation rate [95% MC] | refused | mean test risk | mean test cost |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        low, high = row["violation_rate_95"]
        risk = "-" if row["mean_test_risk"] is None else f"{row['mean_test_risk']:.4f}"
        cost = "-" if row["mean_test_relative_cost"] is None else f"{row['mean_test_relative_cost']:.3f}"
        lines.append(f"| {row['rule']} | {row['max_risk']:g} | {row['delta']:g} | {row['violation_rate']:.3f} "
                     f"[{low:.3f}, {high:.3f}] | {row['refused']}/{row['splits']} | {risk} | {cost} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.certify_splits", description=__doc__.split("\n")[0])
    add_input_arguments(parser)
    parser.add_argument("--label-column", default=None, help="gold labels (needed for --risk error_gap)")
    parser.add_argument("--risk", choices=("disagreement", "error_gap", "moved"), default="disagreement")
    parser.add_argument("--tolerance", type=float, default=None, help="for --risk moved (score units)")
    parser.add_argument("--max-risk", type=float, nargs="+", default=[0.01, 0.02], help="risk levels to certify")
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--splits", type=int, default=1000, help="random splits (>= 500 for a meaningful rate)")
    parser.add_argument("--calibration-fraction", type=float, default=0.5, help="share of rows that calibrate")
    parser.add_argument("--draw", choices=tuple(DRAWS), default="split",
                        help="split: disjoint calibration/test parts; bootstrap: calibration drawn with replacement, "
                             "tested against all rows (the population's true risk)")
    parser.add_argument("--budget", type=float, default=None, help="also the budget rule at this relative cost")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True, help="where to write the results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.certify_splits``; returns the exit status (2 on a user error)."""
    from adaptive_depth.measure import check_budget
    from adaptive_depth.files import check_output_path
    from adaptive_depth.predict import show_progress

    args = parse_args(argv)
    try:
        for value in args.max_risk:
            check_risk_level(value, "--max-risk")
        check_risk_level(args.delta, "--delta")
        if args.budget is not None:
            check_budget(args.budget)
        if args.splits < 1:
            raise InputFileError(f"--splits must be >= 1 (500 or more for a meaningful rate), got {args.splits}.")
        output = check_output_path(args.json)
        pipeline, texts, pairs, labels, _ = load_rows_and_pipeline(args, args.label_column)
        batches = [inputs for _, inputs in pipeline.batches(texts, pairs, labels)]
        grid = run_grid(pipeline.engine, batches, args.risk, args.tolerance, show_progress(args))
        rows = [row for max_risk in args.max_risk
                for row in split_rates(grid, max_risk=max_risk, delta=args.delta, splits=args.splits,
                                       calibration_fraction=args.calibration_fraction, seed=args.seed,
                                       budget=args.budget, draw=args.draw)]
    except (InputFileError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    record = {
        "command": "python -m benchmarks.certify_splits " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": args.device},
        "model": str(args.model), "input": str(args.input), "rows": grid.losses.shape[1], "risk": args.risk,
        "grid": grid.thresholds, "calibration_fraction": args.calibration_fraction, "draw": args.draw, "seed": args.seed,
        "results": rows,
    }
    output.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(format_rows(rows))
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
