"""What every benchmark-matrix cell shares, in both model families: model ids and their specs,
``trajectory/attention/cache`` combinations, the memory probe, and :class:`CellRun` (build, time
the generations and the decoding, report one row)."""

from __future__ import annotations

import gc
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ...core.compiled_decoding import compile_problem
from ...core.errors import ConfigError, MvarEngineError, UsageError
from ...core.layout import SequenceLayout
from ...core.registry import get_registry
from ...models.var import PATCH_NUMS_256, PATCH_NUMS_512
from ...plugins.budget_cache import BudgetOptions
from ..config import EngineConfig
from ..pipeline import Pipeline, autocast_problem, resolve_components, resolve_device
from .report import peak_rss_bytes, release_free_memory, reset_peak_rss, rss_bytes, synchronizer

DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""The autocast dtypes a configuration may name (``@bfloat16``)."""

def run_problems(*, threads: int | None, timeout_s: float | None, device: str, dtype: str) -> list[str]:
    """One line per invalid setting that every fresh-process benchmark shares: ``--threads``,
    ``--timeout-s``, ``--dtype`` and ``--device`` (``auto``, ``cpu``, ``cuda[:N]``; the dtype must
    autocast there, :func:`~mvar_engine.apps.pipeline.autocast_problem`)."""
    out = []
    if threads is not None and threads < 1:
        out.append("--threads must be at least 1")
    if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s > 0):
        out.append(f"--timeout-s must be a finite number of seconds > 0, got {timeout_s:g}")
    if dtype not in DTYPE_NAMES:
        out.append(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        out.append(f"--device {device}: choose auto, cpu or cuda[:N]")
    elif device.startswith("cuda") and not torch.cuda.is_available():
        out.append(f"--device {device}: no CUDA device is available (use --device cpu)")
    elif dtype in DTYPE_NAMES:
        resolved = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        problem = autocast_problem(dtype, torch.device(resolved))
        if problem is not None:
            out.append(problem)
    return out


JANUS_MODELS = ("janus-pro-1b", "janus-tiny")
"""The benchmark's Janus-Pro architectures (transformers' Janus, random weights)."""

RASTER_GRIDS = {"llamagen-b": (24, 24), "raster-tiny": (3, 3), "janus-pro-1b": (24, 24), "janus-tiny": (4, 4)}
"""Raster model ids -> their token grid."""

JANUS_PROMPT_TOKENS = 16
"""The bench's Janus prompt: BOS, 14 text tokens, begin-of-image (a short prompt, as in GenEval)."""

RASTER_PREFIX = {"llamagen-b": 1, "raster-tiny": 1, "janus-pro-1b": JANUS_PROMPT_TOKENS, "janus-tiny": JANUS_PROMPT_TOKENS}
"""Raster model ids -> the prefix before the image tokens (LlamaGen's class token, the Janus prompt)."""

MODEL_HEADS = {"llamagen-b": 12, "raster-tiny": 2, "janus-pro-1b": 16, "janus-tiny": 4, "tiny": 2}
"""Attention heads of the models that are not VAR sizes (VAR-dN has N heads)."""


SSD_STAND_IN = "h2o"
"""The cache that stands in for an ``ssd`` configuration without a head map in the compatibility
check (the same families and headwise storage; the head map comes from the calibration)."""


def needs_calibration(combo) -> bool:
    """An ``ssd`` configuration whose head map the matrix calibrates itself."""
    return combo.cache == "ssd" and not combo.options.get("cache", {}).get("head_map")


