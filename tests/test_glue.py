"""recipes.glue: task table, TSV reader against the real files and synthetic ones, and its errors
(the held-out split, tokenization and batching: tests/test_glue_batches.py)."""

from __future__ import annotations

import doctest
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from recipes.glue import (
    TASKS,
    GlueDataError,
    get_task,
    load_hf_split,
    read_split,
    resolve_data_dir,
)
from tests import glue_fixtures
from tests.conftest import requires_glue, requires_minilm
from tests.glue_fixtures import SYNTHETIC_TASKS, write_synthetic_glue

GLUE_DIR = os.environ.get("GLUE_DIR")
requires_tokenizer = requires_minilm


def _replace_line(path: Path, line_number: int, new_line: str) -> None:
    """Replace the 1-based ``line_number`` of ``path``, keeping every other byte."""
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[line_number - 1] = new_line
    path.write_text("\n".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------------------
# Task table
# --------------------------------------------------------------------------------------


def test_task_table_names_and_aliases() -> None:
    assert set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert get_task("sst-2") is TASKS["sst2"] is get_task("SST-2")
    assert get_task("STS-B") is TASKS["stsb"] is get_task("sts-b")
    assert get_task("CoLA") is TASKS["cola"]
    assert get_task(TASKS["rte"]) is TASKS["rte"]
    assert TASKS["mnli"].dev_splits == ("dev_matched", "dev_mismatched")
    assert TASKS["stsb"].is_regression and TASKS["stsb"].num_labels == 1
    assert TASKS["mnli"].num_labels == 3
    assert {name: task.main_metric for name, task in TASKS.items()} == {
        "cola": "mcc", "sst2": "accuracy", "mrpc": "f1", "stsb": "pearson", "qqp": "f1",
        "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy",
    }
    hash(TASKS["mnli"])  # frozen and hashable


def test_unknown_task_lists_all_tasks() -> None:
    with pytest.raises(ValueError, match="Unknown GLUE task 'sst5'") as info:
        get_task("sst5")
    for name in TASKS:
        assert name in str(info.value)


def test_unknown_split_lists_splits(tmp_path: Path) -> None:
    write_synthetic_glue(tmp_path, "mnli", n_train=3, n_dev=3)
    with pytest.raises(ValueError, match="train, dev_matched, dev_mismatched"):
        read_split(tmp_path, "mnli", "dev")


# --------------------------------------------------------------------------------------
# The real files
# --------------------------------------------------------------------------------------

REAL_COUNTS = [
    ("cola", "train", 8551, {"1": 6023, "0": 2528}),
    ("cola", "dev", 1043, {"1": 721, "0": 322}),
    ("sst2", "train", 67349, {"1": 37569, "0": 29780}),
    ("sst2", "dev", 872, {"1": 444, "0": 428}),
    ("mrpc", "train", 3668, {"1": 2474, "0": 1194}),
    ("mrpc", "dev", 408, {"1": 279, "0": 129}),
    ("rte", "train", 2490, {"entailment": 1249, "not_entailment": 1241}),
    ("rte", "dev", 277, {"entailment": 146, "not_entailment": 131}),
    ("wnli", "train", 635, {"1": 312, "0": 323}),
    ("wnli", "dev", 71, {"1": 31, "0": 40}),
    ("qnli", "dev", 5463, {"entailment": 2702, "not_entailment": 2761}),
    ("stsb", "train", 5749, None),
    ("stsb", "dev", 1500, None),
]


@requires_glue
@pytest.mark.parametrize(("task", "split", "rows", "label_counts"), REAL_COUNTS)
def test_real_counts_match_sources(task: str, split: str, rows: int, label_counts: dict[str, int] | None) -> None:
    data = read_split(GLUE_DIR, task, split)
    assert len(data) == rows
    assert data.skipped_rows == 0
    if label_counts is None:
        scores = [example.label for example in data.examples]
        assert all(isinstance(score, float) for score in scores)
        assert min(scores) == 0.0 and max(scores) == 5.0
        assert data.examples[0].label == 5.0  # "A man with a hard hat ..." / "A plane is taking off."
    else:
        assert data.label_counts() == label_counts
    assert all(example.text_a.strip() for example in data.examples)
    assert data.examples[0].source == f"{get_task(task).folder}/{split}.tsv:{1 if task == 'cola' else 2}"


@requires_glue
def test_real_mrpc_has_no_bom_and_keeps_quotes() -> None:
    train = read_split(GLUE_DIR, "mrpc", "train")
    first = train.examples[0]
    assert first.text_a.startswith("Amrozi accused his brother")
    assert not any("\ufeff" in (example.text_a + example.text_b) for example in train.examples)
    assert first.text_a.count('"') == 2  # QUOTE_NONE keeps the quotes as text
    dev = read_split(GLUE_DIR, "mrpc", "dev")
    assert dev.examples[0].text_b.startswith('" The foodservice pie business')
    assert dev.examples[0].label == 1


@requires_glue
def test_real_cola_has_no_header() -> None:
    train = read_split(GLUE_DIR, "cola", "train")
    first = train.examples[0]
    assert first.text_a.startswith("Our friends won't buy this analysis")
    assert first.label == 1 and first.text_b is None and first.source == "CoLA/train.tsv:1"


@requires_glue
def test_real_sst2_leading_quote_does_not_swallow_next_row(tmp_path: Path) -> None:
    # The real SST-2 files hold no '"' at all; put one at the start of a real row.
    shutil.copytree(Path(GLUE_DIR) / "SST-2", tmp_path / "SST-2")
    path = tmp_path / "SST-2" / "dev.tsv"
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[1] = '"' + lines[1]
    path.write_text("\n".join(lines), encoding="utf-8")
    data = read_split(tmp_path, "sst2", "dev")
    assert len(data) == 872
    assert data.examples[0].text_a == "\"it 's a charming and often affecting journey . "
    assert data.examples[1].text_a == "unflinchingly bleak and desperate "


@requires_glue
def test_real_qnli_train_missing_is_explained() -> None:
    with pytest.raises(GlueDataError, match=r"Missing file .*QNLI/train\.tsv.*holds: dev\.tsv"):
        read_split(GLUE_DIR, "qnli", "train")


# --------------------------------------------------------------------------------------
# Synthetic folders
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_synthetic_round_trip(tmp_path: Path, task: str) -> None:
    root = write_synthetic_glue(tmp_path, task, n_train=12, n_dev=7, seed=3)
    assert root == tmp_path
    spec = get_task(task)
    for split in spec.splits:
        data = read_split(root, task, split)
        assert len(data) == (12 if split == "train" else 7)
        assert data.skipped_rows == 0
        assert all((example.text_b is not None) == spec.is_pair for example in data.examples)
        if not spec.is_regression:
            counts = data.label_counts()
            assert max(counts.values()) - min(counts.values()) <= 1  # balanced
    # Same seed, same bytes; another seed, other bytes.
    again = write_synthetic_glue(tmp_path / "again", task, n_train=12, n_dev=7, seed=3)
    other = write_synthetic_glue(tmp_path / "other", task, n_train=12, n_dev=7, seed=4)
    train_file = Path(spec.folder) / "train.tsv"
    assert (again / train_file).read_bytes() == (root / train_file).read_bytes()
    assert (other / train_file).read_bytes() != (root / train_file).read_bytes()


def test_synthetic_formats_match_the_real_ones(tmp_path: Path) -> None:
    write_synthetic_glue(tmp_path, "mrpc")
    write_synthetic_glue(tmp_path, "cola")
    write_synthetic_glue(tmp_path, "sst2")
    assert (tmp_path / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality\t#1 ID\t#2 ID\t")
    first_cola = (tmp_path / "CoLA" / "train.tsv").read_text().split("\n")[0].split("\t")
    assert len(first_cola) == 4 and first_cola[1] in "01" and first_cola[2] in ("", "*")
    assert (tmp_path / "SST-2" / "dev.tsv").read_text().startswith("sentence\tlabel\n")


def test_synthetic_labels_are_learnable(tmp_path: Path) -> None:
    write_synthetic_glue(tmp_path, "mrpc", n_train=40)
    for example in read_split(tmp_path, "mrpc", "train").examples:
        same_words = sorted(example.text_a.split()) == sorted(example.text_b.split())
        assert same_words == (example.label == 1)
    write_synthetic_glue(tmp_path, "stsb", n_train=40)
    scores = {example.label for example in read_split(tmp_path, "stsb", "train").examples}
    assert scores == {0.0, 1.25, 2.5, 3.75, 5.0}


def test_fixture_doctest() -> None:
    assert doctest.testmod(glue_fixtures).failed == 0


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_missing_task_folder_explains_layout(tmp_path: Path) -> None:
    write_synthetic_glue(tmp_path, "rte", n_train=2, n_dev=2)
    with pytest.raises(GlueDataError) as info:
        read_split(tmp_path, "mrpc", "train")
    message = str(info.value)
    for part in ("No MRPC/ folder", "holds: RTE", "glue_data", "<data_dir>/MRPC/train.tsv", "--data-dir", "$GLUE_DIR"):
        assert part in message


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(GlueDataError, match=r"does not exist.*<data_dir>/RTE/train\.tsv.*GLUE_DIR"):
        read_split(tmp_path / "nowhere", "rte", "dev")


def test_missing_file(tmp_path: Path) -> None:
    write_synthetic_glue(tmp_path, "rte", n_train=2, n_dev=2)
    (tmp_path / "RTE" / "dev.tsv").unlink()
    with pytest.raises(GlueDataError, match=r"Missing file .*RTE/dev\.tsv"):
        read_split(tmp_path, "rte", "dev")


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLUE_DIR", raising=False)
    with pytest.raises(GlueDataError) as info:
        resolve_data_dir(None)
    assert "--data-dir" in str(info.value) and "GLUE_DIR" in str(info.value) and "glue_data" in str(info.value)
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    cli_dir = tmp_path / "cli"
    cli_dir.mkdir()
    assert resolve_data_dir(str(cli_dir)) == cli_dir  # --data-dir wins over $GLUE_DIR
    with pytest.raises(GlueDataError, match=r"from --data-dir\) does not exist"):
        resolve_data_dir(str(tmp_path / "missing"))
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "missing"))
    with pytest.raises(GlueDataError, match=r"from \$GLUE_DIR\) does not exist"):
        resolve_data_dir(None)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(GlueDataError, match="is not a folder"):
        resolve_data_dir(str(tmp_path / "file.txt"))


