"""Optional: the Hugging Face hub copy of GLUE (``datasets``)."""

from __future__ import annotations

from recipes.glue.tasks import GlueDataError, GlueTask, get_task
from recipes.glue.tsv import GlueExample, GlueSplit


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
