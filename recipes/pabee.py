"""PABEE (Zhou et al., NeurIPS 2020, https://arxiv.org/abs/2006.04152): patience-based exit.

Usage::

    python -m recipes.pabee --task mrpc [--data-dir DIR] [--model PATH] [--config FILE]
        [--output-dir DIR] [--resume] [key=value ...]

* one stage: backbone and every pooler head train jointly on the layer-weighted loss
  ``sum_i i * L_i / sum_i i`` (``i = 1..L``, ``L_i`` the task loss of head ``i``);
  ``stage2_*`` config keys are ignored;
* inference: exit once ``p`` consecutive heads agree (``PatienceExit(p)``), swept over
  ``p = 1..L-1`` unless ``thresholds`` lists others; engine mode ``"exit_only"``.

No skip gates (``with_gates=False``). Regression tasks work too (agreement within a
tolerance). Shared loops: :mod:`recipes.baselines` and :mod:`recipes.run`.
"""

from __future__ import annotations

import sys

from adaptive_depth.exits import PatienceExit
from adaptive_depth.objectives import WeightedExits
from recipes import baselines

SPEC = baselines.BaselineSpec(
    name="pabee",
    description="PABEE: joint training of all heads (layer-weighted loss); patience exit.",
    head_type="pooler",
    stage1=WeightedExits(),
    make_criterion=lambda threshold: PatienceExit(int(threshold)),
    threshold_name="patience",
    default_thresholds=lambda num_steps: [float(patience) for patience in range(1, num_steps)],
    integer_thresholds=True,
    classification_only_exits=False,
)
METHOD = baselines.register_baseline(SPEC)

# load_trained(run_dir, device="cpu") -> (encoder, tokenizer, config); main(argv=None) -> exit status.
load_trained, main = baselines.entry_points(METHOD)

if __name__ == "__main__":
    sys.exit(main())
