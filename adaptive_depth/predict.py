"""``python -m adaptive_depth.predict MODEL_DIR --input rows.tsv|rows.jsonl``: classify a file.

Writes one JSON object per input row (its line in the input file, label, score, probabilities, exit
layer, layers run, relative cost and its MACs) to ``--output`` (checked before any work, written atomically) or
stdout, with a progress bar on stderr; on stderr too, the certificate the operating point runs
under (if any) and a summary line: rows, relative cost (total MACs / full-depth MACs of all
rows, exact convention) and, with ``--label-column``, the task's metric saved with the model
(F1 for MRPC...) and accuracy.

Input: a ``.jsonl`` file (one object per line) or a ``.tsv`` file with a header row (read with
``csv.QUOTE_NONE``, as GLUE files must be). For a model that may read pairs, the columns default to
the first known pair the file has (``text``/``text_pair``, ``sentence1``/``sentence2``,
``question1``/``question2``, ``#1 String``/``#2 String``, QNLI's ``question``/``sentence``); otherwise
the text column is the first of ``text, sentence, sentence1, question, question1, #1 String`` that
exists, and a pair column the first of ``text_pair, sentence2, question2, #2 String`` that is not
the text column. So a GLUE ``dev.tsv`` works as is.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from adaptive_depth.files import OutputPathError, check_output_path

__all__ = ["AUTO_BATCH_POSITIONS", "InputFileError", "LoadedRows", "Rows", "add_input_arguments", "auto_batch_size",
           "load_rows_and_pipeline", "main", "read_rows", "show_progress"]

TEXT_COLUMNS = ("text", "sentence", "sentence1", "question", "question1", "#1 String")
PAIR_COLUMNS = ("text_pair", "sentence2", "question2", "#2 String")
# (first text, second text) as the GLUE files and the usual JSON name them; QNLI puts the question first.
KNOWN_PAIRS = (("text", "text_pair"), ("sentence1", "sentence2"), ("question1", "question2"),
               ("#1 String", "#2 String"), ("question", "sentence"))


# Row-positions of one engine call when --batch-size is not given: 256 rows at the MRPC model's 128 tokens,
# where streaming 5,000 SST-2 rows kept all of the FLOPs saving on the 2-core CPU, against 0.89 of it at 32
# rows (docs/benchmarks.md "Streaming"); fewer rows for longer truncation lengths, so memory stays bounded.
AUTO_BATCH_POSITIONS = 32768


def auto_batch_size(max_length: int) -> int:
    """``--batch-size``'s default: as many rows as :data:`AUTO_BATCH_POSITIONS` holds at the truncation
    length ``max_length`` (tokens), at least 32. E.g. 256 at 128 tokens, 64 at 512.

    Example:
        >>> auto_batch_size(128), auto_batch_size(512), auto_batch_size(2048)
        (256, 64, 32)
    """
    return max(32, AUTO_BATCH_POSITIONS // max(1, max_length))


class InputFileError(ValueError):
    """The input file cannot be read as rows of texts."""


class Rows(list):  # type: ignore[type-arg]
    """The rows :func:`read_rows` read (a list of dicts), with ``lines``: the file's line number of each
    (1-based; blank lines hold no row, so the row index and the line differ)."""

    def __init__(self, rows: list[dict[str, Any]], lines: list[int]) -> None:
        super().__init__(rows)
        self.lines = lines


def read_rows(path: str | Path, tsv_header: bool = True) -> Rows:
    """Rows of a ``.jsonl`` or ``.tsv`` file, as dicts keyed by column name, with their line numbers
    (:class:`Rows`).

    Args:
        path: the file.
        tsv_header: whether a ``.tsv`` starts with a header row; without one (CoLA's GLUE files) every
            line is a row and the columns are named ``"column 1"``, ``"column 2"``...

    Raises:
        InputFileError: unknown extension, bad JSON, a row with the wrong number of fields, a
            header naming a column twice, text that is not UTF-8, or no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"input file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".tsv"):
        raise InputFileError(f"input file {path} must end in .jsonl or .tsv, got {suffix or 'no extension'!r}.")
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
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
                    lines.append(number)
            else:
                rows, lines = _tsv_rows(path, handle, tsv_header)
    except UnicodeDecodeError as error:
        raise InputFileError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start} of a read chunk).") from error
    if not rows:
        raise InputFileError(f"{path} holds no rows.")
    return Rows(rows, lines)


