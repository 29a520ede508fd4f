"""adaptive_depth is a library: it must not import the recipes or benchmarks built on it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import subprocess_env

PACKAGE = Path(__file__).resolve().parents[1] / "adaptive_depth"


def test_no_source_file_imports_recipes_or_benchmarks() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] in ("recipes", "benchmarks")]
    assert offenders == []


def test_importing_every_module_loads_neither(tmp_path: Path) -> None:
    code = (
        "import importlib, pkgutil, sys, adaptive_depth\n"
        "for info in pkgutil.walk_packages(adaptive_depth.__path__, 'adaptive_depth.'):\n"
        "    importlib.import_module(info.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('recipes', 'benchmarks'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=subprocess_env(checkout_first=True))
