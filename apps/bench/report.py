"""Helpers shared by the ``mvar-engine bench`` commands: timing, cost estimates, machine info,
plain-text tables and atomic JSON reports.

Nothing here knows about attention; a benchmark builds its rows and uses these to time, skip,
print and save them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from ...core.files import WRITTEN_BY, writer
from ...models.checkpoint import atomic_write
from ..allocator import with_mmap_threshold
from ..cli_helpers import finite_float
from ..output_files import add_overwrite_flag


class Timing(NamedTuple):
    """Result of :func:`median_time`: median seconds per call over ``repeats`` timed calls, and the
    seconds the first (warm-up) call took (compilation, caches and allocations included)."""

    median_s: float
    repeats: int
    first_call_s: float


def synchronizer(device: torch.device | str | None) -> Callable[[], None]:
    """A zero-argument function that waits for ``device``'s queued work (a no-op off CUDA)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def repeats_within(budget_s: float, call_s: float, repeats: int) -> int:
    """``min(repeats, max(1, floor(budget_s / call_s)))``: how many timed calls fit the budget."""
    if call_s <= 0:
        return max(1, repeats)
    return max(1, min(repeats, math.floor(budget_s / call_s)))


def median_time(fn: Callable[[], Any], repeats: int, budget_s: float, warmup: int = 1,
                device: torch.device | str | None = None) -> Timing:
    """Time ``fn()``: ``warmup`` untimed-for-the-median calls (at least one), then up to ``repeats``
    timed calls, fewer when the budget says so (see :func:`repeats_within`, estimated from the fastest
    warm-up call). Uses ``time.perf_counter`` and, on CUDA, ``torch.cuda.synchronize`` around each call."""
    if repeats < 1 or budget_s <= 0:
        raise ValueError(f"median_time needs repeats >= 1 and budget_s > 0, got {repeats} and {budget_s}")
    sync = synchronizer(device)
    warm = [_timed(fn, sync) for _ in range(max(1, warmup))]
    count = repeats_within(budget_s, min(warm), repeats)
    times = [_timed(fn, sync) for _ in range(count)]
    return Timing(statistics.median(times), count, warm[0])


def scaled_estimate(previous: tuple[int, float] | None, size: int, power: float = 2.0) -> float | None:
    """Seconds a call at problem ``size`` is expected to take, from ``previous = (size, seconds)``
    measured at a smaller size, scaled as ``(size / previous size) ** power``; None without one."""
    if previous is None:
        return None
    prev_size, prev_s = previous
    return prev_s * (size / prev_size) ** power