def _tsv_rows(path: Path, handle: Any, has_header: bool) -> tuple[list[dict[str, Any]], list[int]]:
    """The rows of a ``.tsv`` and their line numbers (see :func:`read_rows`); fields of any length (the csv
    module stops at 128 KiB by default, a limit it keeps process-wide, so it is raised only while reading)."""
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise InputFileError(f"{path} is empty; a .tsv input needs a header row.")
        rows, lines = [], []
        if not has_header:
            rows.append({f"column {number}": field for number, field in enumerate(header, start=1)})
            lines.append(1)
            header = list(rows[0])
        elif len(set(header)) < len(header):
            twice = sorted({name for name in header if header.count(name) > 1})
            raise InputFileError(f"{path}: the header names the column(s) {twice} twice; rename one.")
        for number, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) != len(header):
                raise InputFileError(f"{path}, line {number}: {len(fields)} tab-separated fields, the "
                                     f"{'header' if has_header else 'first line'} has {len(header)}.")
            rows.append(dict(zip(header, fields)))
            lines.append(number)
        return rows, lines
    except csv.Error as error:
        raise InputFileError(f"{path}, line {reader.line_num}: {error}.") from error
    finally:
        csv.field_size_limit(limit)


def _pick_texts(rows: list[dict[str, Any]], text_asked: str | None, pair_asked: str | None,
                pairs_wanted: bool) -> tuple[str, str | None]:
    """``(text column, pair column or None)``: the ones asked for, else the defaults of the module docstring."""
    columns = list(rows[0])
    for asked, what in ((text_asked, "text"), (pair_asked, "pair")):
        if asked is not None and asked not in columns:
            raise InputFileError(f"--{what}-column {asked!r} is not a column of the input; columns: {columns}.")
    if pairs_wanted and text_asked is None and pair_asked is None:
        known = next(((text, pair) for text, pair in KNOWN_PAIRS if text in columns and pair in columns), None)
        if known is not None:
            return known
    text = text_asked or next((name for name in TEXT_COLUMNS if name in columns and name != pair_asked), None)
    if text is None:
        raise InputFileError(f"no text column found among {columns}; name it with --text-column.")
    pair = pair_asked
    if pair is None and pairs_wanted:
        pair = next((second for first, second in KNOWN_PAIRS if first == text and second in columns),
                    next((name for name in PAIR_COLUMNS if name in columns and name != text), None))
    if pair == text:
        raise InputFileError(f"the text and the pair column are both {text!r}; name the other with --text-column or "
                             "--pair-column.")
    return text, pair


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


def _check_device(device: str) -> None:
    """Refuse a device torch does not know or cannot use here, before anything is loaded."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise InputFileError(f"--device {device!r}: {error}") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputFileError(f"--device {device!r}: this torch has no usable CUDA device; use --device cpu.")


def _column(rows: list[dict[str, Any]], name: str) -> list[str]:
    values = []
    for index, row in enumerate(rows):
        value = row.get(name)
        if not isinstance(value, str):
            raise InputFileError(f"row {index + 1}: column {name!r} is {type(value).__name__}, not text.")
        values.append(value)
    return values


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that say how to read rows and load the model (shared with ``adaptive_depth.calibrate``)."""
    parser.add_argument("model", help="folder written by AdaptiveEncoder.save_pretrained (with its tokenizer)")
    parser.add_argument("--input", required=True, help="rows: .jsonl or .tsv with a header")
    parser.add_argument("--text-column", default=None, help=f"text column (default: first of {', '.join(TEXT_COLUMNS)})")
    parser.add_argument("--pair-column", default=None, help=f"second text (default: first of {', '.join(PAIR_COLUMNS)})")
    parser.add_argument("--allow-single-texts", action="store_true",
                        help="run a pair model (saved text_pair: true) on single texts anyway")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per engine call (the stream's group size); default: 32,768 tokens' worth at the "
                             "model's truncation length, at least 32 (256 at 128 tokens)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the SHA-256 check of the model's files (after a deliberate edit)")