def test_malformed_row_names_file_and_line(tmp_path: Path) -> None:
    write_synthetic_glue(tmp_path, "mrpc", n_train=8, n_dev=4)
    path = tmp_path / "MRPC" / "train.tsv"
    _replace_line(path, 5, "1\t12\t13\tonly one sentence")
    with pytest.raises(GlueDataError) as info:
        read_split(tmp_path, "mrpc", "train")
    assert f"{path}:5: malformed row: expected 5 tab-separated columns" in str(info.value)
    assert "got 4" in str(info.value)


def test_label_outside_set(tmp_path: Path) -> None:
    write_synthetic_glue(tmp_path, "rte", n_train=8, n_dev=4)
    path = tmp_path / "RTE" / "dev.tsv"
    _replace_line(path, 3, "1\tA cat sat .\tA cat .\tcontradiction")
    with pytest.raises(GlueDataError) as info:
        read_split(tmp_path, "rte", "dev")
    assert str(info.value) == (
        f"{path}:3: label 'contradiction' is not a RTE label; allowed: entailment, not_entailment"
    )


def test_empty_text(tmp_path: Path) -> None:
    write_synthetic_glue(tmp_path, "wnli", n_train=8, n_dev=4)
    path = tmp_path / "WNLI" / "train.tsv"
    _replace_line(path, 4, "2\tA cat sat .\t  \t1")
    with pytest.raises(GlueDataError, match=re.escape(f"{path}:4: empty text in column 2 (text_b)")):
        read_split(tmp_path, "wnli", "train")


