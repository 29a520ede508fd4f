"""Small synthetic GLUE folders in the exact ``glue_data`` file formats, with learnable labels.

Used by ``tests/test_glue.py`` and by integration tests of the recipes: the files have the
same header (or none, for CoLA), BOM (MRPC), column layout and label spelling as the real
ones, so :func:`recipes.glue.read_split` reads them the same way.

Example:
    >>> import tempfile
    >>> from recipes.glue import read_split
    >>> root = write_synthetic_glue(Path(tempfile.mkdtemp()), "rte", n_train=8, n_dev=4)
    >>> len(read_split(root, "rte", "train")), len(read_split(root, "rte", "dev"))
    (8, 4)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from recipes.glue import get_task

__all__ = ["SYNTHETIC_TASKS", "write_synthetic_glue"]

SYNTHETIC_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")

_SUBJECTS = ("the cat", "a dog", "my neighbour", "the teacher", "a pilot", "the farmer", "our team", "the child")
_VERBS = ("watched", "painted", "followed", "carried", "visited", "cleaned", "found", "sold")
_OBJECTS = ("the old car", "a red kite", "the small boat", "a wooden chair", "the big house", "a blue bottle",
            "the stone bridge", "a green lamp")
_PLACES = ("in the morning", "near the station", "after lunch", "at the market", "before the storm", "on the hill")
_POSITIVE = ("charming", "wonderful", "moving", "brilliant", "delightful", "funny")
_NEGATIVE = ("dull", "tedious", "bleak", "boring", "clumsy", "lifeless")
_NOUNS = ("film", "comedy", "story", "drama", "thriller", "portrait")


def _clause(rng: random.Random) -> list[str]:
    """Four slots: subject, verb, object, place."""
    return [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_PLACES)]


def _other_clause(rng: random.Random, clause: list[str]) -> list[str]:
    """A clause that differs from ``clause`` in subject, verb and object."""
    while True:
        other = _clause(rng)
        if all(other[slot] != clause[slot] for slot in range(3)):
            return other


def _sentence(clause: list[str], capitalize: bool = True) -> str:
    text = " ".join(clause) + " ."
    return text[0].upper() + text[1:] if capitalize else text


def _shuffled_words(text: str, rng: random.Random) -> str:
    words = text.split()
    original = list(words)
    while words == original:
        rng.shuffle(words)
    return " ".join(words)


def _labels_in_turn(count: int, labels: tuple[str, ...], rng: random.Random) -> list[str]:
    """Balanced labels in a random order."""
    sequence = [labels[index % len(labels)] for index in range(count)]
    rng.shuffle(sequence)
    return sequence


# Row writers: (rng, row index, label) -> the row's fields (label included), one per task.


def _cola_row(rng: random.Random, index: int, label: str) -> list[str]:
    text = _sentence(_clause(rng))
    if label == "1":
        return [rng.choice(("gj04", "bc01", "ks08")), "1", "", text]
    return [rng.choice(("gj04", "bc01", "ks08")), "0", "*", _shuffled_words(text, rng)]


def _sst2_row(rng: random.Random, index: int, label: str) -> list[str]:
    adjectives = _POSITIVE if label == "1" else _NEGATIVE
    first, second = rng.sample(adjectives, 2)
    # Real SST-2 sentences are lowercased, tokenized and end with a space.
    return [f"a {first} and {second} {rng.choice(_NOUNS)} about {rng.choice(_SUBJECTS)} ", label]


def _paraphrase_pair(rng: random.Random, paraphrase: bool) -> tuple[str, str]:
    clause = _clause(rng)
    text_a = _sentence(clause)
    text_b = _shuffled_words(text_a, rng) if paraphrase else _sentence(_other_clause(rng, clause))
    return text_a, text_b


def _mrpc_row(rng: random.Random, index: int, label: str) -> list[str]:
    text_a, text_b = _paraphrase_pair(rng, label == "1")
    return [label, str(rng.randrange(10**5, 10**7)), str(rng.randrange(10**5, 10**7)), text_a, text_b]


def _qqp_row(rng: random.Random, index: int, label: str) -> list[str]:
    text_a, text_b = _paraphrase_pair(rng, label == "1")
    return [str(index), str(2 * index + 1), str(2 * index + 2), text_a[:-1] + "?", text_b.replace(" .", "") + " ?",
            label]


def _entailment_pair(rng: random.Random, label: str) -> tuple[str, str]:
    """Entailed: the hypothesis drops the place; contradicted: 'never'; otherwise unrelated."""
    clause = _clause(rng)
    premise = _sentence(clause)
    if label in ("entailment", "1"):
        return premise, _sentence(clause[:3])
    if label == "contradiction":
        return premise, _sentence([clause[0], "never", *clause[1:3]])
    return premise, _sentence(_other_clause(rng, clause)[:3])


def _rte_row(rng: random.Random, index: int, label: str) -> list[str]:
    return [str(index), *_entailment_pair(rng, label), label]


def _qnli_row(rng: random.Random, index: int, label: str) -> list[str]:
    clause = _clause(rng)
    asked = clause if label == "entailment" else _other_clause(rng, clause)
    return [str(index), f"Who {asked[1]} {asked[2]} {asked[3]}?", _sentence(clause), label]


def _stsb_row(rng: random.Random, index: int, label: str) -> list[str]:
    clause = _clause(rng)
    other = _other_clause(rng, clause) + [rng.choice([place for place in _PLACES if place != clause[3]])]
    changed = int(label)  # 0..4 slots replaced; the score falls with every one
    slots = rng.sample(range(4), changed)
    second = [other[slot] if slot in slots else clause[slot] for slot in range(4)]
    score = 5.0 * (4 - changed) / 4
    return [str(index), "main-captions", "MSRvid", "2012test", f"{index:04d}", "none", "none",
            _sentence(clause), _sentence(second), f"{score:.3f}"]


def _mnli_fields(rng: random.Random, index: int, label: str) -> list[str]:
    premise, hypothesis = _entailment_pair(rng, label)
    return [str(index), str(10 * index), f"{10 * index}{label[0]}", rng.choice(("fiction", "travel", "government")),
            f"( {premise} )", f"( {hypothesis} )", f"(ROOT (S {premise}))", f"(ROOT (S {hypothesis}))",
            premise, hypothesis]


def _mnli_train_row(rng: random.Random, index: int, label: str) -> list[str]:
    return [*_mnli_fields(rng, index, label), label, label]


def _mnli_dev_row(rng: random.Random, index: int, label: str) -> list[str]:
    return [*_mnli_fields(rng, index, label), *([label] * 5), label]


_MNLI_COMMON = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
_PAIR_HEADER = ["index", "sentence1", "sentence2", "label"]

RowWriter = Callable[[random.Random, int, str], list[str]]

# task -> (header or None, labels to draw, {split: row writer})
_FORMATS: dict[str, tuple[list[str] | None, tuple[str, ...], dict[str, RowWriter]]] = {
    "cola": (None, ("0", "1"), {"train": _cola_row, "dev": _cola_row}),
    "sst2": (["sentence", "label"], ("0", "1"), {"train": _sst2_row, "dev": _sst2_row}),
    "mrpc": (["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"], ("0", "1"),
             {"train": _mrpc_row, "dev": _mrpc_row}),
    "stsb": (["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score"], ("0", "1", "2", "3", "4"), {"train": _stsb_row, "dev": _stsb_row}),
    "qqp": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], ("0", "1"),
            {"train": _qqp_row, "dev": _qqp_row}),
    "mnli": (None, ("contradiction", "entailment", "neutral"),
             {"train": _mnli_train_row, "dev_matched": _mnli_dev_row, "dev_mismatched": _mnli_dev_row}),
    "qnli": (["index", "question", "sentence", "label"], ("entailment", "not_entailment"),
             {"train": _qnli_row, "dev": _qnli_row}),
    "rte": (_PAIR_HEADER, ("entailment", "not_entailment"), {"train": _rte_row, "dev": _rte_row}),
    "wnli": (_PAIR_HEADER, ("0", "1"), {"train": _rte_row, "dev": _rte_row}),
}

_MNLI_HEADERS = {
    "train": [*_MNLI_COMMON, "label1", "gold_label"],
    "dev_matched": [*_MNLI_COMMON, "label1", "label2", "label3", "label4", "label5", "gold_label"],
    "dev_mismatched": [*_MNLI_COMMON, "label1", "label2", "label3", "label4", "label5", "gold_label"],
}


def write_synthetic_glue(root: Path, task: str = "mrpc", n_train: int = 48, n_dev: int = 24, seed: int = 0) -> Path:
    """Write ``<root>/<Folder>/train.tsv`` and its dev file(s) for one task.

    Labels are balanced and learnable from the words: MRPC/QQP paraphrases are word
    shuffles of the first sentence (non-paraphrases are other sentences), SST-2 uses
    positive or negative adjectives, CoLA's unacceptable sentences are word shuffles, NLI
    hypotheses drop a phrase (entailment), add "never" (contradiction) or are unrelated,
    and STS-B scores fall by 1.25 for each of the 4 phrases replaced.

    Args:
        root: folder to write into (created if needed); other tasks' folders may share it.
        task: any GLUE task name :func:`recipes.glue.get_task` accepts.
        n_train: rows in ``train.tsv``.
        n_dev: rows in each dev file (MNLI writes ``dev_matched`` and ``dev_mismatched``).
        seed: the same seed writes the same bytes.

    Returns:
        ``root``, to pass as ``data_dir`` / ``--data-dir``.
    """
    spec = get_task(task)
    if spec.name not in _FORMATS:
        raise ValueError(f"no synthetic format for {task!r}; supported: {', '.join(SYNTHETIC_TASKS)}")
    if n_train < 1 or n_dev < 1:
        raise ValueError(f"n_train and n_dev must be positive, got {n_train} and {n_dev}")
    header, labels, writers = _FORMATS[spec.name]
    folder = Path(root) / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{spec.name}:{seed}")
    for split, writer in writers.items():
        count = n_train if split == "train" else n_dev
        split_header = _MNLI_HEADERS[split] if spec.name == "mnli" else header
        lines = [] if split_header is None else ["\t".join(split_header)]
        for index, label in enumerate(_labels_in_turn(count, labels, rng)):
            row = writer(rng, index, label)
            assert len(row) == spec.num_columns(split), (spec.name, split, row)
            lines.append("\t".join(row))
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")
    return Path(root)
