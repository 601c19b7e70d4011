#!/usr/bin/env python3
"""Bad-input sweep of the ``mvar-engine`` command line.

Runs many *bad* inputs against the CLI the way a new user would (a fresh subprocess, each in its
own temporary working directory) and checks the project's promise for bad input (docs/cli.md:
"Bad input exits with status 2 and one line per problem"):

- exit status 2;
- at most one non-empty line on stderr;
- no ``Traceback`` on stdout or stderr;
- no file created in the working directory (a listing before and after, the case's own fixtures
  excluded; a fixture that is changed or removed counts too);
- fast: a case over 60 s is SLOW (and fails); one over 120 s is killed.

A few *control* cases (``expect="ok"``: valid input, e.g. names in another case, which
docs/cli.md says are normalised) check that each baseline command line really runs, so that a bad
value is the only thing wrong with the matching bad cases; they pass on exit 0 without a traceback.

Every bad input was checked against the ``--help`` text, docs/cli.md or the settings' documented
ranges before it went into the table: values documented as valid (``--cfg 0`` disables guidance,
``--top-k 0``/``--top-p 0`` switch the filter off, ``--grad-clip 0`` is off, ``--warmup-steps 0``,
``--cache-sink 0``, ``--seed -1``, a ``--cache-budget`` count above the sequence length, which is
clamped, an undilated ``--attention-kernel-size`` larger than a map, which covers the map, a finite
``--cfg 1e23`` (up to 1e30), a ``--max-images`` above the dataset size, ...) are left out.

Usage (a report: exits 0 unless ``--strict`` and something failed)::

    .venv/bin/python tools/bad_input_sweep.py [--jobs 1] [NAME_FILTER ...] [--json out.json]
        [--list] [--strict] [--keep] [--launcher auto|script|module]

``NAME_FILTER``: substrings (or globs with ``*``/``?``) of case names; a case runs when it matches
any of them. Standard library plus the project's own dependencies (torch, safetensors, pillow)
for the fixtures; nothing of the package itself is imported, so a broken package shows up as
failing cases instead of a crashed sweep.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SLOW_S = 60.0
KILL_S = 120.0
HUGE = "99999999999999999999999"
"""A number above every 64-bit range (and finite as a float: 1e23)."""

Setup = Callable[[Path, "Fixtures"], None]


# -- where things are ------------------------------------------------------------------------------
def package_dir() -> Path:
    """The ``mvar_engine`` package folder, found without importing it."""
    spec = importlib.util.find_spec("mvar_engine")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bad_input_sweep: the mvar_engine package is not importable from this interpreter "
                 "(run it with the project's .venv/bin/python)")
    return Path(list(spec.submodule_search_locations)[0])


def cpu_has_native_bf16() -> bool:
    """``avx512_bf16``/``amx_bf16`` (x86) or ``bf16`` (Arm) among the CPU flags (docs/cli.md: --dtype)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.split(":")[0].strip().lower() in ("flags", "features")
             for flag in line.partition(":")[2].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


WEIGHTS = package_dir() / "models" / "weights"
SHIPPED = {
    "mvar": WEIGHTS / "mvar-digits.safetensors",            # MVAR transformer (markov/neighborhood)
    "var": WEIGHTS / "var-digits.safetensors",              # VAR transformer (full/dense)
    "raster": WEIGHTS / "raster-digits.safetensors",        # raster GPT
    "tok": WEIGHTS / "tokenizer-digits.safetensors",        # multi-scale tokenizer 1,2,3,4,6,8
    "rtok": WEIGHTS / "tokenizer-raster-digits.safetensors",  # one-scale (8) tokenizer of the raster GPT
}


def launcher(kind: str) -> list[str]:
    """How the CLI is started: the ``mvar-engine`` console script beside the interpreter (what a
    user types), else ``python -m mvar_engine.apps.cli`` (``python -m mvar_engine`` has no
    ``__main__``)."""
    script = Path(sys.executable).parent / "mvar-engine"
    if kind == "script" or (kind == "auto" and script.is_file() and os.access(script, os.X_OK)):
        return [str(script)]
    return [sys.executable, "-m", "mvar_engine.apps.cli"]


def cuda_state() -> tuple[int, bool]:
    """(CUDA device count, MPS available) of this machine, from a torch import here."""
    try:
        import torch
    except Exception:  # pragma: no cover - torch is a dependency
        return 0, False
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return count, mps


# -- session fixtures (shared, read-only, outside every case's working directory) ---------------------
def synthetic_head_map(layers: int, heads: int) -> dict[str, Any]:
    """A well-formed head map (format mvar-engine/head-map/v1) of the given shape, no weights_id."""
    scores = [[0.8 if (layer + head) % 2 else 0.2 for head in range(heads)] for layer in range(layers)]
    return {"format": "mvar-engine/head-map/v1", "layers": layers, "heads": heads, "neighborhood": 3,
            "threshold": 0.5, "scores": scores,
            "classification": [["sink" if s > 0.5 else "local" for s in row] for row in scores],
            "calibration": {}, "weights_id": None}


def raster_shape() -> tuple[int, int]:
    """(layers, heads) of the shipped raster GPT, from its safetensors metadata (4 x 4 if unreadable)."""
    try:
        from safetensors import safe_open

        with safe_open(str(SHIPPED["raster"]), framework="pt") as handle:
            arch = json.loads((handle.metadata() or {})["mvar_engine"])["architecture"]
        return int(arch["depth"]), int(arch["heads"])
    except Exception:
        return 4, 4


class Fixtures(dict):
    """``{name}`` placeholders of argv: the shipped weights (``{mvar}``, ``{var}``, ``{raster}``,
    ``{tok}``, ``{rtok}``), ``{headmap}`` (a valid head map for the shipped raster GPT) and
    ``{cache}``; built on first use, once per session, thread-safe."""

    def __init__(self, root: Path) -> None:
        super().__init__({k: str(v) for k, v in SHIPPED.items()})
        self.root = root
        self.lock = threading.Lock()

    def __missing__(self, key: str) -> str:
        with self.lock:
            if key in self:
                return dict.__getitem__(self, key)
            builder = getattr(self, f"_build_{key}", None)
            if builder is None:
                raise KeyError(f"unknown fixture {{{key}}}")
            self.root.mkdir(parents=True, exist_ok=True)
            value = str(builder())
            self[key] = value
            return value

    def _build_headmap(self) -> Path:
        path = self.root / "heads.json"
        path.write_text(json.dumps(synthetic_head_map(*raster_shape()), indent=1))
        return path

    def head_map_data(self) -> dict[str, Any]:
        return json.loads(Path(self["headmap"]).read_text())


# -- fixture builders (each returns a setup callable: (cwd, fixtures) -> None) ------------------------
def chain(*steps: Setup) -> Setup:
    def run(cwd: Path, fx: Fixtures) -> None:
        for step in steps:
            step(cwd, fx)
    return run


def fifo(name: str) -> Setup:
    def run(cwd: Path, fx: Fixtures) -> None:
        os.mkfifo(cwd / name)
    return run


def mkdir(*names: str) -> Setup:
    def run(cwd: Path, fx: Fixtures) -> None:
        for name in names:
            (cwd / name).mkdir(parents=True, exist_ok=True)
    return run


def write(name: str, data: bytes | str) -> Setup:
    def run(cwd: Path, fx: Fixtures) -> None:
        path = cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return run


def random_bytes(name: str, size: int = 4096) -> Setup:
    return write(name, random.Random(name).randbytes(size))


def copy(name: str, fixture: str) -> Setup:
    def run(cwd: Path, fx: Fixtures) -> None:
        shutil.copyfile(fx[fixture], cwd / name)
    return run


def torch_save(name: str, make: Callable[[], Any]) -> Setup:
    def run(cwd: Path, fx: Fixtures) -> None:
        import torch

        torch.save(make(), cwd / name)
    return run


