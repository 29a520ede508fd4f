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
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

if TYPE_CHECKING:
    import torchmetrics
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TASKS",
    "ColumnLayout",
    "EncodedDataset",
    "EncodedSplit",
    "GlueDataError",
    "GlueExample",
    "GlueMetrics",
    "GlueSplit",
    "GlueTask",
    "SkippedRow",
    "collate",
    "encode_examples",
    "get_task",
    "holdout_split",
    "load_hf_split",
    "matthews_corrcoef",
    "read_split",
    "resolve_data_dir",
]

logger = logging.getLogger(__name__)

GLUE_DIR_ENV = "GLUE_DIR"


class GlueDataError(ValueError):
    """GLUE data is missing or not in the expected format; the message says what and where."""


# --------------------------------------------------------------------------------------
# Task table
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnLayout:
    """Where the fields of one example sit in a row of a GLUE TSV file.

    Attributes:
        text_a: column of the first sentence.
        text_b: column of the second sentence, ``None`` for single-sentence tasks.
        label: column of the label or score; negative values count from the end of the row.
    """

    text_a: int
    text_b: int | None
    label: int


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task in the ``glue_data`` layout.

    Attributes:
        name: lowercase key in :data:`TASKS` (``"sst2"``, ``"stsb"``, ...).
        folder: folder name in ``glue_data`` (``"SST-2"``).
        columns: column layout, the same for the train and dev files.
        split_columns: ``(split, number of tab-separated columns)`` for every split this
            module reads; the split's file is ``<folder>/<split>.tsv``.
        has_header: whether the files start with a header line (all but CoLA).
        labels: labels as written in the files, in label-id order; ``None`` for regression.
        metrics: names of the metrics reported by :class:`GlueMetrics`.
        main_metric: the metric used for model selection.
        skip_malformed_rows: skip rows with the wrong number of columns and count them instead
            of raising (QQP only, whose official files have rows with stray tabs).
        score_range: ``(low, high)`` allowed scores for regression tasks.
    """

    name: str
    folder: str
    columns: ColumnLayout
    split_columns: tuple[tuple[str, int], ...]
    has_header: bool
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    skip_malformed_rows: bool = False
    score_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.main_metric not in self.metrics:
            raise ValueError(f"{self.name}: main_metric {self.main_metric!r} is not in metrics {self.metrics}")
        if (self.labels is None) != (self.score_range is not None):
            raise ValueError(f"{self.name}: give labels for classification or score_range for regression")

    @property
    def is_regression(self) -> bool:
        """Whether labels are float scores (STS-B) rather than class ids."""
        return self.labels is None

    @property
    def num_labels(self) -> int:
        """Number of classes, 1 for regression (the width of a classifier's output)."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_pair(self) -> bool:
        """Whether examples have a second sentence."""
        return self.columns.text_b is not None

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split this module can read, train first (``("train", "dev")`` for most)."""
        return tuple(split for split, _ in self.split_columns)

    @property
    def dev_splits(self) -> tuple[str, ...]:
        """The labelled evaluation splits (MNLI has ``dev_matched`` and ``dev_mismatched``)."""
        return tuple(split for split in self.splits if split != "train")

    def num_columns(self, split: str) -> int:
        """Number of tab-separated columns of every row of ``split``'s file.

        Raises:
            ValueError: ``split`` is not one of :attr:`splits`.
        """
        for name, count in self.split_columns:
            if name == split:
                return count
        raise ValueError(f"GLUE task {self.name!r} has no split {split!r}; its splits are {', '.join(self.splits)}")


_BINARY = ("0", "1")
_NLI_BINARY = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            name="cola", folder="CoLA", columns=ColumnLayout(text_a=3, text_b=None, label=1),
            split_columns=(("train", 4), ("dev", 4)), has_header=False, labels=_BINARY,
            metrics=("mcc", "accuracy"), main_metric="mcc",
        ),
        GlueTask(
            name="sst2", folder="SST-2", columns=ColumnLayout(text_a=0, text_b=None, label=1),
            split_columns=(("train", 2), ("dev", 2)), has_header=True, labels=_BINARY,
            metrics=("accuracy",), main_metric="accuracy",
        ),
        GlueTask(
            name="mrpc", folder="MRPC", columns=ColumnLayout(text_a=3, text_b=4, label=0),
            split_columns=(("train", 5), ("dev", 5)), has_header=True, labels=_BINARY,
            metrics=("accuracy", "f1"), main_metric="f1",
        ),
        GlueTask(
            name="stsb", folder="STS-B", columns=ColumnLayout(text_a=7, text_b=8, label=-1),
            split_columns=(("train", 10), ("dev", 10)), has_header=True, labels=None,
            metrics=("pearson", "spearman"), main_metric="pearson", score_range=(0.0, 5.0),
        ),
        GlueTask(
            name="qqp", folder="QQP", columns=ColumnLayout(text_a=3, text_b=4, label=5),
            split_columns=(("train", 6), ("dev", 6)), has_header=True, labels=_BINARY,
            metrics=("accuracy", "f1"), main_metric="f1", skip_malformed_rows=True,
        ),
        GlueTask(
            name="mnli", folder="MNLI", columns=ColumnLayout(text_a=8, text_b=9, label=-1),
            split_columns=(("train", 12), ("dev_matched", 16), ("dev_mismatched", 16)), has_header=True,
            labels=("contradiction", "entailment", "neutral"), metrics=("accuracy",), main_metric="accuracy",
        ),
        GlueTask(
            name="qnli", folder="QNLI", columns=ColumnLayout(text_a=1, text_b=2, label=-1),
            split_columns=(("train", 4), ("dev", 4)), has_header=True, labels=_NLI_BINARY,
            metrics=("accuracy",), main_metric="accuracy",
        ),
        GlueTask(
            name="rte", folder="RTE", columns=ColumnLayout(text_a=1, text_b=2, label=-1),
            split_columns=(("train", 4), ("dev", 4)), has_header=True, labels=_NLI_BINARY,
            metrics=("accuracy",), main_metric="accuracy",
        ),
        GlueTask(
            name="wnli", folder="WNLI", columns=ColumnLayout(text_a=1, text_b=2, label=-1),
            split_columns=(("train", 4), ("dev", 4)), has_header=True, labels=_BINARY,
            metrics=("accuracy",), main_metric="accuracy",
        ),
    )
}


def get_task(name: str | GlueTask) -> GlueTask:
    """Look a task up by name, case-insensitively; ``"SST-2"`` and ``"sts-b"`` work too.

    Raises:
        ValueError: unknown name; the message lists every task.

    Example:
        >>> get_task("SST-2").folder
        'SST-2'
    """
    if isinstance(name, GlueTask):
        return name
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Held-out split for model selection
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Tokenization and batching
# --------------------------------------------------------------------------------------


@dataclass
class EncodedSplit:
    """Token ids of a split, unpadded (pad per batch with :func:`collate`).

    Attributes:
        input_ids: one list of token ids per example, ``[CLS] a [SEP] b [SEP]`` for BERT,
            at most ``max_length`` long.
        token_type_ids: segment ids aligned with ``input_ids``, or ``None`` when the tokenizer
            does not return them (RoBERTa, DistilBERT).
        labels: class ids (``int``) or scores (``float``), one per example.
        num_truncated: how many examples were longer than ``max_length`` tokens before
            truncation.
        max_length: the length limit used, in tokens (special tokens included).
    """

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int] | list[float]
    num_truncated: int
    max_length: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def is_regression(self) -> bool:
        """Whether labels are float scores."""
        return bool(self.labels) and isinstance(self.labels[0], float)


def encode_examples(
    examples: Sequence[GlueExample], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> EncodedSplit:
    """Tokenize examples as single sentences or ``(text_a, text_b)`` pairs, without padding.

    Pairs are truncated ``"longest_first"``, as in the GLUE fine-tuning scripts.

    Args:
        examples: examples of one task (all single sentences or all pairs).
        tokenizer: a Hugging Face tokenizer.
        max_length: the most tokens per example, special tokens included.

    Returns:
        The encoded split; ``num_truncated`` counts examples whose untruncated encoding was
        longer than ``max_length``.

    Raises:
        ValueError: ``max_length`` too small, no examples, or a mix of single sentences and pairs.
    """
    if max_length < 4:
        raise ValueError(f"max_length must be at least 4 tokens, got {max_length}")
    if not examples:
        raise ValueError("encode_examples got no examples")
    has_pair = {example.text_b is not None for example in examples}
    if len(has_pair) != 1:
        raise ValueError("examples mix single sentences and sentence pairs; encode each task separately")
    texts_a = [example.text_a for example in examples]
    texts_b = [example.text_b for example in examples] if has_pair.pop() else None

    encoded = tokenizer(texts_a, texts_b, truncation="longest_first", max_length=max_length, padding=False)
    untruncated = tokenizer(
        texts_a, texts_b, truncation=False, padding=False, return_attention_mask=False,
        return_token_type_ids=False, verbose=False,
    )
    num_truncated = sum(len(ids) > max_length for ids in untruncated["input_ids"])
    token_type_ids = encoded.get("token_type_ids")
    return EncodedSplit(
        input_ids=[list(ids) for ids in encoded["input_ids"]],
        token_type_ids=None if token_type_ids is None else [list(ids) for ids in token_type_ids],
        labels=[example.label for example in examples],
        num_truncated=num_truncated,
        max_length=max_length,
    )


class EncodedDataset(Dataset):
    """A :class:`torch.utils.data.Dataset` over an :class:`EncodedSplit`.

    Items are dicts with ``input_ids`` (list of int), ``token_type_ids`` (when present) and
    ``labels`` (int or float); batch them with :func:`collate`.

    Example:
        >>> split = EncodedSplit([[101, 7, 102], [101, 102]], None, [1, 0], num_truncated=0, max_length=8)
        >>> batch = collate([EncodedDataset(split)[0], EncodedDataset(split)[1]], pad_token_id=0)
        >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
        ([[101, 7, 102], [101, 102, 0]], [[1, 1, 1], [1, 1, 0]])
    """

    def __init__(self, encoded: EncodedSplit) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.encoded.input_ids[index], "labels": self.encoded.labels[index]}
        if self.encoded.token_type_ids is not None:
            item["token_type_ids"] = self.encoded.token_type_ids[index]
        return item


def collate(batch: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Tensor]:
    """Pad a list of :class:`EncodedDataset` items to the longest one in the batch.

    Args:
        batch: items with ``input_ids``, ``labels`` and optionally ``token_type_ids``.
        pad_token_id: the tokenizer's ``pad_token_id``.

    Returns:
        ``input_ids`` ``[B, N]`` long (right-padded with ``pad_token_id``), ``attention_mask``
        ``[B, N]`` long (1 = token, 0 = padding), ``token_type_ids`` ``[B, N]`` long (padded with
        0) when the items have them, ``labels`` ``[B]``: long for class ids, float32 for scores.

    Raises:
        ValueError: empty batch, missing pad id, or items that disagree on ``token_type_ids``.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    if pad_token_id is None:
        raise ValueError("collate needs a pad_token_id; this tokenizer has none (set tokenizer.pad_token)")
    with_types = {"token_type_ids" in item for item in batch}
    if len(with_types) != 1:
        raise ValueError("some items have token_type_ids and some do not")
    longest = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    token_type_ids = torch.zeros((len(batch), longest), dtype=torch.long) if with_types.pop() else None
    for row, item in enumerate(batch):
        length = len(item["input_ids"])
        input_ids[row, :length] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
        if token_type_ids is not None:
            token_type_ids[row, :length] = torch.as_tensor(item["token_type_ids"], dtype=torch.long)
    labels = [item["labels"] for item in batch]
    is_regression = any(isinstance(label, float) for label in labels)
    output = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.tensor(labels, dtype=torch.float32 if is_regression else torch.long),
    }
    if token_type_ids is not None:
        output["token_type_ids"] = token_type_ids
    return output


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def matthews_corrcoef(confusion: Tensor) -> float:
    """Matthews correlation of a binary confusion matrix, 0.0 where it is undefined.

    GLUE scores CoLA with scikit-learn's ``matthews_corrcoef``, which returns 0 when a row or a
    column of the matrix is empty (e.g. a model that always answers the same class).
    torchmetrics' ``MatthewsCorrCoef`` returns a small non-zero limit there instead (+-0.0256
    for CoLA dev), which would credit a constant answer; so the value is computed here.

    Args:
        confusion: ``[2, 2]`` counts, rows the true class, columns the predicted one
            (``[[tn, fp], [fn, tp]]``, as torchmetrics' ``ConfusionMatrix(task="binary")``).

    Returns:
        ``(tp * tn - fp * fn) / sqrt((tp + fp)(tp + fn)(tn + fp)(tn + fn))``, in ``[-1, 1]``.

    Example:
        >>> matthews_corrcoef(torch.tensor([[1, 1], [1, 3]]))
        0.25
        >>> matthews_corrcoef(torch.tensor([[0, 322], [0, 721]]))  # always "acceptable"
        0.0
    """
    if tuple(confusion.shape) != (2, 2):
        raise ValueError(f"a binary confusion matrix is [2, 2], got shape {tuple(confusion.shape)}")
    (tn, fp), (fn, tp) = confusion.double().tolist()
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


