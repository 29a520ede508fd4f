"""What SmartBERT training would cost on this machine: time a few steps, extrapolate per epoch.

Times, on random token ids of a fixed length (the cost does not depend on the ids), the
recipe's own steps (:class:`recipes.smartbert.SmartBertModel` with the shipped MRPC config,
``recipes/configs/smartbert_mrpc.yaml``, and its parameter groups):

- a stage-1 step: soft gates, last head, ``CE + lambda / sum g + eta1 * InfoNCE`` over the
  hidden states (paper eq. 3), backward through everything stage 1 trains, AdamW step;
- a stage-2 step: hard gates, the intermediate heads, ``sum CE + eta2 * InfoNCE`` over the heads'
  token states (eq. 6-8), backward into the heads only (backbone and gates frozen);
- a full-depth inference batch (no gradient), for the held-out evaluations and the sweep.

at ``--length 128`` (the recipe's ``max_length``) and, when ``--data-dir`` holds MRPC, at the
mean padded length of MRPC's length-bucketed training batches, then multiplies by the steps of an
epoch. Nothing is trained to completion. On a machine shared with other jobs each figure is the
fastest step that had all its ``--threads`` cores (see :func:`best_seconds`); the JSON says
which figures had none such, and the load average before and after.

    python -m benchmarks.training_cost --model mpnet-base --threads 2 --data-dir $GLUE_DIR
    python -m benchmarks.training_cost --model all-minilm-l6-v2 --threads 2 --data-dir $GLUE_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer

from adaptive_depth.files import OutputPathError, check_output_path
from recipes import smartbert
from recipes.glue import encode_examples, get_task, read_split
from recipes.run.config import default_config_file, load_config
from recipes.run.loop import freeze_for_stage2, stage2_train_mode
from recipes.run.named_models import named_model_path


def mrpc_config() -> smartbert.SmartBertConfig:
    """The recipe's MRPC settings (``recipes/configs/smartbert_mrpc.yaml``)."""
    return load_config(smartbert.SmartBertConfig, default_config_file(smartbert.RECIPE, "mrpc"), task="mrpc")


def mrpc_bucketed_length(data_dir: Path, tokenizer: Any, batch_size: int, max_length: int) -> tuple[float, int]:
    """Mean padded length of MRPC train batches when rows are sorted by length (as bucketing
    nearly does), and the number of train rows; the rows read and tokenized as the recipe reads
    them (:func:`recipes.glue.read_split`, :func:`recipes.glue.encode_examples`)."""
    examples = read_split(data_dir, "mrpc", "train").examples
    lengths = sorted(len(ids) for ids in encode_examples(examples, tokenizer, max_length).input_ids)
    batches = [lengths[start:start + batch_size] for start in range(0, len(lengths), batch_size)]
    return statistics.mean(max(batch) for batch in batches), len(examples)


def best_seconds(step: Callable[[], None], steps: int, threads: int, max_tries: int) -> tuple[float, float, bool]:
    """The fastest undisturbed run of ``step``: ``(wall s, CPU s, undisturbed)``.

    After a warm-up, runs ``step`` until ``steps`` runs were undisturbed (their process CPU
    seconds over wall seconds, the cores they really had, reach 90% of ``threads``) or
    ``max_tries`` runs were made. On a machine shared with other jobs a step can only be slowed
    down, so the fastest undisturbed run is the estimate; when none was undisturbed, the fastest
    run is returned with ``undisturbed=False``.
    """
    step()  # warm-up: allocator, kernels
    clean, disturbed = [], []
    for _ in range(max(steps, max_tries)):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        (clean if cpu / wall >= 0.9 * threads else disturbed).append((wall, cpu))
        if len(clean) >= steps:
            break
    return (*min(clean), True) if clean else (*min(disturbed), False)


def time_training_step(model: smartbert.SmartBertModel, batch: dict[str, torch.Tensor], stage: int,
                       optimizer: torch.optim.Optimizer, options: dict[str, Any], steps: int, threads: int,
                       max_tries: int) -> tuple[float, float, bool]:
    """:func:`best_seconds` of one training step of ``stage``: the recipe's forward
    (``model(batch, stage, **options)``, the stage's loss terms), backward and optimizer step."""

    def step() -> None:
        loss = model(batch, stage=stage, **options).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return best_seconds(step, steps, threads, max_tries)


