"""The docs cannot rot: every relative link in README.md and docs/ resolves, and every worked
example in docs/plugins.md marked ``# test: run`` runs as written (each in a fresh namespace)."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "docs" / "plugins.md"
MARK = "# test: run"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def runnable_blocks() -> list[tuple[int, str]]:
    """``(line, code)`` of every ```python block of docs/plugins.md whose first line is the mark."""
    text = PLUGINS.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(text)
            if m.group(1).split("\n", 1)[0].strip() == MARK]


def test_every_link_resolves():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "check_links.py")], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_plugins_md_has_the_worked_examples():
    blocks = runnable_blocks()
    assert len(blocks) >= 6  # the token layout and examples (a) to (e)
    code = "\n".join(code for _, code in blocks)
    for hook in ("mvar_engine_cache_policies", "mvar_engine_attention_patterns", "mvar_engine_attention_backends",
                 "mvar_engine_model_adapters", "mvar_engine_register_commands"):
        assert f"def {hook}(" in code, hook


@pytest.mark.parametrize("line, code", [pytest.param(line, code, id=f"plugins.md:{line}")
                                        for line, code in runnable_blocks()])
def test_worked_example_runs(line, code, monkeypatch):
    """Run as a fresh module of its own (dataclasses and pickling look classes up by module)."""
    module = types.ModuleType(f"docs_plugins_line{line}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    # dont_inherit: the block runs under its own __future__ flags, not this file's
    exec(compile(code, f"{PLUGINS}:{line}", "exec", dont_inherit=True), module.__dict__)
