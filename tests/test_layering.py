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


def _import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """``{module: modules of ``packages`` it imports}``, at run time (module level or inside a
    function; imports under ``if TYPE_CHECKING:`` are left out, as Python never runs them)."""
    files = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges: set[str] = set()
        pending = [ast.parse(path.read_text(), filename=str(path))]
        while pending:
            for node in ast.iter_child_nodes(pending.pop()):
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    pending.append(ast.Module(body=node.orelse, type_ignores=[]))  # only its else branch runs
                    continue
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:  # relative: ``from . import x``, ``from ..run import y``
                        parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                        base = ".".join([*parents, base]).strip(".")
                    names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
                edges |= {target for target in map(known, names) if target and target != module}
                pending.append(node)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """One ``a -> b -> a`` path for every module that imports itself through others."""
    cycles = []
    for start in sorted(graph):  # depth-first search for a path back to ``start``
        stack, seen = [(start, [start])], set()
        while stack:
            module, path = stack.pop()
            for target in sorted(graph[module]):
                if target == start:
                    cycles.append(" -> ".join([*path, start]))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, [*path, target]))
    return cycles


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from typing import TYPE_CHECKING\nfrom pkg.b import f\n"
                                           "if TYPE_CHECKING:\n    from pkg.c import g\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from . import a\n")
    (tmp_path / "pkg" / "c.py").write_text("import pkg.a\n")
    graph = _import_graph(tmp_path, ("pkg",))
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg", "pkg.a"}, "pkg.c": {"pkg.a"}}
    assert _cycles(graph) == ["pkg.a -> pkg.b -> pkg.a", "pkg.b -> pkg.a -> pkg.b"]


def test_no_import_cycle_among_the_library_recipes_and_benchmarks() -> None:
    graph = _import_graph(PACKAGE.parent, ("adaptive_depth", "recipes", "benchmarks"))
    assert "recipes.run.composer" in graph["recipes.run.cli"] and "adaptive_depth.engine" in graph["recipes.run.sweep"]
    assert _cycles(graph) == []
