"""``mvar-engine bench cache``: KV-cache policies of a raster (next-token) model side by side: cache
bytes, throughput, peak memory and quality against the ``full`` cache, per policy and budget.

Rows. One row for ``full`` (the baseline of every ratio), one for ``none`` when it is asked for, and one
per budgeted policy (``window``, ``sink``, ``h2o``, ``ssd``, any cache with a ``budget`` option) and
``--budgets`` value (a fraction <= 1 of the sequence, class prefix included, or a token count > 1; see
:mod:`mvar_engine.plugins.budget_cache`).

Time and memory. Each row runs in a fresh process (``python -m mvar_engine.apps.bench.cache CELL``, as
``bench matrix`` does; ``--in-process`` runs them in this process instead, quicker but with peaks that
are not isolated): the worker builds the model, records the memory after the load (the baseline),
then times ``--warmup`` untimed and ``--repeats`` timed generations of ``--batch`` images with CFG
(rows ``[cond; uncond]``: ``2 x batch`` rows unless ``--cfg 1``), a fresh cache per generation, sampled
with top-k from a generator seeded with ``--seed``. ``torch.cuda.synchronize`` brackets each call on
CUDA. Reported: the median time per image and image tokens per second (``batch x tokens / median``);
the cache's own byte counts polled after every step, key/value buffers (``kv_bytes``; ``full``: its
``nbytes``) and bookkeeping (positions, attention scores: ``nbytes - kv_bytes``); peak memory above
the post-load baseline (CPU: the process's ``VmHWM``, reset after the load; CUDA:
``max_memory_allocated``). Ratios are this row / the ``full`` row.

Quality (``--quality-images``, in this process, after the timed rows). ``full`` generates the images
(sampled, fixed seed) and its raw logits are kept; every policy then replays exactly those tokens
(``forced_tokens``), and its CFG-guided logits are compared with full's at every token: top-1
agreement (same argmax) and the mean ``KL(full || policy)`` of the guided softmax distributions (no
top-k filtering). Each policy also samples freely from the same seed: ``sampled_agreement`` is the
share of tokens equal to full's (one early difference changes everything after it, so this is the
harshest measure). With ``--model default`` (trained digits weights) the freely sampled images are
decoded and scored like ``mvar-engine evaluate`` does (class accuracy and the Frechet distance of
classifier features to the real held-out digits; the ``full`` row is the reference).

SSD needs a head map: ``--head-map FILE`` (``mvar-engine profile-heads``), or an automatic calibration
before the rows: ``ProfilingCache`` over ``--calibration-images`` generations with the full cache
(3x3 neighbourhood, automatic threshold), written beside ``--output`` (``NAME.head_map.json`` and its
PNG heat map); its path, sink/local counts and threshold go into the JSON.

``--max-tokens N`` generates only the first N image tokens of each image (a short CPU run). The cache
storage is still that of the full-length sequence (``full`` allocates every position; a budget is a
share of the full length), so the byte columns are unchanged; but the time covers only the first N
steps, during which the full cache's attention spans at most ``prefix + N`` keys instead of
``prefix + h*w`` and a budgeted cache evicts only once more than its budget has been generated (for
``N`` below the budget it never evicts), so speed ratios are those of short sequences and understate a
full run's; on the CPU the peak resident memory counts only the pages written, so the positions the
``full`` cache never reaches do not show in its peak memory either; quality compares the first N tokens
only and sample quality is skipped. Prefer full runs.

Models: ``llamagen-b`` (random weights, LlamaGen-B size on a 24 x 24 grid: 576 image tokens, 16384
codes, 1000 classes; rows say ``random_weights``: valid for time and memory, not for quality),
``default`` (the shipped trained raster digits weights that ``mvar-engine --trajectory raster`` loads;
the run is skipped with a message where this installation has none) and ``tiny`` (for tests).

Output: ``--output`` (JSON, written atomically and rewritten after every row and every quality
result, so an interrupted run keeps what it measured), the markdown table beside it (``.md``), and the
table and target lines on stdout.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

import torch

from ...core.errors import MvarEngineError, UsageError
from ...core.registry import get_registry
from ...core.sampling import raster_guided
from ...core.files import marked_markdown
from ...models.checkpoint import atomic_write
from ...models.default_models import available_defaults
from ...models.raster_adapter import RasterEngine
from ...models.raster_gpt import RasterGPT, RasterGPTConfig
from ...plugins.budget_cache import budget_tokens
from ...plugins.head_map import load_head_map
from ..cli_helpers import PROG, Parser, finite_float, float_list, name_list, one_line, seed_int
from ..output_files import check_outputs, report_outputs
from ..config import EngineConfig
from ..pipeline import Pipeline, resolve_autocast, resolve_components, resolve_device
from ..profile_heads import calibrate_head_map
from .cells import MemoryProbe, run_problems
from .quality import Protocol, QualitySampling, SampleScorer, agreement, takes_budget
from .report import (add_report_flags, add_run_flags, format_markdown_table, format_table, machine_info, mib,
                     run_json_worker, synchronizer, worker_env, write_json)

MODELS = ("llamagen-b", "default", "tiny")
BASELINE = "full"
DEFAULT_POLICIES = ("full", "window", "sink", "h2o", "ssd")
LLAMAGEN_GRID = (24, 24)
TINY_GRID = (6, 6)
QUALITY_IMAGES = {"llamagen-b": 4, "default": 200, "tiny": 4}
"""``--quality-images`` when not given, per model."""
QUALITY_LOGIT_BYTES = 1 << 30
"""Most bytes of raw logits one quality chunk keeps (the chunk shrinks below ``--batch`` to fit)."""
TARGET_BUDGET = 0.2
PAPER = ("paper (SSD, Janus-Pro-1B, A100, 20% budget): 1.40x at batch 32 (897 -> 1253 tokens/s), 6.6x at batch "
         "128 (289 -> 1912 tokens/s)")


@dataclass(frozen=True)
class BenchCacheConfig:
    """Every option of the benchmark (the command-line flags)."""

    model: str = "llamagen-b"
    batch: int = 32
    cfg: float = 4.0
    top_k: int = 2000
    top_p: float = 1.0
    policies: tuple[str, ...] = DEFAULT_POLICIES
    budgets: tuple[float, ...] = (0.2, 0.5)
    repeats: int = 3
    warmup: int = 1
    max_tokens: int | None = None
    head_map: str | None = None
    calibration_images: int = 4
    quality_images: int | None = None  # None: QUALITY_IMAGES[model]; 0: no quality phase
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    backend: str = "auto"
    threads: int | None = None
    isolate: bool = True
    timeout_s: float | None = None
    output: str = "bench_cache.json"
    table: bool = True

    def problems(self) -> list[str]:
        """One line per invalid option (empty when valid); names are checked by :func:`plan_runs`."""
        out = []
        if self.model not in MODELS:
            out.append(f"--model {self.model!r}: choose {', '.join(MODELS)}")
        if self.batch < 1:
            out.append(f"--batch must be at least 1, got {self.batch}")
        if not (math.isfinite(self.cfg) and self.cfg >= 0):
            out.append(f"--cfg must be >= 0 (1 disables guidance), got {self.cfg:g}")
        if self.top_k < 0 or not 0 <= self.top_p <= 1:
            out.append("--top-k must be >= 0 (0: no filter) and --top-p within 0..1")
        if not self.policies:
            out.append("--policies needs at least one cache policy")
        bad = [b for b in self.budgets if not (b > 0 and math.isfinite(b))]
        if not self.budgets or bad:
            out.append(f"--budgets: every budget must be > 0 (a fraction <= 1 of the sequence or a token count > 1), "
                       f"got {','.join(f'{b:g}' for b in self.budgets) or 'nothing'}")
        if self.repeats < 1 or self.warmup < 0:
            out.append("--repeats must be at least 1 and --warmup at least 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            out.append(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.calibration_images < 1:
            out.append(f"--calibration-images must be at least 1, got {self.calibration_images}")
        if self.quality_images is not None and self.quality_images < 0:
            out.append(f"--quality-images must be >= 0 (0: no quality measurement), got {self.quality_images}")
        out += run_problems(threads=self.threads, timeout_s=self.timeout_s, device=self.device, dtype=self.dtype)
        if Path(self.output).suffix != ".json":
            out.append(f"--output {self.output}: give a .json path (the .md table goes beside it)")
        return out

    def device_name(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def quality_count(self) -> int:
        return QUALITY_IMAGES.get(self.model, 4) if self.quality_images is None else self.quality_images

    @property
    def guided(self) -> bool:
        return raster_guided(self.cfg)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "BenchCacheConfig":
        raw = dict(raw)
        raw["policies"], raw["budgets"] = tuple(raw["policies"]), tuple(raw["budgets"])
        return cls(**raw)


# -- policies --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyRun:
    """One row: a cache policy at a budget (None for policies without one: ``full``, ``none``)."""

    policy: str
    budget: float | None = None

    @property
    def label(self) -> str:
        return self.policy if self.budget is None else f"{self.policy}@{self.budget:g}"

    def options(self, head_map: str | None = None) -> dict[str, Any]:
        options: dict[str, Any] = {} if self.budget is None else {"budget": self.budget}
        if self.policy == "ssd" and head_map:
            options["head_map"] = head_map
        return options


def plan_runs(config: BenchCacheConfig, registry=None) -> list[PolicyRun]:
    """The rows in order: ``full`` first (added when not named: it is the baseline), then each policy
    once (``none``) or once per budget. Unknown names list the known caches; caches that do not
    serve raster decoding say so."""

    registry = registry or get_registry()
    names = list(dict.fromkeys(p.strip().lower() for p in config.policies if p.strip()))
    known = registry.names("cache")
    for name in names:
        if name not in known:
            raise UsageError(f"unknown cache policy '{name}' (available: {', '.join(known)})")
    if BASELINE in names:
        names.remove(BASELINE)
    runs = [PolicyRun(BASELINE)]
    for name in names:
        if takes_budget(name, registry):
            runs += [PolicyRun(name, budget) for budget in dict.fromkeys(config.budgets)]
        else:
            runs.append(PolicyRun(name))
    trajectory = registry.create("trajectory", "raster")
    for run in runs:  # options and raster support, before anything is built
        if run.policy == "ssd":  # its head map comes later (--head-map or the calibration)
            registry.validate_options("cache", run.policy, run.options())
        else:
            trajectory.check_cache(run.policy, make_cache(run, registry=registry))
    return runs


def make_cache(run: PolicyRun, head_map: str | None = None, registry=None):

    return (registry or get_registry()).create("cache", run.policy, run.options(head_map))


def cache_bytes(cache) -> tuple[int, int]:
    """``(key/value bytes, bookkeeping bytes)`` the cache holds now (``kv_bytes()`` where the policy
    separates them, else all of ``nbytes()`` is key/value storage)."""
    total = int(cache.nbytes())
    kv = int(cache.kv_bytes()) if hasattr(cache, "kv_bytes") else total
    return kv, total - kv


# -- models -----------------------------------------------------------------------------------------------
class DefaultWeightsMissing(UsageError):
    """``--model default`` where this installation ships no raster weights (the run is skipped)."""


@dataclass
class BenchModel:
    """The raster GPT (on its device, eval mode), its tokenizer (None for random models: nothing is
    decoded) and what the report says about it."""

    model: Any
    tokenizer: Any
    info: dict[str, Any]


def build_model(config: BenchCacheConfig, device: torch.device) -> BenchModel:
    """``tiny`` / ``llamagen-b`` with random weights from ``--seed`` (every process builds the same
    weights), or ``default``: what ``Pipeline.from_config`` loads for ``--trajectory raster``."""

    tokenizer, source = None, "random weights (seed {})".format(config.seed)
    if config.model == "default":

        try:
            pipe = Pipeline.from_config(EngineConfig(trajectory="raster", cache="full", device=str(device),
                                                     progress=False))
        except UsageError as error:
            if "raster" not in available_defaults():
                raise DefaultWeightsMissing(
                    "--model default: this installation ships no default raster weights yet (mvar-engine --trajectory "
                    "raster finds none; expected core/weights/raster-digits*.safetensors): skipped") from error
            raise
        model, tokenizer = pipe.model, pipe.tokenizer
        source = str(pipe.components.model.input_files()["checkpoint"])
    else:
        torch.manual_seed(config.seed)
        arch = (RasterGPTConfig.llamagen_b(grid=LLAMAGEN_GRID) if config.model == "llamagen-b"
                else RasterGPTConfig.tiny(grid=TINY_GRID))
        model = RasterGPT(arch)
    model = model.to(device).eval()
    c = model.config
    info = {"id": config.model, "random_weights": config.model != "default", "source": source,
            "params": sum(p.numel() for p in model.parameters()), "depth": c.depth, "width": c.width,
            "heads": c.heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size, "num_classes": c.num_classes,
            "grid": list(c.grid), "image_tokens": c.grid[0] * c.grid[1], "prefix": c.cls_token_num,
            "sequence_length": model.layout.length}
    return BenchModel(model, tokenizer, info)


def components_for(config: BenchCacheConfig):
    """The ``raster`` trajectory and the backend selector (through the pipeline's resolver)."""

    return resolve_components(EngineConfig(trajectory="raster", cache="full", backend=config.backend))


def make_engine(bench: BenchModel, components, config: BenchCacheConfig, device: torch.device):
    """A :class:`RasterEngine` that generates ``--max-tokens`` image tokens (all when None).

    Truncation keeps the engine's first ``--max-tokens`` steps (those ``generate`` runs); the layout,
    and therefore every cache's storage, stays the full sequence's."""

    engine = RasterEngine(bench.model, bench.tokenizer, components.trajectory, components.cache, components.backends,
                          pattern=components.pattern, autocast_dtype=resolve_autocast(config.dtype, device))
    if config.max_tokens is not None:
        engine.steps = engine.steps[:config.max_tokens]
        engine.num_tokens = len(engine.steps)
    return engine


def class_labels(count: int, num_classes: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(count) % num_classes).to(device)


# -- time and memory of one row ---------------------------------------------------------------------------
def measure(config: BenchCacheConfig, run: PolicyRun, bench: BenchModel, components, device: torch.device,
            head_map: str | None = None) -> dict[str, Any]:
    """Time ``--repeats`` generations of one row after ``--warmup``; its cache bytes and peak memory."""

    engine = make_engine(bench, components, config, device)
    cache = [make_cache(run, head_map)]  # fails here, before any timing, on bad options
    probe = MemoryProbe(device)
    sync = synchronizer(device)
    gc.collect()
    probe.reset()
    baseline = probe.current()
    labels = class_labels(config.batch, bench.model.num_classes, device)
    held = {"kv": 0, "bookkeeping": 0}

    def poll(_step: int) -> None:
        kv, bookkeeping = cache_bytes(cache[0])
        held["kv"], held["bookkeeping"] = max(held["kv"], kv), max(held["bookkeeping"], bookkeeping)

    def generate() -> float:
        cache[0] = make_cache(run, head_map)  # a fresh policy: the previous call's buffers are freed first
        gc.collect()
        generator = torch.Generator(device=device).manual_seed(config.seed)
        sync()
        start = time.perf_counter()
        engine.generate(labels, cache[0], cfg=config.cfg, top_k=config.top_k, top_p=config.top_p, generator=generator,
                        progress=poll)
        sync()
        return time.perf_counter() - start

    warm = [generate() for _ in range(config.warmup)]
    times = [generate() for _ in range(config.repeats)]
    peak = probe.peak()
    cache[0] = None
    median_s = statistics.median(times)
    tokens = engine.num_tokens
    return {
        "status": "ok", "reason": None, "policy": run.policy, "budget": run.budget, "label": run.label,
        "options": run.options(head_map), "budget_tokens": budget_tokens_of(run, bench),
        "batch": config.batch, "cfg": config.cfg, "rows": config.batch * (2 if config.guided else 1),
        "tokens_per_image": tokens, "full_length": tokens == bench.info["image_tokens"],
        "kv_bytes": held["kv"], "bookkeeping_bytes": held["bookkeeping"],
        "cache_bytes": held["kv"] + held["bookkeeping"],
        "median_s": median_s, "s_per_image": median_s / config.batch,
        "tokens_per_s": config.batch * tokens / median_s, "times_s": times, "warmup_times_s": warm,
        "repeats": len(times), "memory_source": "cuda max_memory_allocated" if probe.cuda else "process peak RSS (VmHWM)",
        "peak_resets": probe.resets, "baseline_bytes": baseline, "peak_bytes": peak, "working_bytes": peak - baseline,
        "backends_used": dict(components.backends.used), "device": str(device), "dtype": config.dtype,
        "torch_threads": torch.get_num_threads(),
    }


def budget_tokens_of(run: PolicyRun, bench: BenchModel) -> int:
    """Tokens per layer the row's cache stores: the whole sequence for ``full``, 0 for ``none``."""

    length = bench.info["sequence_length"]
    if run.budget is None:
        return length if run.policy == BASELINE else 0
    return min(length, budget_tokens(run.budget, length))


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """One row in this (fresh) process: build the model, then :func:`measure`."""

    config = BenchCacheConfig.from_dict(cell["config"])
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    start = time.perf_counter()
    bench = build_model(config, device)
    components = components_for(config)
    load_s = time.perf_counter() - start
    row = measure(config, PolicyRun(cell["policy"], cell["budget"]), bench, components, device, cell.get("head_map"))
    row["load_s"] = load_s
    return row


def _error_row(run: PolicyRun, reason: str) -> dict[str, Any]:
    return {"status": "error", "reason": reason, "policy": run.policy, "budget": run.budget, "label": run.label}


# -- SSD head maps ----------------------------------------------------------------------------------------
def given_head_map(path: str, bench: BenchModel) -> dict[str, Any]:

    head_map = load_head_map(path)
    head_map.check_model(bench.info["depth"], bench.info["heads"])
    counts = head_map.counts()
    return {"path": str(path), "calibrated": False, "threshold": head_map.threshold, "sink_heads": counts["sink"],
            "local_heads": counts["local"], "neighborhood": head_map.neighborhood}


# -- ratios and targets -----------------------------------------------------------------------------------
RATIO_FIELDS = {"kv_ratio": ("kv_bytes", "kv_bytes"), "cache_ratio": ("cache_bytes", "kv_bytes"),
                "time_ratio": ("s_per_image", "s_per_image"), "working_ratio": ("working_bytes", "working_bytes")}
"""Ratio name -> (row field, full's field it is divided by). ``cache_ratio``: with bookkeeping, over
full's key/value bytes; ``speedup`` (tokens/s over full's) is added beside them."""


def add_ratios(rows: list[dict[str, Any]]) -> None:
    base = next((r for r in rows if r["policy"] == BASELINE and r["status"] == "ok"), None)
    for row in rows:
        ok = base is not None and row["status"] == "ok"
        for name, (key, base_key) in RATIO_FIELDS.items():
            row[name] = row[key] / base[base_key] if ok and base.get(base_key) else None
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"] if ok else None


def target_checks(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """SSD's targets (docs/benchmarks.md) for every budgeted row at the 20% budget: key/value bytes at most 1/5 of
    full's (met or not), and the throughput ratio to full (reported; the paper's figures beside it)."""
    model = payload["model"]
    config = payload["config"]
    at_target = (model["id"] == "llamagen-b" and model["image_tokens"] == 576 and config["batch"] == 32
                 and config["cfg"] > 1)
    out = []
    for row in payload["results"]:
        if row["status"] != "ok" or row["budget"] is None or abs(row["budget"] - TARGET_BUDGET) > 1e-9:
            continue
        if row.get("kv_ratio") is None:
            continue
        out.append({"policy": row["policy"], "budget": row["budget"], "kv_ratio": row["kv_ratio"],
                    "cache_ratio": row["cache_ratio"], "met": row["kv_ratio"] <= 1 / 5 + 1e-12,
                    "speedup": row["speedup"], "tokens_per_s": row["tokens_per_s"],
                    "full_tokens_per_s": row["tokens_per_s"] / row["speedup"] if row["speedup"] else None,
                    "at_target_setting": at_target, "full_length": row["full_length"]})
    return out


def target_lines(payload: dict[str, Any]) -> list[str]:
    lines = []
    config, model = payload["config"], payload["model"]
    where = (f"{model['id']}, {model['image_tokens']} tokens, batch {config['batch']}, cfg {config['cfg']:g}"
             + ("" if any(t["at_target_setting"] for t in payload["targets"]) else
                " (target setting: llamagen-b, 576 tokens, batch 32 with CFG)"))
    for t in payload["targets"]:
        lines.append(f"target 20% budget cache bytes <= 1/5 of full: {t['policy']}: {'met' if t['met'] else 'NOT met'} "
                     f"(key/value {t['kv_ratio']:.4f} of full; with bookkeeping {t['cache_ratio']:.4f})")
    for t in payload["targets"]:
        lines.append(f"throughput 20% budget vs full: {t['policy']}: {t['speedup']:.2f}x ({t['tokens_per_s']:.1f} vs "
                     f"{t['full_tokens_per_s']:.1f} image tokens/s)")
    if payload["targets"]:
        truncated = "" if payload["full_length"] else (f"; first {payload['tokens_per_image']} tokens of each image "
                                                       f"only (--max-tokens: speed ratios understate a full run's)")
        lines.append(f"throughput setting: {where}{truncated}; {PAPER}")
    return lines


# -- presentation -----------------------------------------------------------------------------------------
def _times(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}x"


def table_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in payload["results"]:
        budget = "-" if r.get("budget") is None else (
            f"{r['budget']:g} ({r['budget_tokens']} tok)" if "budget_tokens" in r else f"{r['budget']:g}")
        if r["status"] != "ok":
            rows.append({"label": r["policy"], "budget": budget, "kv": f"error: {r['reason']}"})
            continue
        rows.append({**r, "label": r["policy"], "budget": budget, "kv": mib(r["kv_bytes"]),
                     "bookkeeping": mib(r["bookkeeping_bytes"]), "kv_ratio_text": _times(r.get("kv_ratio")),
                     "working": mib(r["working_bytes"]), "working_ratio_text": _times(r.get("working_ratio")),
                     "speedup_text": _times(r.get("speedup"))})
    return rows


def table_columns(payload: dict[str, Any]) -> list[tuple[str, str]]:
    columns = [("label", "policy"), ("budget", "budget"), ("kv", "KV MiB"), ("bookkeeping", "bookkeeping MiB"),
               ("kv_ratio_text", "KV vs full"), ("s_per_image", "s/image"), ("tokens_per_s", "tokens/s"),
               ("speedup_text", "speed vs full"), ("working", "peak working MiB"),
               ("working_ratio_text", "vs full"), ("top1_agreement", "top-1 agree"), ("kl", "KL(full||policy)"),
               ("sampled_agreement", "sampled agree")]
    if any(r.get("sample_accuracy") is not None for r in payload["results"]):
        columns += [("sample_accuracy", "accuracy"), ("sample_fd", "FD")]
    return columns


def table_text(payload: dict[str, Any]) -> str:
    return format_table(table_rows(payload), table_columns(payload))


def table_markdown(payload: dict[str, Any]) -> str:
    return format_markdown_table(table_rows(payload), table_columns(payload))


def describe(payload: dict[str, Any]) -> str:
    """One paragraph: what was measured, on what."""
    m, c, machine = payload["model"], payload["config"], payload["machine"]
    tokens = m["image_tokens"] if c["max_tokens"] is None else min(c["max_tokens"], m["image_tokens"])
    text = (f"Model `{m['id']}` ({'random weights' if m['random_weights'] else m['source']}; {m['depth']} layers, "
            f"width {m['width']}, {m['heads']} heads, {m['grid'][0]}x{m['grid'][1]} = {m['image_tokens']} image tokens "
            f"+ {m['prefix']} class token), batch {c['batch']}, cfg {c['cfg']:g} ({payload['rows']} rows), "
            f"{tokens} tokens generated per image"
            + ("" if tokens == m["image_tokens"] else " (--max-tokens: cache storage of the full sequence)")
            + f". {machine['device_name']} ({machine['device']}, {machine['torch_threads']} torch threads), torch "
            f"{machine['torch']}. Time: median of {c['repeats']} after {c['warmup']} warm-up; {payload['isolation']}. "
            f"KV/bookkeeping: the cache's own byte counts; peak working memory: "
            f"{'max_memory_allocated' if machine['device'].startswith('cuda') else 'peak RSS (VmHWM)'} above the "
            f"post-load baseline. ")
    images = payload.get("quality", {}).get("images", 0)
    text += (f"Quality: {images} images, full's sampled tokens replayed by each policy (top-1 agreement and KL of "
             f"the CFG-guided distributions), and each policy sampled freely from the same seed (sampled "
             f"agreement)." if images else "Quality: not measured (--quality-images 0).")
    hm = payload.get("head_map")
    if hm:
        text += (f" SSD head map: {hm['path']} ({'calibrated here' if hm['calibrated'] else 'given'}; "
                 f"{hm['sink_heads']} sink / {hm['local_heads']} local heads, threshold {hm['threshold']:.3f}).")
    return text


def write_markdown(path: Path, payload: dict[str, Any]) -> Path:

    text = f"# mvar-engine bench cache\n\n{describe(payload)}\n\n{table_markdown(payload)}\n"
    lines = target_lines(payload)
    if lines:
        text += "\n" + "\n".join(f"- {line}" for line in lines) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(marked_markdown(text)))


# -- the run ----------------------------------------------------------------------------------------------
def _worker_cell(config: BenchCacheConfig, run: PolicyRun, head_map: str | None) -> dict[str, Any]:
    return {"config": asdict(config), "policy": run.policy, "budget": run.budget, "head_map": head_map}


def _in_subprocess(cell: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:

    return run_json_worker("mvar_engine.apps.bench.cache", json.dumps(cell), env=worker_env(), timeout_s=timeout_s)


def _progress_line(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['label']}: error: {row['reason']}"
    return (f"{row['label']}: KV {row['kv_bytes'] / 2**20:.1f} MiB, {row['s_per_image']:.3g} s/image, "
            f"{row['tokens_per_s']:.1f} tokens/s, working {row['working_bytes'] / 2**20:.0f} MiB")


def run_bench_cache(config: BenchCacheConfig, out: TextIO | None = None, log: TextIO | None = None) -> dict[str, Any]:
    """Validate, build the model here (calibration, quality, budget checks), measure every row (fresh
    processes unless ``isolate`` is False), then the quality phase; JSON rewritten after each result.
    Returns the payload (``skipped`` set, and nothing measured, when ``--model default`` has no weights)."""

    out, log = out or sys.stdout, log or sys.stderr
    problems = config.problems()
    if problems:
        raise UsageError("; ".join(problems))
    runs = plan_runs(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    payload: dict[str, Any] = {"benchmark": "cache", "machine": machine_info(device), "config": asdict(config)}
    try:
        bench = build_model(config, device)
    except DefaultWeightsMissing as error:
        payload["skipped"] = str(error)
        write_json(config.output, payload)
        print(f"bench cache: {error}", file=out)
        return payload
    if config.max_tokens is not None and config.max_tokens > bench.info["image_tokens"]:
        raise UsageError(f"--max-tokens {config.max_tokens}: the model generates {bench.info['image_tokens']} tokens "
                         f"per image")
    prefix, length = bench.info["prefix"], bench.info["sequence_length"]
    for run in runs:
        if run.budget is not None and budget_tokens_of(run, bench) < prefix + 1:
            raise UsageError(f"--budgets {run.budget:g} gives {budget_tokens_of(run, bench)} token(s) of a "
                             f"{length}-token sequence, not more than the {prefix} class token(s) always kept")
    if config.guided and not bench.model.has_null_class:
        raise UsageError(f"--cfg {config.cfg:g}: this model has no null class (trained without class dropout), so no "
                         f"classifier-free guidance: use --cfg 1")
    components = components_for(config)
    engine = make_engine(bench, components, config, device)
    head_map_path = None
    if any(run.policy == "ssd" for run in runs):
        if config.head_map:
            payload["head_map"] = given_head_map(config.head_map, bench)
        else:
            path = Path(config.output).with_suffix(".head_map.json")
            payload["head_map"] = calibrate_head_map(
                engine, path, log, images=config.calibration_images, batch=config.batch, cfg=config.cfg,
                top_k=config.top_k, top_p=config.top_p, seed=config.seed + 1, model=config.model,
                source="mvar-engine bench cache", device=device)
        head_map_path = str(Path(payload["head_map"]["path"]).resolve())  # workers may run elsewhere
    tokens = engine.num_tokens
    payload.update({
        "model": bench.info, "rows": config.batch * (2 if config.guided else 1), "tokens_per_image": tokens,
        "full_length": tokens == bench.info["image_tokens"],
        "isolation": "each row in a fresh process" if config.isolate else "every row in this process (peaks not isolated)",
        "note": ("ratios are this row / the full row; tokens/s counts image tokens (batch x tokens / median time); "
                 "random weights give valid time and memory, not quality" if bench.info["random_weights"] else
                 "ratios are this row / the full row; tokens/s counts image tokens (batch x tokens / median time)"),
        "results": [], "targets": []})
    write_json(config.output, payload)
    for index, run in enumerate(runs, 1):
        print(f"[{index}/{len(runs)}] {run.label}: {'fresh process' if config.isolate else 'in process'} ...",
              file=log, flush=True)
        start = time.perf_counter()
        if config.isolate:
            row = _in_subprocess(_worker_cell(config, run, head_map_path), config.timeout_s)
            if row["status"] != "ok":
                row = {**_error_row(run, row["reason"]), **row}
        else:
            try:
                row = measure(config, run, bench, components, device, head_map_path)
            except (MvarEngineError, RuntimeError, ValueError) as error:
                row = _error_row(run, one_line(error))
        row["wall_s"] = time.perf_counter() - start
        payload["results"].append(row)
        add_ratios(payload["results"])
        payload["targets"] = target_checks(payload)
        write_json(config.output, payload)
        print(f"[{index}/{len(runs)}] {_progress_line(row)}", file=log, flush=True)
    if config.quality_count() > 0:
        run_quality(config, engine, bench, runs, payload, head_map_path, log)
    md_path = write_markdown(Path(config.output).with_suffix(".md"), payload)
    if config.table:
        print(table_text(payload), file=out)
        for line in target_lines(payload):
            print(line, file=out)
    print(f"wrote {config.output} and {md_path}", file=out)
    return payload


def run_quality(config: BenchCacheConfig, engine, bench: BenchModel, runs: list[PolicyRun], payload: dict[str, Any],
                head_map: str | None, log: TextIO) -> None:
    """The quality phase (in this process, ``bench quality``'s protocol): every row's quality
    fields against the full cache's generation of the same seeds; JSON rewritten after each."""
    start = time.perf_counter()
    count, rows_per_image = config.quality_count(), 2 if config.guided else 1
    per_image = rows_per_image * engine.num_tokens * bench.info["vocab_size"] * 4
    batch = max(1, min(config.batch, QUALITY_LOGIT_BYTES // per_image))
    items = [(index % bench.model.num_classes, index // bench.model.num_classes) for index in range(count)]
    full_length = engine.num_tokens == bench.info["image_tokens"]
    scorer, note = None, None
    if bench.tokenizer is not None and full_length:
        try:
            scorer = SampleScorer(bench.tokenizer.config.image_hw[0], bench.model.num_classes, log)
        except Exception as error:  # the token and logit comparison does not need it
            note = f"sample quality unavailable: {one_line(error)}"
    elif bench.tokenizer is not None:
        note = "sample quality needs whole images: not measured under --max-tokens"
    sampling = QualitySampling(config.cfg, config.top_k, config.top_p, config.seed + 1000)
    protocol = Protocol(engine, sampling, items, batch, bench.model.output.weight.device, decode=scorer is not None)
    print(f"quality: {count} images with the full cache (reference) ...", file=log, flush=True)
    full = protocol.generate(lambda: make_cache(PolicyRun(BASELINE)))
    full_logp = protocol.forced_logp(lambda: make_cache(PolicyRun(BASELINE)), full)
    payload["quality"] = {"images": count, "tokens_per_image": engine.num_tokens, "chunk": batch, "seed": sampling.seed,
                          "note": note, "sample_quality": None if scorer is None else {
                              "metric": "mvar-engine evaluate's: class accuracy and Frechet distance of digit-classifier "
                                        "features to the real held-out split", "classifier": scorer.info}}
    rows = {(r["policy"], r["budget"]): r for r in payload["results"]}
    for run in runs:
        row = rows[(run.policy, run.budget)]
        try:
            gen = full if run.policy == BASELINE else protocol.generate(lambda: make_cache(run, head_map))
            fields = agreement(gen, full, protocol.forced_logp(lambda: make_cache(run, head_map), full), full_logp)
            row.update(quality_images=count, quality_tokens=sum(m.numel() for m in full.maps),
                       sampled_agreement=fields.pop("equal_tokens"), **fields)
            if scorer is not None:
                row.update({f"sample_{k}": v for k, v in scorer(gen.images, protocol.labels).items()})
        except (MvarEngineError, RuntimeError, ValueError) as error:
            row["quality_error"] = one_line(error)
        write_json(config.output, payload)
        if "top1_agreement" in row:
            print(f"quality {run.label}: top-1 agreement {row['top1_agreement']:.4f}, KL {row['kl']:.3g}, sampled "
                  f"agreement {row['sampled_agreement']:.3f}", file=log, flush=True)
    payload["quality"]["seconds"] = time.perf_counter() - start
    write_json(config.output, payload)


# -- command line -----------------------------------------------------------------------------------------
def cmd_bench_cache(argv: Sequence[str]) -> int:
    """``mvar-engine bench cache``: parse the flags, run, exit 0 (1 when a row failed)."""

    d = BenchCacheConfig()
    p = Parser(prog=f"{PROG} bench cache", allow_abbrev=False,
                description="KV-cache policies of a raster model side by side: per policy and budget the "
                            "cache's key/value and bookkeeping bytes, time per image and tokens/s, peak memory over "
                            "the post-load baseline (each row in a fresh process), and quality against the full "
                            "cache (top-1 agreement and KL of the CFG-guided logits on full's tokens; tokens sampled "
                            "from the same seed; digit accuracy and FD with --model default). Writes JSON and a "
                            "markdown table beside it.")
    p.add_argument("--model", choices=MODELS, default=d.model,
                   help="llamagen-b: random weights, LlamaGen-B size, 24x24 = 576 tokens (time and memory); default: "
                        "the shipped trained raster digits weights (skipped when there are none); tiny: for tests "
                        f"(default {d.model})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"images per generation (default {d.batch})")
    p.add_argument("--cfg", type=finite_float, default=d.cfg, help=f"classifier-free guidance (default {d.cfg:g}; 1 disables)")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"top-k sampling (default {d.top_k}, LlamaGen's)")
    p.add_argument("--top-p", type=finite_float, default=d.top_p, help=f"top-p sampling (default {d.top_p:g}: off)")
    p.add_argument("--policies", type=name_list, default=d.policies, metavar="NAME,...",
                   help=f"cache policies (default {','.join(d.policies)}; full is always measured: it is the baseline)")
    p.add_argument("--budgets", type=float_list, default=d.budgets, metavar="B,...",
                   help="budgets of the budgeted policies: a fraction of the sequence (<= 1) or a token count "
                        f"(default {','.join(f'{b:g}' for b in d.budgets)})")
    p.add_argument("--repeats", type=int, default=d.repeats, help=f"timed generations per row (default {d.repeats})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed generations first (default {d.warmup})")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="generate only the first N tokens of each image (short CPU runs; the cache keeps the full "
                        "sequence's size, but speed ratios then understate a full run's: see the JSON note)")
    p.add_argument("--head-map", default=None, metavar="FILE",
                   help="SSD head map (mvar-engine profile-heads); default: calibrate here and write NAME.head_map.json "
                        "beside --output")
    p.add_argument("--calibration-images", type=int, default=d.calibration_images, metavar="N",
                   help=f"generations profiled for the automatic head map (default {d.calibration_images})")
    p.add_argument("--quality-images", type=int, default=None, metavar="N",
                   help="images of the quality comparison (default: " + ", ".join(
                       f"{k} {v}" for k, v in QUALITY_IMAGES.items()) + "; 0 skips it)")
    p.add_argument("--seed", type=seed_int, default=d.seed, help=f"weights (random models) and sampling seed (default {d.seed})")
    add_run_flags(p, device=d.device, dtype=d.dtype, backend=d.backend, timeout="limit per row (fresh processes)")
    p.add_argument("--in-process", action="store_true",
                   help="measure every row in this process (quicker; peak memory not isolated per row)")
    add_report_flags(p, d.output)
    args = p.parse_args(argv)
    if Path(args.output).suffix == ".json":  # another suffix is refused with the others' problems
        calibrated = args.head_map is None and any(name.strip().lower() == "ssd" for name in args.policies or ())
        check_outputs(report_outputs(args.output, (".md", ".head_map.json", ".head_map.png") if calibrated else (".md",)),
                      args.overwrite)
    payload = run_bench_cache(BenchCacheConfig(
        model=args.model, batch=args.batch, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, policies=args.policies,
        budgets=args.budgets, repeats=args.repeats, warmup=args.warmup, max_tokens=args.max_tokens,
        head_map=args.head_map, calibration_images=args.calibration_images, quality_images=args.quality_images,
        seed=args.seed, device=args.device, dtype=args.dtype, backend=args.backend, threads=args.threads,
        isolate=not args.in_process, timeout_s=args.timeout_s, output=args.output, table=not args.no_table))
    return 1 if any(r["status"] != "ok" or "quality_error" in r for r in payload.get("results", [])) else 0


def main(argv: Sequence[str]) -> int:
    """Worker entry: ``python -m mvar_engine.apps.bench.cache CELL_JSON`` prints one JSON line."""
    print(json.dumps(run_cell(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
