"""``mvar-engine bench attention``: neighbourhood attention backends against dense SDPA.

For each map side and batch the spec is ``Neighborhood2D(side, side, kernel_size)`` over seeded
random ``q, k, v [B, H, N, D]``. The baseline row (``sdpa (dense)``) is dense SDPA over the same
tokens; then every chosen backend either says why it cannot (``unsupported``), is skipped because
the previous side predicts it would take too long (``skipped``), fails (``error``), or is timed
(``ok``) under ``torch.no_grad()``. Outputs of timed neighbourhood backends are compared with the
float64 reference when ``N <= 1024`` (a fast wrong backend shows up as a large ``max_abs_err``).

The JSON report is rewritten atomically after every row, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

import torch

from ...backends.reference import ReferenceBackend
from ...backends.sdpa import SdpaBackend
from ...core.attention import AttentionBackend, AttentionSpec, Dense, Neighborhood2D
from ...core.errors import UsageError, render_settings
from ...core.registry import get_registry
from ..cli_helpers import PROG, Parser, finite_float, int_list, name_list, one_line, seed_int
from ..output_files import check_outputs
from ..memory_fit import available_bytes
from ..pipeline import resolve_device
from .report import add_report_flags, format_table, machine_info, median_time, scaled_estimate, skip_reason, write_json

DENSE_ROW = "sdpa (dense)"
"""Backend column of the baseline row."""

ERROR_CHECK_MAX_N = 1024
"""Largest token count whose outputs are checked against the float64 reference."""

SKIP_FACTOR = 4.0
"""A cell is skipped when its estimated seconds per call exceed this many budgets."""

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
REFERENCE_CHUNK_BYTES = 1 << 28
"""Scores the reference materialises at once (float64), to bound its memory."""


@dataclass(frozen=True)
class BenchAttentionConfig:
    """Every option of the benchmark (the command-line flags); ``backends`` None = every available
    backend except ``reference``."""

    sides: tuple[int, ...] = (16, 32, 64, 128)
    kernel_size: int = 7
    heads: int = 16
    head_dim: int = 64
    batches: tuple[int, ...] = (1, 8)
    backends: tuple[str, ...] | None = None
    repeats: int = 5
    budget_s: float = 30.0
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    output: str = "bench-attention.json"
    table: bool = True

    def problems(self) -> list[str]:
        """One line per invalid option (empty when the config is valid)."""
        out = []
        for flag, values in (("--sides", self.sides), ("--batches", self.batches)):
            if not values or min(values) < 1:
                out.append(f"{flag} needs positive integers, got {','.join(map(str, values)) or 'nothing'}")
        for flag, value in (("--kernel-size", self.kernel_size), ("--heads", self.heads),
                            ("--head-dim", self.head_dim), ("--repeats", self.repeats)):
            if value < 1:
                out.append(f"{flag} must be at least 1, got {value}")
        if not self.budget_s > 0:
            out.append(f"--budget-s must be positive, got {self.budget_s:g}")
        if self.dtype not in DTYPES:
            out.append(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            out.append(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        return out


@dataclass
class Contender:
    """A backend to time: its name, the instance (None when unavailable) and why it is unavailable."""

    name: str
    backend: AttentionBackend | None
    unavailable: str | None = None


def resolve_backends(names: tuple[str, ...] | None, registry=None) -> list[Contender]:
    """The chosen backends in order (default: every available one except ``reference``). Unknown
    names raise a one-line UsageError listing the known ones; unavailable named ones are kept
    without an instance so that their rows say why."""

    registry = registry or get_registry()
    if names is None:
        return [Contender(e.name, registry.create("backend", e.name)) for e in registry.components("backend")
                if e.availability.ok and e.name != "reference"]
    known = registry.names("backend")
    out: list[Contender] = []
    for name in dict.fromkeys(names):
        try:
            entry = registry.get("backend", name)
        except UsageError:
            raise UsageError(f"--backends: unknown attention backend '{name}' (known: {', '.join(known)})") from None
        if entry.availability.ok:
            out.append(Contender(entry.name, registry.create("backend", entry.name)))
        else:
            out.append(Contender(entry.name, None, entry.availability.reason))
    return out


def make_inputs(batch: int, heads: int, n: int, head_dim: int, *, seed: int, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded ``q, k, v [B, H, N, D]`` (drawn in float32 on CPU, so the same on every device)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, head_dim, generator=gen).to(device=device, dtype=dtype)
                 for _ in range(3))  # type: ignore[return-value]


def reference_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float) -> torch.Tensor:
    """The float64 reference output (``ReferenceBackend``), computed a few heads at a time."""

    batch, heads, n, dim = q.shape
    oracle = ReferenceBackend()
    per_chunk = max(1, REFERENCE_CHUNK_BYTES // (n * k.shape[-2] * 8))
    flat = [t.reshape(1, batch * heads, t.shape[-2], t.shape[-1]).double() for t in (q, k, v)]
    parts = [oracle.attend(*(t[:, i:i + per_chunk] for t in flat), spec, scale=scale)
             for i in range(0, batch * heads, per_chunk)]
    return torch.cat(parts, dim=1).reshape(batch, heads, n, v.shape[-1])


@dataclass
class Cell:
    """One (side, batch) of the sweep with its inputs and the quantities every row shares."""

    side: int
    batch: int
    spec: Neighborhood2D
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    _reference: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return self.side * self.side

    @property
    def pairs(self) -> int:
        return self.spec.pair_count(self.n, self.n)

    @property
    def flop_ceiling(self) -> float:
        """``N^2 / pairs``: the most a neighbourhood backend can gain over dense by skipping work."""
        return self.n * self.n / self.pairs

    def flops(self, pairs: int) -> int:
        batch, heads, _, dim = self.q.shape
        return 4 * batch * heads * dim * pairs

    def reference(self) -> torch.Tensor:
        if self._reference is None:
            self._reference = reference_output(self.q, self.k, self.v, self.spec, self.scale)
        return self._reference


MEMORY_HEADROOM = 0.7
"""A call is skipped when its estimated workspace exceeds this share of the available memory."""


def memory_reason(backend: AttentionBackend, spec: AttentionSpec, cell: "Cell", device: torch.device,
                  available: int | None = None) -> str | None:
    """Why ``backend`` would not fit in memory on this cell (its ``workspace_bytes`` estimate), or None."""
    estimate = getattr(backend, "workspace_bytes", lambda *a, **k: None)(
        spec, batch=cell.batch, heads=cell.q.shape[1], q_len=cell.n, kv_len=cell.n, head_dim=cell.q.shape[-1],
        dtype=cell.q.dtype, device=device)
    available = available_bytes(device) if available is None else available
    if estimate is None or available is None or estimate <= MEMORY_HEADROOM * available:
        return None
    return (f"needs about {estimate / 2**30:.3g} GiB of attention workspace, {available / 2**30:.3g} GiB available "
            f"(run a smaller --batches/--sides)")


def base_row(cell: Cell, backend: str, spec: AttentionSpec, pairs: int) -> dict[str, Any]:
    """A row with every field, the measured ones still None."""
    return {"side": cell.side, "N": cell.n, "batch": cell.batch, "backend": backend, "spec": spec.describe(),
            "status": "ok", "reason": None, "median_ms": None, "repeats": 0, "first_call_ms": None,
            "flops": cell.flops(pairs), "gflops_per_s": None, "speedup_vs_dense_sdpa": None,
            "flop_ceiling": cell.flop_ceiling, "max_abs_err": None}


class AttentionBench:
    """Runs the sweep of a :class:`BenchAttentionConfig`; rows accumulate in :attr:`results` and the
    report is rewritten after each one. ``estimates`` keeps each (backend, batch)'s last measurement
    ``(N, seconds per call)`` for the budget skip rule."""

    def __init__(self, config: BenchAttentionConfig, *, registry=None, log: TextIO | None = None) -> None:
        problems = config.problems()
        if problems:
            raise UsageError(problems[0])
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.contenders = resolve_backends(config.backends, registry)
        self.results: list[dict[str, Any]] = []
        self.measured: dict[tuple[str, int], tuple[int, float]] = {}
        self.log = log
        self.machine = machine_info(self.device)

    # -- report ---------------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        config = asdict(self.config)
        config.update(sides=list(self.config.sides), batches=list(self.config.batches),
                      backends=[c.name for c in self.contenders], device_resolved=str(self.device),
                      output=str(self.config.output))
        return {"benchmark": "attention", "machine": self.machine, "config": config, "results": self.results}

    def save(self) -> Path:
        return write_json(self.config.output, self.payload())

    def _add(self, row: dict[str, Any]) -> dict[str, Any]:
        self.results.append(row)
        self.save()
        if self.log is not None:
            timing = f"{row['median_ms']:.3g} ms" if row["median_ms"] is not None else row["reason"]
            print(f"side {row['side']} batch {row['batch']} {row['backend']}: {row['status']} ({timing})",
                  file=self.log, flush=True)
        return row

    # -- sweep ----------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Measure every (side, batch) cell in order; returns the rows."""
        for side in sorted(set(self.config.sides)):
            for batch in dict.fromkeys(self.config.batches):
                self.run_cell(self.make_cell(side, batch))
        return self.results

    def make_cell(self, side: int, batch: int) -> Cell:
        c = self.config
        q, k, v = make_inputs(batch, c.heads, side * side, c.head_dim, seed=c.seed, device=self.device, dtype=self.dtype)
        return Cell(side, batch, Neighborhood2D(side, side, c.kernel_size), q, k, v, c.head_dim ** -0.5)

    def run_cell(self, cell: Cell) -> None:

        dense = self.measure(cell, DENSE_ROW, SdpaBackend(), Dense(), cell.n * cell.n)
        if dense["median_ms"] is not None:
            dense["speedup_vs_dense_sdpa"] = 1.0
        self._add(dense)
        for contender in self.contenders:
            row = self.measure(cell, contender.name, contender.backend, cell.spec, cell.pairs,
                               unavailable=contender.unavailable)
            if dense["median_ms"] is not None and row["median_ms"]:
                row["speedup_vs_dense_sdpa"] = dense["median_ms"] / row["median_ms"]
            self._add(row)

    def measure(self, cell: Cell, name: str, backend: AttentionBackend | None, spec: AttentionSpec, pairs: int,
                *, unavailable: str | None = None) -> dict[str, Any]:
        """One row: unavailable / unsupported / skipped / error, or timed (and checked against the reference)."""
        row = base_row(cell, name, spec, pairs)
        reason = unavailable
        status = "unavailable"
        if reason is None:
            status = "unsupported"
            reason = backend.supports(spec, device=self.device, dtype=self.dtype, head_dim=cell.q.shape[-1])
            reason = reason and render_settings(reason)
        if reason is None:
            status = "skipped"
            reason = memory_reason(backend, spec, cell, self.device)
        if reason is None:
            previous = self.measured.get((name, cell.batch))
            reason = skip_reason(scaled_estimate(previous, cell.n), self.config.budget_s, SKIP_FACTOR)
            if reason is not None and previous is not None:
                reason += f" (from N={previous[0]} at {previous[1] * 1e3:.3g} ms, scaled as N^2)"
        if reason is not None:
            return {**row, "status": status, "reason": reason}
        try:
            output = self._time(row, backend, cell, spec)
        except Exception as error:  # a failing backend must not end the sweep
            self._release()
            return {**row, "status": "error", "reason": one_line(error, with_type=True, limit=240)}
        self.measured[(name, cell.batch)] = (cell.n, row["median_ms"] / 1e3)
        if isinstance(spec, Neighborhood2D) and cell.n <= ERROR_CHECK_MAX_N:
            row["max_abs_err"] = (output.double() - cell.reference()).abs().max().item()
        return row

    def _time(self, row: dict[str, Any], backend: AttentionBackend, cell: Cell, spec: AttentionSpec) -> torch.Tensor:
        """Fill the timing fields of ``row``; returns the backend's last output."""
        last: list[torch.Tensor] = []

        def call() -> None:
            last[:] = [backend.attend(cell.q, cell.k, cell.v, spec, scale=cell.scale)]

        with torch.no_grad():
            timing = median_time(call, self.config.repeats, self.config.budget_s, device=self.device)
        row.update(median_ms=timing.median_s * 1e3, repeats=timing.repeats, first_call_ms=timing.first_call_s * 1e3,
                   gflops_per_s=row["flops"] / timing.median_s / 1e9)
        return last[0]

    def _release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# -- presentation -------------------------------------------------------------------------------
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("side", "side"), ("batch", "batch"), ("backend", "backend"), ("median_ms", "median ms"),
    ("gflops_per_s", "GFLOP/s"), ("speedup_vs_dense_sdpa", "vs dense SDPA (x)"), ("flop_ceiling", "FLOP ceiling (x)"),
    ("max_abs_err", "max abs err"), ("outcome", "status"),
)