def show_progress(args: argparse.Namespace) -> bool:
    """Whether to show a progress bar: not with ``--no-progress``, nor without tqdm installed."""
    import importlib.util

    return not args.no_progress and importlib.util.find_spec("tqdm") is not None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m adaptive_depth.predict", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_input_arguments(parser)
    parser.add_argument("--output", default=None, help="JSON-lines output file (default: stdout)")
    parser.add_argument("--label-column", default=None,
                        help="gold labels (the model's label names or class indices; scores for regression): print "
                             "the task's metric and accuracy (or the mean absolute error)")
    parser.add_argument("--threshold", type=float, default=None, help="exit threshold (default: the saved one)")
    parser.add_argument("--gate-threshold", type=float, default=None, help="gate threshold (default: the saved one)")
    parser.add_argument("--mode", default=None, choices=("adaptive", "skip_only", "exit_only", "full"),
                        help="engine mode (default: the saved one)")
    return parser.parse_args(argv)


class LoadedRows(NamedTuple):
    """What :func:`load_rows_and_pipeline` read: the pipeline, the texts (and pairs), the gold labels as
    class indices or scores (``None`` without a label column), and each row's line in the input file."""

    pipeline: Any
    texts: list[str]
    pairs: list[str] | None
    labels: list[Any] | None
    lines: list[int]


