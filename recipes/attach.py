"""Make a fine-tuned classifier faster: train exit heads on its own predictions, from unlabeled text.

    python -m recipes.attach --model FINETUNED_DIR --texts rows.jsonl|rows.tsv [--task sst2]
        [--eval-texts dev.tsv] [--output-dir DIR] [--overwrite] [--config attach.yaml] [key=value ...]

The model (a supported ``*ForSequenceClassification`` saved with ``save_pretrained``) is wrapped by
:meth:`AdaptiveEncoder.from_classifier <adaptive_depth.AdaptiveEncoder.from_classifier>`: its own
classifier is the last exit, so full depth is the model, exactly. Backbone and classifier are frozen
(``requires_grad`` off, not in the optimizer, eval mode); only the new heads after layers ``1..L-1``
train, on each batch's hidden states computed once under ``no_grad``, towards the model's
full-depth predictions (:func:`~adaptive_depth.losses.distillation_loss`: KL, MSE for regression).
No label is read for training. ``with_gates=true`` first trains skip gates against a cost budget.

Rows: ``.jsonl`` (``text``, optional ``text_pair``) or ``.tsv`` with a header, columns found by name as
``predict`` finds them (a GLUE file works; ``--task`` reads its labels in ``--eval-texts``, and CoLA's
headerless files by position). A seeded ``holdout_fraction``
of the texts selects the epoch whose heads agree most with full depth. ``--eval-texts`` (e.g. the
task's ``dev.tsv``) reports each head's agreement with full depth, whether full depth equals the
model's own forward row by row and, with ``--task`` and labels, the task metric. Writes ``<output-dir>/model``
(``AdaptivePipeline`` / ``predict`` / ``export``; certify it with ``python -m adaptive_depth.calibrate``) and ``results.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from adaptive_depth import AdaptiveEncoder
from adaptive_depth.exits import predictions_from_logits
from adaptive_depth.losses import LossTerms, budget_penalty, distillation_loss
from recipes.run.errors import ConfigError, InputCheckError, ModelLoadError, RunFolderError
from recipes.run.logs import logger

__all__ = ["AttachConfig", "head_agreement", "main"]

RECIPE = "attach"


@dataclass
class AttachConfig:
    """What ``python -m recipes.attach`` trains (``key=value`` on the command line, or a YAML ``--config``).

    Attributes:
        seed: seeds the heads' initialization, the shuffling and the held-out split.
        max_length: tokens per row, special tokens included (the model's fine-tuning length).
        batch_size, eval_batch_size: rows per training / evaluation batch.
        epochs, lr: epochs and learning rate of the exit heads (AdamW, linear warm-up and decay).
        weight_decay, warmup_ratio, max_grad_norm: AdamW and schedule settings.
        holdout_fraction: share of the texts held out to select the epoch (never trained on).
        max_rows: use only the first rows of ``--texts`` (0: all).
        head_inner_size, head_num_heads, dropout: the :class:`~adaptive_depth.exits.ExitHead` s.
        with_gates: also train skip gates (on the 6-layer MiniLM they do not pay: docs/results.md).
        gate_epochs, gate_lr: epochs and learning rate of the gates, before the heads.
        target_cost, budget_weight: the gates' budget (share of the layers' MACs) and its weight.
        torch_threads: ``torch.set_num_threads`` (0: leave the default).
    """

    seed: int = 42
    max_length: int = 128
    batch_size: int = 32
    eval_batch_size: int = 64
    epochs: int = 3
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    holdout_fraction: float = 0.1
    max_rows: int = 0
    head_inner_size: int = 128
    head_num_heads: int = 4
    dropout: float = 0.1
    with_gates: bool = False
    gate_epochs: int = 2
    gate_lr: float = 5e-4
    target_cost: float = 0.5
    budget_weight: float = 1.0
    torch_threads: int = 0

    def __post_init__(self) -> None:
        rules = {name: (getattr(self, name) >= 1, ">= 1") for name in ("batch_size", "eval_batch_size", "epochs",
                                                                        "head_inner_size", "head_num_heads", "gate_epochs")}
        rules.update({name: (getattr(self, name) >= 0, ">= 0") for name in ("max_rows", "weight_decay", "max_grad_norm",
                                                                             "torch_threads", "budget_weight")})
        rules.update(lr=(self.lr > 0, "> 0"), gate_lr=(self.gate_lr > 0, "> 0"), max_length=(self.max_length >= 4, ">= 4"),
                     holdout_fraction=(0 < self.holdout_fraction < 1, "in (0, 1)"),
                     dropout=(0 <= self.dropout < 1, "in [0, 1)"), warmup_ratio=(0 <= self.warmup_ratio < 1, "in [0, 1)"),
                     target_cost=(0 <= self.target_cost <= 1, "in [0, 1]"))
        for name, (valid, rule) in rules.items():
            if not valid:
                raise ConfigError(f"{name} must be {rule}, got {getattr(self, name)}")


class TextRows(NamedTuple):
    """Texts read from a file: ``pairs`` ``None`` for single texts; ``labels`` only when asked and present."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[int] | list[float] | None


