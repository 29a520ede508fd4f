"""The GLUE task table: columns, labels, splits and metrics of the nine tasks."""

from __future__ import annotations

from dataclasses import dataclass


GLUE_DIR_ENV = "GLUE_DIR"


class GlueDataError(ValueError):
    """GLUE data is missing or not in the expected format; the message says what and where."""


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