def time_steps(model: smartbert.SmartBertModel, config: smartbert.SmartBertConfig, batch_size: int, length: int,
               steps: int, threads: int, max_tries: int) -> dict[str, float]:
    """Wall seconds of a stage-1 step, a stage-2 step and a no-grad inference batch (see
    :func:`best_seconds`), each with the cores it used and whether it ran undisturbed. ``model``
    is left with stage 2's parameters trainable and the rest frozen."""
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(5, 1000, (batch_size, length), generator=generator),
             "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
             "labels": torch.randint(0, 2, (batch_size,), generator=generator)}

    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(smartbert.stage1_param_groups(model, config), weight_decay=config.weight_decay)
    stage1 = time_training_step(model, batch, 1, optimizer, {"gate_mode": "soft"}, steps, threads, max_tries)
    modules = smartbert.stage2_modules(model)
    optimizer = torch.optim.AdamW(freeze_for_stage2(model, modules), lr=config.stage2_lr,
                                  weight_decay=config.weight_decay)
    stage2_train_mode(model, modules)
    stage2 = time_training_step(model, batch, 2, optimizer, {}, steps, threads, max_tries)
    model.eval()

    def inference() -> None:
        with torch.inference_mode():
            model.encoder(batch["input_ids"], batch["attention_mask"], gate_mode="run", heads="last")

    inference_run = best_seconds(inference, steps, threads, max_tries)
    figures = {}
    for name, (wall, cpu, undisturbed) in (("stage1_step", stage1), ("stage2_step", stage2),
                                           ("inference_batch", inference_run)):
        figures[f"{name}_s"], figures[f"{name}_cores_used"] = wall, cpu / wall
        figures[f"{name}_undisturbed"] = undisturbed
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mpnet-base", help="a named model (recipes.run.named_models) or a local folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="undisturbed timed steps wanted per setting")
    parser.add_argument("--max-tries", type=int, default=8,
                        help="give up waiting for undisturbed steps after this many")
    parser.add_argument("--data-dir", type=Path, default=None, help="GLUE folder holding MRPC/train.tsv")
    parser.add_argument("--train-rows", type=int, default=3668, help="rows per epoch (MRPC train)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.json is not None:  # before any work
        try:
            check_output_path(args.json, create_parents=True)
        except OutputPathError as error:
            parser.error(str(error))

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = named_model_path(args.model) or Path(args.model)
    backbone = AutoModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = mrpc_config()
    model = smartbert.build_model(backbone, config, get_task("mrpc"))
    encoder = model.encoder
    lengths = {"fixed": args.length}
    if args.data_dir is not None:
        mean_length, _ = mrpc_bucketed_length(args.data_dir, tokenizer, args.batch_size, args.length)
        lengths["mrpc_bucketed"] = round(mean_length)
    steps_per_epoch = -(-args.train_rows // args.batch_size)
    report: dict[str, Any] = {
        "model": str(args.model), "layers": encoder.num_steps, "hidden": int(encoder.config.hidden_size),
        "threads": args.threads, "batch_size": args.batch_size, "train_rows": args.train_rows,
        "steps_per_epoch": steps_per_epoch, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "load_average_before": os.getloadavg(), "settings": {},
    }
    for label, length in lengths.items():
        figures = time_steps(model, config, args.batch_size, length, args.steps, args.threads, args.max_tries)
        figures.update(
            length=length,
            stage1_epoch_min=figures["stage1_step_s"] * steps_per_epoch / 60,
            stage2_epoch_min=figures["stage2_step_s"] * steps_per_epoch / 60,
            inference_ms_per_row=1000 * figures["inference_batch_s"] / args.batch_size,
        )
        report["settings"][label] = figures
        print(f"{label:>14} length {length:3d}:", ", ".join(
            f"{stage} step {figures[f'{stage}_step_s']:.2f} s ({figures[f'{stage}_epoch_min']:.1f} min/epoch, "
            f"{figures[f'{stage}_step_cores_used']:.2f} cores)" for stage in ("stage1", "stage2")
        ), f"inference {figures['inference_ms_per_row']:.0f} ms/row")
    report["load_average_after"] = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {report['load_average_before']}, after {report['load_average_after']}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
