"""GLUE data for the recipes, one module per concern.

* :mod:`recipes.glue.tasks`: the task table (:class:`GlueTask`, :data:`TASKS`, :func:`get_task`).
* :mod:`recipes.glue.tsv`: the strict reader of the ``glue_data`` TSV layout
  (:func:`read_split`, :func:`resolve_data_dir`) and the seeded held-out split.
* :mod:`recipes.glue.encoding`: tokenization, the dataset and the dynamic-padding collate.
* :mod:`recipes.glue.metrics`: the official metrics of each task (:class:`GlueMetrics`).
* :mod:`recipes.glue.hub`: optional, the Hugging Face hub copy.
"""

from recipes.glue.encoding import EncodedDataset, EncodedSplit, collate, encode_examples
from recipes.glue.hub import load_hf_split
from recipes.glue.metrics import GlueMetrics, majority_class_metrics, matthews_corrcoef
from recipes.glue.tasks import GLUE_DIR_ENV, TASKS, ColumnLayout, GlueDataError, GlueTask, get_task
from recipes.glue.tsv import GlueExample, GlueSplit, SkippedRow, holdout_split, read_split, resolve_data_dir

__all__ = [
    "GLUE_DIR_ENV",
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
    "majority_class_metrics",
    "matthews_corrcoef",
    "read_split",
    "resolve_data_dir",
]
