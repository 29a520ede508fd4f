"""DeeBERT (Xin et al., ACL 2020, https://arxiv.org/abs/2004.12993): highway exits, raw entropy.

Usage::

    python -m recipes.deebert --task mrpc [--data-dir DIR] [--model PATH] [--config FILE]
        [--output-dir DIR] [--resume] [key=value ...]

* stage 1: backbone + the last highway (pooler) head, cross-entropy;
* stage 2: backbone and last head frozen (``requires_grad`` off, not in the optimizer); the
  intermediate highway heads train on ``sum_i CE(z_i, y)``, ``i = 1..L-1``;
* inference: exit at the first head whose prediction entropy (nats) is below ``S``
  (``EntropyExit(S)``), engine mode ``"exit_only"``.

No skip gates (``with_gates=False``). Shared loops: :mod:`recipes.baselines`.
"""

from __future__ import annotations

import sys
from functools import partial

from adaptive_depth.exits import EntropyExit
from recipes import baselines

METHOD = baselines.BaselineMethod(
    name="deebert",
    description="DeeBERT: fine-tune, then train frozen-backbone highway heads; raw entropy exit.",
    head_type="pooler",
    stage1_heads="last",
    stage1_loss=baselines.last_head_loss,
    stage2_heads="intermediate",
    stage2_loss=baselines.intermediate_heads_loss,
    make_criterion=lambda threshold: EntropyExit(threshold),
    threshold_name="entropy",
    default_thresholds=lambda num_steps: [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
)


# (run_dir, device="cpu") -> (encoder, tokenizer, config); see recipes.baselines.load_trained.
load_trained = partial(baselines.load_trained, METHOD)
# (argv=None) -> exit status; see recipes.baselines.main.
main = partial(baselines.main, METHOD)

if __name__ == "__main__":
    sys.exit(main())