def load_rows_and_pipeline(args: argparse.Namespace, label_column: str | None) -> LoadedRows:
    """The pipeline and rows the ``add_input_arguments`` arguments name; ``labels`` are mapped to the
    model's class indices (or scores) when ``label_column`` is given.

    Raises:
        InputFileError: unreadable rows or model, missing columns, labels the model does not have,
            a pair model given single texts (without ``--allow-single-texts``).
    """
    from adaptive_depth.config import label_ids
    from adaptive_depth.pipeline import AdaptivePipeline

    if args.batch_size is not None and args.batch_size < 1:
        raise InputFileError(f"--batch-size must be >= 1, got {args.batch_size}.")
    _check_device(args.device)
    rows = read_rows(args.input)
    _pick_texts(rows, args.text_column, args.pair_column, pairs_wanted=True)  # column errors before the model loads
    if label_column is not None:
        label_column = _pick_column(rows, label_column, (), "label", required=False)
        missing = [number for number, row in enumerate(rows, start=1) if label_column not in row]
        if missing:
            raise InputFileError(f"--label-column {label_column!r}: rows {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                                 "have no such field.")
    try:
        pipeline = AdaptivePipeline.from_pretrained(args.model, device=args.device, batch_size=args.batch_size or 32,
                                                    verify=not args.no_verify,
                                                    allow_single_texts=args.allow_single_texts)
    except ValueError as error:  # a damaged adaptive_config.json or weights that do not fit it
        raise InputFileError(f"cannot load the model in {args.model}: {error}") from error
    if args.batch_size is None:
        pipeline.batch_size = auto_batch_size(pipeline.max_length)
    # A model known to read single texts needs no pair column, even if the file has one.
    pairs_wanted = pipeline.encoder.adaptive_config.text_pair is not False
    text_column, pair_column = _pick_texts(rows, args.text_column, args.pair_column, pairs_wanted)
    texts = _column(rows, text_column)
    pairs = _column(rows, pair_column) if pair_column else None
    try:
        pipeline.check_texts(texts, pairs)
    except ValueError as error:
        raise InputFileError(f"{args.input}: {error}") from error
    labels = None
    if label_column is not None:
        try:
            labels = label_ids(pipeline.encoder.adaptive_config, [row[label_column] for row in rows])
        except ValueError as error:
            raise InputFileError(f"--label-column {label_column!r}: {error}") from error
    return LoadedRows(pipeline, texts, pairs, labels, rows.lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 on bad input)."""
    args = parse_args(argv)
    from adaptive_depth.certificate import Certificate
    from adaptive_depth.config import criterion_with_threshold
    from adaptive_depth.files import write_atomically
    from adaptive_depth.pipeline import relative_cost

    try:
        output = check_output_path(args.output) if args.output else None
        pipeline, texts, pairs, labels, row_lines = load_rows_and_pipeline(args, args.label_column)
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
        try:
            certificate = Certificate.from_dict(config.certificate) if config.certificate is not None else None
        except ValueError as error:
            raise InputFileError(f"cannot load the model in {args.model}: its certificate: {error}") from error
    except (InputFileError, OutputPathError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{pipeline!r}: {len(texts)} rows from {args.input}, {pipeline.batch_size} per engine call", file=sys.stderr)
    engine = pipeline.engine
    if certificate is None:
        print("operating point not certified (python -m adaptive_depth.calibrate certifies one)", file=sys.stderr)
    elif certificate.covers(engine.criterion, engine.gate_threshold, engine.mode):
        print(certificate.summary(), file=sys.stderr)
    else:
        print(f"not certified: the saved certificate covers {certificate.criterion}={certificate.threshold:.6g} at gate "
              f"threshold {certificate.gate_threshold:g} in mode {certificate.mode}, not the operating point given here",
              file=sys.stderr)
    predictions = pipeline(texts, pairs, progress=show_progress(args))
    lines = (json.dumps({"line": line, **prediction.to_dict()}) + "\n"
             for line, prediction in zip(row_lines, predictions, strict=True))
    if output is not None:
        try:
            write_atomically(output, lines)
        except OSError as error:  # a full disk, the folder gone read-only...
            print(f"error: cannot write {output} ({error.strerror or error}); nothing was written there.",
                  file=sys.stderr)
            return 2
    else:
        try:
            sys.stdout.writelines(lines)
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader has gone; stop quietly, as command-line tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return 1
    summary = (f"{len(predictions)} rows, relative cost {relative_cost(predictions):.3f} (total MACs / full-depth "
               "MACs, exact convention)")
    if labels is not None:
        summary += ", " + _scores(config, predictions, labels, args.label_column)
    print(summary, file=sys.stderr)
    return 0


def _scores(config: Any, predictions: Sequence[Any], labels: list[Any], column: str) -> str:
    """The task's metric (saved with the model) and accuracy, or for regression the mean absolute error."""
    import torch

    from adaptive_depth.metrics import task_metric

    parts = []
    if config.num_labels == 1:
        scores = torch.tensor([p.score for p in predictions], dtype=torch.float64)
        gold = torch.tensor(labels, dtype=torch.float64)
        if config.metric is not None:
            parts.append(f"{config.metric} {task_metric(config.metric, scores, gold, 1):.4f}")
        parts.append(f"mean absolute error {float((scores - gold).abs().mean()):.4f}")
    else:
        chosen = torch.tensor([p.label_id for p in predictions])
        gold = torch.tensor(labels)
        if config.metric not in (None, "accuracy"):
            parts.append(f"{config.metric} {task_metric(config.metric, chosen, gold, config.num_labels):.4f}")
        parts.append(f"accuracy {task_metric('accuracy', chosen, gold, config.num_labels):.4f}")
    return ", ".join(parts) + f" against {column!r}"


if __name__ == "__main__":
    sys.exit(main())