class GlueMetrics:
    """The official GLUE metrics of one task, accumulated over batches (torchmetrics).

    Accuracy (micro: the share of correct predictions) for every classification task, F1 of
    the positive class ``"1"`` for MRPC and QQP, Matthews correlation for CoLA, Pearson and
    Spearman correlation for STS-B. Values are floats on the ``[0, 1]`` scale (correlations
    in ``[-1, 1]``), not percent.

    Args:
        task: a :class:`GlueTask` or its name.

    Example:
        >>> metrics = GlueMetrics("mrpc")
        >>> metrics.update(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 1]))
        >>> metrics.compute(), metrics.main_metric
        ({'accuracy': 0.5, 'f1': 0.5}, 'f1')
    """

    def __init__(self, task: GlueTask | str) -> None:
        self.task = get_task(task)
        self.main_metric = self.task.main_metric
        self._metrics: dict[str, torchmetrics.Metric] = {name: self._build(name) for name in self.task.metrics}

    def _build(self, name: str) -> torchmetrics.Metric:
        import torchmetrics  # imported here: it pulls in transformers and scipy (seconds)

        num_labels = self.task.num_labels
        if name == "accuracy":
            return torchmetrics.Accuracy(task="multiclass", num_classes=num_labels, average="micro")
        if name == "f1":
            return torchmetrics.F1Score(task="binary")
        if name == "mcc":  # the counts; matthews_corrcoef() turns them into the GLUE value
            return torchmetrics.ConfusionMatrix(task="binary")
        if name == "pearson":
            return torchmetrics.PearsonCorrCoef()
        if name == "spearman":
            with warnings.catch_warnings():  # it keeps every prediction; GLUE dev sets are small
                warnings.filterwarnings("ignore", message=".*will save all targets and predictions")
                return torchmetrics.SpearmanCorrCoef()
        raise ValueError(f"unknown GLUE metric {name!r}")

    def update(self, preds: Tensor | Sequence[float], target: Tensor | Sequence[float]) -> None:
        """Add a batch.

        Args:
            preds: ``[B]`` predicted label ids (``logits.argmax(-1)``), or ``[B]`` / ``[B, 1]``
                predicted scores for STS-B.
            target: ``[B]`` true label ids or scores.

        Raises:
            ValueError: float predictions for a classification task, or mismatched shapes.
        """
        preds = torch.as_tensor(preds).detach().cpu()
        target = torch.as_tensor(target).detach().cpu()
        if self.task.is_regression:
            preds = preds.float().reshape(-1) if preds.ndim == 2 and preds.shape[-1] == 1 else preds.float()
            target = target.float()
        else:
            if preds.is_floating_point():
                raise ValueError(
                    f"{self.task.name}: pass predicted label ids (logits.argmax(-1)), not float scores "
                    f"of shape {tuple(preds.shape)}"
                )
            preds, target = preds.long(), target.long()
        if preds.ndim != 1 or preds.shape != target.shape:
            raise ValueError(
                f"preds and target must both be [B]; got {tuple(preds.shape)} and {tuple(target.shape)}"
            )
        for metric in self._metrics.values():
            metric.update(preds, target)

    def compute(self) -> dict[str, float]:
        """The metrics over every batch since the last :meth:`reset`, as Python floats."""
        return {
            name: matthews_corrcoef(metric.compute()) if name == "mcc" else float(metric.compute())
            for name, metric in self._metrics.items()
        }

    def reset(self) -> None:
        """Forget all batches."""
        for metric in self._metrics.values():
            metric.reset()


