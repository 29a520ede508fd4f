"""The data rows a run reads, their fingerprint, and its evaluation batches.

A run reads the first ``max_train_rows`` of train and ``max_eval_rows`` of the first dev split
(:func:`run_examples`), holds a seeded part of train out for model selection and calibration
(:func:`recipes.glue.holdout_split`), and records a SHA-256 over those rows
(:func:`split_fingerprint`) in ``run.json`` and every checkpoint, so that ``--resume``,
``--stage1-from`` and the benchmarks can tell whether a data folder holds the same rows. Held-out
and dev rows are evaluated in batches of ``eval_batch_size``, in file order, padded per batch
(:func:`eval_loader`, :func:`eval_batches`); train rows are shuffled (length-bucketed) per epoch
(:class:`RunSplits`, whose batches are moved to the run's device).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from recipes.glue import EncodedDataset, EncodedSplit, GlueExample, collate, encode_examples, get_task, read_split
from recipes.run.device import DeviceLoader
from recipes.run.loop import make_loader

__all__ = ["RunSplits", "data_fingerprint", "eval_batches", "eval_loader", "run_examples", "split_fingerprint"]


def run_examples(data_dir: Path, task: str, config: Any) -> tuple[list[GlueExample], list[GlueExample]]:
    """The train and first dev split rows a run with ``config`` reads (``max_train_rows``,
    ``max_eval_rows``); the held-out part is ``holdout_split`` of train."""
    glue_task = get_task(task)
    train = read_split(data_dir, glue_task, "train").examples[: config.max_train_rows or None]
    dev = read_split(data_dir, glue_task, glue_task.dev_splits[0]).examples[: config.max_eval_rows or None]
    return list(train), list(dev)


def data_fingerprint(splits: Mapping[str, Sequence[Any]], data_dir: Path) -> dict[str, Any]:
    """What a run trains and is evaluated on: the resolved data folder, rows per split and one
    SHA-256 over every row's texts and label (in order).

    Args:
        splits: ``{split name: GlueExample list}`` as used (after ``max_*_rows``).
        data_dir: the GLUE data folder.
    """
    digest = hashlib.sha256()
    for name in sorted(splits):
        digest.update(f"[{name}]\n".encode())
        for example in splits[name]:
            digest.update(json.dumps([example.text_a, example.text_b, example.label]).encode("utf-8") + b"\n")
    return {"data_dir": str(Path(data_dir).expanduser().resolve()),
            "rows": {name: len(rows) for name, rows in sorted(splits.items())}, "sha256": digest.hexdigest()}


def split_fingerprint(data_dir: Path, task: str, config: Any,
                      examples: tuple[list[GlueExample], list[GlueExample]] | None = None) -> dict[str, Any]:
    """:func:`data_fingerprint` of the rows a run with ``config`` reads (what ``run.json`` records);
    ``examples``: those rows when already read (:func:`run_examples`)."""
    train, dev = examples if examples is not None else run_examples(data_dir, task, config)
    return data_fingerprint({"train": train, get_task(task).dev_splits[0]: dev}, data_dir)


def eval_loader(dataset: EncodedDataset, batch_size: int, pad_token_id: int) -> DataLoader:
    """Batches of ``dataset`` in order, ``batch_size`` rows each, padded per batch (held-out
    selection, the dev sweep, calibration)."""
    return DataLoader(dataset, batch_size=batch_size, collate_fn=partial(collate, pad_token_id=pad_token_id))


def eval_batches(rows: Sequence[GlueExample], tokenizer: Any, config: Any) -> list[dict[str, Tensor]]:
    """``rows`` as a run with ``config`` evaluates them: tokenized to ``max_length`` by ``tokenizer``,
    in batches of ``eval_batch_size`` (:func:`eval_loader`)."""
    dataset = EncodedDataset(encode_examples(rows, tokenizer, config.max_length))
    return list(eval_loader(dataset, config.eval_batch_size, tokenizer.pad_token_id))


class RunSplits:
    """A run's tokenized splits and their batches.

    Args:
        encoded: ``{split name: EncodedSplit}``: ``"train"`` (less the held-out part), ``"heldout"``,
            ``"dev"`` and further dev splits (MNLI's ``"dev_mismatched"``).
        config: the run's config (``batch_size``, ``eval_batch_size``, ``seed``, ``bucket_by_length``).
        pad_token_id: the tokenizer's padding id.
        device: where :meth:`loader`'s batches go (the run's device).
    """

    def __init__(self, encoded: Mapping[str, EncodedSplit], config: Any, pad_token_id: int,
                 device: torch.device = torch.device("cpu")) -> None:
        self.datasets = {name: EncodedDataset(split) for name, split in encoded.items()}
        self.config = config
        self.pad_token_id = pad_token_id
        self.device = device

    @property
    def sizes(self) -> dict[str, int]:
        """Rows per split."""
        return {name: len(dataset.encoded) for name, dataset in self.datasets.items()}

    @property
    def num_truncated(self) -> dict[str, int]:
        """Rows per split that were longer than ``max_length`` tokens."""
        return {name: dataset.encoded.num_truncated for name, dataset in self.datasets.items()}

    def labels(self, name: str) -> list[int] | list[float]:
        """The labels of split ``name``, in order."""
        return self.datasets[name].encoded.labels

    def loader(self, name: str, shuffle: bool = False, epoch: int = 0) -> DeviceLoader:
        """Batches of split ``name``, padded per batch, on :attr:`device`: for ``"train"``
        (:func:`recipes.run.loop.make_loader`) shuffled with the seed and ``epoch`` when ``shuffle``,
        length-bucketed when ``bucket_by_length``; for the others :func:`eval_loader`."""
        dataset = self.datasets[name]
        if name != "train":
            return DeviceLoader(eval_loader(dataset, self.config.eval_batch_size, self.pad_token_id), self.device)
        lengths = [len(ids) for ids in dataset.encoded.input_ids] if self.config.bucket_by_length else None
        return DeviceLoader(make_loader(dataset, self.config.batch_size, partial(collate, pad_token_id=self.pad_token_id),
                                        shuffle, self.config.seed, epoch, lengths), self.device)
