"""``python -m recipes.heldout RUN_DIR [--data-dir DIR] [--output FILE]``: a run's held-out rows as JSON lines.

The recipes hold a seeded, label-stratified part of train out of training (``holdout_fraction``,
``seed``); it chooses the best stage-1 epoch and the operating point. This writes those rows
(``text``, ``text_pair`` for pair tasks, ``label`` as the task's label name or score), read
again from the GLUE folder and checked against the run's data fingerprint, to
``<run>/heldout.jsonl`` by default: the input of ``python -m adaptive_depth.calibrate`` or
``predict``. The rows chose the best epoch, so they are not untouched; rows never used for any
choice are better still for a certificate.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipes.run import errors
from recipes.run.errors import CheckpointError, ConfigError
from recipes.run.folder import HELDOUT_FILE

__all__ = ["heldout_rows", "main"]


def heldout_rows(run_dir: Path, data_dir: str | None = None) -> list[dict[str, Any]]:
    """The held-out rows of the run in ``run_dir``, as ``{"text", "text_pair"?, "label"}`` dicts.

    Raises:
        CheckpointError: no readable ``run.json`` (not a run folder).
        ResumeMismatchError: the data folder's rows are not the ones the run used
            (:func:`recipes.run.trained.checked_rows`).
    """
    from recipes.glue import get_task, holdout_split, resolve_data_dir
    from recipes.run.folder import RUN_FILE, read_run_record
    from recipes.run.method import get_method
    from recipes.run.trained import checked_rows

    record = read_run_record(run_dir)
    try:
        method = get_method(record["recipe"])
        config = method.config_class(**record["config"])
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"cannot read {run_dir / RUN_FILE} ({error}); is {run_dir} a recipe run folder?") from None
    folder = resolve_data_dir(data_dir if data_dir is not None else record.get("data", {}).get("data_dir"))
    examples = checked_rows(run_dir, folder, method, config, record)
    task = get_task(config.task)
    rows = []
    for example in holdout_split(examples[0], config.holdout_fraction, config.seed)[1]:
        row: dict[str, Any] = {"text": example.text_a}
        if example.text_b is not None:
            row["text_pair"] = example.text_b
        row["label"] = task.labels[example.label] if task.labels is not None else example.label
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 on a user error)."""
    from adaptive_depth.files import write_atomically
    from recipes.glue import GlueDataError
    from recipes.run.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m recipes.heldout", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a recipe run folder (with run.json)")
    parser.add_argument("--data-dir", default=None, help="glue_data folder (default: the one the run recorded)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"JSON-lines file (default: RUN_DIR/{HELDOUT_FILE}, removed by the recipe's --overwrite)")
    args = parser.parse_args(argv)
    setup_logging()
    with errors.error_boundary(handled=(GlueDataError,)) as outcome:
        rows = heldout_rows(args.run_dir, args.data_dir)
        output = args.output or args.run_dir / HELDOUT_FILE
        if not output.parent.is_dir():
            raise ConfigError(f"--output {output}: the folder {output.parent} does not exist")
        write_atomically(output, (json.dumps(row) + "\n" for row in rows))
        print(f"{len(rows)} held-out rows: {output}")
    return outcome.status


if __name__ == "__main__":
    sys.exit(main())