def poisoned_weights(name: str, fixture: str = "mvar", value: float | None = float("nan")) -> Setup:
    """``fixture``'s weights with its largest floating tensor filled with ``value`` (NaN; None: left
    as it is): a ``.safetensors`` keeps the metadata, a ``.pth`` is a flat state dict (torch.save)."""
    def run(cwd: Path, fx: Fixtures) -> None:
        import torch
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(fx[fixture], framework="pt") as handle:
            meta = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        if value is not None:
            key = max((k for k, t in tensors.items() if t.is_floating_point()), key=lambda k: tensors[k].numel())
            tensors[key] = torch.full_like(tensors[key], value)
        if name.endswith(".safetensors"):
            save_file(tensors, str(cwd / name), metadata=meta)
        else:
            torch.save(tensors, cwd / name)
    return run


def head_map(name: str, change: Callable[[dict[str, Any]], None]) -> Setup:
    """The valid head map fixture, changed by ``change(data)``, written to ``name``."""
    def run(cwd: Path, fx: Fixtures) -> None:
        data = fx.head_map_data()
        change(data)
        (cwd / name).write_text(json.dumps(data))  # NaN/Infinity are written as JSON extensions
    return run


def set_score(value: float) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["scores"][0][0] = value
    return change


def drop_layer(data: dict[str, Any]) -> None:
    data["layers"] -= 1
    data["scores"].pop()
    data["classification"].pop()


def other_weights(data: dict[str, Any]) -> None:
    data["weights_id"] = "f" * 64  # a fingerprint of some other weights file of the same shape


def images(folder: str, classes: dict[str, int], side: int = 12) -> Setup:
    """``folder/<class>/<i>.png``: ``classes[name]`` small RGB images each (0 = an empty class folder)."""
    def run(cwd: Path, fx: Fixtures) -> None:
        from PIL import Image

        for index, (cls, count) in enumerate(classes.items()):
            (cwd / folder / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (side, side), (40 * index, 20 * i, 200)).save(cwd / folder / cls / f"{i}.png")
    return run


