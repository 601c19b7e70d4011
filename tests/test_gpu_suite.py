"""``benchmarks/gpu-suite.sh``: the one-call GPU suite resolves every step on this CPU with
``--dry-run`` (pytest collects the cuda cases, each mvar-engine command parses its flags), so it
cannot rot while no GPU is at hand; bad folders and step names are one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu-suite.sh"


def suite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})


def test_dry_run_resolves_every_step(tmp_path):
    done = suite(str(tmp_path / "out"), "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "out" / "suite.json").read_text())
    names = [s["name"] for s in report["steps"]]
    assert names == ["pytest-cuda", "bench-attention", "matrix-d16", "matrix-raster", "capacity", "train-throughput"]
    assert all(s["status"] == "resolved" for s in report["steps"]), report["steps"]
    assert report["dry_run"] and report["setup"]["torch"]
    assert sum(s["timeout_s"] for s in report["steps"]) <= 480  # the 8-minute budget
    collected = (tmp_path / "out" / "pytest-cuda.log").read_text()
    assert "test_cuda_backend_equals_reference" in collected  # the cuda cases are there to run
    parsed = json.loads((tmp_path / "out" / "capacity.log").read_text().strip().splitlines()[-1])
    assert parsed["command"] == "mvar-engine bench capacity" and parsed["arguments"]["memory_budget"] == "40GiB"
    assert not any(p.suffix == ".json" and p.name != "suite.json" for p in (tmp_path / "out").iterdir())  # nothing ran


def test_a_renamed_flag_fails_the_dry_run(tmp_path, monkeypatch):
    """The dry run really parses: a step with a flag no command has fails (checked on the parse-only path)."""
    env = {**os.environ, "MVAR_ENGINE_PARSE_ONLY": "1"}
    done = subprocess.run([sys.executable, "-c", "from mvar_engine.apps.cli import entry; entry()", "bench", "matrix",
                           "--no-such-flag"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "unrecognized arguments: --no-such-flag" in done.stderr


@pytest.mark.parametrize("args, needle", [(["--only", "nonsense"], "--only nonsense: no such step"),
                                          (["--dry-run"], "cannot write there")])
def test_bad_input_is_one_line(tmp_path, args, needle):
    out = tmp_path / "out"
    if "--only" not in args:
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"  # under a file
    done = suite(str(out), *args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], done.stderr
