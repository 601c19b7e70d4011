#!/usr/bin/env python3
"""The one-call GPU suite: every CUDA test and the GPU benchmarks, on one GPU, within about 8 minutes.

Usage (``benchmarks/gpu-suite.sh`` runs this with the Python it finds)::

    python benchmarks/gpu_suite.py OUT_DIR [--dry-run] [--wheels DIR] [--budget-s 480] [--only NAME,...]

Steps, in order (each with its own time limit, skipped with the reason once the budget is spent):

1. ``setup``: the torch already installed (never replaced: a GPU image's CUDA build stays), the
   project's other dependencies (from ``--wheels DIR`` when missing: ``pip install --no-index
   --find-links DIR``, so a machine without a package registry works), the project itself
   installed without dependencies when it is not importable from this checkout.
2. ``pytest-cuda``: ``pytest -m cuda`` (every CUDA case; a backend unavailable there skips with its
   reason, listed by ``-rs`` in the log) with a JUnit XML.
3. ``bench-attention``: ``bench attention`` on CUDA (sdpa, flex, natten/xformers/flash-attn where present).
4. ``matrix-d16``: the paper preset at d16 256px, batch 32, bf16: VAR vs MVAR (memory, time), and
   MVAR compiled (one graph per scale, CUDA graphs).
5. ``matrix-raster``: LlamaGen-B (576 tokens), batch 32 and 128, bf16: full vs ssd at 20%, eager and
   compiled (CUDA graphs), and ssd's buffer variant (``buffer=row``: SSD's 10.7x setting).
6. ``capacity``: ``bench capacity`` at a 40 GiB budget (largest batch and throughput per policy).
7. ``train-throughput``: ``bench train --throughput`` at VAR-d16 256px, batch 16, bf16: VAR's sequence
   vs MVAR's parallel strategy, from codes and from images (images/s, data-wait share).

Written under ``OUT_DIR``: ``suite.json`` (rewritten atomically after every step: command, status,
exit code, seconds, the files the step wrote), one ``NAME.log`` per step and each benchmark's own
JSON/markdown. ``--dry-run`` resolves every step on any machine, CPU included, and times nothing:
the setup checks run, pytest only collects (``--collect-only``), and each ``mvar-engine`` command
only parses its command line (``MVAR_ENGINE_PARSE_ONLY=1``), so a renamed flag fails the dry run.
Standard library only (the project is imported in the steps' own processes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEPENDENCIES = {"pluggy": "pluggy", "pydantic": "pydantic", "numpy": "numpy", "PIL": "pillow", "tqdm": "tqdm",
                "safetensors": "safetensors"}
"""Import name -> distribution name of the runtime dependencies besides torch."""
TEST_DEPENDENCIES = {"pytest": "pytest", "hypothesis": "hypothesis"}
DEFAULT_BUDGET_S = 480.0
PARSE_ONLY_ENV = "MVAR_ENGINE_PARSE_ONLY"  # apps/cli_helpers.py reads it (standard library only here)


@dataclass
class Step:
    """One step: ``argv`` run from the repository root, killed after ``timeout_s``."""

    name: str
    argv: list[str]
    timeout_s: float
    outputs: list[str] = field(default_factory=list)
    kind: str = "mvar-engine"  # or "pytest"


def mvar_engine(*args: str) -> list[str]:
    return [sys.executable, "-c", "from mvar_engine.apps.cli import entry; entry()", *args]


def steps(out: Path) -> list[Step]:
    """The suite's steps (their outputs under ``out``)."""
    def o(name: str) -> str:
        return str(out / name)

    common = ("--device", "cuda", "--no-table")
    return [
        Step("pytest-cuda", [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                             "--junitxml", o("pytest-cuda.xml"), "tests"], 90, ["pytest-cuda.xml"], kind="pytest"),
        Step("bench-attention", mvar_engine("bench", "attention", *common, "--dtype", "bfloat16",
                                            "--output", o("attention.json")), 60, ["attention.json"]),
        Step("matrix-d16", mvar_engine("bench", "matrix", "--cells", "d16-256:32",
                                       "--configs", "full/dense/full,markov/neighborhood/none,"
                                                    "markov/neighborhood/none@compile", "--dtype", "bfloat16",
                                       "--cfg", "1.5", "--repeats", "3", "--warmup", "1", *common,
                                       "--output", o("matrix-d16.json")), 120, ["matrix-d16.json", "matrix-d16.md"]),
        Step("matrix-raster", mvar_engine("bench", "matrix", "--cells", "llamagen-b:32,llamagen-b:128",
                                          "--configs", "raster/dense/full,raster/dense/full@compile,"
                                                       "raster/dense/ssd:budget=0.2,raster/dense/ssd:budget=0.2@compile,"
                                                       "raster/dense/ssd:budget=0.2:buffer=row",
                                          "--dtype", "bfloat16", "--repeats", "1", "--warmup", "1", *common,
                                          "--output", o("matrix-raster.json")), 90,
             ["matrix-raster.json", "matrix-raster.md"]),
        Step("capacity", mvar_engine("bench", "capacity", "--memory-budget", "40GiB", "--dtype", "bfloat16",
                                     "--repeats", "2", *common, "--output", o("capacity.json")), 60,
             ["capacity.json", "capacity.md"]),
        Step("train-throughput", mvar_engine("bench", "train", "--throughput", "--precisions", "bf16", "--batch-size",
                                             "16", "--images", "64", "--cycles", "1", *common,
                                             "--output", o("train-throughput.json")), 60, ["train-throughput.json"]),
    ]


# -- setup -----------------------------------------------------------------------------------------
def missing(modules: dict[str, str]) -> list[str]:
    """Distribution names of the modules that are not importable here."""
    return [dist for module, dist in modules.items() if importlib.util.find_spec(module) is None]


