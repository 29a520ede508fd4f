"""Tokenized GLUE splits, the dataset over them and the dynamic-padding collate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from recipes.glue.tsv import GlueExample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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