def table_text(rows: list[dict[str, Any]]) -> str:
    """The readable table of ``rows`` (status and reason in the last column)."""
    shown = [{**row, "outcome": row["status"] if not row["reason"] else f"{row['status']}: {row['reason']}"}
             for row in rows]
    return format_table(shown, TABLE_COLUMNS)


def fastest_by_cell(rows: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, Any] | None]:
    """For each (side, batch), the timed non-dense row with the smallest median (None if none was timed)."""
    best: dict[tuple[int, int], dict[str, Any] | None] = {}
    for row in rows:
        key = (row["side"], row["batch"])
        best.setdefault(key, None)
        if row["backend"] == DENSE_ROW or row["status"] != "ok":
            continue
        if best[key] is None or row["median_ms"] < best[key]["median_ms"]:
            best[key] = row
    return best


def fastest_line(rows: list[dict[str, Any]]) -> str:
    """One line naming the fastest neighbourhood backend of every (side, batch)."""
    parts = []
    for (side, batch), row in fastest_by_cell(rows).items():
        if row is None:
            parts.append(f"{side}x{side} b{batch}: none")
            continue
        speed = row["speedup_vs_dense_sdpa"]
        parts.append(f"{side}x{side} b{batch}: {row['backend']} ({row['median_ms']:.3g} ms"
                     + (f", {speed:.3g}x dense SDPA)" if speed is not None else ")"))
    return "fastest neighbourhood backend: " + "; ".join(parts)


