"""Plain fine-tuning at full depth: the BERT row of the paper's Table 1.

Usage::

    python -m recipes.finetune --task mrpc [--data-dir DIR] [--model PATH] [--config FILE]
        [--output-dir DIR] [--resume] [key=value ...]

The backbone and a pooler classifier (``[CLS]`` -> ``tanh(Linear(H, H))`` -> ``Linear(H, C)``,
BERT's own head) on the last layer train with cross-entropy; the intermediate heads exist (the
encoder has one per layer) but never train or run. Evaluated with the inference engine in
mode ``"full"``: the reference cost of :mod:`benchmarks.tradeoff`. Shared loops:
:mod:`recipes.baselines`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from recipes import baselines

METHOD = baselines.BaselineMethod(
    name="finetune",
    description="Plain fine-tuning, full depth (backbone + last pooler head, cross-entropy).",
    head_type="pooler",
    stage1_heads="last",
    stage1_loss=baselines.last_head_loss,
)


def load_trained(run_dir: str | Path, device: str = "cpu") -> tuple[Any, Any, baselines.BaselineConfig]:
    """``(encoder, tokenizer, config)`` of a finished run folder (see :func:`recipes.baselines.load_trained`)."""
    return baselines.load_trained(METHOD, run_dir, device)


def main(argv: list[str] | None = None) -> int:
    return baselines.main(METHOD, argv)


if __name__ == "__main__":
    sys.exit(main())