@pytest.mark.parametrize(("score", "message"), [("high", "is not a number"), ("7.5", r"is outside \[0, 5\]"),
                                                 ("nan", r"is outside \[0, 5\]")])
def test_bad_stsb_score(tmp_path: Path, score: str, message: str) -> None:
    write_synthetic_glue(tmp_path, "stsb", n_train=4, n_dev=4)
    path = tmp_path / "STS-B" / "dev.tsv"
    fields = path.read_text().split("\n")[2].split("\t")
    _replace_line(path, 3, "\t".join([*fields[:-1], score]))
    with pytest.raises(GlueDataError, match=re.escape(f"{path}:3: STS-B score '{score}' ") + message):
        read_split(tmp_path, "stsb", "dev")


def test_wrong_header_and_empty_file(tmp_path: Path) -> None:
    write_synthetic_glue(tmp_path, "sst2", n_train=4, n_dev=4)
    path = tmp_path / "SST-2" / "dev.tsv"
    path.write_text("sentence,label\nnice,1\n")
    with pytest.raises(GlueDataError, match=re.escape(f"{path}:1: header has 1 tab-separated columns, expected 2")):
        read_split(tmp_path, "sst2", "dev")
    path.write_text("sentence\tlabel\n")
    with pytest.raises(GlueDataError, match="has no data rows"):
        read_split(tmp_path, "sst2", "dev")


