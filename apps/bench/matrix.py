"""``mvar-engine bench matrix``: the inference benchmark matrix (next-scale and raster models).

Every cell (model x batch x configuration) runs in a fresh process, so that peak memory is the
cell's own: the worker (``python -m mvar_engine.apps.bench.matrix CELL_JSON``) builds the model with
random weights (cost does not depend on the weights; rows say ``random_weights: true``), records
the memory after the load (the baseline), times the transformer's generation (``--warmup`` untimed
calls, then the median of ``--repeats``), then decodes the last ``f_hat`` to images in chunks of
``--decode-chunk`` images, timed separately, so that the tokenizer neither sets the transformer's
peak nor hides it.

Memory. CPU: the process's peak resident set (``VmHWM``), reset after the load and again before
decoding (``/proc/self/clear_refs``), so ``peak_rss_transformer`` is the peak of the generation
phase and ``peak_rss_decode`` the peak of the decoding phase, both weights included; before each
reset the C allocator returns its free heap memory to the OS (glibc ``malloc_trim``; without it,
memory the generation freed but glibc kept resident was counted again in the decoding phase);
``peak_rss_total`` is their maximum and ``working_memory`` = ``peak_rss_total - baseline_rss``.
CUDA: the same fields from ``torch.cuda.max_memory_allocated`` (``reset_peak_memory_stats``
between the phases) and ``memory_allocated`` after the load. The engine's own count of KV-cache
bytes (``cache_peak_bytes``) is reported beside them.

Attention FLOPs are counted from the pattern (:func:`attention_flops`): for every scale the spec the
engine asks the pattern for (cached step: the step's queries over the keys the cache returns;
recomputed step: the visible history over itself), ``4 * rows * heads * head_dim * pairs`` per
layer. Ratios compare each configuration with the first configuration (the baseline) of the same
model and batch: ``this / baseline``.

Output: ``--output`` (JSON, rewritten after every cell), the markdown table beside it (``.md``)
and a PNG chart (``.png``, drawn with PIL) of total peak memory and transformer time per image per
configuration, each bar labelled with its ratio to the baseline.

Models: ``dN-256`` / ``dN-512`` (VAR-dN on VAR's 256px or 512px schedule, the released tokenizer's
architecture, downsample 16), ``tiny`` (depth 2, scales 1,2,4, a small tokenizer; for tests), and the
raster family (:mod:`.bench_matrix_raster`): ``llamagen-b`` (LlamaGen GPT-B, 576 tokens) and
``raster-tiny``. A cell runs the configurations of its family, told by the trajectory's ``family``
(``raster/dense/...`` for raster models, next-scale trajectories for VAR models); the first
configuration of each family is that family's baseline. ``MODEL_FAMILIES`` maps a family to its worker.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

import torch

from ...core.errors import UsageError
from ...core.layout import spans_length
from ...core.files import marked_markdown, save_marked_image
from ...models.checkpoint import atomic_write
from ...models.tokenizer import MultiScaleVQVAE, TokenizerConfig
from ...models.var import VAR, VARConfig
from ..cli_helpers import PROG, Parser, finite_float, int_list, name_list, seed_int
from ..output_files import check_outputs, report_outputs
from ..config import EngineConfig
from ..model_options import VarOptions
from ..pipeline import autocast_problem, build_models
from .cells import (KNOWN_MODELS, CellRun, Combo, ModelSpec, check_combo, combo_family, model_spec, needs_calibration,
                    parse_cell, parse_combo, run_problems)
from .matrix_raster import calibrate_for_matrix, run_raster_cell
from .report import (PALETTE, add_report_flags, add_run_flags, format_value, machine_info, mib, run_json_worker, worker_env,
                     write_json)

# -- models ------------------------------------------------------------------------------------------


# -- configurations ----------------------------------------------------------------------------------


# -- presets -----------------------------------------------------------------------------------------
BASELINE = "full/dense/full"
MVAR = "markov/neighborhood/none"
RASTER_BASELINE = "raster/dense/full"
RASTER_SSD = "raster/dense/ssd:budget=0.2"
RASTER_POLICIES = (RASTER_BASELINE, "raster/dense/window:budget=0.2", "raster/dense/sink:budget=0.2",
                   "raster/dense/h2o:budget=0.2", RASTER_SSD)


@dataclass(frozen=True)
class Preset:
    cells: tuple[tuple[str, int], ...]  # (model id, batch) in order
    configs: tuple[str, ...]
    repeats: int
    warmup: int
    device: str
    description: str


PRESETS: dict[str, Preset] = {
    "default": Preset(
        cells=(("d16-256", 1), ("d16-256", 4), ("llamagen-b", 4)),
        configs=(BASELINE, MVAR, "markov/dense/none", RASTER_BASELINE, RASTER_SSD),
        repeats=2, warmup=1, device="cpu",
        description="VAR-d16 256px, batch 1 and 4 with CFG: VAR, MVAR and MVAR's trajectory without its "
                    "neighbourhood; LlamaGen-B (576 tokens) batch 4 with CFG: full cache vs SSD at 20% "
                    "(about 8 minutes on an idle 2-core CPU)"),
    "target": Preset(
        cells=(("d16-256", 32), ("d16-512", 8)),
        configs=(BASELINE, MVAR),
        repeats=1, warmup=1, device="auto",
        description="the target rows: d16 256px batch 32 and d16 512px batch 8, with CFG, VAR vs MVAR (on a "
                    "2-core CPU one batch-32 generation takes minutes: --cells d16-256:8,d16-512:2 there)"),
    "paper": Preset(
        cells=(("d16-256", 32), ("d20-256", 32), ("d24-256", 32)),
        configs=(BASELINE, MVAR),
        repeats=5, warmup=1, device="auto",
        description="the MVAR paper's setting: d16/d20/d24 256px, batch 32, CFG 1.5 (for a GPU)"),
    "raster": Preset(
        cells=(("llamagen-b", 32),),
        configs=RASTER_POLICIES,
        repeats=3, warmup=1, device="auto",
        description="the SSD paper's batch: LlamaGen-B (576 tokens) batch 32 with CFG, full cache vs window, sink, "
                    "h2o and ssd at a 20% budget (for a GPU; minutes per cell on a CPU)"),
}


# -- the matrix configuration --------------------------------------------------------------------------
@dataclass(frozen=True)
class MatrixConfig:
    preset: str = "default"
    cells_: tuple[str, ...] | None = None   # "MODEL:BATCH" pairs; overrides models, batches and the preset's cells
    models: tuple[str, ...] | None = None   # None: the preset's cells
    batches: tuple[int, ...] | None = None  # None: the preset's cells
    configs: tuple[str, ...] | None = None  # None: the preset's; the first is the baseline
    backend: str = "auto"
    device: str | None = None               # None: the preset's
    dtype: str = "float32"
    repeats: int | None = None
    warmup: int | None = None
    cfg: float = 1.5
    seed: int = 0
    decode_chunk: int = 2
    calibration_images: int = 1             # ssd head maps calibrated by the matrix (raster cells)
    threads: int | None = None              # None: torch's default (OMP_NUM_THREADS)
    timeout_s: float | None = None
    output: str = "bench-matrix.json"
    table: bool = True
    count_calls: bool = False               # raster cells: aten calls and host syncs per step (one more generation)

    @property
    def base(self) -> Preset:
        if self.preset not in PRESETS:
            raise UsageError(f"unknown preset {self.preset!r} (available: {', '.join(PRESETS)})")
        return PRESETS[self.preset]

    def cells(self) -> list[tuple[ModelSpec, int]]:
        """(model, batch) pairs in run order: ``--cells``, else the preset's, or ``models x batches`` where given."""
        if self.cells_ is not None:
            return [(model_spec(m), b) for m, b in map(parse_cell, self.cells_)]
        base = self.base
        models = self.models if self.models is not None else tuple(dict.fromkeys(m for m, _ in base.cells))
        if self.models is None and self.batches is None:
            pairs = list(base.cells)
        else:
            batches = self.batches if self.batches is not None else tuple(dict.fromkeys(b for _, b in base.cells))
            pairs = [(m, b) for m in models for b in batches]
        return [(model_spec(m), b) for m, b in pairs]

    def combos(self) -> list[Combo]:
        return [parse_combo(text) for text in (self.configs if self.configs is not None else self.base.configs)]

    def resolved(self) -> dict[str, Any]:
        """The effective settings (preset values filled in)."""
        base = self.base
        return {"repeats": self.repeats if self.repeats is not None else base.repeats,
                "warmup": self.warmup if self.warmup is not None else base.warmup,
                "device": self.device or base.device}

    def problems(self) -> list[str]:
        out = []
        if self.preset not in PRESETS:
            return [f"unknown preset {self.preset!r} (available: {', '.join(PRESETS)})"]
        settings = self.resolved()
        if settings["repeats"] < 1 or settings["warmup"] < 0:
            out.append("--repeats must be at least 1 and --warmup at least 0")
        if self.batches is not None and (not self.batches or min(self.batches) < 1):
            out.append("--batches must be positive integers")
        if self.decode_chunk < 1:
            out.append("--decode-chunk must be at least 1")
        if self.calibration_images < 1:
            out.append("--calibration-images must be at least 1")
        if not (math.isfinite(self.cfg) and self.cfg >= 0):
            out.append(f"--cfg must be a finite number >= 0 (0 disables guidance), got {self.cfg:g}")
        if self.cells_ is not None and not self.cells_:
            out.append("--cells needs at least one MODEL:BATCH")
        if self.configs is not None and not self.configs:
            out.append("--configs needs at least one trajectory/attention/cache triple")
        out += run_problems(threads=self.threads, timeout_s=self.timeout_s, device=settings["device"], dtype=self.dtype)
        if not Path(self.output).suffix == ".json":
            out.append(f"--output {self.output}: give a .json path (the .md table and .png chart go beside it)")
        return out

    def device_name(self) -> str:
        device = self.resolved()["device"]
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return device


