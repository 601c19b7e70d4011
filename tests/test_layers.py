"""The package's layers: apps -> plugins | backends | models -> core. ``.ci/run`` checks the
import-linter contract (pyproject.toml) with ``lint-imports``; these tests read every module's
imports directly: core stays self-contained, no cycle, no function-level or private import."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "models", "plugins", "backends", "apps")


@functools.lru_cache(maxsize=None)
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def internal_imports(path: Path) -> list[str]:
    """Absolute ``mvar_engine...`` modules a source file imports (relative imports resolved)."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = ["mvar_engine", *rel.parts[:-1]] if rel.name != "__init__" else ["mvar_engine", *rel.parts[:-1]]
    out = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                out.append(".".join(base + ([node.module] if node.module else [])))
            elif (node.module or "").startswith("mvar_engine"):
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("mvar_engine")]
    return out


def test_core_imports_nothing_outside_core():
    for path in sorted((ROOT / "core").rglob("*.py")):
        outside = [m for m in internal_imports(path) if m != "mvar_engine.core" and not m.startswith("mvar_engine.core.")]
        assert not outside, f"{path.relative_to(ROOT)} imports {outside}"


def test_a_generation_never_imports_the_training_stack():
    code = ("import sys; from mvar_engine.apps.pipeline import Pipeline; "
            "bad = sorted(m for m in sys.modules if m.startswith(('mvar_engine.apps.training', 'mvar_engine.apps.bench', "
            "'mvar_engine.apps.evaluation'))); print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def package_modules() -> dict[str, Path]:
    """``mvar_engine.x.y`` -> its source file, for every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] not in LAYERS and rel != Path("__init__.py") and rel != Path("testing.py"):
            continue
        parts = rel.with_suffix("").parts
        name = ".".join(["mvar_engine", *(parts[:-1] if parts[-1] == "__init__" else parts)])
        out[name] = path
    return out


@functools.lru_cache(maxsize=None)
def module_imports(path: Path, *, top_level_only: bool) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every internal import (``top_level_only``: outside functions)."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = ["mvar_engine", *rel.parts[:-1]]
    tree = parse(path)
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if top_level_only and id(node) in inside:
            continue
        if isinstance(node, ast.ImportFrom):
            module = (".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else []))
                      if node.level else node.module or "")
            if module.startswith("mvar_engine"):
                out.append((module, [a.name for a in node.names], node.lineno))
    return out


def test_no_function_level_import_of_the_package():
    """Function-level imports are for optional dependencies only (natten, transformers, ...)."""
    for name, path in package_modules().items():
        inner = set(map(tuple, [(m, tuple(n), line) for m, n, line in module_imports(path, top_level_only=False)]))
        outer = set(map(tuple, [(m, tuple(n), line) for m, n, line in module_imports(path, top_level_only=True)]))
        assert inner == outer, f"{path.relative_to(ROOT)}: function-level imports {sorted(inner - outer)}"


def test_no_private_name_is_imported_from_another_module():
    for name, path in package_modules().items():
        for module, names, line in module_imports(path, top_level_only=False):
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not private, f"{path.relative_to(ROOT)}:{line} imports {private} from {module}"


def test_no_import_cycle():
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for module, names, _ in module_imports(path, top_level_only=True):
            for candidate in [f"{module}.{n}" for n in names] + [module]:
                if candidate in modules and candidate != name:
                    targets.add(candidate)
                    break
        graph[name] = targets
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own submodules
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])


def test_core_names_no_apps_module():
    """Built-ins register through entry points only (their distribution's own, :func:`builtin_entry_points`):
    core/ names no module of apps/, not even as a string."""
    for path in sorted((ROOT / "core").glob("*.py")):
        text = path.read_text()
        assert "mvar_engine.apps" not in text and "apps." not in text, path.relative_to(ROOT)


def test_core_words_no_cli_flag():
    """core/ names run settings with ``setting(...)`` (errors.py), never as flags: the CLI words them
    ``--backend sdpa``, the Python API ``backend='sdpa'``."""
    import re

    for path in sorted((ROOT / "core").glob("*.py")):
        flags = re.findall(r"--[a-z][a-z-]*", path.read_text())
        assert not flags, f"{path.relative_to(ROOT)} names flags {sorted(set(flags))}"


def test_no_comment_names_an_issue_or_a_measured_time():
    """Comments state contracts and choices; measurements live in docs/measurements.md, history in git."""
    import re

    pattern = re.compile(r"[Ii]ssue ?#?\d+|\d(\.\d+)? ?ms\b|\d ?s (a call|compile)|seen on \d")
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in ("tests", "examples", "benchmarks", "tools", "docs", ".venv") or "egg-info" in str(relative):
            continue
        hits = [line.strip() for line in path.read_text().splitlines() if pattern.search(line)]
        assert not hits, f"{relative}: {hits[:3]}"
