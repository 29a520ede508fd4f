"""The installed distribution: recipes and benchmarks import from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import subprocess_env


def test_recipes_and_benchmarks_import_outside_the_clone(tmp_path: Path) -> None:
    code = (
        "import benchmarks.tradeoff, recipes, recipes.smartbert\n"
        "from recipes.run.config import CONFIG_DIR\n"
        "assert (CONFIG_DIR / 'smartbert_mrpc.yaml').is_file(), CONFIG_DIR\n"
        "from adaptive_depth import AdaptiveInferenceEngine, AdaptivePipeline, calibrate_threshold\n"
        "print(recipes.__file__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(checkout_first=False),
                            capture_output=True, text=True)
    assert result.returncode == 0, (
        f"{result.stderr}\n(is the project installed? pip install -e '.[dev]')"
    )
    assert result.stdout.strip().endswith(os.path.join("recipes", "__init__.py"))


def test_predict_module_runs_from_another_directory(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "adaptive_depth.predict", "--help"], cwd=tmp_path,
                            env=subprocess_env(checkout_first=False), capture_output=True, text=True)
    assert result.returncode == 0 and "--input" in result.stdout