# -- attention FLOPs -----------------------------------------------------------------------------------
def attention_flops(layout, trajectory, pattern, cache, *, depth: int, heads: int, head_dim: int, rows: int,
                    per_scale: list[int] | None = None) -> int:
    """FLOPs of the attention products of one generation (``4 * rows * heads * head_dim * pairs`` per
    layer and step, QK^T and PV), walking the scales as :meth:`NextScaleEngine.generate` does: a step
    that the cache serves (or that needs no history) asks the pattern for its queries over the keys
    the cache returns; otherwise the visible history is recomputed and attends to itself.

    ``cache`` is driven with one-element tensors (``begin`` resets it, so the engine's own instance
    may be passed). ``per_scale``, if given, receives each step's FLOPs."""

    cache.begin(num_layers=1, batch=1, num_heads=1, head_dim=1, layout=layout, device=torch.device("cpu"),
                dtype=torch.float32)
    total = 0
    for sc in layout.scales:
        s = sc.index
        needed, frontier = {s}, [s]  # the engine's dependencies(): visible history, transitively
        while frontier:
            for j in trajectory.history(frontier.pop()):
                if j not in needed:
                    needed.add(j)
                    frontier.append(j)
        history = sorted(needed)
        if cache.stores_history or history == [s]:
            queries = (sc.span,)
            dummy = torch.zeros(1, 1, sc.numel, 1)
            _, _, keys = cache.update(0, dummy, dummy, queries)
            cache.end_step()
        else:
            queries = keys = layout.spans_of(history)
        q_len, kv_len = spans_length(queries), spans_length(keys)
        spec = pattern.spec(layout, queries, keys, trajectory.visible)
        flops = 4 * rows * heads * head_dim * spec.pair_count(q_len, kv_len) * depth
        if per_scale is not None:
            per_scale.append(flops)
        total += flops
    cache.begin(num_layers=1, batch=1, num_heads=1, head_dim=1, layout=layout, device=torch.device("cpu"),
                dtype=torch.float32)
    return total


