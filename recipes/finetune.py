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

from adaptive_depth.objectives import LastHead
from recipes import baselines

SPEC = baselines.BaselineSpec(
    name="finetune",
    description="Plain fine-tuning, full depth (backbone + last pooler head, cross-entropy).",
    head_type="pooler",
    stage1=LastHead(),
)
METHOD = baselines.register_baseline(SPEC)

# load_trained(run_dir, device="cpu") -> (encoder, tokenizer, config); main(argv=None) -> exit status.
load_trained, main = baselines.entry_points(METHOD)

if __name__ == "__main__":
    sys.exit(main())