def read_texts(path: str, task: Any, text_column: str | None, pair_column: str | None, with_labels: bool) -> TextRows:
    """The texts (and, ``with_labels`` and a ``task``, the label ids) of a ``.jsonl`` or ``.tsv`` file; an
    :class:`~adaptive_depth.predict.InputFileError` names a missing file or column, no rows, an unknown label.

    Columns are found by name as ``predict`` finds them (``text``/``text_pair``, GLUE's ``sentence1``/``sentence2``,
    QNLI's ``question``/``sentence``...). With a ``task``, a file laid out as its GLUE files (the column count,
    and the text columns where the task puts them) gives its labels from the task's label column, and a
    headerless ``.tsv`` of a task whose files have no header (CoLA) is read by position, first row included.
    """
    from adaptive_depth.predict import TEXT_COLUMNS, InputFileError, _column, _pick_texts, read_rows

    glue_counts = set(dict(task.split_columns).values()) if task is not None else set()
    is_tsv = Path(path).suffix.lower() == ".tsv"
    headerless = is_tsv and task is not None and not task.has_header and Path(path).is_file()
    if headerless:  # a GLUE file of a task without headers, unless its first line names known columns
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            first = handle.readline().rstrip("\r\n").split("\t")
        headerless = len(first) in glue_counts and not set(first) & set(TEXT_COLUMNS)
    rows = read_rows(path, tsv_header=not headerless)
    header = list(rows[0])
    glue_layout = is_tsv and task is not None and len(header) in glue_counts
    if glue_layout and not task.has_header and text_column is None:
        text_column = header[task.columns.text_a]
        pair_column = header[task.columns.text_b] if task.is_pair and pair_column is None else pair_column
    text_column, pair_column = _pick_texts(rows, text_column, pair_column,
                                           pairs_wanted=task is None or task.is_pair)
    glue_layout = glue_layout and header[task.columns.text_a] == text_column and (
        not task.is_pair or header[task.columns.text_b] == pair_column)  # not a test file with as many columns
    labels = None
    label_column = (header[task.columns.label] if glue_layout else "label") if task is not None else None
    if with_labels and label_column in header:
        values = [str(row[label_column]) for row in rows]
        try:
            labels = [float(v) for v in values] if task.is_regression else [task.labels.index(v) for v in values]
        except ValueError as error:
            raise InputFileError(f"{path}: a label in column {label_column!r} is not one of {task.name}'s "
                                 f"({task.labels or 'scores'}): {error}") from None
    return TextRows(_column(rows, text_column), _column(rows, pair_column) if pair_column else None, labels)