# -- memory probes -------------------------------------------------------------------------------------


# -- the worker ----------------------------------------------------------------------------------------
def bench_next_scale_models(spec: ModelSpec, cell: dict[str, Any]):
    """(VAR, tokenizer) with random weights: ``tiny`` is built here, the VAR sizes through the same
    path as ``mvar-engine --random-weights`` (:func:`build_models`)."""

    if spec.id == "tiny":
        torch.manual_seed(cell["seed"])
        model = VAR(VARConfig(depth=spec.depth, embed_dim=64, num_heads=2, num_classes=10, vocab_size=64, z_channels=8,
                              patch_nums=spec.patch_nums))
        tokenizer = MultiScaleVQVAE(TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2),
                                                    num_res_blocks=1, using_sa=False, using_mid_sa=False,
                                                    patch_nums=spec.patch_nums))
        return model, tokenizer
    return build_models(VarOptions(random_weights=True, depth=spec.depth, patch_nums=spec.patch_nums,
                                   init_seed=cell["seed"]))


def run_next_scale_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Measure one (next-scale model, batch, configuration) cell in this process; returns the row."""

    combo = parse_combo(cell["config"])
    run = CellRun(cell, lambda device: EngineConfig(**combo.engine_components(), backend=cell["backend"],
                                                    device=str(device), dtype=cell["dtype"],
                                                    sampling={"cfg": cell["cfg"], "seed": cell["seed"]},
                                                    compile=combo.compile),
                  lambda: bench_next_scale_models(model_spec(cell["model"]), cell))
    model, engine = run.model, run.engine
    block = model.blocks[0].attn
    rows = cell["batch"] * (2 if cell["cfg"] > 0 else 1)
    flops = attention_flops(model.layout, run.components.trajectory, run.components.pattern, run.fresh_cache(),
                            depth=len(model.blocks), heads=block.heads, head_dim=block.head_dim, rows=rows)
    labels = (torch.arange(cell["batch"]) % model.num_classes).to(run.device)
    generator = torch.Generator(device=run.device).manual_seed(cell["seed"])
    last: list[Any] = [None]
    cache: list[Any] = [None]

    def prepare(_index: int) -> None:
        last[0] = None
        cache[0] = run.fresh_cache()

    def call() -> None:
        last[0] = engine.generate(labels, cache[0], cfg=cell["cfg"], top_k=900, top_p=0.96, generator=generator)

    run.generations(prepare, call)
    f_hat, cache_peak = last[0].f_hat, last[0].cache_peak_bytes
    prepare(-1)
    run.decoding(run.tokenizer.fhat_to_img, f_hat)
    return run.row(rows=rows, cfg=cell["cfg"], flops=flops, cache_peak=cache_peak,
                   patch_nums=list(run.spec.patch_nums))


MODEL_FAMILIES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "next-scale": run_next_scale_cell,
    "next-token": run_raster_cell,
}
"""Model family (the trajectory family its configurations belong to) -> the function that measures
one cell of it in the current (fresh) process. A worker returns the shared row fields (baseline and
peaks via :class:`MemoryProbe`, ``cache_peak_bytes``, attention FLOPs, transformer and decode times)."""


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    spec = model_spec(cell["model"])
    runner = MODEL_FAMILIES.get(spec.family)
    if runner is None:
        raise UsageError(f"model family '{spec.family}' has no benchmark worker yet (have: {', '.join(MODEL_FAMILIES)})")
    return runner(cell)


# -- the parent: one process per cell --------------------------------------------------------------------
def cell_for(spec: ModelSpec, batch: int, combo: Combo, *, backend: str, device: str, dtype: str, cfg: float, seed: int,
             repeats: int, warmup: int, decode_chunk: int, threads: int | None) -> dict[str, Any]:
    """The worker's input for one (model, batch, configuration): a JSON-able dict (see :func:`run_cell`)."""
    return {"model": spec.id, "batch": batch, "config": combo.text, "backend": backend, "device": device,
            "dtype": dtype, "cfg": cfg, "seed": seed, "repeats": repeats, "warmup": warmup,
            "decode_chunk": decode_chunk, "threads": threads}


