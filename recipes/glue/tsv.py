"""GLUE data for the recipes: the task table, a strict TSV reader, tokenization and metrics.

The reader expects the ``glue_data`` layout written by GLUE's ``download_glue_data.py``
(``<data_dir>/SST-2/train.tsv``, ``<data_dir>/MRPC/dev.tsv``, ...) and reads the columns the
way transformers 4.x ``data/processors/glue.py`` did. Files are parsed with
``csv.reader(delimiter="\\t", quoting=csv.QUOTE_NONE)`` in ``utf-8-sig``: quotes are text
(an SST-2 line that starts with ``"`` would otherwise swallow the next line), MRPC's UTF-8
BOM is dropped, and ``"null"`` / ``"NA"`` stay text. A malformed row is an error naming the
file and line, except in QQP, whose official files have rows with stray tabs: those rows are
skipped, as the official processor did, and counted in :attr:`GlueSplit.skipped`.

Label ids are positions in :attr:`GlueTask.labels`; STS-B is a regression task with float
scores in ``[0, 5]``.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / "SST-2").mkdir()
    >>> _ = (root / "SST-2" / "dev.tsv").write_text("sentence\\tlabel\\n\\"a gem \\t1\\nnull \\t0\\n")
    >>> split = read_split(root, "sst-2", "dev")
    >>> [(example.text_a, example.label, example.source) for example in split.examples]
    [('"a gem ', 1, 'SST-2/dev.tsv:2'), ('null ', 0, 'SST-2/dev.tsv:3')]
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from recipes.glue.tasks import GLUE_DIR_ENV, GlueDataError, GlueTask, get_task

logger = logging.getLogger("recipes.glue")


@dataclass(frozen=True)
class GlueExample:
    """One labelled example.

    Attributes:
        text_a: first sentence, as written in the file (no stripping).
        text_b: second sentence, ``None`` for single-sentence tasks.
        label: class id (position in :attr:`GlueTask.labels`) or, for STS-B, a float score.
        source: ``"<Folder>/<file>:<line>"`` with a 1-based line number, or the HF row.
    """

    text_a: str
    text_b: str | None
    label: int | float
    source: str


@dataclass(frozen=True)
class SkippedRow:
    """A row left out while reading (QQP rows with stray tabs, blank lines).

    Attributes:
        source: ``"<Folder>/<file>:<line>"``.
        reason: why it was skipped.
    """

    source: str
    reason: str


@dataclass
class GlueSplit:
    """The examples of one split of one task.

    Attributes:
        task: the task.
        split: ``"train"``, ``"dev"``, ``"dev_matched"``, ...
        path: the file read (``None`` when loaded from the HF hub).
        examples: the examples in file order.
        skipped: rows left out, with their location and reason.
    """

    task: GlueTask
    split: str
    path: Path | None
    examples: list[GlueExample]
    skipped: list[SkippedRow]

    @property
    def skipped_rows(self) -> int:
        """Number of rows left out."""
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.examples)

    def label_counts(self) -> dict[str, int]:
        """Examples per label, keyed by the label as written in the file.

        Raises:
            ValueError: regression task.
        """
        if self.task.labels is None:
            raise ValueError(f"{self.task.name} is a regression task: it has no label counts")
        counts = Counter(int(example.label) for example in self.examples)
        return {label: counts.get(index, 0) for index, label in enumerate(self.task.labels)}


def _layout_hint(task: GlueTask) -> str:
    files = " and ".join(f"<data_dir>/{task.folder}/{split}.tsv" for split in task.splits)
    return (
        f"Expected the glue_data layout written by GLUE's download_glue_data.py: {files}. "
        f"Pass --data-dir or set ${GLUE_DIR_ENV} to the folder that contains {task.folder}/."
    )


def resolve_data_dir(cli_value: str | os.PathLike[str] | None) -> Path:
    """The GLUE data folder: ``--data-dir`` if given, else ``$GLUE_DIR``.

    Args:
        cli_value: the ``--data-dir`` value, or ``None`` when it was not given.

    Returns:
        The folder holding the task folders (``CoLA/``, ``SST-2/``, ...), ``~`` expanded.

    Raises:
        GlueDataError: neither is set, or the path is not an existing folder.
    """
    if cli_value is not None and str(cli_value).strip():
        origin, value = "--data-dir", str(cli_value)
    elif os.environ.get(GLUE_DIR_ENV, "").strip():
        origin, value = f"${GLUE_DIR_ENV}", os.environ[GLUE_DIR_ENV]
    else:
        raise GlueDataError(
            f"No GLUE data folder given: pass --data-dir or set ${GLUE_DIR_ENV}. "
            "The folder must have the glue_data layout written by GLUE's download_glue_data.py "
            "(<data_dir>/SST-2/train.tsv, <data_dir>/MRPC/dev.tsv, ...)."
        )
    path = Path(value).expanduser()
    if not path.exists():
        raise GlueDataError(f"GLUE data folder {path} (from {origin}) does not exist")
    if not path.is_dir():
        raise GlueDataError(f"GLUE data folder {path} (from {origin}) is not a folder")
    return path


def read_split(data_dir: str | os.PathLike[str], task: GlueTask | str, split: str) -> GlueSplit:
    """Read ``<data_dir>/<task folder>/<split>.tsv``.

    Args:
        data_dir: the ``glue_data`` folder (see :func:`resolve_data_dir`).
        task: a :class:`GlueTask` or its name.
        split: one of ``task.splits`` (``"train"``, ``"dev"``; MNLI ``"dev_matched"``, ...).

    Returns:
        The split's examples in file order, and the rows skipped (blank lines; QQP rows
        with the wrong number of columns).

    Raises:
        ValueError: unknown task or split.
        GlueDataError: missing folder or file, a row with the wrong number of columns, a label
            outside the task's labels, an empty sentence, a score that is not a number in
            range; the message names the file and 1-based line.
    """
    task = get_task(task)
    expected_columns = task.num_columns(split)
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise GlueDataError(f"GLUE data folder {data_dir} does not exist. {_layout_hint(task)}")
    folder = data_dir / task.folder
    if not folder.is_dir():
        present = sorted(child.name for child in data_dir.iterdir() if child.is_dir())
        raise GlueDataError(
            f"No {task.folder}/ folder in {data_dir} (it holds: {', '.join(present) or 'no folders'}). "
            f"{_layout_hint(task)}"
        )
    path = folder / f"{split}.tsv"
    if not path.is_file():
        present = sorted(child.name for child in folder.iterdir())
        raise GlueDataError(
            f"Missing file {path} for split {split!r} of {task.folder} "
            f"(the folder holds: {', '.join(present) or 'nothing'}). {_layout_hint(task)}"
        )

    examples: list[GlueExample] = []
    skipped: list[SkippedRow] = []
    short_name = f"{task.folder}/{path.name}"
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            for row in reader:
                line = reader.line_num
                where = f"{path}:{line}"
                if task.has_header and line == 1:
                    if len(row) != expected_columns:
                        raise GlueDataError(
                            f"{where}: header has {len(row)} tab-separated columns, expected "
                            f"{expected_columns} for {task.folder} {split}. Is this the glue_data file?"
                        )
                    if _is_label(task, row[task.columns.label].strip()):  # a data row: reading on would drop it
                        raise GlueDataError(
                            f"{where}: the first line is a data row (label {row[task.columns.label].strip()!r}), not "
                            f"the header {task.folder} files start with. Is this the glue_data file?"
                        )
                    continue
                if not row or row == [""]:
                    skipped.append(SkippedRow(f"{short_name}:{line}", "blank line"))
                    continue
                if len(row) != expected_columns:
                    if task.skip_malformed_rows:
                        skipped.append(
                            SkippedRow(f"{short_name}:{line}", f"{len(row)} columns, expected {expected_columns}")
                        )
                        continue
                    raise GlueDataError(
                        f"{where}: malformed row: expected {expected_columns} tab-separated columns "
                        f"for {task.folder} {split}, got {len(row)}"
                    )
                examples.append(_parse_row(task, row, where, f"{short_name}:{line}"))
    except UnicodeDecodeError as error:
        raise GlueDataError(_non_utf8_message(path)) from error
    if not examples:
        raise GlueDataError(f"{path} has no data rows ({len(skipped)} skipped)")
    if skipped:
        logger.warning(
            "%s: skipped %d row(s), first at %s (%s)", path, len(skipped), skipped[0].source, skipped[0].reason
        )
    return GlueSplit(task=task, split=split, path=path, examples=examples, skipped=skipped)


def _non_utf8_message(path: Path) -> str:
    """Where ``path`` stops being UTF-8: 1-based line, byte column and the bad bytes (the decoder's
    own error counts bytes from the start of a read chunk, not of the file or line)."""
    data = path.read_bytes()
    offset = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    data = data[offset:]
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as error:
            bad = line[error.start:error.end]
            return (f"{path}:{number}: not UTF-8 text (byte {error.start + 1} of the line, {offset + error.start} "
                    f"of the file, is {bad.hex(' ')}); re-save the file as UTF-8")
        offset += len(line) + 1
    return f"{path} is not UTF-8 text; re-save the file as UTF-8"


def _is_label(task: GlueTask, raw: str) -> bool:
    """Whether ``raw`` is one of the task's labels (for regression: a number)."""
    if task.labels is not None:
        return raw in task.labels
    try:
        float(raw)
    except ValueError:
        return False
    return True