def head_agreement(head_logits: Tensor, full_logits: Tensor) -> float:
    """Share of rows where a head predicts full depth's class; regression: minus the mean absolute difference."""
    if full_logits.shape[-1] == 1:
        return -float((head_logits[:, 0] - full_logits[:, 0]).abs().mean())
    return float((predictions_from_logits(head_logits) == predictions_from_logits(full_logits)).float().mean())


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value for key, value in batch.items() if key != "labels"}


class Collected(NamedTuple):
    """Logits ``[R, C]``: every head's (behind the gates, if any), full depth's (the model's own classifier,
    every layer run), the model's own forward's (if asked); the share of layers run (``None``: no gates)."""

    heads: list[Tensor]
    full: Tensor
    original: Tensor | None
    layers_run: float | None


@torch.inference_mode()
def collect_logits(encoder: AdaptiveEncoder, loader: Any, description: str, with_original: bool = False) -> Collected:
    """:class:`Collected` over the batches of ``loader``, in order."""
    from tqdm.auto import tqdm

    gate_mode = "hard" if encoder.has_gates else "run"
    heads: list[list[Tensor]] = [[] for _ in range(encoder.num_steps)]
    full, original, skipped = [], [], []
    for batch in tqdm(loader, desc=description, leave=False, dynamic_ncols=True):
        inputs = model_inputs(batch)
        out = encoder(**inputs, gate_mode=gate_mode, heads="all")
        for step, logits in enumerate(out.exit_logits):
            heads[step].append(logits.float())
        full.append((encoder(**inputs, gate_mode="run", heads="last") if encoder.has_gates else out).logits.float())
        skipped.append(out.gate_values.float())
        if with_original:
            original.append(encoder.unwrap()(**inputs).logits.float())
    layers_run = 1.0 - float(torch.cat(skipped).mean()) if encoder.has_gates else None
    return Collected([torch.cat(logits) for logits in heads], torch.cat(full),
                     torch.cat(original) if with_original else None, layers_run)


def frozen_hidden_states(encoder: AdaptiveEncoder, batch: dict[str, Tensor]) -> tuple[list[Tensor], Tensor, Tensor]:
    """The frozen model's work on a batch, once, without gradients: the hidden states the heads read (behind
    the gates, if any), the token mask and the full-depth logits they learn from."""
    with torch.no_grad():
        inputs = model_inputs(batch)
        out = encoder(**inputs, gate_mode="hard" if encoder.has_gates else "run", heads="none")
        full = encoder(**inputs, gate_mode="run", heads="last").logits if encoder.has_gates else \
            encoder.exit_heads[-1](out.last_hidden_state).logits
    return out.hidden_states, out.attention_mask, full


def heads_step(encoder: AdaptiveEncoder, batch: dict[str, Tensor]) -> LossTerms:
    """Distillation of every intermediate head towards full depth, on hidden states computed once."""
    hidden_states, mask, full = frozen_hidden_states(encoder, batch)
    students = [encoder.exit_heads[step](hidden_states[step + 1], mask).logits for step in range(encoder.num_steps - 1)]
    return LossTerms({"distillation": distillation_loss(students, full)})


def gates_step(encoder: AdaptiveEncoder, config: AttachConfig, batch: dict[str, Tensor]) -> LossTerms:
    """The last head behind soft gates learns to agree with full depth, at the budget's cost."""
    inputs = model_inputs(batch)
    with torch.no_grad():
        full = encoder(**inputs, gate_mode="run", heads="last").logits
    out = encoder(**inputs, gate_mode="soft", heads="last")
    return LossTerms({"distillation": distillation_loss([out.logits], full),
                      "budget": budget_penalty(out.gate_probs, config.target_cost, config.budget_weight)})