def project_location() -> Path | None:
    spec = importlib.util.find_spec("mvar_engine")
    return Path(list(spec.submodule_search_locations)[0]).resolve() if spec and spec.submodule_search_locations else None


def setup(wheels: Path | None, dry_run: bool, log) -> dict:
    """Check torch, bring the missing dependencies from ``wheels``, install the project without
    dependencies where needed; returns what it found (raises ``SystemExit`` with one line)."""
    facts: dict = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("gpu-suite: torch is not installed in this Python; install a CUDA build of torch first "
                         "(the suite never installs torch)")
    probe = subprocess.run([sys.executable, "-c", "import json, torch; print(json.dumps({'torch': torch.__version__, "
                            "'cuda': torch.version.cuda, 'available': torch.cuda.is_available(), 'devices': "
                            "[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}))"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        raise SystemExit(f"gpu-suite: torch does not import: {probe.stderr.strip().splitlines()[-1:]}")
    facts.update(json.loads(probe.stdout))
    print(f"torch {facts['torch']} (CUDA {facts['cuda']}), devices: {facts['devices'] or 'none'}", file=log)
    if not facts["available"] and not dry_run:
        raise SystemExit("gpu-suite: torch sees no CUDA device here (run with --dry-run to check the steps on a CPU)")
    absent = missing({**DEPENDENCIES, **TEST_DEPENDENCIES})
    facts["installed_from_wheels"] = []
    if absent:
        if wheels is None or not wheels.is_dir():
            raise SystemExit(f"gpu-suite: missing {', '.join(absent)}; bring their wheels and pass --wheels DIR "
                             f"(pip download {' '.join(absent)} -d DIR on a machine with a registry)")
        command = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *absent]
        print(f"{'would run' if dry_run else 'running'}: {' '.join(command)}", file=log)
        if not dry_run:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        facts["installed_from_wheels"] = absent
    location = project_location()
    facts["project"] = str(location) if location else None
    if location != REPO:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e",
                   str(REPO)]
        print(f"{'would run' if dry_run else 'running'}: {' '.join(command)}", file=log)
        if not dry_run:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
            facts["project"] = str(REPO)
    return facts


# -- running ---------------------------------------------------------------------------------------
def write_atomic(path: Path, payload: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=1)
        handle.write("\n")
    os.replace(tmp, path)


def run_step(step: Step, out: Path, dry_run: bool, left_s: float) -> dict:
    argv = list(step.argv)
    env = dict(os.environ)
    if dry_run:
        if step.kind == "pytest":
            argv = [a for a in argv if a != "-rs"] + ["--collect-only"]
        else:
            env[PARSE_ONLY_ENV] = "1"
    limit = min(step.timeout_s, left_s)
    record = {"name": step.name, "command": argv, "timeout_s": limit, "log": f"{step.name}.log"}
    start = time.perf_counter()
    with open(out / f"{step.name}.log", "w") as log:
        try:
            code = subprocess.run(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
            status = ("resolved" if dry_run else "ok") if code == 0 else "failed"
            if step.kind == "pytest" and code == 5 and not dry_run:
                status = "ok"  # no test selected: nothing marked cuda ran here
        except subprocess.TimeoutExpired:
            code, status = None, "timeout"
    record.update(status=status, returncode=code, seconds=round(time.perf_counter() - start, 2),
                  outputs=[name for name in step.outputs if (out / name).exists()])
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-suite", description=__doc__.split("\n\n")[0])
    p.add_argument("out", metavar="OUT_DIR", help="folder for suite.json, the logs and the reports")
    p.add_argument("--dry-run", action="store_true", help="resolve every step, time nothing (any machine)")
    p.add_argument("--wheels", type=Path, default=None, metavar="DIR", help="wheels of missing dependencies")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="whole-suite limit (default 480)")
    p.add_argument("--only", default=None, metavar="NAME,...", help="run only these steps")
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        print(f"gpu-suite: error: {args.out}: cannot write there ({error.strerror or error}); choose another folder",
              file=sys.stderr)
        return 2
    chosen = steps(out)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {s.name for s in chosen}]
        if unknown:
            print(f"gpu-suite: error: --only {','.join(unknown)}: no such step (steps: "
                  f"{', '.join(s.name for s in chosen)})", file=sys.stderr)
            return 2
        chosen = [s for s in chosen if s.name in names]
    began = time.perf_counter()
    payload: dict = {"suite": "gpu", "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "budget_s": args.budget_s, "steps": []}
    with open(out / "setup.log", "w") as log:
        try:
            payload["setup"] = setup(args.wheels, args.dry_run, log)
        except SystemExit as stop:
            print(stop, file=sys.stderr)
            payload["setup"] = {"error": str(stop)}
            write_atomic(out / "suite.json", payload)
            return 2
    write_atomic(out / "suite.json", payload)
    for step in chosen:
        left = args.budget_s - (time.perf_counter() - began)
        if left < 5:
            payload["steps"].append({"name": step.name, "status": "skipped", "reason": "the suite's budget is spent"})
        else:
            record = run_step(step, out, args.dry_run, left)
            payload["steps"].append(record)
            print(f"{step.name}: {record['status']} in {record['seconds']} s (log {out / record['log']})", flush=True)
        write_atomic(out / "suite.json", payload)
    payload["seconds"] = round(time.perf_counter() - began, 1)
    write_atomic(out / "suite.json", payload)
    bad = [s["name"] for s in payload["steps"] if s["status"] not in ("ok", "resolved")]
    print(f"gpu-suite: {len(payload['steps']) - len(bad)}/{len(payload['steps'])} steps "
          f"{'resolved' if args.dry_run else 'ok'}; {out / 'suite.json'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