def _parse_row(task: GlueTask, row: list[str], where: str, source: str) -> GlueExample:
    columns = task.columns
    text_a = row[columns.text_a]
    if not text_a.strip():
        raise GlueDataError(f"{where}: empty text in column {columns.text_a} (text_a)")
    text_b: str | None = None
    if columns.text_b is not None:
        text_b = row[columns.text_b]
        if not text_b.strip():
            raise GlueDataError(f"{where}: empty text in column {columns.text_b} (text_b)")
    raw_label = row[columns.label].strip()
    label: int | float
    if task.labels is None:
        try:
            label = float(raw_label)
        except ValueError:
            raise GlueDataError(f"{where}: {task.folder} score {raw_label!r} is not a number") from None
        low, high = task.score_range if task.score_range is not None else (-math.inf, math.inf)
        if not low <= label <= high:  # also rejects nan
            raise GlueDataError(f"{where}: {task.folder} score {raw_label!r} is outside [{low:g}, {high:g}]")
    else:
        if raw_label not in task.labels:
            raise GlueDataError(
                f"{where}: label {raw_label!r} is not a {task.folder} label; allowed: {', '.join(task.labels)}"
            )
        label = task.labels.index(raw_label)
    return GlueExample(text_a=text_a, text_b=text_b, label=label, source=source)


