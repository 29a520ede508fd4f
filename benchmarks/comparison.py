"""What every comparison of finished runs shares (``benchmarks.tradeoff``, ``calibrated``, ``heads``).

* :data:`REFERENCE` and :func:`reference_macs`: the one cost denominator, the full depth of the
  plain fine-tuned model of the same backbone (paper-convention MACs), so that a relative cost
  means the same FLOPs for every method;
* :func:`check_alike`: runs of one task, seed, length and backbone, or none are compared;
* :func:`parse_run`: the ``--run METHOD=FOLDER`` arguments.

Example:
    >>> parse_run("smartbert=runs/mrpc/smartbert")
    ('smartbert', PosixPath('runs/mrpc/smartbert'))
"""

from __future__ import annotations

from pathlib import Path

from recipes.run.errors import ConfigError
from recipes.run.results import RunResults

__all__ = ["REFERENCE", "check_alike", "parse_run", "reference_macs"]

REFERENCE = "finetune"  # the method whose full depth is every relative cost's denominator


def reference_macs(backbone_dir: Path, num_labels: int, padded_length: int) -> int:
    """Full-depth paper MACs of the plain fine-tuned model: embedding + every layer + a pooler head."""
    from transformers import AutoConfig, AutoModel

    from adaptive_depth.encoder import AdaptiveEncoder

    backbone = AutoModel.from_config(AutoConfig.from_pretrained(backbone_dir))
    encoder = AdaptiveEncoder(backbone, num_labels=num_labels, head_type="pooler", with_gates=False)
    return encoder.full_depth_macs(padded_length, "paper")


def check_alike(all_results: dict[str, RunResults]) -> None:
    """Refuse to compare runs of different tasks, seeds, lengths or backbones.

    Raises:
        ConfigError: with the values that differ.
    """
    for key in ("task", "seed", "padded_length", "max_length"):
        values = {method: results.config.get(key) for method, results in all_results.items()}
        if len(set(values.values())) > 1:
            raise ConfigError(f"the runs differ in {key}: {values}; compare runs made alike")
    models = {method: results.model for method, results in all_results.items()}
    if len(set(models.values())) > 1:
        raise ConfigError(f"the runs use different backbones: {models}")


def parse_run(argument: str) -> tuple[str, Path]:
    """``method=folder`` -> ``(method, Path(folder))``."""
    method, separator, folder = argument.partition("=")
    if not separator or not method or not folder:
        raise ConfigError(f"--run {argument!r}: expected method=run_folder, e.g. --run smartbert=runs/tradeoff-mrpc/smartbert")
    return method.strip(), Path(folder)
