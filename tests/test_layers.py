"""The package's layers: apps -> plugins | backends | models -> core, checked by import-linter
(the contract is in pyproject.toml), and by a direct reading of every module's imports."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "models", "plugins", "backends", "apps")


def lint_imports() -> str:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is missing: install the test extra (pip install -e '.[test]')")
    return exe


def test_import_linter_contract_is_kept():
    result = subprocess.run([lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def internal_imports(path: Path) -> list[str]:
    """Absolute ``mvar_engine...`` modules a source file imports (relative imports resolved)."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = ["mvar_engine", *rel.parts[:-1]] if rel.name != "__init__" else ["mvar_engine", *rel.parts[:-1]]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
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