def run_bench_attention(config: BenchAttentionConfig, *, registry=None, out: TextIO | None = None,
                        log: TextIO | None = None) -> dict[str, Any]:
    """Run the benchmark, write the JSON report, print the table (unless ``config.table`` is False),
    the fastest-backend line and the report's path to ``out``; returns the payload."""
    out = out or sys.stdout
    bench = AttentionBench(config, registry=registry, log=log)
    bench.save()
    bench.run()
    path = bench.save()
    if config.table:
        print(table_text(bench.results), file=out)
    print(fastest_line(bench.results), file=out)
    print(f"wrote {path}", file=out)
    return bench.payload()


def cmd_bench_attention(argv: Sequence[str]) -> int:
    d = BenchAttentionConfig()
    p = Parser(prog=f"{PROG} bench attention", allow_abbrev=False,
                description="Time neighbourhood attention on square maps: every backend against dense SDPA "
                            "on the same tokens, with achieved GFLOP/s, speed-up, the FLOP ceiling N^2/pairs "
                            "and the error against the float64 reference (N <= 1024). Writes a JSON report.")
    p.add_argument("--sides", type=int_list, default=d.sides, metavar="S,S,...",
                   help=f"map sides (square maps; default {','.join(map(str, d.sides))})")
    p.add_argument("--kernel-size", type=int, default=d.kernel_size, metavar="K", help=f"window side (default {d.kernel_size})")
    p.add_argument("--heads", type=int, default=d.heads, metavar="H", help=f"attention heads (default {d.heads})")
    p.add_argument("--head-dim", type=int, default=d.head_dim, metavar="D", help=f"head dim (default {d.head_dim})")
    p.add_argument("--batches", type=int_list, default=d.batches, metavar="B,B,...",
                   help=f"batch sizes (default {','.join(map(str, d.batches))})")
    p.add_argument("--backends", type=name_list, default=None, metavar="NAME,...",
                   help="backends to time (default: every available one except reference)")
    p.add_argument("--repeats", type=int, default=d.repeats, metavar="N", help=f"timed calls per cell (default {d.repeats})")
    p.add_argument("--budget-s", type=finite_float, default=d.budget_s, metavar="SECONDS",
                   help=f"time budget per cell: fewer repeats when calls are slow, and a cell predicted "
                        f"(from the previous side, as N^2) to need over 4x this is skipped (default {d.budget_s:g})")
    p.add_argument("--device", choices=DEVICES, default=d.device, help="default auto (CUDA when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=d.dtype, help=f"input dtype (default {d.dtype})")
    p.add_argument("--seed", type=seed_int, default=d.seed, help=f"input seed (default {d.seed})")
    add_report_flags(p, d.output)
    args = p.parse_args(argv)
    check_outputs({"--output": args.output}, args.overwrite)  # before any work
    config = BenchAttentionConfig(sides=args.sides, kernel_size=args.kernel_size, heads=args.heads,
                                  head_dim=args.head_dim, batches=args.batches, backends=args.backends,
                                  repeats=args.repeats, budget_s=args.budget_s, device=args.device, dtype=args.dtype,
                                  seed=args.seed, output=args.output, table=not args.no_table)
    run_bench_attention(config, log=sys.stderr)
    return 0
