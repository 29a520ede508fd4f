"""The row files of the "make a fine-tuned classifier faster" experiment (issue 28), as JSON lines.

Rows never overlap between roles: the classifier is fine-tuned on some rows
(``benchmarks.finetune_hf``), its exit heads are trained on other, unlabeled ones
(``recipes.attach``), and a third set, labelled and never trained on, is kept for certification.
Dev stays the reported set.

- ``sst2-unlabeled.jsonl``: SST-2 train rows 8000-23999 (16,000; ``text`` only);
- ``sst2-certify.jsonl``: the first 8,000 SST-2 train rows from row 24000 on whose text is not that of a
  row before 24000 (``text``, ``label``): SST-2 repeats sentences, and 30 of rows 24000-31999 repeat a
  fine-tuning or unlabeled row verbatim (the files before 2026-12-04 kept them);
- ``mrpc-unlabeled.jsonl``: MRPC train (3,668 pairs; ``text``, ``text_pair``);
- ``mrpc-certify.jsonl``: the MSR paraphrase corpus' test file ``MRPC/msr_paraphrase_test.txt``
  (1,725 labelled pairs, none of them in GLUE's MRPC train or dev; checked by id pair);
- ``manifest.json``: rows and SHA-256 of each file, and the command.

Labels are the class ids (0/1, as the GLUE files write them).

    python -m benchmarks.attach_data --data-dir /work/shared/data/glue --output-dir /work/artifacts/attach-data
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "read_msr_test", "unseen"]

MSR_HEADER = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]


def read_msr_test(path: Path) -> list[dict[str, Any]]:
    """The MSR paraphrase test pairs: ``{"id", "text", "text_pair", "label"}`` per row (tab-separated,
    header ``Quality #1 ID #2 ID #1 String #2 String``, UTF-8 with a BOM; quotes are text)."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or rows[0] != MSR_HEADER:
        raise ValueError(f"{path}: expected the header {MSR_HEADER}, got {rows[0] if rows else 'an empty file'}")
    pairs = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != 5 or row[0] not in ("0", "1"):
            raise ValueError(f"{path}, line {number}: expected 5 fields with a 0/1 label, got {row[:2]}...")
        pairs.append({"id": (row[1], row[2]), "text": row[3], "text_pair": row[4], "label": int(row[0])})
    return pairs


def unseen(rows: Sequence[Any], start: int, count: int) -> list[Any]:
    """The first ``count`` of ``rows[start:]`` whose ``text_a`` is not that of any row before ``start`` (the
    rows trained on), so that certification rows are held out as text, not only by index.

    Raises:
        ValueError: fewer than ``count`` such rows.
    """
    seen = {row.text_a for row in rows[:start]}
    kept = [row for row in rows[start:] if row.text_a not in seen][:count]
    if len(kept) < count:
        raise ValueError(f"only {len(kept)} rows from row {start} on have a text not seen before it; "
                         f"{count} are needed")
    return kept


def _write(path: Path, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")
    return {"rows": len(rows), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def main(argv: Sequence[str] | None = None) -> int:
    from recipes.glue import get_task, read_split, resolve_data_dir

    parser = argparse.ArgumentParser(prog="python -m benchmarks.attach_data", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="glue_data folder (default: $GLUE_DIR)")
    parser.add_argument("--output-dir", required=True, help="folder for the JSON-lines files")
    args = parser.parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    sst2 = read_split(data_dir, get_task("sst2"), "train").examples
    mrpc = read_split(data_dir, get_task("mrpc"), "train").examples
    msr = read_msr_test(data_dir / "MRPC" / "msr_paraphrase_test.txt")
    glue_pairs = set()
    for split in ("train", "dev"):
        with (data_dir / "MRPC" / f"{split}.tsv").open(encoding="utf-8-sig", newline="") as handle:
            glue_pairs |= {(row[1], row[2]) for row in list(csv.reader(handle, delimiter="\t",
                                                                       quoting=csv.QUOTE_NONE))[1:]}
    shared = [row["id"] for row in msr if row["id"] in glue_pairs]
    if shared:
        raise ValueError(f"{len(shared)} MSR test pairs are also in GLUE MRPC train/dev, e.g. {shared[:3]}")
    files = {
        "sst2-unlabeled.jsonl": [{"text": row.text_a} for row in sst2[8000:24000]],
        "sst2-certify.jsonl": [{"text": row.text_a, "label": row.label} for row in unseen(sst2, 24000, 8000)],
        "mrpc-unlabeled.jsonl": [{"text": row.text_a, "text_pair": row.text_b} for row in mrpc],
        "mrpc-certify.jsonl": [{key: row[key] for key in ("text", "text_pair", "label")} for row in msr],
    }
    manifest = {"command": " ".join(["python -m benchmarks.attach_data", *(argv or sys.argv[1:])]),
                "data_dir": str(data_dir), "files": {name: _write(output / name, rows) for name, rows in files.items()}}
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for name, record in manifest["files"].items():
        print(f"{output / name}: {record['rows']} rows, sha256 {record['sha256'][:16]}...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