def train(encoder: AdaptiveEncoder, config: AttachConfig, train_split: Any, heldout_loader: Any, pad_id: int
          ) -> tuple[list[dict[str, Any]], int]:
    """Gates (if any), then the heads, epoch by epoch; the heads of the epoch that agrees most with
    full depth on the held-out texts are kept. Returns the per-epoch history and that epoch."""
    from recipes.glue import EncodedDataset, collate
    from recipes.run.loop import linear_schedule, make_loader, run_epoch

    for parameter in [*encoder.backbone_parameters(), *encoder.exit_heads[-1].parameters()]:
        parameter.requires_grad_(False)
    encoder.eval()  # the frozen model: no dropout, ever
    loader = partial(make_loader, EncodedDataset(train_split), config.batch_size, partial(collate, pad_token_id=pad_id),
                     True, config.seed, lengths=[len(ids) for ids in train_split.input_ids])
    phases = [("gates", encoder.gates, config.gate_epochs, config.gate_lr, partial(gates_step, encoder, config))] \
        if encoder.has_gates else []
    phases.append(("heads", encoder.exit_heads[:-1], config.epochs, config.lr, partial(heads_step, encoder)))
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, Tensor]] = (-float("inf"), 0, {})
    for phase, modules, epochs, lr, step in phases:
        parameters = list(modules.parameters())
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay)
        scheduler = linear_schedule(optimizer, epochs * len(loader(epoch=0)), config.warmup_ratio)
        for epoch in range(epochs):
            modules.train()
            stats = run_epoch(loader(epoch=epoch), step, optimizer, parameters, f"{phase} epoch {epoch + 1}/{epochs}",
                              scheduler, config.max_grad_norm, f"lower {'gate_lr' if phase == 'gates' else 'lr'}")
            modules.eval()
            heldout = collect_logits(encoder, heldout_loader, "held-out")
            agreement = [head_agreement(logits, heldout.full) for logits in heldout.heads]
            history.append({"phase": phase, "epoch": epoch + 1, "loss": stats.loss, "terms": stats.terms,
                            "seconds": stats.seconds, "heldout_agreement": agreement,
                            "heldout_layers_run": heldout.layers_run})
            score = sum(agreement[:-1]) / max(len(agreement) - 1, 1)
            logger.info("%s epoch %d: held-out agreement with full depth per head %s (mean of heads 1..L-1 %.4f)",
                        phase, epoch + 1, " ".join(f"{value:.3f}" for value in agreement), score)
            if phase == "heads" and score > best[0]:
                best = (score, epoch + 1, copy.deepcopy(encoder.exit_heads[:-1].state_dict()))
    encoder.exit_heads[:-1].load_state_dict(best[2])
    return history, best[1]


def evaluate(encoder: AdaptiveEncoder, loader: Any, labels: Sequence[Any] | None, task: Any) -> dict[str, Any]:
    """Each head's agreement with full depth, full depth against the model's own forward, and the
    task metric (with labels) of full depth and of each head alone."""
    heads, full, original, layers_run = collect_logits(encoder, loader, "eval", with_original=True)
    differ = int((predictions_from_logits(full) != predictions_from_logits(original)).sum())
    report: dict[str, Any] = {"rows": len(full), "head_agreement": [head_agreement(h, full) for h in heads],
                              "layers_run": layers_run, "full_depth_vs_model": {
                                  "max_abs_logit_difference": float((full - original).abs().max()),
                                  "rows_predicted_differently": differ}}
    if labels is not None and task is not None:
        from recipes.glue import GlueMetrics

        def metric(logits: Tensor) -> dict[str, float]:
            metrics = GlueMetrics(task)
            metrics.update(predictions_from_logits(logits), torch.tensor(labels))
            return metrics.compute()

        report.update(metric_full_depth=metric(full), metric_model=metric(original),
                      metric_per_head=[metric(logits) for logits in heads])
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m recipes.attach", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder of a fine-tuned *ForSequenceClassification (with tokenizer)")
    parser.add_argument("--texts", required=True, help="unlabeled rows to train on: .jsonl (text, text_pair) or .tsv")
    parser.add_argument("--task", default=None, help="GLUE task: picks a GLUE file's text (and label) columns")
    parser.add_argument("--text-column", default=None, help="text column (default: the task's, else text, sentence...)")
    parser.add_argument("--pair-column", default=None, help="second text column (default: the task's, else text_pair...)")
    parser.add_argument("--eval-texts", default=None, help="rows to report on after training (e.g. the task's dev.tsv)")
    parser.add_argument("--config", default=None, help="YAML file of AttachConfig keys")
    parser.add_argument("--output-dir", default=None, help="run folder (default: runs/attach-<time>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir")
    parser.add_argument("overrides", nargs="*", help="AttachConfig overrides key=value")
    return parser.parse_intermixed_args(argv)


