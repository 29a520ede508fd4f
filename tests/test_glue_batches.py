"""recipes.glue: the held-out split, tokenization and batching."""

from __future__ import annotations

import doctest
import math
import statistics
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import recipes.glue as glue
from recipes.glue import (
    TASKS,
    EncodedDataset,
    EncodedSplit,
    GlueDataError,
    GlueExample,
    GlueMetrics,
    collate,
    encode_examples,
    holdout_split,
    read_split,
)
from tests.conftest import minilm_dir, requires_minilm
from tests.glue_fixtures import write_synthetic_glue

requires_tokenizer = requires_minilm


# --------------------------------------------------------------------------------------
# Held-out split
# --------------------------------------------------------------------------------------


def _examples(labels: list[int] | list[float]) -> list[GlueExample]:
    return [GlueExample(f"text {index}", None, label, f"x:{index}") for index, label in enumerate(labels)]


def test_holdout_is_deterministic_disjoint_and_stratified() -> None:
    data = _examples([0] * 70 + [1] * 30)
    train, heldout = holdout_split(data, fraction=0.2, seed=7)
    assert (train, heldout) == holdout_split(data, fraction=0.2, seed=7)
    assert heldout != holdout_split(data, fraction=0.2, seed=8)[1]
    assert len(heldout) == 20 and len(train) == 80
    assert sum(example.label for example in heldout) == 6  # 30% positives kept
    assert {example.source for example in train}.isdisjoint(example.source for example in heldout)


def test_holdout_validates() -> None:
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
            holdout_split(_examples([0, 1, 0]), fraction, seed=0)
    with pytest.raises(ValueError, match="at least 2 examples"):
        holdout_split(_examples([1]), 0.5, seed=0)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.one_of(
        st.lists(st.integers(0, 2), min_size=2, max_size=50),
        st.lists(st.floats(0, 5, allow_nan=False), min_size=2, max_size=50),
    ),
    fraction=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**32),
)
def test_holdout_properties(labels: list, fraction: float, seed: int) -> None:
    data = _examples(labels)
    train, heldout = holdout_split(data, fraction, seed)
    assert train and heldout
    assert len(heldout) == min(max(round(fraction * len(data)), 1), len(data) - 1)
    train_ids = [example.source for example in train]
    heldout_ids = [example.source for example in heldout]
    assert set(train_ids).isdisjoint(heldout_ids)
    assert sorted(train_ids + heldout_ids) == sorted(example.source for example in data)
    order = {example.source: index for index, example in enumerate(data)}
    assert [order[source] for source in train_ids] == sorted(order[source] for source in train_ids)
    assert (train, heldout) == holdout_split(data, fraction, seed)


# --------------------------------------------------------------------------------------
# Tokenization and batching
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


@requires_tokenizer
def test_encode_pairs_truncates_and_counts(tokenizer) -> None:
    long_text = " ".join(["word"] * 40)
    examples = [
        GlueExample("hello world", "good morning", 1, "a:1"),  # [CLS] hello world [SEP] good morning [SEP]
        GlueExample(long_text, "short one", 0, "a:2"),
        GlueExample("a cat", long_text, 1, "a:3"),
        GlueExample("one two three four five", "six seven eight", 0, "a:4"),  # exactly 11 tokens
    ]
    encoded = encode_examples(examples, tokenizer, max_length=11)
    assert encoded.num_truncated == 2
    assert [len(ids) for ids in encoded.input_ids] == [7, 11, 11, 11]
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert encoded.input_ids[0] == [cls_id, *tokenizer.convert_tokens_to_ids(["hello", "world"]), sep_id,
                                    *tokenizer.convert_tokens_to_ids(["good", "morning"]), sep_id]
    assert encoded.token_type_ids[0] == [0, 0, 0, 0, 1, 1, 1]
    # longest_first: the long side is cut, the short side kept whole.
    assert tokenizer.decode(encoded.input_ids[2]) == "[CLS] a cat [SEP] word word word word word word [SEP]"
    assert encoded.labels == [1, 0, 1, 0] and not encoded.is_regression

    dataset = EncodedDataset(encoded)
    assert len(dataset) == 4
    batch = collate([dataset[0], dataset[1]], pad_token_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 11) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].tolist() == [[1] * 7 + [0] * 4, [1] * 11]
    assert batch["input_ids"][0, 7:].tolist() == [tokenizer.pad_token_id] * 4
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long


@requires_tokenizer
def test_encode_single_sentences_and_regression(tokenizer, tmp_path: Path) -> None:
    write_synthetic_glue(tmp_path, "sst2", n_train=6, n_dev=2)
    encoded = encode_examples(read_split(tmp_path, "sst2", "train").examples, tokenizer, max_length=128)
    assert encoded.num_truncated == 0 and all(set(types) == {0} for types in encoded.token_type_ids)
    write_synthetic_glue(tmp_path, "stsb", n_train=6, n_dev=2)
    encoded = encode_examples(read_split(tmp_path, "stsb", "train").examples, tokenizer, max_length=128)
    assert encoded.is_regression
    batch = collate([EncodedDataset(encoded)[index] for index in range(3)], tokenizer.pad_token_id)
    assert batch["labels"].dtype == torch.float32
    with pytest.raises(ValueError, match="mix single sentences and sentence pairs"):
        encode_examples([GlueExample("a", None, 0, "x"), GlueExample("a", "b", 0, "y")], tokenizer, 16)