def test_null_and_na_stay_text_and_blank_lines_are_counted(tmp_path: Path) -> None:
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nnull \t0\n\nNA\t1\n")
    data = read_split(tmp_path, "sst2", "dev")
    assert [example.text_a for example in data.examples] == ["null ", "NA"]
    assert [row.source for row in data.skipped] == ["SST-2/dev.tsv:3"]


def test_qqp_malformed_rows_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_synthetic_glue(tmp_path, "qqp", n_train=10, n_dev=4)
    path = tmp_path / "QQP" / "train.tsv"
    _replace_line(path, 3, "2\t5\t6\tHow do I fly\ta kite ?\tWhat is a kite ?\t0")
    _replace_line(path, 6, "5\t11\t12\tWhy ?")
    with caplog.at_level(logging.WARNING, logger="recipes.glue"):
        data = read_split(tmp_path, "qqp", "train")
    assert len(data) == 8 and data.skipped_rows == 2
    assert [(row.source, row.reason) for row in data.skipped] == [
        ("QQP/train.tsv:3", "7 columns, expected 6"), ("QQP/train.tsv:6", "4 columns, expected 6")
    ]
    assert "skipped 2 row(s)" in caplog.text


def test_load_hf_split_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(GlueDataError, match=r"pip install datasets.*--data-dir"):
        load_hf_split("rte", "dev")
    with pytest.raises(ValueError, match="has no split"):
        load_hf_split("rte", "test")


def test_a_headerless_file_of_a_task_with_a_header_is_refused(tmp_path: Path) -> None:
    """Line 1 of SST-2 was skipped as the header whatever it held: a file without one lost its first example."""
    write_synthetic_glue(tmp_path, "sst2", n_train=8, n_dev=4)
    dev = tmp_path / "SST-2" / "dev.tsv"
    dev.write_text("".join(dev.read_text(encoding="utf-8").splitlines(keepends=True)[1:]), encoding="utf-8")
    with pytest.raises(GlueDataError, match=r"dev.tsv:1: the first line is a data row \(label '[01]'\)"):
        read_split(tmp_path, "sst2", "dev")