# Held-out split for model selection


def holdout_split(
    examples: Sequence[GlueExample], fraction: float, seed: int
) -> tuple[list[GlueExample], list[GlueExample]]:
    """Split examples into a training part and a held-out part, deterministically.

    Classification examples are stratified: each label keeps (up to rounding) its share in
    both parts. Both parts keep the input order.

    Args:
        examples: at least 2 examples.
        fraction: share of the examples held out, in ``(0, 1)``; the held-out size is
            ``round(fraction * len(examples))`` clipped to ``[1, len - 1]``.
        seed: the same seed and input give the same parts.

    Returns:
        ``(train_part, heldout_part)``: disjoint, together every example, neither empty.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1)`` or fewer than 2 examples.

    Example:
        >>> data = [GlueExample(f"s{i}", None, i % 2, f"x:{i}") for i in range(10)]
        >>> train, heldout = holdout_split(data, fraction=0.2, seed=0)
        >>> len(train), len(heldout), sorted(example.label for example in heldout)
        (8, 2, [0, 1])
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    total = len(examples)
    if total < 2:
        raise ValueError(f"holdout_split needs at least 2 examples, got {total}")
    heldout_size = min(max(round(fraction * total), 1), total - 1)

    groups: dict[object, list[int]] = {}
    stratify = all(isinstance(example.label, int) and not isinstance(example.label, bool) for example in examples)
    for index, example in enumerate(examples):
        groups.setdefault(example.label if stratify else None, []).append(index)
    rng = random.Random(seed)
    keys = sorted(groups, key=repr)
    for key in keys:
        rng.shuffle(groups[key])

    # Largest-remainder allocation of heldout_size over the groups, ties broken by the rng.
    quotas = {key: heldout_size * len(groups[key]) / total for key in keys}
    taken = {key: math.floor(quotas[key]) for key in keys}
    tie_breaks = {key: rng.random() for key in keys}
    by_remainder = sorted(keys, key=lambda key: (taken[key] - quotas[key], tie_breaks[key]))
    for key in by_remainder[: heldout_size - sum(taken.values())]:
        taken[key] += 1

    heldout_indices = {index for key in keys for index in groups[key][: taken[key]]}
    train_part = [example for index, example in enumerate(examples) if index not in heldout_indices]
    heldout_part = [example for index, example in enumerate(examples) if index in heldout_indices]
    return train_part, heldout_part