def test_collate_without_token_types_and_errors() -> None:
    split = EncodedSplit([[5, 6, 7], [5], [5, 6]], None, [0.5, 1.0, 2.0], num_truncated=0, max_length=8)
    batch = collate([EncodedDataset(split)[index] for index in range(3)], pad_token_id=1)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 1, 1], [5, 6, 1]]
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 1, 2]
    assert batch["labels"].dtype == torch.float32
    with pytest.raises(ValueError, match="pad_token_id"):
        collate([EncodedDataset(split)[0]], pad_token_id=None)
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_token_id=0)


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------

PREDS = [1, 1, 1, 0, 0, 1]
TARGET = [1, 0, 1, 1, 0, 1]  # TP = 3, FP = 1, FN = 1, TN = 1


def test_f1_and_accuracy_by_hand() -> None:
    metrics = GlueMetrics("mrpc")
    metrics.update(torch.tensor(PREDS[:4]), torch.tensor(TARGET[:4]))
    metrics.update(PREDS[4:], TARGET[4:])  # lists work too; updates accumulate
    result = metrics.compute()
    assert set(result) == {"accuracy", "f1"} and metrics.main_metric == "f1"
    assert result["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert all(isinstance(value, float) for value in result.values())
    metrics.reset()
    metrics.update([1, 0], [1, 0])
    assert metrics.compute() == {"accuracy": 1.0, "f1": 1.0}


def test_mcc_by_hand() -> None:
    metrics = GlueMetrics("cola")
    metrics.update(torch.tensor(PREDS), torch.tensor(TARGET))
    tp, tn, fp, fn = 3, 1, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert expected == 0.25
    assert metrics.compute()["mcc"] == pytest.approx(expected)
    assert metrics.main_metric == "mcc"


@pytest.mark.parametrize("constant", [0, 1])
def test_mcc_of_a_constant_answer_is_zero_as_in_glue(constant: int) -> None:
    """scikit-learn (the GLUE scorer) gives 0 where torchmetrics gives +-0.0256 on CoLA dev."""
    target = torch.tensor([1] * 721 + [0] * 322)
    metrics = GlueMetrics("cola")
    metrics.update(torch.full_like(target, constant), target)
    assert metrics.compute()["mcc"] == 0.0
    metrics.reset()
    metrics.update(target, target)
    assert metrics.compute()["mcc"] == pytest.approx(1.0)
    metrics.reset()
    metrics.update(1 - target, target)
    assert metrics.compute()["mcc"] == pytest.approx(-1.0)


def test_accuracy_is_micro_not_macro() -> None:
    metrics = GlueMetrics("mnli")
    metrics.update(torch.tensor([0, 0, 0, 0, 2, 1]), torch.tensor([0, 0, 0, 0, 1, 2]))
    # Micro: 4 of 6 right. Macro would average per-class recalls (1 + 0 + 0) / 3.
    assert metrics.compute() == {"accuracy": pytest.approx(4 / 6)}


def test_pearson_and_spearman_by_hand() -> None:
    metrics = GlueMetrics("sts-b")
    preds, target = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 8.0]
    metrics.update(torch.tensor(preds).unsqueeze(-1), torch.tensor(target))  # [B, 1] regression output
    result = metrics.compute()
    assert set(result) == {"pearson", "spearman"}
    assert result["pearson"] == pytest.approx(statistics.correlation(preds, target), abs=1e-6)
    # Ranks 1,2,3,4 vs 1,3,2,4: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60.
    assert result["spearman"] == pytest.approx(0.8, abs=1e-6)


def test_metrics_reject_logits_and_cover_every_task() -> None:
    with pytest.raises(ValueError, match=r"argmax"):
        GlueMetrics("rte").update(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"must both be \[B\]"):
        GlueMetrics("rte").update(torch.tensor([0, 1]), torch.tensor([0, 1, 1]))
    for name, task in TASKS.items():
        metrics = GlueMetrics(name)
        if task.is_regression:
            metrics.update(torch.tensor([0.5, 2.0, 4.0]), torch.tensor([1.0, 2.5, 3.0]))
        else:
            metrics.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
        result = metrics.compute()
        assert tuple(result) == task.metrics and metrics.main_metric in result


def test_module_doctests() -> None:
    assert doctest.testmod(glue).failed == 0


def test_non_utf8_file_names_the_line_and_byte(tmp_path: Path) -> None:
    """The decoder's own message counts bytes from the start of an 8 KiB read chunk; ours names
    the line, as every other data error does."""
    root = write_synthetic_glue(tmp_path, "rte", n_train=400, n_dev=4)
    path = root / "RTE" / "train.tsv"
    lines = path.read_bytes().split(b"\n")
    lines[300] = lines[300][:5] + b"\xe9t\xe9" + lines[300][5:]  # Latin-1 "été"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(GlueDataError, match=r"train\.tsv:301: not UTF-8 text \(byte 6 of the line, .* is e9\)"):
        read_split(root, "rte", "train")
