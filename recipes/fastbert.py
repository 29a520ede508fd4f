"""FastBERT (Liu et al., ACL 2020, https://arxiv.org/abs/2004.02178): self-distilled students.

Usage::

    python -m recipes.fastbert --task mrpc [--data-dir DIR] [--model PATH] [--config FILE]
        [--output-dir DIR] [--resume] [key=value ...]

* stage 1 ("pre-training + fine-tuning"): backbone + the teacher, the last FastBERT
  classifier (:class:`~adaptive_depth.exits.ExitHead`: narrowed self-attention head), CE;
* stage 2 (self-distillation): backbone and teacher frozen; the student heads ``1..L-1``
  train on ``sum_s KL(p_teacher || p_s)`` with the teacher's softmax detached (no labels);
* inference: exit when the normalized entropy ("speed") is below ``S``
  (``EntropyExit(S, normalized=True)``), engine mode ``"exit_only"``.

No skip gates (``with_gates=False``). Shared loops: :mod:`recipes.baselines` and :mod:`recipes.run`.
"""

from __future__ import annotations

import sys

from adaptive_depth.exits import EntropyExit
from adaptive_depth.objectives import DistillExits, LastHead
from recipes import baselines

SPEC = baselines.BaselineSpec(
    name="fastbert",
    description="FastBERT: fine-tune the teacher, self-distil frozen-backbone students; speed (normalized entropy) exit.",
    head_type="attention",
    stage1=LastHead(),
    stage2=DistillExits(),
    make_criterion=lambda threshold: EntropyExit(threshold, normalized=True),
    threshold_name="speed",
    default_thresholds=lambda num_steps: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
)
METHOD = baselines.register_baseline(SPEC)

# load_trained(run_dir, device="cpu") -> (encoder, tokenizer, config); main(argv=None) -> exit status.
load_trained, main = baselines.entry_points(METHOD)

if __name__ == "__main__":
    sys.exit(main())
