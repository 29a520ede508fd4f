"""Every exit head of finished runs, scored alone on dev: how good is each layer's answer?

A calibrated operating point mixes heads: at a 33% budget on a six-layer model most rows leave
at heads 1 and 2. When one method beats another there, the first question is whether its early
heads are simply better. This scores each head ``k`` as if every dev row exited there, with every
layer before it running (no gate skips, no exit): the task's metrics of head ``k``, and how often
it agrees with the run's last head (the full-depth answer the heads were distilled from).

    python -m benchmarks.heads --data-dir ../shared/data/glue \\
        --run smartbert=runs/i13f/rte-s42/smartbert --run fastbert=runs/i13e/fb-rte-s42/fastbert \\
        --json runs/heads-rte-seed42.json

Several ``--run`` of one method (e.g. one per seed) are allowed as ``METHOD=FOLDER`` repeated;
the JSON keeps each run under its folder. The rows are the run's own dev rows, checked against the
data it was trained on, tokenized as it was.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from adaptive_depth.exits import predictions_from_logits
from recipes.run import errors
from recipes.run.errors import ConfigError
from recipes.run.logs import setup_logging

__all__ = ["head_scores", "main"]


def head_scores(method_name: str, run_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Dev metrics of each exit head of one finished run, every row exiting at that head.

    Args:
        method_name: the run's method (a recipe with exit heads, e.g. ``smartbert``, ``fastbert``).
        run_dir: the finished run folder.
        data_dir: the ``glue_data`` folder it was trained on.

    Returns:
        ``{"method", "run", "task", "seed", "main_metric", "num_rows", "heads"}``; ``heads[k]``
        (``k = 0..L-1``, head ``k + 1``) is ``{"layer", "metrics", "agreement_with_last"}``
        (agreement: share of rows whose predicted class equals the last head's; for regression,
        the mean absolute difference of the scores instead, ``mean_abs_difference_to_last``).

    Raises:
        ConfigError: a method without early exit (its intermediate heads are untrained).
        CheckpointError, ResumeMismatchError: not a finished run of ``method_name``, or
            ``data_dir`` holds other rows than the run's.
    """
    from recipes.glue import GlueMetrics
    from recipes.run.operating_point import first_exit_setting
    from recipes.run.trained import load_trained_run

    run = load_trained_run(method_name, run_dir, data_dir)
    encoder, config, task = run.encoder, run.config, run.task
    if first_exit_setting(run.method.sweep_settings(config, task, encoder.num_steps)) is None:
        raise ConfigError(f"{method_name} has no early exit (its intermediate heads are never trained), so there is "
                          "no head to score but the last; score a method with exits (smartbert, fastbert, deebert, "
                          "pabee)")
    dev = run.batches(run.examples[1])
    steps = encoder.num_steps
    metrics = [GlueMetrics(task) for _ in range(steps)]
    agreement = torch.zeros(steps, dtype=torch.float64)
    rows = 0
    encoder.eval()
    with torch.inference_mode():
        for batch in dev:
            inputs = {key: value for key, value in batch.items() if key == "token_type_ids"}
            out = encoder(batch["input_ids"], batch["attention_mask"], gate_mode="run", heads="all", **inputs)
            last = out.exit_logits[-1]
            for index, logits in enumerate(out.exit_logits):
                predictions, last_predictions = predictions_from_logits(logits), predictions_from_logits(last)
                metrics[index].update(predictions, batch["labels"])
                if task.is_regression:
                    agreement[index] += float((predictions - last_predictions).abs().double().sum())
                else:
                    agreement[index] += float((predictions == last_predictions).double().sum())
            rows += len(batch["input_ids"])
    key = "mean_abs_difference_to_last" if task.is_regression else "agreement_with_last"
    heads = [{"layer": index + 1, "metrics": {name: float(value) for name, value in metrics[index].compute().items()},
              key: float(agreement[index]) / rows} for index in range(steps)]
    return {"method": method_name, "run": str(run_dir), "task": task.name, "seed": config.seed,
            "main_metric": task.main_metric, "num_rows": rows, "heads": heads}


def format_heads(scores: list[dict[str, Any]]) -> str:
    """Markdown: one row per run, the main metric (%) of each head."""
    steps = max(len(score["heads"]) for score in scores)
    lines = ["| method | seed | task | " + " | ".join(f"head {k}" for k in range(1, steps + 1)) + " |",
             "|" + "---|" * (steps + 3)]
    for score in scores:
        values = [f"{100 * head['metrics'][score['main_metric']]:.2f}" for head in score["heads"]]
        lines.append(f"| {score['method']} | {score['seed']} | {score['task']} ({score['main_metric']}) | "
                     + " | ".join(values) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.heads", description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", default=[], metavar="METHOD=FOLDER",
                        help="a finished run folder of METHOD (repeatable, also for several runs of one method)")
    parser.add_argument("--data-dir", default=None, help="glue_data folder the runs were trained on (default: $GLUE_DIR)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", required=True, help="where to write the scores")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.heads``; returns the exit status (2 on a user error)."""
    from adaptive_depth.backbones import UnsupportedModelError
    from adaptive_depth.files import OutputPathError, check_output_path
    from benchmarks.comparison import parse_run
    from recipes.glue import GlueDataError, resolve_data_dir
    from recipes.run.method import get_method

    setup_logging()
    args = parse_args(argv)
    with errors.error_boundary(handled=(GlueDataError, UnsupportedModelError, OutputPathError)) as outcome, \
            errors.catch_signals():
        output = check_output_path(args.json, create_parents=True)  # before any work
        runs = [parse_run(argument) for argument in args.run]
        if not runs:
            raise ConfigError("nothing to score: give --run METHOD=FOLDER (repeatable)")
        for method, _ in runs:
            get_method(method)
        data_dir = resolve_data_dir(args.data_dir)
        if args.threads:
            torch.set_num_threads(args.threads)
        scores = [head_scores(method, folder, data_dir) for method, folder in runs]
        output.write_text(json.dumps({"runs": scores}, indent=1) + "\n", encoding="utf-8")
        print(format_heads(scores))
        print(f"scores: {output}")
    return outcome.status


if __name__ == "__main__":
    sys.exit(main())
