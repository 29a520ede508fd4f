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
from functools import partial

from recipes import baselines

METHOD = baselines.BaselineMethod(
    name="finetune",
    description="Plain fine-tuning, full depth (backbone + last pooler head, cross-entropy).",
    head_type="pooler",
    stage1_heads="last",
    stage1_loss=baselines.last_head_loss,
)


# (run_dir, device="cpu") -> (encoder, tokenizer, config); see recipes.baselines.load_trained.
load_trained = partial(baselines.load_trained, METHOD)
# (argv=None) -> exit status; see recipes.baselines.main.
main = partial(baselines.main, METHOD)

if __name__ == "__main__":
    sys.exit(main())
