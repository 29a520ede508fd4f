"""A saved model at its operating point against its own full depth and the original fine-tuned model.

For a model folder attached to a fine-tuned classifier (``python -m recipes.attach``, then
perhaps certified by ``python -m adaptive_depth.calibrate``), on labelled rows (e.g. the task's
``dev.tsv``), in one JSON:

- ``operating_point``: the saved criterion, threshold, mode and certificate (if any), the task
  metric there, the disagreement with full depth (share of rows whose answer differs), the
  relative cost (total MACs over total full-depth MACs of the same rows) in both FLOPs
  conventions and its inverse, the FLOPs speed-up;
- ``full_depth``: the task metric of the engine at ``mode="full"``;
- ``original``: with ``--original``, the fine-tuned model's own forward on the same batches: its
  metric, how many rows it predicts differently from full depth and the largest logit difference
  (the claim "full depth is the user's model").

    python -m benchmarks.attach_eval runs/attach-sst2/model --input dev.tsv --label-column label \\
        --original my-finetuned-model --json benchmarks/results/attach/sst2_dev.json
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

from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.exits import predictions_from_logits
from adaptive_depth.files import OutputPathError, check_output_path, write_atomically
from adaptive_depth.measure import measure_rows
from adaptive_depth.metrics import task_metric
from adaptive_depth.predict import InputFileError, add_input_arguments, load_rows_and_pipeline

__all__ = ["evaluate", "main"]


@torch.inference_mode()
def evaluate(pipeline: Any, texts: list[str], pairs: list[str] | None, labels: list[Any], metric: str,
             original: torch.nn.Module | None = None) -> dict[str, Any]:
    """The report described in the module docstring, for ``pipeline``'s engine (its operating point)."""
    encoder = pipeline.encoder
    order, batches = [], []
    for rows, batch in pipeline.batches(texts, pairs, labels):
        order.extend(rows)
        batches.append({key: value.to(pipeline.device) for key, value in batch.items()})
    gold = torch.cat([batch["labels"].cpu() for batch in batches])
    engine = pipeline.engine
    full_engine = AdaptiveInferenceEngine(encoder, engine.criterion, engine.gate_threshold, "full")
    point, full = measure_rows(engine, batches), measure_rows(full_engine, batches)
    num_labels = encoder.adaptive_config.num_labels

    def score(predictions: torch.Tensor) -> float:
        return task_metric(metric, predictions, gold, num_labels)

    config = encoder.adaptive_config
    report: dict[str, Any] = {
        "rows": len(gold), "metric": metric,
        "operating_point": {
            "criterion": config.criterion, "threshold": config.threshold, "mode": engine.mode,
            "gate_threshold": engine.gate_threshold, "certificate": config.certificate,
            "metric": score(point.predictions), "metric_change": score(point.predictions) - score(full.predictions),
            "disagreement_with_full_depth": float((point.predictions != full.predictions).double().mean()),
            "rows_disagreeing": int((point.predictions != full.predictions).sum()),
            "relative_cost_exact": point.relative_cost("exact"), "relative_cost_paper": point.relative_cost("paper"),
            "flops_speedup_exact": 1.0 / point.relative_cost("exact"),
            "flops_speedup_paper": 1.0 / point.relative_cost("paper"),
            "mean_layers_run": float(point.layers_run.double().mean()),
        },
        "full_depth": {"metric": score(full.predictions), "relative_cost_exact": full.relative_cost("exact")},
    }
    if original is not None:
        differences, rows_differing, predictions = 0.0, 0, []
        for batch in batches:
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            mine = full_engine(**inputs).logits.float()
            theirs = original(**inputs).logits.float()
            differences = max(differences, float((mine - theirs).abs().max()))
            rows_differing += int((predictions_from_logits(mine) != predictions_from_logits(theirs)).sum())
            predictions.append(predictions_from_logits(theirs).cpu())  # regression: the scores, not an argmax
        report["original"] = {"metric": score(torch.cat(predictions)), "rows_predicted_differently": rows_differing,
                              "max_abs_logit_difference": differences}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; 2 on a user error (one ``error: ...`` line)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attach_eval", description=__doc__.split("\n")[0])
    add_input_arguments(parser)
    parser.add_argument("--label-column", default="label", help="gold labels (the model's label names or indices)")
    parser.add_argument("--metric", default=None, help="task metric (default: the one the saved model names)")
    parser.add_argument("--original", default=None, help="folder of the fine-tuned *ForSequenceClassification")
    parser.add_argument("--machine", default="", help="a note on the machine (load, threads) for the record")
    parser.add_argument("--json", required=True, help="where to write the report")
    args = parser.parse_args(argv)
    try:
        output = check_output_path(args.json, create_parents=True)  # before the work, not after it
        pipeline, texts, pairs, labels, _ = load_rows_and_pipeline(args, args.label_column)
    except (InputFileError, OutputPathError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    metric = args.metric or pipeline.encoder.adaptive_config.metric or "accuracy"
    original = None
    if args.original:
        from adaptive_depth.classifiers import load_classifier

        original = load_classifier(args.original).to(pipeline.device)
    started = datetime.now(timezone.utc)
    report = evaluate(pipeline, texts, pairs, labels, metric, original)
    report.update(model=str(args.model), input=str(args.input), original_model=args.original,
                  command="python -m benchmarks.attach_eval " + " ".join(sys.argv[1:] if argv is None else argv),
                  date=started.isoformat(timespec="seconds"), torch_threads=torch.get_num_threads(),
                  machine=f"{platform.machine()} {platform.processor() or ''} {args.machine}".strip())
    write_atomically(output, [json.dumps(report, indent=2) + "\n"])
    point = report["operating_point"]
    print(f"{metric}: {point['metric']:.4f} at the operating point (full depth {report['full_depth']['metric']:.4f}); "
          f"disagreement with full depth {point['disagreement_with_full_depth']:.4f}; relative cost (total MACs / "
          f"full-depth MACs) exact {point['relative_cost_exact']:.3f}, paper {point['relative_cost_paper']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