TINY_PATCH_NUMS = (1, 2, 4)


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: ``family`` picks the worker (see :data:`MODEL_FAMILIES`)."""

    id: str
    family: str
    depth: int
    patch_nums: tuple[int, ...]
    resolution: int  # pixels per image side
    heads: int
    prefix: int = 1  # raster: the tokens before the image grid

    @property
    def tokens_per_image(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def layout(self) -> SequenceLayout:
        """The sequence the model generates, known without building it: next-scale, its scales;
        raster, the prefix as a ``1 x P`` grid, then the image grid."""
        if self.family == "next-token":
            side = self.patch_nums[0]
            return SequenceLayout(((1, self.prefix), (side, side)))
        return SequenceLayout.from_patch_nums(self.patch_nums)


KNOWN_MODELS = ("d16-256", "d20-256", "d24-256", "d30-256", "d16-512", "tiny", "llamagen-b", "raster-tiny", "janus-pro-1b",
                "janus-tiny")
"""Model ids listed in messages; any ``dN-256`` or ``dN-512`` is accepted."""


def model_spec(model_id: str) -> ModelSpec:
    """``d16-256`` -> VAR-d16 on the 256px schedule; ``tiny`` -> the test model; else a UsageError."""


    key = model_id.strip().lower()
    if key in RASTER_GRIDS:
        grid = RASTER_GRIDS[key]
        depth = {"llamagen-b": 12, "janus-pro-1b": 24}.get(key, 2)
        return ModelSpec(key, "next-token", depth, (grid[0],), grid[0] * 16, MODEL_HEADS[key], RASTER_PREFIX[key])
    if key == "tiny":
        return ModelSpec("tiny", "next-scale", 2, TINY_PATCH_NUMS, TINY_PATCH_NUMS[-1] * 2, MODEL_HEADS[key])
    match = re.fullmatch(r"(?:var-)?d(\d+)-(256|512)", key)
    if match and int(match.group(1)) >= 1:
        schedule = PATCH_NUMS_256 if match.group(2) == "256" else PATCH_NUMS_512
        depth = int(match.group(1))
        return ModelSpec(f"d{depth}-{match.group(2)}", "next-scale", depth, tuple(schedule), int(match.group(2)), depth)
    raise UsageError(f"unknown model {model_id!r} (available: {', '.join(KNOWN_MODELS)}; any dN-256 or dN-512 is "
                     f"VAR-dN at that resolution)")


@dataclass(frozen=True)
class Combo:
    """One configuration ``trajectory/attention/cache``; a part may carry options as
    ``name:key=value:key=value`` (``markov/neighborhood:kernel_size=5/none``), and the whole an
    autocast dtype as ``@bfloat16`` (``full/dense/full@bfloat16``; default: the run's ``--dtype``)
    and compiled decoding steps as ``@compile`` (``raster/dense/full@bfloat16@compile``)."""

    text: str
    trajectory: str
    attention: str
    cache: str
    options: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False, hash=False)
    dtype: str | None = None
    compile: bool = False

    def engine_components(self) -> dict[str, dict[str, Any]]:
        return {kind: {"name": getattr(self, kind), "options": self.options.get(kind, {})}
                for kind in ("trajectory", "attention", "cache")}


def parse_component(text: str, context: str) -> tuple[str, dict[str, Any]]:
    """``"neighborhood:kernel_size=5"`` -> ``("neighborhood", {"kernel_size": 5})``: a component name
    and its options (values as booleans or numbers where they read so, ``-`` in keys as ``_``); an
    option that is not ``key=value`` is a one-line UsageError starting with ``context``."""
    name, *pairs = text.split(":")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{context} '{name.strip()}': option {pair!r} is not key=value")
        options[key.strip().replace("-", "_")] = _option_value(value.strip())
    return name.strip(), options


def _option_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_combo(text: str) -> Combo:
    """``"full/dense/full"`` (or ``"full/dense/full@bfloat16"``) -> :class:`Combo`; a malformed triple
    or an unknown dtype is a one-line UsageError. The cache's option values may hold ``/`` (a path:
    ``raster/dense/ssd:head_map=maps/b.json``): only the first two ``/`` separate the triple."""
    triple, *suffixes = (part.strip() for part in text.strip().split("@"))
    dtype, compiled = None, False
    for suffix in suffixes:
        if suffix == "compile" and not compiled:
            compiled = True
        elif suffix in DTYPE_NAMES and dtype is None:
            dtype = suffix
        else:
            raise UsageError(f"configuration {text!r}: @{suffix} is not an autocast dtype or @compile (choose "
                             f"{', '.join(DTYPE_NAMES)}, compile; each at most once)")
    parts = [p.strip() for p in triple.strip().split("/", 2)]
    if len(parts) != 3 or not all(parts) or "/" in parts[2].split(":")[0]:
        raise UsageError(f"configuration {text!r} is not trajectory/attention/cache (e.g. full/dense/full or "
                         f"markov/neighborhood/none; options as neighborhood:kernel_size=5)")
    names, options = [], {}
    for kind, part in zip(("trajectory", "attention", "cache"), parts):
        name, given = parse_component(part, f"configuration {text!r}: {kind}")
        names.append(name)
        if given:
            options[kind] = given
    text = "/".join(parts) + (f"@{dtype}" if dtype else "") + ("@compile" if compiled else "")
    return Combo(text, *names, options=options, dtype=dtype, compile=compiled)


def parse_cell(text: str) -> tuple[str, int]:
    """``"d16-512:8"`` -> ``("d16-512", 8)``; anything else is a one-line UsageError."""
    model, sep, batch = text.strip().rpartition(":")
    if not sep or not model or not batch.isdigit() or int(batch) < 1:
        raise UsageError(f"cell {text!r} is not MODEL:BATCH (e.g. d16-256:8)")
    return model, int(batch)


def combo_family(combo: Combo) -> str:
    """The model family a configuration runs on: its trajectory's ``family`` (``next-scale`` or
    ``next-token``); an unknown trajectory is a one-line error listing the known ones."""

    try:
        return get_registry().create("trajectory", combo.trajectory, combo.options.get("trajectory", {})).family
    except MvarEngineError as error:
        raise type(error)(f"configuration '{combo.text}': {' '.join(str(error).split())}") from None
    except ValueError as error:
        raise UsageError(f"configuration '{combo.text}': {' '.join(str(error).split())[:300]}") from None


def check_combo(combo: Combo, backend: str, specs: Sequence[ModelSpec] = ()) -> None:
    """Resolve the components (names, options, compatibility) now, before any process starts; errors
    name the configuration and list what exists. An ``ssd`` cache without a head map (the matrix
    calibrates one) is checked with its options, and its compatibility through a stand-in. The
    pattern and the cache are checked against the layout of each model in ``specs`` that the
    configuration runs on (a budget below a Janus prompt, an ``apply_from`` past the schedule)."""

    components = combo.engine_components()
    try:
        if needs_calibration(combo):  # the stand-in keeps the budget's options (its layout check)
            options = components["cache"]["options"]
            get_registry().validate_options("cache", combo.cache, options)
            components["cache"] = {"name": SSD_STAND_IN,
                                   "options": {k: v for k, v in options.items() if k in BudgetOptions.model_fields}}
        resolved = resolve_components(EngineConfig(**components, backend=backend))
        for spec in specs:
            if spec.family == resolved.trajectory.family:
                resolved.pattern.check_layout(spec.layout)
                resolved.cache.check_layout(spec.layout, num_layers=spec.depth, num_heads=spec.heads)
        if combo.compile:
            compiles = resolved.model.compiles_token_steps() and not any(spec.id in JANUS_MODELS for spec in specs)
            problem = compile_problem(trajectory=resolved.trajectory, pattern=resolved.pattern, cache=resolved.cache,
                                      compiles_token_steps=compiles,
                                      compiles_scale_steps=resolved.model.compiles_scale_steps(), backend=backend)
            if problem is not None:
                raise UsageError(problem)
    except ConfigError as error:
        raise ConfigError([f"configuration '{combo.text}': {'; '.join(error.problems)}"]) from None
    except MvarEngineError as error:
        raise type(error)(f"configuration '{combo.text}': {' '.join(str(error).split())}") from None
    except ValueError as error:  # pydantic validation of the options
        raise UsageError(f"configuration '{combo.text}': {' '.join(str(error).split())[:300]}") from None


class MemoryProbe:
    """Baseline, phase resets and phase peaks: CUDA allocator counters or the process's RSS."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.resets = True
        self.trimmed = False

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else rss_bytes()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else peak_rss_bytes()

    def reset(self) -> None:
        """Start a phase: CUDA peak counters reset; CPU: free heap memory returned to the OS
        (:func:`release_free_memory`), then the peak resident set reset to the current one."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.trimmed = release_free_memory()
            self.resets = reset_peak_rss() and self.resets


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class CellRun:
    """What every family's worker shares in its fresh process: settings, building the pipeline and
    the memory baseline (``__init__``), timed generations (:meth:`generations`), chunked decoding
    (:meth:`decoding`) and the row's common fields (:meth:`row`).

    ``make_config(device)`` returns the cell's :class:`EngineConfig`; ``build()`` the (model,
    tokenizer) pair with random weights."""

    def __init__(self, cell: dict[str, Any], make_config: Callable[[torch.device], Any],
                 build: Callable[[], tuple[Any, Any]]) -> None:

        self.cell, self.spec, self.combo = cell, model_spec(cell["model"]), parse_combo(cell["config"])
        if cell.get("threads"):
            torch.set_num_threads(cell["threads"])
        self.device = resolve_device(cell["device"])
        self.probe, self.sync = MemoryProbe(self.device), synchronizer(self.device)
        start = time.perf_counter()
        self.config = make_config(self.device)
        self.components = resolve_components(self.config)
        model, tokenizer = build()
        self.model = model.to(self.device).eval()
        self.tokenizer = None if tokenizer is None else tokenizer.to(self.device).eval()
        self.engine = Pipeline(self.config, self.model, self.tokenizer, self.components, self.device).engine
        self.sync()
        self.load_s = time.perf_counter() - start
        self.peak_load = self.probe.peak()
        self.probe.reset()
        self.baseline = self.probe.current()

    def fresh_cache(self):
        """A new instance of the configuration's cache policy (the previous call's buffers go first)."""

        return get_registry().create("cache", self.config.cache.name, self.config.cache.options)

    def generations(self, prepare: Callable[[int], None], call: Callable[[], None]) -> None:
        """``--warmup`` untimed then ``--repeats`` timed calls (``prepare(i)`` before each, untimed);
        then the peak of the generation phase."""
        durations = []
        for index in range(self.cell["warmup"] + self.cell["repeats"]):
            prepare(index)
            gc.collect()
            self.sync()
            t0 = time.perf_counter()
            call()
            self.sync()
            durations.append(time.perf_counter() - t0)
        self.warm, self.times = durations[:self.cell["warmup"]], durations[self.cell["warmup"]:]
        self.peak_transformer = self.probe.peak()

    def decoding(self, decode: Callable[[torch.Tensor], torch.Tensor], items: torch.Tensor) -> None:
        """Decode ``items`` (f_hat maps or token maps, one per image) in ``--decode-chunk`` images at a
        time after one untimed warm-up image, in a phase of its own for the peak."""
        self.probe.reset()
        self.decode_times = []
        with torch.no_grad():
            decode(items[:1])  # first-call allocations, untimed
            for chunk in torch.split(items, self.cell["decode_chunk"]):
                self.sync()
                t0 = time.perf_counter()
                images = decode(chunk)
                self.sync()
                self.decode_times.append((time.perf_counter() - t0) / chunk.shape[0])
                del images
        self.peak_decode = self.probe.peak()

    def row(self, *, rows: int, cfg: float, flops: int | None, cache_peak: int, **extra: Any) -> dict[str, Any]:
        """The row's fields (``flops`` None: not counted, as in compiled steps, which run outside the
        backends the counter wraps)."""
        cell, spec, combo = self.cell, self.spec, self.combo
        median_s = statistics.median(self.times)
        peak_total = max(self.peak_transformer, self.peak_decode)
        return {
            "status": "ok", "reason": None,
            "model": spec.id, "family": spec.family, "random_weights": True, "depth": spec.depth,
            "resolution": spec.resolution, "tokens_per_image": spec.tokens_per_image,
            "batch": cell["batch"], "cfg": cfg, "rows": rows, "config": combo.text,
            "trajectory": combo.trajectory, "attention": combo.attention, "cache": combo.cache,
            "options": combo.options, "backend": cell["backend"], "backends_used": dict(self.components.backends.used),
            "device": str(self.device), "dtype": cell["dtype"], "torch_threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in self.model.parameters()),
            "tokenizer_params": sum(p.numel() for p in self.tokenizer.parameters()) if self.tokenizer is not None else 0,
            "weights_bytes": _module_bytes(self.model) + (_module_bytes(self.tokenizer) if self.tokenizer is not None
                                                          else 0),
            "memory_source": "cuda max_memory_allocated" if self.probe.cuda else "process peak RSS (VmHWM)",
            "peak_resets": self.probe.resets, "heap_trimmed": self.probe.trimmed,
            "load_s": self.load_s, "peak_load": self.peak_load, "baseline_rss": self.baseline,
            "peak_rss_transformer": self.peak_transformer, "peak_rss_decode": self.peak_decode,
            "peak_rss_total": peak_total, "working_memory": peak_total - self.baseline,
            "working_memory_transformer": self.peak_transformer - self.baseline,
            "cache_peak_bytes": cache_peak, "attention_gflops": None if flops is None else flops / 1e9,
            "attention_gflops_per_image": None if flops is None else flops / 1e9 / cell["batch"],
            "transformer_s": median_s, "transformer_s_per_image": median_s / cell["batch"],
            "transformer_times_s": self.times, "warmup_times_s": self.warm, "repeats": len(self.times),
            "decode_s_per_image": statistics.median(self.decode_times), "decode_chunk": cell["decode_chunk"],
            "tokens_per_s": cell["batch"] * spec.tokens_per_image / median_s,
            **extra,
        }