def load_model(path: str, config: AttachConfig) -> tuple[AdaptiveEncoder, Any]:
    """The wrapped model and its tokenizer; failures become one-line :class:`ModelLoadError` s."""
    from transformers import AutoTokenizer

    from adaptive_depth.backbones import UnsupportedModelError
    from recipes.run.input_checks import check_model_inputs
    from recipes.run.models import TOKENIZER_FILES

    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"--model {path}: no such folder; pass the folder the fine-tuned model was saved to")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"--model {path} holds no tokenizer files; save it there (tokenizer.save_pretrained)")
    try:
        torch.manual_seed(config.seed)  # the new heads' initialization
        encoder = AdaptiveEncoder.from_classifier(folder, with_gates=config.with_gates, dropout=config.dropout,
                                                  head_inner_size=config.head_inner_size,
                                                  head_num_heads=config.head_num_heads)
    except (FileNotFoundError, TypeError, ValueError, UnsupportedModelError, OSError) as error:
        raise ModelLoadError(f"--model {path}: {error}") from error
    if encoder.num_steps < 2:
        raise ModelLoadError(f"--model {path} has {encoder.num_steps} layer: no layer to exit after before the last")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    check_model_inputs(encoder.config, tokenizer, config.max_length, path)
    encoder.adaptive_config.max_length = config.max_length
    return encoder, tokenizer