def attach_head_map(cell: dict[str, Any], combo: Combo, payload: dict[str, Any], output: str | Path, images: int,
                    log: TextIO) -> None:
    """For an ``ssd`` configuration without a head map: calibrate one per model (first use; written
    beside ``output`` and recorded in ``payload["head_maps"]``, the report rewritten) and put its
    path in ``cell``. Other configurations are left as they are."""
    if not needs_calibration(combo):
        return
    model = cell["model"]
    if model not in payload["head_maps"]:
        path = Path(output).with_suffix(f".{model}.head_map.json")
        payload["head_maps"][model] = calibrate_for_matrix(model, cell, path, images, log)
        write_json(output, payload)
    cell["head_map"] = payload["head_maps"][model]["path"]


def run_cell_in_subprocess(cell: dict[str, Any], timeout_s: float | None,
                           watch: Callable[[int], str | None] | None = None) -> dict[str, Any]:
    """Run one cell in a fresh interpreter; a failure becomes a row with status ``error`` (``watch``:
    see :func:`run_json_worker`)."""
    row = run_json_worker("mvar_engine.apps.bench.matrix", json.dumps(cell), env=worker_env(), timeout_s=timeout_s,
                          watch=watch)
    if row.get("status") == "error" and str(row.get("reason", "")).startswith("timed out"):
        row["reason"] += " (--timeout-s)"
    return row


RATIO_FIELDS = {"memory_ratio": "peak_rss_total", "transformer_memory_ratio": "peak_rss_transformer",
                "working_memory_ratio": "working_memory", "time_ratio": "transformer_s_per_image",
                "flops_ratio": "attention_gflops"}
"""Ratio name -> the row field it divides (this configuration / the baseline of the same model and batch)."""


def add_ratios(rows: list[dict[str, Any]], baseline: str | Mapping[str, str]) -> None:
    """Fill every row's ratios against the baseline configuration of its (model, batch): ``baseline``,
    or ``baseline[family]`` per model family (None where either side is missing or failed)."""
    def base_of(row: dict[str, Any]) -> str | None:
        return baseline if isinstance(baseline, str) else baseline.get(row.get("family", "next-scale"))

    bases = {(r["model"], r["batch"]): r for r in rows if r["config"] == base_of(r) and r["status"] == "ok"}
    for row in rows:
        base = bases.get((row["model"], row["batch"]))
        for name, key in RATIO_FIELDS.items():
            ok = base is not None and row["status"] == "ok" and base.get(key) and row.get(key) is not None
            row[name] = row[key] / base[key] if ok else None


TARGETS = (  # (model, target batch, metric, minimum reduction baseline / MVAR, paper figures)
    ("d16-256", 32, "transformer_memory_ratio", 3.0, "paper 10882 MB -> 3846 MB"),
    ("d16-256", 32, "time_ratio", 1.25, "paper 0.34 s -> 0.27 s"),
    ("d16-512", 8, "transformer_memory_ratio", 3.0, "paper 43826 MB -> 15090 MB"),
    ("d16-512", 8, "flops_ratio", 1.9, "paper 219.9 -> 116.4 GFLOPs"),
)


