"""``python -m adaptive_depth.predict MODEL_DIR --input rows.tsv|rows.jsonl``: classify a file.

Writes one JSON object per input row (label, score, probabilities, exit layer, layers run,
relative cost) to ``--output`` or stdout, with a progress bar on stderr, and a summary line
(rows, mean relative cost, accuracy when ``--label-column`` is given) on stderr.

Input: a ``.jsonl`` file (one object per line) or a ``.tsv`` file with a header row (read with
``csv.QUOTE_NONE``, as GLUE files must be). The text column defaults to the first of
``text, sentence, sentence1, question, question1, #1 String`` that exists; the pair column to
the first of ``text_pair, sentence2, question2, #2 String``. So a GLUE ``dev.tsv`` works as is.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["InputFileError", "main", "read_rows"]

TEXT_COLUMNS = ("text", "sentence", "sentence1", "question", "question1", "#1 String")
PAIR_COLUMNS = ("text_pair", "sentence2", "question2", "#2 String")


class InputFileError(ValueError):
    """The input file cannot be read as rows of texts."""


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` or header-first ``.tsv`` file, as dicts keyed by column name.

    Raises:
        InputFileError: unknown extension, bad JSON, a row with the wrong number of fields,
            text that is not UTF-8, or no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"input file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".tsv"):
        raise InputFileError(f"input file {path} must end in .jsonl or .tsv, got {suffix or 'no extension'!r}.")
    rows: list[dict[str, Any]] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if suffix == ".jsonl":
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise InputFileError(f"{path}, line {number}: not JSON ({error.msg}).") from error
                    if not isinstance(row, dict):
                        raise InputFileError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}.")
                    rows.append(row)
            else:
                reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
                header = next(reader, None)
                if header is None:
                    raise InputFileError(f"{path} is empty; a .tsv input needs a header row.")
                for number, fields in enumerate(reader, start=2):
                    if not fields:
                        continue
                    if len(fields) != len(header):
                        raise InputFileError(
                            f"{path}, line {number}: {len(fields)} tab-separated fields, the header has {len(header)}."
                        )
                    rows.append(dict(zip(header, fields)))
    except UnicodeDecodeError as error:
        raise InputFileError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start} of a read chunk).") from error
    if not rows:
        raise InputFileError(f"{path} holds no rows.")
    return rows


def _pick_column(rows: list[dict[str, Any]], asked: str | None, defaults: Sequence[str], what: str,
                 required: bool) -> str | None:
    columns = list(rows[0])
    if asked is not None:
        if asked not in columns:
            raise InputFileError(f"--{what}-column {asked!r} is not a column of the input; columns: {columns}.")
        return asked
    found = next((name for name in defaults if name in columns), None)
    if found is None and required:
        raise InputFileError(f"no text column found among {columns}; name it with --{what}-column.")
    return found


def _column(rows: list[dict[str, Any]], name: str) -> list[str]:
    values = []
    for index, row in enumerate(rows):
        value = row.get(name)
        if not isinstance(value, str):
            raise InputFileError(f"row {index + 1}: column {name!r} is {type(value).__name__}, not text.")
        values.append(value)
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m adaptive_depth.predict", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", help="folder written by AdaptiveEncoder.save_pretrained (with its tokenizer)")
    parser.add_argument("--input", required=True, help="rows to classify: .jsonl or .tsv with a header")
    parser.add_argument("--output", default=None, help="JSON-lines output file (default: stdout)")
    parser.add_argument("--text-column", default=None, help=f"text column (default: first of {', '.join(TEXT_COLUMNS)})")
    parser.add_argument("--pair-column", default=None, help=f"second text (default: first of {', '.join(PAIR_COLUMNS)})")
    parser.add_argument("--label-column", default=None, help="gold labels: print accuracy (or mean abs. error)")
    parser.add_argument("--threshold", type=float, default=None, help="exit threshold (default: the saved one)")
    parser.add_argument("--gate-threshold", type=float, default=None, help="gate threshold (default: the saved one)")
    parser.add_argument("--mode", default=None, choices=("adaptive", "skip_only", "exit_only", "full"),
                        help="engine mode (default: the saved one)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per engine call")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the SHA-256 check of the model's files (after a deliberate edit)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 on bad input)."""
    args = parse_args(argv)
    from adaptive_depth.config import criterion_with_threshold
    from adaptive_depth.pipeline import AdaptivePipeline

    try:
        if args.batch_size < 1:
            raise InputFileError(f"--batch-size must be >= 1, got {args.batch_size}.")
        rows = read_rows(args.input)
        text_column = _pick_column(rows, args.text_column, TEXT_COLUMNS, "text", required=True)
        pair_column = _pick_column(rows, args.pair_column, PAIR_COLUMNS, "pair", required=False)
        label_column = _pick_column(rows, args.label_column, (), "label", required=False) if args.label_column else None
        texts = _column(rows, text_column)  # type: ignore[arg-type]
        pairs = _column(rows, pair_column) if pair_column else None
        try:
            pipeline = AdaptivePipeline.from_pretrained(args.model, device=args.device, batch_size=args.batch_size,
                                                        verify=not args.no_verify)
        except ValueError as error:  # a damaged adaptive_config.json or weights that do not fit it
            raise InputFileError(f"cannot load the model in {args.model}: {error}") from error
        config = pipeline.encoder.adaptive_config
        if args.threshold is not None:
            try:
                pipeline.engine.criterion = criterion_with_threshold(config.make_criterion(), args.threshold)
            except ValueError as error:
                raise InputFileError(f"--threshold {args.threshold}: {error}") from error
        if args.gate_threshold is not None:
            try:
                pipeline.engine.gate_threshold = args.gate_threshold
            except ValueError as error:
                raise InputFileError(f"--gate-threshold: {error}") from error
        if args.mode is not None:
            if args.mode in ("adaptive", "skip_only") and not pipeline.encoder.has_gates:
                raise InputFileError(f"--mode {args.mode} needs skip gates; this model has none.")
            pipeline.engine.mode = args.mode
    except (InputFileError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{pipeline!r}: {len(texts)} rows from {args.input}", file=sys.stderr)
    predictions = pipeline(texts, pairs, progress=not args.no_progress)
    output = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for prediction in predictions:
            output.write(json.dumps(prediction.to_dict()) + "\n")
    finally:
        if args.output:
            output.close()
    cost = sum(p.relative_cost for p in predictions) / len(predictions)
    summary = f"{len(predictions)} rows, mean relative cost {cost:.3f} (exact convention)"
    if label_column is not None:
        gold = [row[label_column] for row in rows]
        if pipeline.encoder.num_labels == 1:
            error = sum(abs(p.score - float(g)) for p, g in zip(predictions, gold)) / len(gold)
            summary += f", mean absolute error {error:.4f}"
        else:
            correct = sum(str(p.label) == str(g) for p, g in zip(predictions, gold))
            summary += f", accuracy {correct / len(gold):.4f} against {label_column!r}"
    print(summary, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
