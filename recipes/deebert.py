"""DeeBERT (Xin et al., ACL 2020, https://arxiv.org/abs/2004.12993): highway exits, raw entropy.

Usage::

    python -m recipes.deebert --task mrpc [--data-dir DIR] [--model PATH] [--config FILE]
        [--output-dir DIR] [--resume] [key=value ...]

* stage 1: backbone + the last highway (pooler) head, cross-entropy;
* stage 2: backbone and last head frozen (``requires_grad`` off, not in the optimizer); the
  intermediate highway heads train on ``sum_i CE(z_i, y)``, ``i = 1..L-1``;
* inference: exit at the first head whose prediction entropy (nats) is below ``S``
  (``EntropyExit(S)``), engine mode ``"exit_only"``.

No skip gates (``with_gates=False``). Shared loops: :mod:`recipes.baselines` and :mod:`recipes.run`.
"""

from __future__ import annotations

import sys

from adaptive_depth.exits import EntropyExit
from adaptive_depth.objectives import LabelExits, LastHead
from recipes import baselines

SPEC = baselines.BaselineSpec(
    name="deebert",
    description="DeeBERT: fine-tune, then train frozen-backbone highway heads; raw entropy exit.",
    head_type="pooler",
    stage1=LastHead(),
    stage2=LabelExits(),
    make_criterion=lambda threshold: EntropyExit(threshold),
    threshold_name="entropy",
    default_thresholds=lambda num_steps: [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
)
METHOD = baselines.register_baseline(SPEC)

# load_trained(run_dir, device="cpu") -> (encoder, tokenizer, config); main(argv=None) -> exit status.
load_trained, main = baselines.entry_points(METHOD)

if __name__ == "__main__":
    sys.exit(main())