def run(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Check the inputs, load, train, evaluate, save (errors propagate to :func:`main`'s boundary)."""
    from adaptive_depth.files import write_atomically
    from adaptive_depth.predict import InputFileError
    from recipes.run.config import config_to_dict, load_config
    from recipes.glue import EncodedDataset, GlueExample, collate, encode_examples, get_task, holdout_split
    from recipes.run.loop import make_loader
    from recipes.run.results import command_line
    from recipes.run.folder import RunLock, check_run_folder, clear_run, run_contents

    started = time.perf_counter()
    config = load_config(AttachConfig, args.config, args.overrides)
    try:
        task = get_task(args.task) if args.task else None
    except ValueError as error:
        raise ConfigError(str(error)) from None
    run_dir = Path(args.output_dir or f"runs/{RECIPE}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    if run_contents(run_dir) and not args.overwrite:
        raise RunFolderError(f"{run_dir} already holds a run ({', '.join(run_contents(run_dir))}); pass --overwrite to "
                             "replace it, or another --output-dir")
    check_run_folder(run_dir, resume=False, overwrite=True)  # also: a file there, no permission, a live lock
    try:
        rows = read_texts(args.texts, task, args.text_column, args.pair_column, with_labels=False)
        eval_rows = read_texts(args.eval_texts, task, args.text_column, args.pair_column, with_labels=True) \
            if args.eval_texts else None
    except InputFileError as error:
        raise InputCheckError(str(error)) from None
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    encoder, tokenizer = load_model(args.model, config)
    if task is not None:
        outputs = 1 if task.is_regression else len(task.labels)
        if encoder.num_labels != outputs:
            raise ConfigError(f"--task {task.name} has {outputs} output(s) ({'a score' if task.is_regression else 'classes ' + ', '.join(task.labels)}) "
                              f"but the model in --model has {encoder.num_labels}; pass the task it was fine-tuned for")
        names = encoder.adaptive_config.label_names
        if eval_rows is not None and eval_rows.labels is not None and names and set(task.labels or ()) <= set(names):
            # gold labels by the model's own label names (its classes may be ordered otherwise than the task's)
            from adaptive_depth.config import label_ids

            eval_rows = eval_rows._replace(labels=label_ids(encoder.adaptive_config,
                                                            [task.labels[i] for i in eval_rows.labels]))
    # what predict and calibrate read: the task's metric (F1 for MRPC) and whether rows are pairs
    encoder.adaptive_config.metric, encoder.adaptive_config.text_pair = task and task.main_metric, rows.pairs is not None

    def examples(rows: TextRows, count: int | None = None) -> list[GlueExample]:  # label 0: a placeholder, never read
        return [GlueExample(text, rows.pairs[i] if rows.pairs else None, rows.labels[i] if rows.labels else 0, str(i))
                for i, text in enumerate(rows.texts[:count])]

    def by_length(rows: list[GlueExample]) -> list[GlueExample]:  # evaluation batches of similar length: less padding
        return sorted(rows, key=lambda row: len(row.text_a) + len(row.text_b or ""))

    texts = examples(rows, config.max_rows or None)
    if len(texts) < 2:
        raise InputCheckError(f"{args.texts}: {len(texts)} row(s); at least 2 are needed (one is held out)")
    train_part, heldout_part = holdout_split(texts, config.holdout_fraction, config.seed)
    pad_id = tokenizer.pad_token_id
    encode = partial(encode_examples, tokenizer=tokenizer, max_length=config.max_length)
    ordered = partial(make_loader, batch_size=config.eval_batch_size, collate_fn=partial(collate, pad_token_id=pad_id),
                      shuffle=False, seed=config.seed)
    logger.info("%s: %d rows to train the heads on, %d held out; %s, %d layers, last head %s", RECIPE, len(train_part),
                len(heldout_part), type(encoder.unwrap()).__name__, encoder.num_steps, encoder.adaptive_config.last_head)
    with RunLock(run_dir):
        if args.overwrite:
            clear_run(run_dir)
        history, selected = train(encoder, config, encode(train_part), ordered(EncodedDataset(encode(by_length(heldout_part)))),
                                  pad_id)
        report = None
        if eval_rows is not None:
            rows_sorted = by_length(examples(eval_rows))
            report = evaluate(encoder, ordered(EncodedDataset(encode(rows_sorted))),
                              [row.label for row in rows_sorted] if eval_rows.labels else None, task)
            logger.info("eval (%d rows): head agreement with full depth %s; full depth vs the model: %s; %s",
                        report["rows"], " ".join(f"{v:.3f}" for v in report["head_agreement"]),
                        report["full_depth_vs_model"], report.get("metric_full_depth", "no labels"))
        model_dir = encoder.save_pretrained(run_dir / "model", tokenizer=tokenizer)
        results = {"recipe": RECIPE, "model": str(args.model), "texts": str(args.texts), "task": task and task.name,
                   "eval_texts": args.eval_texts, "rows": {"train": len(train_part), "heldout": len(heldout_part)},
                   "config": config_to_dict(config), "history": history, "selected_epoch": selected, "eval": report,
                   "command": command_line("recipes.attach", argv), "seconds": time.perf_counter() - started,
                   "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        text = json.dumps(results, indent=2) + "\n"
        write_atomically(run_dir / "results.json", [text])
    logger.info("%s: saved %s and %s", RECIPE, model_dir, run_dir / "results.json")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 on a user error, one ``error: ...`` line)."""
    from adaptive_depth.backbones import UnsupportedModelError
    from recipes.run.errors import catch_signals, error_boundary
    from recipes.run.logs import setup_logging

    setup_logging()
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    args = parse_args(argv)
    with error_boundary(handled=(UnsupportedModelError,)) as outcome, catch_signals():
        run(args, argv)
    return outcome.status


if __name__ == "__main__":
    raise SystemExit(main())