def huge_png(path: str, side: int) -> Setup:
    """A ``side x side`` PNG of mode '1' (a few KB on disk, ``side**2`` pixels when decoded)."""
    def run(cwd: Path, fx: Fixtures) -> None:
        from PIL import Image

        (cwd / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("1", (side, side), 0).save(cwd / path, optimize=False)
    return run


# -- the case table --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    setup: Setup | None = None
    expect: str = "usage"  # "usage": bad input (exit 2, one line, no files); "ok": a valid control (exit 0)
    why: str = ""


def with_base(prefix: list[str], base: dict[str, str | None], extra: list[str], drop: tuple[str, ...] = ()) -> list[str]:
    """``prefix + base + extra``, where a flag named in ``extra`` (or ``drop``) replaces the base's."""
    given = {token for token in extra if token.startswith("--")} | set(drop)
    out = list(prefix)
    for flag, value in base.items():
        if flag not in given:
            out += [flag] if value is None else [flag, value]
    return out + list(extra)


GEN = {"--labels": "1", "--samples-per-label": "1", "--no-progress": None}
"""generate with the shipped digits models: about 3 s, writes outputs/samples.png when accepted."""
RW = {"--random-weights": None, "--depth": "1", "--patch-nums": "1,2,4", **GEN}
"""a randomly initialised model, small: about 5 s."""
RASTER = {"--trajectory": "raster", **GEN}
TRAIN = {"--tokenizer": "{tok}", "--steps": "1", "--batch-size": "4", "--max-images": "8", "--depth": "1",
         "--embed-dim": "32", "--num-heads": "2", "--no-progress": None, "--output": "run"}
"""train a tiny MVAR for one step on the shipped tokenizer: about 9 s when accepted."""
TRAIN_RASTER = {**TRAIN, "--trajectory": "raster", "--tokenizer": "{rtok}"}
TOKENIZER = {"--steps": "1", "--batch-size": "4", "--max-images": "8", "--no-progress": None, "--output": "tok"}
PROFILE = {"--labels": "0", "--samples-per-label": "1", "--no-progress": None, "--head-map": "heads.json"}
BENCH_ATTENTION = {"--sides": "8", "--batches": "1", "--heads": "1", "--head-dim": "8", "--repeats": "1",
                   "--backends": "sdpa", "--no-table": None, "--output": "ba.json"}
BENCH_TRAIN = {"--depth": "1", "--patch-nums": "1,2,3", "--batch-size": "1", "--steps": "1",
               "--strategies": "sequence", "--device": "cpu", "--no-table": None, "--output": "bt.json"}
BENCH_MATRIX = {"--models": "tiny", "--batches": "1", "--repeats": "1", "--warmup": "0", "--no-table": None,
                "--output": "bm.json"}
BENCH_CACHE = {"--model": "tiny", "--batch": "1", "--repeats": "1", "--warmup": "0", "--max-tokens": "4",
               "--quality-images": "0", "--in-process": None, "--policies": "sink", "--budgets": "0.5",
               "--no-table": None, "--output": "bc.json"}
EVALUATE = {"--samples-per-class": "1", "--compare": "m=--trajectory markov", "--no-table": None,
            "--output": "e.json"}
SAMPLE = {"--per-class": "1", "--labels": "0,1", "--no-progress": None, "--output-dir": "s"}
FID = {"--ref": "a.npz", "--inception-weights": "w.pth", "--no-progress": None, "--output": "f.json"}


def gen(*extra: str, drop: tuple[str, ...] = ()) -> list[str]:
    return with_base([], GEN, list(extra), drop)


def rw(*extra: str) -> list[str]:
    return with_base([], RW, list(extra))


def raster(*extra: str) -> list[str]:
    return with_base([], RASTER, list(extra))


def ssd(*extra: str) -> list[str]:
    return with_base([], {**RASTER, "--cache": "ssd", "--cache-budget": "0.5", "--cache-head-map": "{headmap}"},
                     list(extra))


def train(*extra: str, drop: tuple[str, ...] = ()) -> list[str]:
    return with_base(["train"], TRAIN, list(extra), drop)


def train_raster(*extra: str) -> list[str]:
    return with_base(["train"], TRAIN_RASTER, list(extra))


def tokenizer(*extra: str) -> list[str]:
    return with_base(["train-tokenizer"], TOKENIZER, list(extra))


def profile(*extra: str) -> list[str]:
    return with_base(["profile-heads"], PROFILE, list(extra))


def bench(name: str, base: dict[str, str | None], *extra: str) -> list[str]:
    return with_base(["bench", name], base, list(extra))


def evaluate(*extra: str) -> list[str]:
    return with_base(["evaluate"], EVALUATE, list(extra))


def sample(*extra: str) -> list[str]:
    return with_base(["sample"], SAMPLE, list(extra))


def fid(samples: str, *extra: str) -> list[str]:
    return with_base(["fid", samples], FID, list(extra))


def npz(name: str, shape: tuple[int, ...] = (4, 16, 16, 3), dtype: str = "uint8") -> Setup:
    """An ADM-style batch ``name`` (``arr_0`` of ``shape`` and ``dtype``) written with numpy."""
    def run(cwd: Path, fx: Fixtures) -> None:
        import numpy as np

        np.savez(cwd / name, np.zeros(shape, dtype=dtype))

    return run


def build_cases() -> list[Case]:
    cuda_count, mps = cuda_state()
    cases: list[Case] = []

    def bad(name: str, argv: list[str], setup: Setup | None = None, why: str = "") -> None:
        cases.append(Case(name, tuple(argv), setup, "usage", why))

    def ok(name: str, argv: list[str], setup: Setup | None = None, why: str = "") -> None:
        cases.append(Case(name, tuple(argv), setup, "ok", why))

    def numeric(prefix: str, build: Callable[..., list[str]], flag: str, values: dict[str, str], why: str,
                before: tuple[str, ...] = ()) -> None:
        for label, value in values.items():
            bad(f"{prefix}{flag.lstrip('-')}-{label}", build(*before, flag, value), why=why)

    NEG, ZERO, INF, NAN = {"neg": "-1"}, {"zero": "0"}, {"inf": "inf"}, {"nan": "nan"}
    BIG = {"huge": HUGE}

    # -- controls: each baseline runs (so the bad value is the only thing wrong below) ------------
    ok("control-generate", gen("--output", "/dev/null"))
    ok("control-random-weights", rw("--output", "/dev/null"))
    ok("control-raster-sink", raster("--cache", "sink", "--cache-budget", "32", "--output", "/dev/null"))
    ok("control-ssd-head-map", ssd("--output", "/dev/null"))
    ok("control-nbhd-kernel-dilation", gen("--attention-kernel-size", "3", "--attention-dilation", "2",
                                            "--output", "/dev/null"))
    ok("control-full-window", gen("--trajectory", "full", "--cache", "window", "--output", "/dev/null"))
    ok("control-var-plus-tokenizer", gen("--trajectory", "full", "--var-checkpoint", "{var}",
                                         "--vae-checkpoint", "{tok}", "--output", "/dev/null"))
    ok("control-train", train())
    ok("control-train-data-folder", train("--data", "data", "--max-images", "4", "--batch-size", "2"),
       images("data", {"a": 2, "b": 2}))
    ok("control-train-raster", train_raster())
    ok("control-train-tokenizer", tokenizer())
    ok("control-profile-heads", profile())
    ok("control-export-weights", ["export-weights", "{mvar}", "out.safetensors"])
    ok("control-bench-attention", bench("attention", BENCH_ATTENTION))
    ok("control-bench-train", bench("train", BENCH_TRAIN))
    ok("control-bench-matrix", bench("matrix", BENCH_MATRIX))
    ok("control-bench-cache", bench("cache", BENCH_CACHE))
    ok("control-evaluate", evaluate())
    ok("valid-trajectory-FULL", gen("--trajectory", "FULL", "--output", "/dev/null"),
       why="docs/cli.md: names are normalised, case is ignored")
    ok("valid-cache-SINK", raster("--cache", "SINK", "--cache-budget", "32", "--output", "/dev/null"),
       why="docs/cli.md: names are normalised, case is ignored")

    # -- generate: numeric flags --------------------------------------------------------------------
    numeric("gen-", gen, "--cfg", {**NEG, **INF, **NAN, "1e308": "1e308"},
            "--cfg takes a finite number from 0 to 1e30 (0 disables; larger overflows float32 logits)")
    numeric("gen-", gen, "--top-k", {**NEG, **BIG, **INF}, "--top-k: an integer >= 0 (0 off, 1 greedy)")
    numeric("gen-", gen, "--top-p", {**NEG, **BIG, **INF, **NAN}, "--top-p: a share in [0, 1]")
    numeric("gen-", gen, "--seed", {**BIG, "neghuge": "-" + HUGE}, "--seed: a 64-bit integer")
    numeric("gen-", gen, "--samples-per-label", {**ZERO, **NEG, **BIG}, "images per label: at least 1")
    numeric("gen-", gen, "--batch-size", {**ZERO, **BIG}, "images per forward pass: at least 1")
    numeric("rw-", rw, "--depth", {**ZERO, **BIG}, "transformer depth: at least 1")
    numeric("rw-", rw, "--num-classes", {**ZERO, **BIG}, "number of classes: at least 1")
    numeric("gen-", gen, "--trajectory-order", {**ZERO, **NEG, **INF}, "scales a scale sees: at least 1")
    numeric("gen-", gen, "--attention-kernel-size", {**ZERO, **NEG, **NAN, "frac": "5.5"},
            "window side k: an integer >= 1")
    numeric("gen-", gen, "--attention-dilation", {**ZERO, **BIG}, "window dilation: an integer >= 1")
    bad("gen-attention-dilation-5-kernel-7", gen("--attention-kernel-size", "7", "--attention-dilation", "5"),
        why="a 35-token dilated window does not fit the shipped 8x8 last map (NATTEN's rule)")
    numeric("gen-", gen, "--attention-apply-from", {"99": "99", "neg99": "-99", **BIG},
            "a scale index of the 6-scale schedule: -6 .. 5")

    # -- generate: raster caches ------------------------------------------------------------------
    numeric("sink-", raster, "--cache-budget", {**ZERO, **NEG, **INF, **NAN}, "budget: a finite number > 0",
            before=("--cache", "sink"))
    bad("sink-cache-budget-1-token", raster("--cache", "sink", "--cache-budget", "0.01"),
        why="1% of the 65-token sequence is 1 token, not more than the class prefix (a budget of 1 is the "
            "fraction 1.0: valid)")
    numeric("sink-", raster, "--cache-sink", {**NEG, **BIG}, "sink tokens: an integer >= 0 within the budget",
            before=("--cache", "sink", "--cache-budget", "32"))
    bad("sink-cache-sink-100-budget-32", raster("--cache", "sink", "--cache-budget", "32", "--cache-sink", "100"),
        why="the sink tokens fill the 32-token budget")
    numeric("h2o-", raster, "--cache-recent", {**NEG, "1.5": "1.5", **NAN}, "recent share: in [0, 1]",
            before=("--cache", "h2o"))
    numeric("window-", gen, "--cache-scales", {**ZERO, **NAN}, "scales kept: at least 1",
            before=("--trajectory", "full", "--cache", "window"))
    bad("window-cache-budget-inf", raster("--cache", "window", "--cache-budget", "inf"), why="budget must be finite")
    bad("markov-with-full-cache", gen("--cache", "full"), why="docs/cli.md: markov order 1 with a full cache is refused")
    bad("markov-with-window-cache", gen("--cache", "window"), why="docs/cli.md: markov order 1 with a window cache is refused")
    bad("raster-with-neighborhood", raster("--attention", "neighborhood"),
        why="attention patterns apply to next-scale trajectories")

    # -- generate: empty names and paths ------------------------------------------------------------
    for flag in ("--trajectory", "--attention", "--cache", "--backend", "--labels", "--var-checkpoint",
                 "--vae-checkpoint", "--output", "--save-tokens", "--config", "--device", "--dtype",
                 "--model-adapter"):
        bad(f"empty{flag}", gen(flag, ""), why="an empty name or path")
    bad("empty--patch-nums", rw("--patch-nums", ""), why="an empty list")
    bad("empty--cache-head-map", ssd("--cache-head-map", ""), why="an empty path")
    bad("empty--cache-budget", raster("--cache", "sink", "--cache-budget", ""), why="an empty number")
    bad("empty--attention-kernel-size", gen("--attention-kernel-size", ""), why="an empty number")

    # -- generate: lists ----------------------------------------------------------------------------
    for label, value in {"hole": "1,,2", "comma": ",", "neg": "-1", "10": "10", "huge": HUGE, "text": "a",
                         "semicolon": "1;2"}.items():
        bad(f"labels-{label}", gen("--labels", value), why="class labels: comma-separated integers 0 .. 9 (digits)")
    for label, value in {"hole": "1,,2", "zero": "0,1,2", "huge": f"1,{HUGE}", "321": "3,2,1"}.items():
        bad(f"rw-patch-nums-{label}", rw("--patch-nums", value), why="a schedule of increasing positive integers")

    # -- generate: unknown names, wrong case, flags of unchosen components ------------------------------
    for flag in ("--trajectory", "--attention", "--cache", "--backend", "--model-adapter"):
        bad(f"unknown{flag}", gen(flag, "bogus"), why="no such component")
    bad("unknown--dtype-float64", gen("--dtype", "float64"), why="float32, bfloat16 or float16")
    bad("unknown--dtype", gen("--dtype", "bogus"), why="float32, bfloat16 or float16")
    bad("unknown-flag", gen("--bogus"), why="no such flag")
    bad("unknown-subcommand", ["bogus"], why="no such subcommand")
    bad("unknown-bench-command", ["bench", "bogus"], why="no such bench command")
    bad("unknown-plugins-kind", ["plugins", "--kind", "bogus"], why="no such kind")
    bad("option-of-unchosen-attention", gen("--attention", "dense", "--attention-kernel-size", "5"),
        why="dense has no kernel size")
    bad("option-of-unchosen-cache", gen("--cache-budget", "0.5"), why="the markov default cache 'none' has no budget")
    if importlib.util.find_spec("flash_attn") is None:
        bad("backend-not-installed", gen("--backend", "flash-attn"), why="flash_attn is not installed")

    # -- generate: output paths -------------------------------------------------------------------
    bad("output-is-dir", gen("--output", "somedir"), mkdir("somedir"), why="a directory")
    bad("output-parent-is-file", gen("--output", "somefile/x.png"), write("somefile", "x"), why="parent is a file")
    bad("output-proc", gen("--output", "/proc/x.png"), why="not writable")
    ok("valid-output-jpg", gen("--output", "x.jpg"), why="the grid's format follows the suffix (.png, .jpg, .jpeg, .webp)")
    bad("output-gif", gen("--output", "x.gif"), why="the grid is .png, .jpg, .jpeg or .webp")
    bad("output-foo", gen("--output", "x.foo"), why="the grid is .png, .jpg, .jpeg or .webp")
    bad("output-no-suffix", gen("--output", "x"), why="the grid is .png, .jpg, .jpeg or .webp")
    bad("per-image-folder-is-file", gen("--output", "g.png", "--per-image"), write("g", "x"),
        why="--per-image writes into g/, a file")
    bad("per-image-devnull", gen("--output", "/dev/null", "--per-image"), why="no folder beside /dev/null")
    bad("save-tokens-txt", gen("--save-tokens", "t.txt"), why=".pt or .safetensors")
    bad("save-tokens-dir", gen("--save-tokens", "tdir"), mkdir("tdir"), why="a directory")
    bad("save-tokens-parent-is-file", gen("--save-tokens", "somefile/t.pt"), write("somefile", "x"),
        why="parent is a file")
    bad("save-tokens-proc", gen("--save-tokens", "/proc/t.pt"), why="not writable")

    # -- generate: devices ------------------------------------------------------------------------
    for device in ("tpu", "meta", "gpu", "cuda:-1", "cuda:x"):
        bad(f"device-{device}", gen("--device", device), why="auto, cpu, cuda, cuda:N")
    if not mps:
        bad("device-mps", gen("--device", "mps"), why="no MPS on this machine")
    if cuda_count <= 7:
        bad("device-cuda:7", gen("--device", "cuda:7"), why=f"{cuda_count} CUDA device(s)")
    if cuda_count == 0:
        bad("device-cuda", gen("--device", "cuda"), why="no CUDA on this machine")
        if cpu_has_native_bf16():
            ok("control-dtype-bfloat16-cpu", gen("--device", "cpu", "--dtype", "bfloat16", "--output", "/dev/null"),
               why="bf16 autocast on a CPU with native bf16")
        else:
            bad("dtype-bfloat16-cpu", gen("--device", "cpu", "--dtype", "bfloat16"), why="no native bf16 on this CPU")
        bad("dtype-float16-cpu", gen("--device", "cpu", "--dtype", "float16"), why="float16 autocast is CUDA only")

    # -- generate: config files -------------------------------------------------------------------
    configs = {
        "not-utf8": ("run.toml", b"\xff\xfetrajectory = 'full'\n"),
        "unknown-top-key": ("run.toml", "bogus = 1\n"),
        "bad-toml": ("run.toml", "trajectory = \n"),
        "bad-json": ("run.json", '{"trajectory": }'),
        "json-array": ("run.json", "[1, 2]"),
        "yaml": ("run.yaml", "trajectory: full\n"),
        "unknown-sampling-key": ("run.toml", "[sampling]\nbogus = 1\n"),
        "wrong-type": ("run.toml", "[sampling]\ncfg = 'high'\n"),
        "cfg-nan": ("run.toml", "[sampling]\ncfg = nan\n"),
        "unknown-component-option": ("run.toml", "[attention]\nname = 'neighborhood'\nbogus = 1\n"),
        "empty-trajectory": ("run.toml", "trajectory = ''\n"),
        "labels-hole": ("run.toml", "labels = '1,,2'\n"),
        "empty-checkpoint": ("run.toml", "[model]\ncheckpoint = ''\n"),
    }
    for label, (name, text) in configs.items():  # flags override the file: the base's --labels goes for labels-hole
        bad(f"config-{label}", gen("--config", name, drop=("--labels",) if "labels" in label else ()),
            write(name, text), why="TOML or JSON with the documented keys")
    bad("config-is-dir", gen("--config", "cfgdir"), mkdir("cfgdir"), why="a directory")
    bad("config-missing", gen("--config", "missing.toml"), why="no such file")

    # -- generate: checkpoints --------------------------------------------------------------------
    def with_var(path: str, *extra: str) -> list[str]:  # a transformer file beside the shipped tokenizer
        return gen("--var-checkpoint", path, "--vae-checkpoint", "{tok}", *extra)

    def with_vae(path: str, *extra: str) -> list[str]:  # a tokenizer file beside the shipped MVAR
        return gen("--var-checkpoint", "{mvar}", "--vae-checkpoint", path, *extra)

    ok("control-mvar-plus-tokenizer", with_var("{mvar}", "--output", "/dev/null"))
    bad("ckpt-var-without-vae", gen("--var-checkpoint", "{mvar}"), why="the CLI asks for both files")
    bad("ckpt-var-dir", with_var("ck"), mkdir("ck"), why="a directory")
    bad("ckpt-var-missing", with_var("missing.pth"), why="no such file")
    bad("ckpt-var-empty-file", with_var("e.pth"), write("e.pth", b""), why="an empty file")
    bad("ckpt-var-random-pth", with_var("r.pth"), random_bytes("r.pth"), why="not a checkpoint")
    bad("ckpt-var-random-safetensors", with_var("r.safetensors"), random_bytes("r.safetensors"),
        why="not a checkpoint")
    bad("ckpt-var-text", with_var("t.pth"), write("t.pth", "just some text\n"), why="not a checkpoint")
    bad("ckpt-var-list-pth", with_var("l.pth"), torch_save("l.pth", lambda: [1, 2, 3]), why="not a state dict")
    bad("ckpt-var-wrong-keys", with_var("w.pth"), torch_save("w.pth", _wrong_keys), why="not VAR weights")
    bad("ckpt-var-nan-safetensors", with_var("nan.safetensors"), poisoned_weights("nan.safetensors"),
        why="NaN weights")
    # a flat .pth state dict has no metadata: its schedule is given (as VAR's released files need)
    ok("control-var-pth", with_var("w.pth", "--patch-nums", "1,2,3,4,6,8", "--output", "/dev/null"),
       poisoned_weights("w.pth", value=None))
    bad("ckpt-var-nan-pth", with_var("nan.pth", "--patch-nums", "1,2,3,4,6,8"), poisoned_weights("nan.pth"),
        why="NaN weights")
    bad("ckpt-var-inf-safetensors", with_var("inf.safetensors"),
        poisoned_weights("inf.safetensors", value=float("inf")), why="inf weights")
    bad("ckpt-vae-dir", with_vae("ck"), mkdir("ck"), why="a directory")
    bad("ckpt-vae-missing", with_vae("missing.pth"), why="no such file")
    bad("ckpt-vae-empty-file", with_vae("e.pth"), write("e.pth", b""), why="an empty file")
    bad("ckpt-vae-random", with_vae("r.pth"), random_bytes("r.pth"), why="not a checkpoint")
    bad("ckpt-vae-nan", with_vae("nan.safetensors"), poisoned_weights("nan.safetensors", "tok"),
        why="NaN tokenizer weights")
    bad("ckpt-var-given-as-vae", with_vae("{var}"), why="VAR transformer weights are not a tokenizer")
    bad("ckpt-vae-given-as-var", with_var("{tok}"), why="tokenizer weights are not a transformer")
    bad("ckpt-raster-under-markov", with_var("{raster}"), why="a raster GPT is not a next-scale model")
    bad("ckpt-tokenizer-other-schedule", with_vae("{rtok}"),
        why="schedule 1,2,3,4,6,8 model with a one-scale (8) tokenizer")
    bad("ckpt-depth-beside", with_var("{mvar}", "--depth", "3"),
        why="the checkpoint has depth 4 (--depth is read off the checkpoint)")
    bad("ckpt-patch-nums-beside", with_var("{mvar}", "--patch-nums", "1,2,4"),
        why="the checkpoint's schedule is 1,2,3,4,6,8")
    bad("default-weights-depth", gen("--depth", "3"), why="the shipped model has depth 4")
    bad("default-weights-patch-nums", gen("--patch-nums", "1,2,4"), why="the shipped schedule is 1,2,3,4,6,8")
    bad("random-weights-and-checkpoint", with_var("{mvar}", "--random-weights"),
        why="random weights contradict a weights file")

    # -- generate: head maps (--cache ssd on the shipped raster GPT) -------------------------------------
    hm = ("--cache-head-map",)
    bad("headmap-dir", ssd(*hm, "hm"), mkdir("hm"), why="a directory")
    bad("headmap-missing", ssd(*hm, "missing.json"), why="no such file")
    bad("headmap-empty-file", ssd(*hm, "e.json"), write("e.json", b""), why="not JSON")
    bad("headmap-not-json", ssd(*hm, "t.json"), write("t.json", "hello"), why="not JSON")
    bad("headmap-nan-score", ssd(*hm, "h.json"), head_map("h.json", set_score(float("nan"))), why="scores in [0, 1]")
    bad("headmap-inf-score", ssd(*hm, "h.json"), head_map("h.json", set_score(float("inf"))), why="scores in [0, 1]")
    bad("headmap-negative-score", ssd(*hm, "h.json"), head_map("h.json", set_score(-0.5)), why="scores in [0, 1]")
    bad("headmap-wrong-layers", ssd(*hm, "h.json"), head_map("h.json", drop_layer), why="made for another model")
    bad("headmap-other-weights", ssd(*hm, "h.json"), head_map("h.json", other_weights),
        why="profiled on other weights")
    bad("headmap-not-given", raster("--cache", "ssd", "--cache-budget", "0.5"), why="ssd requires --cache-head-map")

    # -- profile-heads ------------------------------------------------------------------------------
    bad("profile-heads-not-raster", profile("--trajectory", "markov"), why="raster models only")
    bad("profile-heads-cache-given", profile("--cache", "sink"), why="calibrates with the full cache")
    numeric("profile-heads-", profile, "--neighborhood", {**ZERO, **BIG}, "side k: at least 1")
    numeric("profile-heads-", profile, "--threshold", {**NEG, "2": "2", **NAN, "empty": ""},
            "'auto' or a share in [0, 1]")
    bad("profile-heads-head-map-dir", profile("--head-map", "hm"), mkdir("hm"), why="a directory")
    bad("profile-heads-head-map-txt", profile("--head-map", "x.txt"), why="a .json file")
    bad("profile-heads-head-map-proc", profile("--head-map", "/proc/x.json"), why="not writable")
    bad("profile-heads-head-map-empty", profile("--head-map", ""), why="an empty path")
    bad("profile-heads-head-map-parent-is-file", profile("--head-map", "somefile/h.json"), write("somefile", "x"),
        why="parent is a file")
    bad("profile-heads-samples-per-label-zero", profile("--samples-per-label", "0"), why="at least 1")
    bad("profile-heads-cfg-nan", profile("--cfg", "nan"), why="a finite number")

    # -- export-weights ---------------------------------------------------------------------------
    ew = ["export-weights"]
    bad("export-same-file", ew + ["src.safetensors", "src.safetensors"], copy("src.safetensors", "mvar"),
        why="TARGET is SOURCE")
    bad("export-same-file-other-spelling", ew + ["src.safetensors", "./src.safetensors"],
        copy("src.safetensors", "mvar"), why="TARGET is SOURCE")
    bad("export-source-dir", ew + ["sdir", "out.safetensors"], mkdir("sdir"), why="a directory")
    bad("export-source-missing", ew + ["missing.safetensors", "out.safetensors"], why="no such file")
    bad("export-source-empty-arg", ew + ["", "out.safetensors"], why="an empty path")
    bad("export-source-empty-file", ew + ["e.safetensors", "out.safetensors"], write("e.safetensors", b""),
        why="not weights")
    bad("export-source-random", ew + ["r.pth", "out.safetensors"], random_bytes("r.pth"), why="not weights")
    bad("export-target-dir", ew + ["{mvar}", "tdir"], mkdir("tdir"), why="a directory")
    bad("export-target-parent-is-file", ew + ["{mvar}", "somefile/o.safetensors"], write("somefile", "x"),
        why="parent is a file")
    bad("export-target-proc", ew + ["{mvar}", "/proc/o.safetensors"], why="not writable")
    bad("export-target-empty", ew + ["{mvar}", ""], why="an empty path")
    bad("export-target-pth", ew + ["{mvar}", "o.pth"], why="output .safetensors file")
    bad("export-no-arguments", ew, why="SOURCE and TARGET are required")

    # -- train (VAR/MVAR) ---------------------------------------------------------------------------
    numeric("train-", train, "--lr", {**NEG, **ZERO, **NAN, **INF}, "peak learning rate: a finite number > 0")
    bad("train-warmup-steps-neg5", train("--warmup-steps", "-5"), why="warm-up steps: >= 0")
    numeric("train-", train, "--grad-clip", {**NEG, **NAN}, "gradient-norm clip: >= 0 (0 off)")
    numeric("train-", train, "--weight-decay", NEG, "weight decay: >= 0")
    numeric("train-", train, "--class-dropout", {**NEG, "one": "1", **NAN}, "a probability in [0, 1)")
    numeric("train-", train, "--mlp-ratio", {**ZERO, **NAN, **BIG}, "FFN width / width: a finite number > 0")
    numeric("train-", train, "--steps", ZERO, "optimizer steps: at least 1")
    numeric("train-", train, "--batch-size", {**ZERO, **BIG}, "global batch: at least 1")
    numeric("train-", train, "--depth", {**ZERO, **BIG}, "transformer blocks: at least 1")
    numeric("train-", train, "--embed-dim", {**ZERO, **BIG}, "width: at least 1")
    bad("train-embed-dim-not-divisible", train("--embed-dim", "30", "--num-heads", "4"), why="width / heads")
    numeric("train-", train, "--num-heads", ZERO, "attention heads: at least 1")
    numeric("train-", train, "--resolution", ZERO, "image side: must match the tokenizer")
    bad("train-resolution-mismatch", train("--resolution", "64"), why="must match the tokenizer (32)")
    numeric("train-", train, "--max-images", ZERO, "at least 1")
    numeric("train-", train, "--save-every", ZERO, "at least 1")
    numeric("train-", train, "--log-every", ZERO, "at least 1")
    numeric("train-", train, "--seed", BIG, "a 64-bit integer")
    bad("train-ratio-zero", train("--strategy", "parallel", "--ratio", "0:1:1"), why="iterations per group: >= 1")
    bad("train-parallel-split-99", train("--strategy", "parallel", "--parallel-split", "99"),
        why="the 6-scale schedule")
    bad("train-parallel-order-2", train("--strategy", "parallel", "--trajectory-order", "2"),
        why="parallel: markov order 1")
    bad("train-trajectory-order-zero", train("--trajectory-order", "0"), why="at least 1")
    bad("train-attention-kernel-size-zero", train("--attention-kernel-size", "0"), why="at least 1")
    bad("train-attention-apply-from-99", train("--attention-apply-from", "99"), why="the 6-scale schedule")
    bad("train-tokenizer-patch-nums-hole", train("--tokenizer-patch-nums", "1,,2"), why="a list without holes")
    bad("train-unknown--trajectory", train("--trajectory", "bogus"), why="no such component")
    bad("train-unknown--backend", train("--backend", "bogus"), why="no such component")
    for flag in ("--trajectory", "--attention", "--backend"):
        bad(f"train-empty{flag}", train(flag, ""), why="an empty name")
    # training data
    bad("train-data-empty", train("--data", ""), why="an empty path")
    bad("train-data-missing", train("--data", "nodata"), why="no such folder")
    bad("train-data-is-file", train("--data", "f.png"), write("f.png", "x"), why="not a folder")
    bad("train-data-empty-folder", train("--data", "data"), mkdir("data"), why="no images")
    bad("train-data-empty-class", train("--data", "data"), images("data", {"a": 3, "b": 3, "empty": 0}),
        why="a class folder with no images")
    bad("train-data-no-class-folders", train("--data", "data"), write("data/x.png", b""),
        why="images must be in class subfolders")
    bad("train-data-huge-png", train("--data", "data"),
        chain(images("data", {"a": 3}), huge_png("data/big/big.png", 20000)),
        why="a 20000x20000 image (pillow's decompression-bomb limit), alone in its class (so in the train split)")
    bad("train-data-100mpx-png", train("--data", "data"),
        chain(images("data", {"a": 3}), huge_png("data/big/big.png", 10000)),
        why="a 10000x10000 image (over pillow's 89M-pixel warning)")
    bad("train-data-corrupt-png", train("--data", "data"),
        chain(images("data", {"a": 3}), random_bytes("data/bad/bad.png", 512)), why="an unreadable image")
    # checkpoints
    bad("train-tokenizer-dir", train("--tokenizer", "tdir"), mkdir("tdir"), why="a directory")
    bad("train-tokenizer-default-missing", train(drop=("--tokenizer",)),
        why="the default runs/tokenizer/tokenizer.safetensors does not exist here")
    bad("train-tokenizer-random", train("--tokenizer", "r.safetensors"), random_bytes("r.safetensors"),
        why="not weights")
    bad("train-tokenizer-is-transformer", train("--tokenizer", "{mvar}"), why="transformer weights, not a tokenizer")
    bad("train-tokenizer-empty", train("--tokenizer", ""), why="an empty path")
    bad("train-tokenizer-nan", train("--tokenizer", "nan.safetensors"), poisoned_weights("nan.safetensors", "tok"),
        why="NaN tokenizer weights")
    bad("train-init-from-dir", train("--init-from", "idir"), mkdir("idir"), why="a directory")
    bad("train-init-from-random", train("--init-from", "r.pth"), random_bytes("r.pth"), why="not weights")
    bad("train-init-from-tokenizer", train("--init-from", "{tok}"), why="tokenizer weights")
    bad("train-init-from-other-architecture", train("--init-from", "{mvar}"), why="depth 4 / width 128 vs 1 / 32")
    bad("train-init-from-nan", train("--init-from", "nan.safetensors", "--depth", "4", "--embed-dim", "128",
                                     "--num-heads", "4"), poisoned_weights("nan.safetensors"), why="NaN weights")
    # run directory and device
    bad("train-output-is-file", train("--output", "runfile"), write("runfile", "x"), why="a run directory")
    bad("train-output-parent-is-file", train("--output", "somefile/run"), write("somefile", "x"),
        why="parent is a file")
    bad("train-output-proc", train("--output", "/proc/run"), why="not writable")
    bad("train-output-empty", train("--output", ""), why="an empty path")
    bad("train-resume-nothing", train("--resume"), why="no checkpoint.pt to resume")
    for device in ("tpu", "meta", *([] if mps else ["mps"]), *([] if cuda_count else ["cuda"])):
        bad(f"train-device-{device or 'empty'}", train("--device", device), why="auto, cpu, cuda")
    # raster GPT
    numeric("train-raster-", train_raster, "--cls-token-num", ZERO, "class-prefix length: at least 1")
    numeric("train-raster-", train_raster, "--multiple-of", ZERO, "at least 1")
    numeric("train-raster-", train_raster, "--ffn-dim-multiplier", NEG, "a finite number > 0")
    bad("train-raster-head-dim-rope", train_raster("--embed-dim", "24", "--num-heads", "4"),
        why="head_dim must be divisible by 4 for 2-D RoPE")
    bad("train-raster-attention-given", train_raster("--attention", "dense"), why="refused for raster (documented)")
    bad("train-raster-lr-nan", train_raster("--lr", "nan"), why="a finite number > 0")
    bad("train-raster-warmup-steps-neg5", train_raster("--warmup-steps", "-5"), why="warm-up steps: >= 0")
    bad("train-raster-tokenizer-is-transformer", train_raster("--tokenizer", "{raster}"),
        why="raster GPT weights, not a tokenizer")

    # -- train-tokenizer ----------------------------------------------------------------------------
    numeric("tokenizer-", tokenizer, "--resolution", {**ZERO, "7": "7", **BIG}, "image side: at least 8")
    bad("tokenizer-resolution-mismatch", tokenizer("--resolution", "64"),
        why="the last patch num must be resolution / 2**(len(ch-mult)-1)")
    bad("tokenizer-patch-nums-hole", tokenizer("--patch-nums", "1,,2"), why="a list without holes")
    bad("tokenizer-patch-nums-last-wrong", tokenizer("--patch-nums", "1,2,3"), why="the last must be 32 / 4 = 8")
    numeric("tokenizer-", tokenizer, "--vocab-size", {**ZERO, **BIG}, "codebook size: at least 1")
    numeric("tokenizer-", tokenizer, "--z-channels", ZERO, "code dimension: at least 1")
    numeric("tokenizer-", tokenizer, "--ch", {**ZERO, "33": "33"}, "ch x each multiplier: a multiple of 32")
    numeric("tokenizer-", tokenizer, "--ch-mult", {"hole": "1,,2", "zero": "0,1,2"}, "positive integers")
    numeric("tokenizer-", tokenizer, "--num-res-blocks", NEG, "at least 0")
    numeric("tokenizer-", tokenizer, "--beta", NAN, "commitment weight: a finite number >= 0")
    numeric("tokenizer-", tokenizer, "--quant-resi", NAN, "a finite ratio")
    numeric("tokenizer-", tokenizer, "--share-quant-resi", NEG, "at least 0")
    numeric("tokenizer-", tokenizer, "--l1-weight", NEG, "a finite weight >= 0")
    bad("tokenizer-all-loss-weights-zero", tokenizer("--l1-weight", "0", "--mse-weight", "0", "--vq-weight", "0"),
        why="nothing would be trained")
    numeric("tokenizer-", tokenizer, "--lr", NEG, "a finite number > 0")
    numeric("tokenizer-", tokenizer, "--warmup-steps", {"neg5": "-5"}, ">= 0")
    numeric("tokenizer-", tokenizer, "--steps", ZERO, "at least 1")
    bad("tokenizer-data-empty-class", tokenizer("--data", "data"), images("data", {"a": 3, "empty": 0}),
        why="a class folder with no images")
    bad("tokenizer-data-huge-png", tokenizer("--data", "data"),
        chain(images("data", {"a": 3}), huge_png("data/big/big.png", 20000)), why="a 20000x20000 image")
    bad("tokenizer-output-is-file", tokenizer("--output", "runfile"), write("runfile", "x"), why="a run directory")
    bad("tokenizer-device-tpu", tokenizer("--device", "tpu"), why="auto, cpu, cuda")

    # -- bench ------------------------------------------------------------------------------------
    def ba(*extra: str) -> list[str]:
        return bench("attention", BENCH_ATTENTION, *extra)

    for flag, values in {"--sides": {**ZERO, "hole": "8,,16"}, "--kernel-size": ZERO,
                         "--heads": ZERO, "--head-dim": ZERO, "--batches": ZERO, "--repeats": ZERO,
                         "--budget-s": {**NAN, **NEG}, "--backends": {"bogus": "bogus", "empty": ""},
                         "--seed": BIG}.items():
        numeric("bench-attention-", ba, flag, values, "see bench attention --help")
    bad("bench-attention-output-dir", ba("--output", "odir"), mkdir("odir"), why="a directory")

    def bt(*extra: str) -> list[str]:
        return bench("train", BENCH_TRAIN, *extra)

    for flag, values in {"--depth": ZERO, "--steps": ZERO, "--batch-size": ZERO, "--kernel-size": ZERO,
                         "--ratio": {"zero": "0:1:1"}, "--strategies": {"bogus": "bogus"},
                         "--patch-nums": {"hole": "1,,2,3"}}.items():
        numeric("bench-train-", bt, flag, values, "see bench train --help")
    bad("bench-train-output-dir", bt("--output", "odir"), mkdir("odir"), why="a directory")

    def bm(*extra: str) -> list[str]:
        return bench("matrix", BENCH_MATRIX, *extra)

    for flag, values in {"--batches": {**ZERO, "hole": "1,,2"}, "--repeats": NEG, "--warmup": NEG,
                         "--cfg": NAN, "--timeout-s": {**NEG, **NAN}, "--threads": ZERO,
                         "--decode-chunk": ZERO, "--models": {"bogus": "bogus"},
                         "--configs": {"bogus": "x/y/z"}, "--cells": {"zero": "tiny:0"},
                         "--device": {"tpu": "tpu"}}.items():
        numeric("bench-matrix-", bm, flag, values, "see bench matrix --help")
    bad("bench-matrix-output-dir", bm("--output", "odir"), mkdir("odir"), why="a directory")

    def bc(*extra: str) -> list[str]:
        return bench("cache", BENCH_CACHE, *extra)

    for flag, values in {"--batch": ZERO, "--cfg": NAN, "--top-k": NEG, "--top-p": {"2": "2"},
                         "--budgets": {**ZERO, **INF, "hole": "0.2,,0.5"}, "--repeats": ZERO,
                         "--max-tokens": ZERO, "--policies": {"bogus": "bogus"}, "--timeout-s": NAN,
                         "--device": {"meta": "meta"}}.items():
        numeric("bench-cache-", bc, flag, values, "see bench cache --help")
    bad("bench-cache-head-map-dir", bc("--policies", "ssd", "--head-map", "hm"), mkdir("hm"), why="a directory")
    bad("bench-cache-output-dir", bc("--output", "odir"), mkdir("odir"), why="a directory")

    # -- sample and fid ---------------------------------------------------------------------------
    ok("control-sample", sample())
    for flag, values in {"--per-class": {**ZERO, **NEG, "text": "many"}, "--resize": {**ZERO, "small": "4"},
                         "--batch-size": ZERO, "--seed": BIG, "--cfg": NAN}.items():
        numeric("sample-", sample, flag, values, "see sample --help")
    bad("sample-output-dir-file", sample("--output-dir", "f.txt"), write("f.txt", "x"), why="a file, not a folder")
    bad("sample-output-dir-foreign", sample("--output-dir", "d"), chain(mkdir("d"), write("d/notes.txt", "x")),
        why="a folder of other files")
    bad("sample-resume-foreign-record", sample("--output-dir", "d", "--resume"),
        chain(mkdir("d"), write("d/samples.json", '{"x": 1}')), why="not a sample record")
    bad("sample-npz-suffix", sample("--npz", "x.zip"), why="--npz takes a .npz path")
    bad("sample-output-flag", sample("--output", "x.png"), why="sample writes into --output-dir")
    bad("sample-samples-per-label", sample("--samples-per-label", "2"), why="use --per-class")
    bad("sample-labels-range", sample("--labels", "12"), why="the shipped models have classes 0..9")
    weights = random_bytes("w.pth", 64)
    ok_batch = npz("a.npz")
    bad("fid-no-weights", ["fid", "a.npz", "--ref", "a.npz", "--output", "f.json"], ok_batch,
        why="the Inception weights are a local file: nothing is downloaded")
    bad("fid-weights-missing", fid("a.npz", "--inception-weights", "none.pth"), ok_batch, why="no such file")
    bad("fid-weights-garbage", fid("a.npz"), chain(ok_batch, weights), why="not an Inception state dict")
    bad("fid-float-batch", fid("b.npz"), chain(ok_batch, weights, npz("b.npz", dtype="float32")), why="not uint8")
    bad("fid-gray-batch", fid("b.npz"), chain(ok_batch, weights, npz("b.npz", (4, 16, 16))), why="not [N, H, W, 3]")
    bad("fid-other-resolution", fid("b.npz"), chain(ok_batch, weights, npz("b.npz", (4, 32, 32, 3))),
        why="the reference is 16x16")
    bad("fid-not-npz", fid("b.npz"), chain(ok_batch, weights, write("b.npz", "text")), why="not a zip")
    bad("fid-samples-missing", fid("none.npz"), chain(ok_batch, weights), why="no such file")
    bad("fid-batch-size-zero", fid("a.npz", "--batch-size", "0"), chain(ok_batch, weights), why=">= 1")

    # -- evaluate ---------------------------------------------------------------------------------
    for flag, values in {"--samples-per-class": ZERO, "--batch-size": ZERO, "--resolution": ZERO,
                         "--seed": BIG}.items():
        numeric("evaluate-", evaluate, flag, values, "see evaluate --help")
    for label, value in {"no-equals": "markov", "empty": "", "empty-name": "=--trajectory full",
                         "cfg-nan": "m=--cfg nan", "unknown-flag": "m=--bogus", "bad-quotes": "m=--labels '1"}.items():
        bad(f"evaluate-compare-{label}", evaluate("--compare", value), why="NAME=FLAGS with valid generate flags")
    bad("evaluate-compare-duplicate", evaluate("--compare", "m=--trajectory markov", "--compare",
                                               "m=--trajectory full"), why="two configurations named m")
    bad("evaluate-common-cfg-inf", evaluate("--common", "--cfg inf"), why="a finite --cfg")
    bad("evaluate-data-empty", evaluate("--data", ""), why="an empty path")
    bad("evaluate-data-missing", evaluate("--data", "nodata"), why="no such folder")
    bad("evaluate-output-dir", evaluate("--output", "odir"), mkdir("odir"), why="a directory")
    bad("evaluate-output-proc", evaluate("--output", "/proc/e.json"), why="not writable")
    bad("evaluate-classifier-dir", evaluate("--classifier", "cdir"), mkdir("cdir"), why="a directory")
    bad("evaluate-classifier-random", evaluate("--classifier", "c.safetensors"), random_bytes("c.safetensors"),
        why="not classifier weights")

    # -- hostile input: files that are not files, booleans, texts, memory, outputs the command did not write --
    bad("config-fifo", gen("--config", "pipe"), fifo("pipe"), why="a named pipe would block the read forever")
    bad("config-dev-zero", gen("--config", "/dev/zero"), why="a device file never ends")
    bad("config-oversized", gen("--config", "big.toml"), write("big.toml", " " * (2**20 + 1)), why="over 1 MiB")
    bad("config-bool-batch-size", gen("--config", "b.toml"), write("b.toml", "batch_size = true\n"),
        why="a boolean where an integer is due")
    bad("gen-prompt-class-conditional", gen("--prompt", "a cat"), why="VAR/MVAR draw labels, not text")
    bad("tokenizer-quant-resi-2", tokenizer("--quant-resi", "2"), why="the phi mixing ratio lies in [0, 1]")
    bad("gen-images-beyond-memory", gen("--samples-per-label", "99999999999"), why="the images alone exceed memory")
    bad("sample-job-beyond-memory", sample("--per-class", "99999999999"), why="the image list alone exceeds memory")
    bad("sample-resize-beyond-pillow", sample("--resize", "100000"), why="Pillow would refuse to read it back")
    bad("capacity-budget-no-unit", ["bench", "capacity", "--memory-budget", "10"], why="10 bytes or 10 GiB?")
    bad("capacity-budget-beyond-machine", ["bench", "capacity", "--memory-budget", "1e30GiB"],
        why="more memory than the machine has")
    mine = "the user's own file"
    bad("gen-output-foreign", gen("--output", "mine.png"), write("mine.png", mine), why="not written by generate")
    bad("gen-tokens-foreign", gen("--output", "/dev/null", "--save-tokens", "t.pt"), write("t.pt", mine),
        why="not written by generate")
    bad("gen-per-image-foreign", gen("--output", "g.png", "--per-image"), write("g/0000_class1.png", mine),
        why="not written by generate")
    bad("sample-npz-foreign", sample("--npz", "keep.npz"), write("keep.npz", mine), why="not written by sample")
    bad("bench-attention-output-foreign", bench("attention", BENCH_ATTENTION), write("ba.json", "{}"),
        why="not written by bench attention")
    bad("bench-matrix-md-foreign", bench("matrix", BENCH_MATRIX), write("bm.md", mine), why="its .md companion")
    bad("bench-matrix-md-dir", bench("matrix", BENCH_MATRIX), mkdir("bm.md"), why="its .md companion is a folder")
    bad("bench-cache-output-proc", bench("cache", BENCH_CACHE, "--output", "/proc/x.json"), why="not writable")
    bad("profile-heads-png-dir", profile(), mkdir("heads.png"), why="the heat map beside --head-map is a folder")
    bad("export-weights-foreign", ["export-weights", "{mvar}", "mine.safetensors"], write("mine.safetensors", mine),
        why="not written by export-weights")
    ok("control-gen-overwrite", gen("--output", "mine.png", "--overwrite"), write("mine.png", mine))

    names = [case.name for case in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"bad_input_sweep: duplicate case names {duplicates}")
    return cases


def _wrong_keys() -> dict[str, Any]:
    import torch

    return {"foo.weight": torch.zeros(2, 2), "bar": torch.ones(3)}


# -- running one case ------------------------------------------------------------------------------
def listing(root: Path) -> dict[str, tuple[str, int, int]]:
    """relative path -> (kind, size, mtime_ns) of everything under ``root``."""
    out: dict[str, tuple[str, int, int]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            try:
                st = path.lstat()
            except OSError:
                continue
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            out[rel] = (kind, 0 if kind == "dir" else st.st_size, 0 if kind == "dir" else st.st_mtime_ns)
    return out


@dataclass
class Result:
    case: Case
    argv: list[str]
    rc: int | None = None
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    error: str = ""  # the sweep's own problem (a fixture that could not be built)
    killed: bool = False

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.stdout or "Traceback" in self.stderr

    @property
    def files(self) -> int:
        return len(self.new) + len(self.changed) + len(self.removed)

    @property
    def slow(self) -> bool:
        return self.seconds > SLOW_S

    def problems(self) -> list[str]:
        if self.error:
            return ["sweep-error"]
        out = []
        if self.case.expect == "ok":
            if self.rc != 0:
                out.append("rc")
        else:
            if self.rc != 2:
                out.append("rc")
            if len(self.lines) > 1:
                out.append("lines")
            if self.files:
                out.append("files")
        if self.traceback:
            out.append("traceback")
        if self.killed:
            out.append("KILLED")
        elif self.slow:
            out.append("SLOW")
        return out

    @property
    def passed(self) -> bool:
        return not self.problems()

    def first_line(self) -> str:
        if self.error:
            return f"(sweep: {self.error})"
        text = self.lines[0] if self.lines else (f"(stdout) {self.stdout.strip().splitlines()[-1]}"
                                                 if self.stdout.strip() else "(no output)")
        return text if len(text) <= 220 else text[:217] + "..."

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        rc = "KILL" if self.killed else str(self.rc)
        tag = "" if self.passed else f"[{','.join(self.problems())}] "
        ok = " (valid input: expect exit 0)" if self.case.expect == "ok" else ""
        return (f"{status} {self.case.name:<44} rc={rc:<4} lines={len(self.lines):<2} files={self.files:<2} "
                f"{self.seconds:5.1f}s  {tag}{self.first_line()}{ok}")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.case.name, "expect": self.case.expect, "why": self.case.why, "argv": self.argv,
                "pass": self.passed, "problems": self.problems(), "rc": self.rc, "seconds": round(self.seconds, 2),
                "stderr_lines": len(self.lines), "first_stderr_line": self.first_line(),
                "stderr_tail": self.stderr[-4000:], "stdout_tail": self.stdout[-2000:],
                "new_files": self.new[:50], "changed_files": self.changed, "removed_files": self.removed,
                "sweep_error": self.error or None}


def run_case(case: Case, fx: Fixtures, root: Path, command: list[str], env: dict[str, str]) -> Result:
    cwd = Path(tempfile.mkdtemp(prefix=f"{case.name[:40].replace('/', '_')}.", dir=root))
    result = Result(case, [])
    try:
        result.argv = [token.format_map(fx) if "{" in token else token for token in case.argv]
        if case.setup is not None:
            case.setup(cwd, fx)
    except Exception as error:  # the sweep's fixture, not the CLI under test
        result.error = f"fixture failed: {type(error).__name__}: {error}"
        return result
    before = listing(cwd)
    start = time.perf_counter()
    proc = subprocess.Popen([*command, *result.argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=KILL_S)
    except subprocess.TimeoutExpired:
        result.killed = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the case's own process group (start_new_session)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
    result.seconds = time.perf_counter() - start
    result.rc = proc.returncode
    result.stdout, result.stderr = out.decode(errors="replace"), err.decode(errors="replace")
    after = listing(cwd)
    result.new = sorted(set(after) - set(before))
    result.removed = sorted(set(before) - set(after))
    result.changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    return result


def select(cases: list[Case], filters: list[str]) -> list[Case]:
    if not filters:
        return cases

    def match(name: str, pattern: str) -> bool:
        return fnmatch.fnmatchcase(name, pattern) if any(c in pattern for c in "*?[") else pattern in name

    return [case for case in cases if any(match(case.name, f) for f in filters)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("filters", nargs="*", metavar="NAME_FILTER", help="run the cases whose name contains one of these "
                   "(globs with * or ? match the whole name)")
    p.add_argument("--jobs", type=int, default=1, help="cases run at the same time (default 1; every case has its "
                   "own working directory)")
    p.add_argument("--json", metavar="FILE", help="write every result (argv, stderr tail, new files) as JSON")
    p.add_argument("--list", action="store_true", help="list the cases (name, expectation, argv) and exit")
    p.add_argument("--strict", action="store_true", help="exit 1 when any case fails")
    p.add_argument("--keep", action="store_true", help="keep the temporary working directories")
    p.add_argument("--launcher", choices=("auto", "script", "module"), default="auto",
                   help="the mvar-engine console script or python -m mvar_engine.apps.cli (default: the script "
                        "when it is beside this interpreter)")
    args = p.parse_args(argv)
    cases = select(build_cases(), args.filters)
    if args.list:
        for case in cases:
            print(f"{case.name:<44} {case.expect:<5} {' '.join(repr(a) if not a or ' ' in a else a for a in case.argv)}")
        print(f"{len(cases)} cases")
        return 0
    if not cases:
        print("no case matches", file=sys.stderr)
        return 0

    root = Path(tempfile.mkdtemp(prefix="mvar-bad-input-sweep."))
    fx = Fixtures(root / "fixtures")
    work = root / "cases"
    work.mkdir()
    command = launcher(args.launcher)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["MVAR_ENGINE_CACHE"] = str(root / "engine-cache")  # evaluate's classifier, shared by the session
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")

    print(f"# {len(cases)} cases, launcher: {' '.join(command)}, jobs {args.jobs}, work dir {root}", flush=True)
    pre = subprocess.run([*command, "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=KILL_S)
    if pre.returncode != 0:
        first = next((l for l in pre.stderr.splitlines()[::-1] if l.strip()), "")
        print(f"# WARNING: '{' '.join(command)} --help' exits {pre.returncode} ({first}): every case may fail",
              flush=True)

    if any(case.argv[:1] == ("evaluate",) for case in cases):  # train evaluate's cached classifier once, untimed
        began = time.perf_counter()
        warm = subprocess.run([*command, "evaluate", "--samples-per-class", "1", "--compare", "m=--trajectory markov",
                               "--no-table", "--output", str(root / "warm-up.json")], cwd=work, env=env,
                              capture_output=True, text=True, timeout=10 * KILL_S)
        print(f"# evaluate's classifier trained for the session (exit {warm.returncode}, "
              f"{time.perf_counter() - began:.0f} s, not a case)", flush=True)

    results: list[Result | None] = [None] * len(cases)
    started = time.perf_counter()
    lock = threading.Lock()

    def one(index: int) -> None:
        result = run_case(cases[index], fx, work, command, env)
        results[index] = result
        with lock:
            print(result.line(), flush=True)

    try:
        if args.jobs <= 1:
            for i in range(len(cases)):
                one(i)
        else:
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                list(pool.map(one, range(len(cases))))
    finally:
        done = [r for r in results if r is not None]
        if args.json:
            Path(args.json).write_text(json.dumps({"launcher": command, "seconds": round(time.perf_counter() - started, 1),
                                                   "results": [r.as_dict() for r in done]}, indent=1))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    bad = [r for r in done if r.case.expect == "usage"]
    controls = [r for r in done if r.case.expect == "ok"]
    failed = [r for r in done if not r.passed]
    print()
    if failed:
        print(f"# {len(failed)} failing (in table order):")
        for r in failed:
            print(r.line())
        print()
    print(f"# bad input: {sum(r.passed for r in bad)}/{len(bad)} pass; controls (valid input, expect exit 0): "
          f"{sum(r.passed for r in controls)}/{len(controls)} pass; {time.perf_counter() - started:.0f} s"
          + (f"; kept {root}" if args.keep else ""))
    print(f"{sum(r.passed for r in done)}/{len(done)} pass")
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