def target_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """MVAR's targets against VAR (docs/benchmarks.md), for every measured (model, batch) group that has both VAR (full/dense/full)
    and MVAR (markov/neighborhood/none) rows; ``at_target_batch`` says whether it is the target setting.
    Memory: the peak of the generation phase, weights included (decoding is chunked and reported apart);
    ``working_reduction`` is the same over the post-load baseline, ``total_reduction`` with decoding."""
    out = []
    by_key = {(r["model"], r["batch"], r["config"]): r for r in rows if r["status"] == "ok"}
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        var, mvar = by_key.get((model, batch, BASELINE)), by_key.get((model, batch, MVAR))
        if var is None or mvar is None:
            continue
        for t_model, t_batch, metric, minimum, paper in TARGETS:
            if t_model != model or not mvar.get(metric):
                continue
            reduction = 1 / mvar[metric] if metric != "flops_ratio" else var["attention_gflops"] / mvar["attention_gflops"]
            check = {"model": model, "batch": batch, "target_batch": t_batch, "at_target_batch": batch == t_batch,
                     "cfg": mvar["cfg"], "metric": metric, "reduction": reduction, "minimum": minimum,
                     "met": reduction >= minimum, "paper": paper}
            if metric == "transformer_memory_ratio":
                check["working_reduction"] = (var["working_memory_transformer"] / mvar["working_memory_transformer"]
                                              if mvar.get("working_memory_transformer") else None)
                check["total_reduction"] = 1 / mvar["memory_ratio"] if mvar.get("memory_ratio") else None
            out.append(check)
    out += raster_cache_checks(rows)
    return out


RASTER_CACHE_TARGET = (0.2, 5.0, "SSD paper: about 5x less KV-cache memory at a 20% budget")
"""(largest budget fraction checked, minimum reduction of key/value bytes, source)."""