def skip_reason(estimate_s: float | None, budget_s: float, factor: float = 4.0) -> str | None:
    """Why a cell is skipped: its estimated seconds per call exceed ``factor`` x the budget; else None."""
    if estimate_s is None or estimate_s <= factor * budget_s:
        return None
    return f"estimated {estimate_s:.3g} s per call > {factor:g} x budget ({budget_s:g} s)"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """What the numbers were measured on: torch and Python versions, device name, CPU count, threads."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def mib(value: int | None) -> float | None:
    """Bytes as MiB (None stays None): the unit of every memory column."""
    return None if value is None else value / 2**20


def format_value(value: Any) -> str:
    """Table text for one value: ``-`` for None, about three significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 0.01:
            return f"{value:.{max(0, 2 - math.floor(math.log10(magnitude)))}f}"
        return f"{value:.1e}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as an aligned plain-text table. ``columns``: ``(key, header)`` pairs; a column whose
    values are all numbers (or None) is right-aligned, others left-aligned; the last column is not padded."""
    cells = [[format_value(row.get(key)) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    numeric = [all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows)
               for key, _ in columns]
    widths = [max(len(text) for text in [headers[i], *(c[i] for c in cells)]) for i in range(len(columns))]

    def line(texts: Sequence[str]) -> str:
        parts = [text.rjust(widths[i]) if numeric[i] else text.ljust(widths[i]) for i, text in enumerate(texts)]
        if not numeric[-1]:
            parts[-1] = texts[-1]
        return "  ".join(parts).rstrip()

    return "\n".join(line(texts) for texts in [headers, *cells])


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically (readers never see a partial file); a dict
    payload gains a first key naming what wrote it (:data:`WRITTEN_BY`)."""
    if isinstance(payload, dict):
        payload = {WRITTEN_BY: writer(), **{k: v for k, v in payload.items() if k != WRITTEN_BY}}
    text = json.dumps(payload, indent=2, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def rss_bytes() -> int:
    """This process's resident set size now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker_env() -> dict[str, str]:
    """The environment of a benchmark worker process: this one's, with glibc's mmap threshold fixed
    (:mod:`..allocator`) and the directory holding the ``mvar_engine`` package on ``PYTHONPATH`` when
    it runs from a source tree named so."""
    env = with_mmap_threshold(dict(os.environ))  # freed transients leave the resident set (apps/allocator.py)
    package_dir = Path(__file__).resolve().parents[2]
    if package_dir.name == "mvar_engine":
        env["PYTHONPATH"] = str(package_dir.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def peak_rss_bytes() -> int:
    """Peak resident set of this process since it started or since :func:`reset_peak_rss` (Linux
    ``VmHWM``). Unlike ``ru_maxrss`` it does not inherit the parent's peak across fork/exec."""
    import re

    try:
        with open("/proc/self/status") as status:
            found = re.search(r"^VmHWM:\s+(\d+)\s+kB", status.read(), re.MULTILINE)
        if found:
            return int(found.group(1)) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_memory() -> bool:
    """Return the C allocator's free heap memory to the OS (glibc ``malloc_trim(0)``) so that memory
    one phase freed is not still resident, and counted, in the next; False where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Reset the peak resident set to the current one (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def format_markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as a markdown table (values through :func:`format_value`; ``|`` in values and headers is
    escaped). ``columns``: ``(key, header)`` pairs."""

    def cell(value: Any) -> str:
        return format_value(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(header) for _, header in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def run_json_worker(module: str, argument: str, *, env: Mapping[str, str] | None = None,
                    timeout_s: float | None = None, watch: Callable[[int], str | None] | None = None,
                    every_s: float = 0.2) -> dict[str, Any]:
    """Run ``python -m module argument`` in a fresh interpreter (so that its peak memory is its own) and
    return the JSON object on the last line of its stdout. A failure becomes ``{"status": "error",
    "reason": ...}``: the time limit, a signal (``-9``: probably out of memory), the last line of stderr.
    ``watch(pid)``, called every ``every_s`` seconds while it runs, may return a reason to stop it
    now: the result is then ``{"status": "stopped", "reason": that reason}``."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", module, argument], stdout=out, stderr=err,
                                env=None if env is None else dict(env), text=True)
        start = time.perf_counter()
        while True:
            try:
                proc.wait(timeout=every_s)
                break
            except subprocess.TimeoutExpired:
                pass
            stop = watch(proc.pid) if watch is not None else None
            if stop is None and timeout_s is not None and time.perf_counter() - start > timeout_s:
                proc.kill()
                proc.wait()
                return {"status": "error", "reason": f"timed out after {timeout_s:g} s"}
            if stop is not None:
                proc.kill()
                proc.wait()
                return {"status": "stopped", "reason": stop}
        out.seek(0)
        err.seek(0)
        stdout, stderr, code = out.read(), err.read(), proc.returncode
    if code == 0:
        try:
            return json.loads(stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"status": "error", "reason": "the worker printed no result"}
    if code < 0:
        reason = f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
    else:
        reason = " ".join(stderr.strip().splitlines()[-1:]) or f"exit status {code}"
    return {"status": "error", "reason": reason}


def resident_bytes(pid: int) -> int | None:
    """Another process's resident set now (``VmRSS`` from ``/proc/PID/status``), or None."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


AUTOCAST_DTYPES = ("float32", "bfloat16", "float16")
PALETTE = ((70, 110, 180), (220, 120, 50), (80, 160, 90), (180, 70, 90), (130, 100, 170), (120, 120, 120),
           (200, 170, 60), (60, 170, 170))
"""The series colours of every benchmark chart."""


def add_run_flags(parser: Any, *, device: str | None, dtype: str, backend: str | None = "auto",
                  threads: str = "torch threads (default: torch's)", timeout: str | None = None) -> None:
    """The run flags the model benchmarks share: ``--device`` (None: the command's own default),
    ``--dtype`` (autocast), ``--backend`` (None: the command has none), ``--threads`` and, given its
    help, ``--timeout-s``."""
    parser.add_argument("--device", default=device,
                        help=f"auto, cpu, cuda, cuda:N (default {device or 'the preset' + chr(39) + 's'})")
    parser.add_argument("--dtype", choices=AUTOCAST_DTYPES, default=dtype,
                        help=f"autocast dtype (16-bit on CUDA; bfloat16 also on a CPU with native bf16; default {dtype})")
    if backend is not None:
        parser.add_argument("--backend", default=backend, help=f"attention backend or auto (default {backend})")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help=threads)
    if timeout is not None:
        parser.add_argument("--timeout-s", type=finite_float, default=None, metavar="SECONDS", help=timeout)


def add_report_flags(parser: Any, output: str) -> None:
    """``--output`` (the JSON report; what the command writes beside it shares its name),
    ``--no-table``, ``--debug`` and ``--overwrite``: every bench command's."""
    parser.add_argument("--output", default=output, metavar="PATH", help=f"JSON report (default {output})")
    parser.add_argument("--no-table", action="store_true", help="do not print the table")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    add_overwrite_flag(parser)
