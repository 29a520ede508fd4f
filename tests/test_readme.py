"""The README's example runs as written, and CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO, requires_minilm, tiny_minilm_encoder


@requires_minilm
def test_readme_python_example_runs() -> None:
    readme = (REPO / "README.md").read_text()
    example = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)[0]
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["trace"].predictions.shape == (2,)


@requires_minilm
def test_readme_saved_model_example_runs(tmp_path: Path, capsys) -> None:
    """The README's "use the trained model" block, on a tiny model saved where the recipe saves."""
    readme = (REPO / "README.md").read_text()
    (example,) = [block for block in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
                  if "AdaptivePipeline.from_pretrained" in block]
    encoder, tokenizer = tiny_minilm_encoder()
    encoder.adaptive_config.label_names = ["0", "1"]
    folder = encoder.save_pretrained(tmp_path / "runs" / "smartbert-mrpc" / "model", tokenizer=tokenizer)
    exec(compile(example.replace("runs/smartbert-mrpc/model", str(folder)), "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("exit at layer" in line for line in lines)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.DOTALL)
    test_command = next(command for command in commands if "pytest" in command)
    assert test_command in (REPO / ".ci" / "run").read_text().splitlines()