# --------------------------------------------------------------------------------------
# Optional: the Hugging Face hub copy
# --------------------------------------------------------------------------------------

_HF_SPLITS = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
              "dev_mismatched": "validation_mismatched"}
_HF_COLUMNS = {
    "cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"), "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
}


def load_hf_split(task: GlueTask | str, split: str) -> GlueSplit:
    """Load a split from the Hugging Face hub (``nyu-mll/glue``) instead of TSV files.

    Needs the ``datasets`` package and network access (or its cache). Label ids are mapped
    to this module's order (:attr:`GlueTask.labels`; for MNLI this differs from the hub's).

    Raises:
        ValueError: unknown task or split.
        GlueDataError: ``datasets`` is not installed.
    """
    task = get_task(task)
    task.num_columns(split)  # validates the split name
    try:
        import datasets
    except ImportError as error:
        raise GlueDataError(
            "Loading GLUE from the Hugging Face hub needs the `datasets` package and network access: "
            "pip install datasets, or use local files with --data-dir / $GLUE_DIR "
            "(glue_data layout, <data_dir>/SST-2/train.tsv ...)."
        ) from error
    hf_split = _HF_SPLITS[split]
    dataset = datasets.load_dataset("nyu-mll/glue", task.name, split=hf_split)
    column_a, column_b = _HF_COLUMNS[task.name]
    hub_names = None if task.labels is None else dataset.features["label"].names
    examples = []
    for index, record in enumerate(dataset):
        label: int | float
        if task.labels is None:
            label = float(record["label"])
        else:
            name = hub_names[record["label"]]
            label = task.labels.index(name if name in task.labels else str(record["label"]))
        examples.append(
            GlueExample(
                text_a=record[column_a], text_b=None if column_b is None else record[column_b], label=label,
                source=f"hf:nyu-mll/glue/{task.name}/{hf_split}:{index}",
            )
        )
    return GlueSplit(task=task, split=split, path=None, examples=examples, skipped=[])
