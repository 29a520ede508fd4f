"""The guide's examples run as written: "Add a new method" through the shared run, and
"Reusing CrossLayerInfoNCE in your own model" on a plain transformers classifier."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from recipes.run.method import METHODS
from tests.conftest import REPO, requires_minilm


def run_guide_example(marker: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Execute the one ```python block of docs/guide.md that contains ``marker``; its namespace."""
    guide = (REPO / "docs" / "guide.md").read_text()
    (example,) = [block for block in re.findall(r"```python\n(.*?)```", guide, flags=re.DOTALL) if marker in block]
    exec(compile(example, "docs/guide.md", "exec"), namespace)
    return namespace


@requires_minilm
def test_new_method_example_trains_and_logs_its_loss_terms(tmp_path: Path, glue_dir: Path,
                                                           tiny_model_dir: Path) -> None:
    METHODS.pop("joint", None)
    try:
        namespace = run_guide_example("register_method(Method(", {"__name__": "joint_example"})
        out = tmp_path / "run"
        status = namespace["run_cli"](namespace["METHOD"], [
            "--task", "mrpc", "--data-dir", str(glue_dir), "--model", str(tiny_model_dir), "--output-dir", str(out),
            "stage1_epochs=1", "batch_size=8", "eval_batch_size=8", "head_inner_size=16"])
        assert status == 0
        results = json.loads((out / "results.json").read_text())
        assert results["recipe"] == "joint"
        assert set(results["history"]["stage1"][0]["terms"]) == {"weighted_task", "contrastive"}
        assert [row["name"] for row in results["sweep"]] == ["full", "entropy=0.1", "entropy=0.3", "entropy=0.5"]
        assert (out / "model" / "adaptive_config.json").is_file()
    finally:
        METHODS.pop("joint", None)


def test_cross_layer_info_nce_example_trains_a_plain_transformers_classifier() -> None:
    """The example's step is finite and moves the model; the contrastive term alone (no task
    loss) sends a gradient into every encoder layer and the projection head, none into the classifier."""
    from transformers import BertForSequenceClassification

    namespace = run_guide_example("output_hidden_states=True", {"__name__": "contrastive_example"})
    model, contrastive, config = namespace["model"], namespace["contrastive"], namespace["config"]
    assert type(model) is BertForSequenceClassification
    assert math.isfinite(namespace["loss"].item()) and namespace["contrastive_loss"].item() > 0
    torch.manual_seed(0)  # the example's seed: the model as it was before its step
    initial = BertForSequenceClassification(config)
    assert any(not torch.equal(before, after) for before, after in zip(initial.parameters(), model.parameters()))

    model.zero_grad()
    contrastive.zero_grad()
    out = model(namespace["input_ids"], attention_mask=namespace["attention_mask"], output_hidden_states=True)
    contrastive(out.hidden_states[1:], namespace["attention_mask"]).loss.backward()
    for index, layer in enumerate(model.bert.encoder.layer):
        gradients = [parameter.grad for parameter in layer.parameters()]
        assert all(grad is not None for grad in gradients), index
        assert any(bool(grad.abs().sum() > 0) for grad in gradients), index
    assert all(parameter.grad is not None for parameter in contrastive.parameters())
    assert all(parameter.grad is None or not bool(parameter.grad.any()) for parameter in model.classifier.parameters())
