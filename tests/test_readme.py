"""The README's example runs as written, and CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import requires_minilm

ROOT = Path(__file__).resolve().parents[1]


@requires_minilm
def test_readme_python_example_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["trace"].predictions.shape == (2,)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.DOTALL)
    test_command = next(command for command in commands if "pytest" in command)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
