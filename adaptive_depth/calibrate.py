"""``python -m adaptive_depth.calibrate MODEL_DIR --input rows.jsonl|tsv --max-disagreement 0.01 --delta 0.05``:
certify a saved model's operating point on held-out rows and store it in the model folder.

Runs :func:`adaptive_depth.certify.certify_threshold` on the rows (read as ``predict`` reads
them: the same column picking) with the model's saved criterion, gate threshold and mode, and
writes the certified threshold and its certificate into the folder's ``adaptive_config.json``,
atomically (a temporary file renamed over it), and its new SHA-256 into the folder's manifest. From then on ``AdaptivePipeline`` and
``python -m adaptive_depth.predict`` run at the certified point, and ``predict`` prints the
certificate. Nothing is written when no threshold can be certified: the message says what is
achievable (a larger ``--max-risk``, more rows).

The rows must not have been used to train or choose anything (for a recipe run,
``python -m recipes.heldout RUN_DIR`` writes the held-out part of train, which chose only the
best stage-1 epoch), and must come from the distribution the model will serve.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adaptive_depth.model_folder import ModelFolderError
from adaptive_depth.predict import InputFileError, add_input_arguments, load_rows_and_pipeline, show_progress

__all__ = ["main"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m adaptive_depth.calibrate", description=__doc__.split("\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_input_arguments(parser)
    parser.add_argument("--max-risk", "--max-disagreement", dest="max_risk", type=float, default=0.01,
                        help="the risk to certify, in (0, 1): e.g. at most 1%% of answers differ from full depth")
    parser.add_argument("--delta", type=float, default=0.05,
                        help="allowed probability, in (0, 1), that the certificate is wrong")
    parser.add_argument("--risk", choices=("disagreement", "error_gap", "moved"), default=None,
                        help="disagreement with full depth (classification, no labels needed), error_gap (error rate "
                             "minus the full-depth one: needs --label-column), moved (regression: a score moving by "
                             "more than --tolerance); default: disagreement, or moved for regression")
    parser.add_argument("--tolerance", type=float, default=None, help="for --risk moved: score units, > 0")
    parser.add_argument("--max-relative-cost", type=float, default=None,
                        help="budget in (0, 1]: among the certified thresholds costing at most this (total MACs / "
                             "full-depth MACs), keep the one with the lowest risk bound")
    parser.add_argument("--convention", choices=("exact", "paper"), default="exact", help="FLOPs convention of costs")
    parser.add_argument("--label-column", default=None,
                        help="gold labels (the model's label names or class indices), for --risk error_gap")
    return parser.parse_args(argv)


def _rewrite_config(config: Any, path: Path, verify: bool) -> None:
    """Write ``config`` over ``path`` atomically and record its new digest in the folder's manifest.

    With ``verify`` the folder is checked against its manifest again first (nothing else may have
    changed since it was loaded), so the new manifest blesses only the new config. Without it
    (``--no-verify``), the manifest is left as it was: the folder then loads with ``--no-verify``
    only, as before. A crash between the two writes leaves a config the manifest does not know:
    run the command again, or load with ``--no-verify``.
    """
    from adaptive_depth.model_folder import MANIFEST_NAME, verify_model_folder, write_manifest

    folder = path.parent
    has_manifest = (folder / MANIFEST_NAME).is_file()
    if verify and has_manifest:
        verify_model_folder(folder)
    config.save(path)
    if verify and has_manifest:
        write_manifest(folder)
    elif has_manifest:
        print(f"note: --no-verify: {MANIFEST_NAME} was left as it was, so the folder loads with --no-verify only",
              file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 on bad input or an impossible request)."""
    args = parse_args(argv)
    from adaptive_depth.pvalues import check_risk_level
    from adaptive_depth.measure import check_budget
    from adaptive_depth.pretrained import ADAPTIVE_CONFIG_NAME
    from adaptive_depth.files import check_output_path

    try:
        check_risk_level(args.max_risk, "--max-risk")
        check_risk_level(args.delta, "--delta")
        if args.max_relative_cost is not None:
            check_budget(args.max_relative_cost)
        if args.risk == "error_gap" and args.label_column is None:
            raise InputFileError("--risk error_gap compares error rates: name the gold labels with --label-column.")
        if args.risk != "error_gap" and args.label_column is not None:
            raise InputFileError(f"--label-column is used by --risk error_gap only, not {args.risk or 'the default'}.")
        config_path = Path(args.model) / ADAPTIVE_CONFIG_NAME
        if config_path.is_file():  # a local model folder: it must be writable before any work
            check_output_path(config_path)
        else:
            raise InputFileError(f"{args.model} is not a local folder holding a saved adaptive model "
                                 f"(no {ADAPTIVE_CONFIG_NAME}); calibrate writes its certificate there.")
        pipeline, texts, pairs, labels, _ = load_rows_and_pipeline(args, args.label_column)
    except (InputFileError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    regression = pipeline.encoder.num_labels == 1
    risk = args.risk or ("moved" if regression else "disagreement")
    print(f"{pipeline!r}: certifying {risk} <= {args.max_risk:g} with probability >= {1 - args.delta:g} on "
          f"{len(texts)} rows from {args.input}", file=sys.stderr)
    try:
        certificate = pipeline.certify(texts, pairs, labels=labels, max_risk=args.max_risk, delta=args.delta,
                                       risk=risk, max_relative_cost=args.max_relative_cost, tolerance=args.tolerance,
                                       convention=args.convention, progress=show_progress(args))
    except ValueError as error:  # an impossible request (what is achievable is in the message) or a bad argument
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        _rewrite_config(pipeline.encoder.adaptive_config, config_path, verify=not args.no_verify)
    except (OSError, ModelFolderError) as error:
        print(f"error: cannot write {config_path} ({getattr(error, 'strerror', None) or error}); the model folder "
              "is unchanged.", file=sys.stderr)
        return 2
    print(certificate.statement())
    print(certificate.summary())
    print(f"wrote {certificate.criterion}={certificate.threshold:.6g} (gate threshold {certificate.gate_threshold:g}, "
          f"mode {certificate.mode}) and its certificate to {config_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