def raster_cache_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Raster rows with a cache budget of at most 20% (a fraction): key/value bytes of the full
    cache of the same model, batch and dtype over the row's, against SSD's 5x at a 20% budget (bookkeeping is
    reported apart)."""
    largest, minimum, source = RASTER_CACHE_TARGET
    out = []
    ok = [r for r in rows if r["status"] == "ok" and r.get("family") == "next-token"]
    full = {(r["model"], r["batch"], r.get("dtype")): r for r in ok if r["cache"] == "full"}
    for row in ok:
        budget = (row.get("options") or {}).get("cache", {}).get("budget")
        base = full.get((row["model"], row["batch"], row.get("dtype")))
        if base is None or budget is None or not 0 < budget <= largest or not row.get("kv_bytes"):
            continue
        reduction = base["kv_bytes"] / row["kv_bytes"]
        out.append({"model": row["model"], "batch": row["batch"], "target_batch": row["batch"], "at_target_batch": True,
                    "cfg": row["cfg"], "metric": "kv_ratio", "config": row["config"], "reduction": reduction,
                    "minimum": minimum, "met": reduction >= minimum, "paper": source,
                    "with_bookkeeping": base["kv_bytes"] / row["cache_peak_bytes"] if row.get("cache_peak_bytes") else None})
    return out


def families_of(combos: list[Combo]) -> dict[str, list[Combo]]:
    """Configurations per model family, in the given order (the first of each is its baseline)."""
    out: dict[str, list[Combo]] = {}
    for combo in combos:
        out.setdefault(combo_family(combo), []).append(combo)
    return out


def run_matrix(config: MatrixConfig, out: TextIO | None = None, log: TextIO | None = None) -> dict[str, Any]:
    """Validate, calibrate ssd head maps where needed, run every cell in a fresh process (JSON
    rewritten after each), then write the table and the chart; returns the payload."""

    out, log = out or sys.stdout, log or sys.stderr
    problems = config.problems()
    if problems:
        raise UsageError("; ".join(problems))
    cells = config.cells()
    combos = config.combos()
    if len({c.text for c in combos}) != len(combos):
        raise UsageError("--configs lists a configuration twice")
    specs = [spec for spec, _ in dict.fromkeys(cells)]
    for combo in combos:
        check_combo(combo, config.backend, specs)
        problem = autocast_problem(combo.dtype or config.dtype, torch.device(config.device_name()))
        if problem is not None:
            raise UsageError(f"configuration {combo.text}: {problem}")
    by_family = families_of(combos)
    for spec, _ in dict.fromkeys(cells):
        if spec.family not in by_family:
            kind = "raster/dense/CACHE" if spec.family == "next-token" else "trajectory/attention/cache of a next-scale trajectory"
            raise UsageError(f"model '{spec.id}' ({spec.family}) has no configuration of its family among the configurations "
                             f"({', '.join(c.text for c in combos)}): add {kind} triples to --configs")
    settings = config.resolved()
    device = config.device_name()
    baselines = {family: group[0].text for family, group in by_family.items()}
    payload: dict[str, Any] = {
        "benchmark": "matrix", "machine": machine_info(device), "config": asdict(config), "settings": settings,
        "baseline": next(iter(baselines.values())), "baselines": baselines, "random_weights": True,
        "note": "random weights: time and memory only; ratios are this configuration / the baseline configuration "
                "(the first of its model family) of the same model and batch",
        "head_maps": {}, "results": [], "targets": []}
    write_json(config.output, payload)
    plan = [(spec, batch, combo) for spec, batch in cells for combo in by_family[spec.family]]
    for index, (spec, batch, combo) in enumerate(plan, 1):
        cell = cell_for(spec, batch, combo, backend=config.backend, device=device, dtype=combo.dtype or config.dtype,
                        cfg=config.cfg, seed=config.seed, repeats=settings["repeats"], warmup=settings["warmup"],
                        decode_chunk=config.decode_chunk, threads=config.threads)
        cell["count_calls"] = config.count_calls
        attach_head_map(cell, combo, payload, config.output, config.calibration_images, log)
        print(f"[{index}/{len(plan)}] {spec.id} batch {batch} {combo.text}: fresh process ...", file=log, flush=True)
        t0 = time.perf_counter()
        row = run_cell_in_subprocess(cell, config.timeout_s)
        if row["status"] != "ok":
            row = {**{k: cell[k] for k in ("model", "batch", "config", "backend", "cfg")}, "family": spec.family, **row}
        row["wall_s"] = time.perf_counter() - t0
        payload["results"].append(row)
        add_ratios(payload["results"], baselines)
        payload["targets"] = target_checks(payload["results"])
        write_json(config.output, payload)
        print(f"[{index}/{len(plan)}] {_progress_line(row)}", file=log, flush=True)
    md_path = Path(config.output).with_suffix(".md")
    write_markdown(md_path, payload)
    png_path = Path(config.output).with_suffix(".png")
    draw_chart(png_path, payload)
    if config.table:
        print(table_markdown(payload), file=out)
        for line in target_lines(payload):
            print(line, file=out)
    print(f"wrote {config.output}, {md_path}, {png_path}", file=out)
    return payload


def _progress_line(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['model']} batch {row['batch']} {row['config']}: error: {row['reason']}"
    return (f"{row['model']} batch {row['batch']} {row['config']}: peak {row['peak_rss_total'] / 2**20:.0f} MiB, "
            f"{row['transformer_s_per_image']:.3g} s/image, {row['wall_s']:.0f} s in all")


# -- presentation ----------------------------------------------------------------------------------------
def _ratio(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}x"


TABLE_COLUMNS = (
    ("model", "model"), ("batch", "batch"), ("config", "trajectory/attention/cache"), ("peak", "peak MiB"),
    ("memory_ratio", "vs base"), ("peak_transformer", "transformer peak MiB"), ("transformer_memory_ratio", "vs base"),
    ("working", "working MiB"), ("working_memory_ratio", "vs base"),
    ("cache", "KV cache MiB"), ("attention_gflops", "attn GFLOPs"), ("flops_ratio", "vs base"),
    ("transformer_s_per_image", "transformer s/img"), ("time_ratio", "vs base"),
    ("decode_s_per_image", "decode s/img"), ("tokens_per_s", "tokens/s"),
    ("aten_calls_per_layer_step", "aten calls/layer/step"), ("host_syncs_per_step", "host syncs/step"),
    ("backends", "backends"),
)


def table_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in payload["results"]:
        if r["status"] != "ok":
            rows.append({"model": r["model"], "batch": r["batch"], "config": r["config"],
                         "backends": f"error: {r['reason']}"})
            continue
        rows.append({**r, "peak": mib(r["peak_rss_total"]), "peak_transformer": mib(r["peak_rss_transformer"]),
                     "working": mib(r["working_memory"]),
                     "cache": mib(r["cache_peak_bytes"]),
                     **{k: _ratio(r[k]) for k in RATIO_FIELDS},
                     "backends": ", ".join(f"{k}: {v}" for k, v in sorted(r["backends_used"].items()))})
    return rows


def table_markdown(payload: dict[str, Any]) -> str:
    """The results as a markdown table (one line per cell)."""

    rows = table_rows(payload)
    header = "| " + " | ".join(h for _, h in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(k)) for k, _ in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def target_lines(payload: dict[str, Any]) -> list[str]:
    lines = []
    for t in payload.get("targets", []):
        what = {"transformer_memory_ratio": "peak memory of generation incl. weights", "time_ratio": "transformer time",
                "flops_ratio": "attention FLOPs", "kv_ratio": "KV-cache bytes"}[t["metric"]]
        where = "" if t["at_target_batch"] else f" (target setting: batch {t['target_batch']})"
        extra = ""
        if t.get("working_reduction") is not None:
            extra = f"; working memory {t['working_reduction']:.2f}x"
        if t.get("total_reduction") is not None:
            extra += f", with decoding {t['total_reduction']:.2f}x"
        if t.get("with_bookkeeping") is not None:
            extra += f"; with positions and scores {t['with_bookkeeping']:.2f}x"
        lines.append(f"target {t['model']} batch {t['batch']} cfg {t['cfg']:g}{where}: {what} {t['reduction']:.2f}x "
                     f"lower with {t.get('config', 'MVAR')} (>= {t['minimum']:g}x: {'met' if t['met'] else 'NOT met'}"
                     f"{extra}; {t['paper']})")
    return lines


def write_markdown(path: Path, payload: dict[str, Any]) -> Path:

    machine = payload["machine"]
    settings = payload["settings"]
    baselines = ", ".join(f"`{text}`" for text in payload.get("baselines", {"": payload["baseline"]}).values())
    threads = settings.get("threads") or machine["torch_threads"]  # --threads is what every cell ran with
    text = (f"# mvar-engine bench matrix\n\n{machine['device_name']} ({machine['device']}, {machine['cpu_count']} CPUs, "
            f"{threads} torch threads per cell), torch {machine['torch']}. Random weights (time and memory "
            f"only). Baseline{'s' if len(baselines) > 1 else ''}: {baselines}; ratios are this configuration / the "
            f"baseline of its family for the same model and batch. Memory: {'peak allocated (CUDA)' if machine['device'].startswith('cuda') else 'peak resident set'}"
            f" including weights; working = peak - memory after the load. Transformer time: median of "
            f"{settings['repeats']} after {settings['warmup']} warm-up; decoding timed separately.\n\n"
            + table_markdown(payload) + "\n")
    lines = target_lines(payload)
    if lines:
        text += "\n" + "\n".join(f"- {line}" for line in lines) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(marked_markdown(text)))




def _tint(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(c + (255 - c) * 3 // 5 for c in colour)


def draw_chart(path: Path, payload: dict[str, Any]) -> Path:
    """Two panels (total peak memory, transformer seconds per image) of bars grouped by (model, batch),
    one colour per configuration, each bar labelled with its value and its ratio to the baseline."""
    from PIL import Image, ImageDraw, ImageFont


    ok = [r for r in payload["results"] if r["status"] == "ok"]
    groups = list(dict.fromkeys((r["model"], r["batch"]) for r in ok)) or [("no results", 0)]
    configs = list(dict.fromkeys(r["config"] for r in payload["results"])) or ["-"]
    font = ImageFont.load_default()
    lookup = {(r["model"], r["batch"], r["config"]): r for r in ok}
    present = {g: [c for c in configs if (*g, c) in lookup] for g in groups}  # a group's bars, in legend order
    bar_w, gap, left, top_pad = 46, 36, 70, 40
    group_w = bar_w * max(1, *(len(v) for v in present.values())) + gap
    width = max(640, left + group_w * len(groups) + 20)
    panel_h, legend_h = 260, 20 * len(configs) + 20
    height = 2 * (panel_h + top_pad) + legend_h + 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    panels = (("total peak memory (MiB; lighter: memory after the load, incl. weights; black line: peak of "
               "generation where decoding set the total)", "peak_rss_total", 2**20, "memory_ratio"),
              ("transformer time per image (s)", "transformer_s_per_image", 1, "time_ratio"))
    for p, (title, key, unit, ratio_key) in enumerate(panels):
        y0 = 10 + p * (panel_h + top_pad)
        base_y = y0 + top_pad + panel_h - 30
        draw.text((10, y0), title, fill="black", font=font)
        values = [r[key] / unit for r in ok] or [1.0]
        top = max(values) * 1.15 or 1.0
        draw.line((left - 5, base_y, width - 10, base_y), fill="black")
        for tick in range(5):
            y = base_y - (panel_h - 50) * tick / 4
            tick_value = top * tick / 4
            draw.text((5, y - 6), f"{tick_value:.0f}" if tick_value >= 100 else f"{tick_value:.3g}", fill="gray",
                      font=font)
        for g, (model, batch) in enumerate(groups):
            gx = left + g * group_w
            draw.text((gx, base_y + 6), f"{model} b{batch}", fill="black", font=font)
            for slot, config in enumerate(present[(model, batch)]):
                row = lookup[(model, batch, config)]
                value = row[key] / unit
                x = gx + slot * bar_w
                h = (panel_h - 50) * value / top
                colour = PALETTE[configs.index(config) % len(PALETTE)]
                draw.rectangle((x + 4, base_y - h, x + bar_w - 4, base_y), fill=colour)
                if key == "peak_rss_total":  # the memory after the load (weights), lighter
                    hb = (panel_h - 50) * min(row["baseline_rss"] / unit, value) / top
                    draw.rectangle((x + 4, base_y - hb, x + bar_w - 4, base_y), fill=_tint(colour))
                    if row["peak_rss_transformer"] < row["peak_rss_total"]:  # decoding set the peak: mark generation's
                        ht = (panel_h - 50) * row["peak_rss_transformer"] / unit / top
                        draw.line((x + 4, base_y - ht, x + bar_w - 4, base_y - ht), fill="black", width=2)
                draw.text((x + 4, base_y - h - 24), f"{value:.0f}" if value >= 100 else f"{value:.3g}", fill="black",
                          font=font)
                ratio = row.get(ratio_key)
                draw.text((x + 4, base_y - h - 12), f"{ratio:.2f}x" if ratio is not None else "-", fill="black",
                          font=font)
    legend_y = 2 * (panel_h + top_pad) + 10
    for c, config in enumerate(configs):
        y = legend_y + 20 * c
        draw.rectangle((left, y, left + 14, y + 12), fill=PALETTE[c % len(PALETTE)])
        suffix = " (baseline of its family: ratios are config / baseline)" if config in payload.get(
            "baselines", {"": payload.get("baseline")}).values() else ""
        draw.text((left + 22, y), config + suffix, fill="black", font=font)
    draw.text((10, height - 18), "random weights; " + payload["machine"]["device_name"][:60], fill="gray", font=font)
    return save_marked_image(image, path, format="PNG")


def main(argv: Sequence[str]) -> int:
    """Worker entry: ``python -m mvar_engine.apps.bench.matrix CELL_JSON`` prints one JSON line."""
    print(json.dumps(run_cell(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))


def cmd_bench_matrix(argv: Sequence[str]) -> int:
    d = MatrixConfig()
    presets = "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items())
    p = Parser(prog=f"{PROG} bench matrix", allow_abbrev=False,
                description="Inference benchmark matrix: every model x batch x trajectory/attention/cache "
                            "cell in a fresh process, random weights; peak memory over the post-load baseline, "
                            "KV-cache bytes, attention FLOPs from the pattern, transformer and decoding time. Writes "
                            "JSON, a markdown table (.md) and a PNG chart (.png); ratios are against the first "
                            "configuration of each model family (next-scale VAR/MVAR models; raster LlamaGen-style "
                            f"models run raster/dense/CACHE triples). Presets: {presets}.")
    p.add_argument("--preset", choices=list(PRESETS), default=d.preset, help=f"default {d.preset}")
    p.add_argument("--models", type=name_list, default=None, metavar="ID,...",
                   help=f"model ids ({', '.join(KNOWN_MODELS)}; any dN-256 / dN-512); with --batches, overrides "
                        f"the preset's cells")
    p.add_argument("--batches", type=int_list, default=None, metavar="B,B,...", help="batch sizes (images)")
    p.add_argument("--cells", type=name_list, default=None, metavar="MODEL:B,...",
                   help="exact (model, batch) cells, e.g. d16-256:8,d16-512:2 (overrides --models, --batches, preset)")
    p.add_argument("--configs", type=name_list, default=None, metavar="T/A/C,...",
                   help="trajectory/attention/cache triples; the first of each family is its baseline (options as "
                        "neighborhood:kernel_size=5 or ssd:budget=0.2; ssd without head_map=FILE is calibrated; "
                        "@bfloat16 after a triple autocasts that configuration: full/dense/full,full/dense/full@bfloat16)")
    add_run_flags(p, device=None, dtype=d.dtype, backend=d.backend, threads="torch threads per cell (default: torch's)",
                  timeout="limit per cell (default none)")
    p.add_argument("--repeats", type=int, default=None, help="timed generations per cell (default: the preset's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed generations first (default: the preset's)")
    p.add_argument("--cfg", type=finite_float, default=d.cfg, help=f"classifier-free guidance (default {d.cfg}; 0 disables)")
    p.add_argument("--seed", type=seed_int, default=d.seed)
    p.add_argument("--decode-chunk", type=int, default=d.decode_chunk, metavar="N",
                   help=f"images decoded at a time (default {d.decode_chunk})")
    p.add_argument("--calibration-images", type=int, default=d.calibration_images, metavar="N",
                   help=f"generations that calibrate an ssd head map (default {d.calibration_images})")
    p.add_argument("--count-calls", action="store_true",
                   help="raster cells: count aten calls and host syncs per decoding step (one more, untimed generation; "
                   "not for @compile rows)")
    add_report_flags(p, d.output)
    args = p.parse_args(argv)
    if Path(args.output).suffix == ".json":  # another suffix is refused with the others' problems
        check_outputs(report_outputs(args.output, (".md", ".png")), args.overwrite)
    payload = run_matrix(MatrixConfig(
        preset=args.preset, cells_=args.cells, models=args.models, batches=args.batches, configs=args.configs, backend=args.backend,
        device=args.device, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup, cfg=args.cfg, seed=args.seed,
        decode_chunk=args.decode_chunk, calibration_images=args.calibration_images, threads=args.threads,
        timeout_s=args.timeout_s, output=args.output, table=not args.no_table, count_calls=args.count_calls),
        log=sys.stderr)
    return 1 if any(row["status"] != "ok" for row in payload["results"]) else 0
