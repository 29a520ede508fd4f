"""The guide's "Add a new method" example runs as written, through the shared run."""

from __future__ import annotations

import json
import re
from pathlib import Path

from recipes.methods import METHODS
from tests.conftest import REPO, requires_minilm


@requires_minilm
def test_new_method_example_trains_and_logs_its_loss_terms(tmp_path: Path, glue_dir: Path,
                                                           tiny_model_dir: Path) -> None:
    guide = (REPO / "docs" / "guide.md").read_text()
    (example,) = [block for block in re.findall(r"```python\n(.*?)```", guide, flags=re.DOTALL)
                  if "register_method(Method(" in block]
    METHODS.pop("joint", None)
    namespace: dict = {"__name__": "joint_example"}
    exec(compile(example, "docs/guide.md", "exec"), namespace)
    try:
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
