"""Failures that used to end in a traceback are one ``error:`` line and exit status 2, each command
run as a user runs it: in a subprocess, from a temporary folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from adaptive_depth.pretrained import ADAPTIVE_CONFIG_NAME, ADAPTIVE_WEIGHTS_NAME
from tests.conftest import requires_minilm, subprocess_env

pytestmark = [pytest.mark.integration, requires_minilm]


def run_python(*args: Any, cwd: Path, env: dict[str, str] | None = None,
               timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python args`` from ``cwd``, with this checkout importable, one thread and offline (unless
    ``env`` says otherwise)."""
    environment = {**subprocess_env(checkout_first=True), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def run_module(module: str, *args: Any, cwd: Path, env: dict[str, str] | None = None,
               timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` (see :func:`run_python`)."""
    return run_python("-m", module, *args, cwd=cwd, env=env, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit status 2, exactly one ``error: ...`` line on stderr, no traceback; returns the line."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def saved_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny adaptive model over the MiniLM vocabulary, saved with its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    from adaptive_depth import AdaptiveEncoder

    torch.manual_seed(0)
    encoder = AdaptiveEncoder(AutoModel.from_pretrained(tiny_model_dir), num_labels=2, gate_inner_size=16,
                              head_inner_size=16)
    return encoder.save_pretrained(tmp_path_factory.mktemp("cli") / "model",
                                   tokenizer=AutoTokenizer.from_pretrained(str(tiny_model_dir)))


def damaged(saved_model: Path, tmp_path: Path, edit: Callable[[Path], None]) -> Path:
    folder = Path(shutil.copytree(saved_model, tmp_path / "model"))
    edit(folder)
    return folder


def flip_last_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def edit_config(folder: Path, **changes: Any) -> None:
    values = json.loads((folder / ADAPTIVE_CONFIG_NAME).read_text())
    (folder / ADAPTIVE_CONFIG_NAME).write_text(json.dumps({**values, **changes}))


def truncate_heads(folder: Path) -> None:
    data = (folder / ADAPTIVE_WEIGHTS_NAME).read_bytes()
    (folder / ADAPTIVE_WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


# (edit of the saved model or None, extra arguments, fragments of the error line)
PREDICT_CASES = {
    "flipped-bit": (lambda f: flip_last_bit(f / ADAPTIVE_WEIGHTS_NAME), [], ["adaptive_heads.safetensors differs",
                                                                             "--no-verify"]),
    "truncated-heads": (truncate_heads, ["--no-verify"], ["adaptive_heads.safetensors cannot be read"]),
    "config-wrong-type": (lambda f: edit_config(f, num_labels="two"), ["--no-verify"],
                          ["adaptive_config.json", "field 'num_labels'"]),
    "missing-model-folder": (None, [], ["there is no folder missing/model", "not in the local cache"]),
}
# The other damaged files (tests/test_model_folder.py) take the same path through the command lines.


@pytest.mark.parametrize("case", sorted(PREDICT_CASES))
def test_predict_on_a_damaged_model_is_one_line(case: str, saved_model: Path, tmp_path: Path) -> None:
    edit, extra, fragments = PREDICT_CASES[case]
    model = damaged(saved_model, tmp_path, edit) if edit is not None else Path("missing/model")
    (tmp_path / "rows.tsv").write_text("sentence\nA man plays a guitar.\nHi.\n")
    result = run_module("adaptive_depth.predict", model, "--input", "rows.tsv", "--no-progress", *extra, cwd=tmp_path)
    assert_one_line_error(result, *fragments)


def test_no_verify_loads_a_deliberately_edited_model(saved_model: Path, tmp_path: Path) -> None:
    model = damaged(saved_model, tmp_path, lambda f: edit_config(f, threshold=0.25))
    (tmp_path / "rows.tsv").write_text("sentence\nA man plays a guitar.\n")
    assert_one_line_error(run_module("adaptive_depth.predict", model, "--input", "rows.tsv", "--no-progress",
                                     cwd=tmp_path), "adaptive_config.json differs")
    result = run_module("adaptive_depth.predict", model, "--input", "rows.tsv", "--no-progress", "--no-verify",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.splitlines()) == 1


def test_export_of_a_damaged_model_is_one_line(saved_model: Path, tmp_path: Path) -> None:
    model = damaged(saved_model, tmp_path, lambda f: edit_config(f, head_inner_size=8))
    result = run_module("adaptive_depth.export", model, "exported", "--format", "torch-export", "--no-verify",
                        cwd=tmp_path)
    assert_one_line_error(result, "adaptive_heads.safetensors: tensor 'exit_heads.0.", "has shape")
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize(("model", "fragments"), [
    ("/nonexistent/model", ["--model /nonexistent/model: no such folder"]),
    ("runs/not-here", ["there is no folder runs/not-here", "as a Hugging Face id", "HF_HUB_OFFLINE=1"]),
    ("unknown-type", ["cannot load model", "nope"]),
])
def test_a_recipe_given_a_model_it_cannot_load_says_why_in_one_line(
    model: str, fragments: list[str], tiny_model_dir: Path, glue_dir: Path, tmp_path: Path,
) -> None:
    if model == "unknown-type":  # a folder whose config.json names a model type transformers does not know
        folder = Path(shutil.copytree(tiny_model_dir, tmp_path / model))
        values = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**values, "model_type": "nope"}))
    result = run_module("recipes.smartbert", "--task", "mrpc", "--data-dir", glue_dir, "--model", model,
                        "--output-dir", "run", cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "run").exists()


def test_a_run_whose_engine_meets_nan_logits_stops_with_one_line(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Weights that turn NaN only at inference (training went through): the engine's
    FloatingPointError in the dev sweep becomes one line that says how to fix it."""
    from adaptive_depth.engine import AdaptiveInferenceEngine
    from tests.test_recipe_runs import assert_one_error_line, base, run_cli

    original = AdaptiveInferenceEngine.__call__

    def poisoned(self: AdaptiveInferenceEngine, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            for head in self.encoder.exit_heads:
                head.classifier.bias.fill_(float("nan"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AdaptiveInferenceEngine, "__call__", poisoned)
    out = tmp_path / "run"
    assert run_cli(*base(glue_dir, tiny_model_dir, out), "stage1_epochs=1", "stage2_epochs=0",
                   "entropy_thresholds=[0.3]") == 2
    assert_one_error_line(capsys.readouterr().err, "gave NaN or infinite logits", "training diverged",
                          "lower the learning rates")
