"""The raster (next-token) family of ``mvar-engine bench matrix``: LlamaGen-style models, one cell per
process like the next-scale family (:mod:`.bench_matrix`), with the same row fields.

Models: ``llamagen-b`` (LlamaGen GPT-B: 12 layers, width 768, 12 heads, 16384 codes, on a 24 x 24
grid = 576 image tokens, 384px; with a tokenizer of LlamaGen VQ-16's size for decoding, see
:func:`~mvar_engine.core.models.tokenizer.llamagen_vq16_sized`) and ``raster-tiny`` (for tests); both
with random weights, built through the path of ``mvar-engine --trajectory raster --random-weights``.

Configurations are ``raster/dense/CACHE`` triples (``raster/dense/ssd:budget=0.2``). An ``ssd``
configuration without a ``head_map`` option gets one calibrated by the parent before the cells
(:func:`calibrate_for_matrix`: the full cache over ``--calibration-images`` generations, written
beside ``--output``); every process then loads the same file.

Row fields beyond the shared ones: ``kv_bytes`` and ``cache_bookkeeping_bytes`` (the cache's own
split of ``cache_peak_bytes`` into key/value buffers and positions/scores, polled after every step)
and ``budget_tokens``. Attention FLOPs are counted from the specs the backends are asked to compute
during the first generation (``4 * rows * heads * head_dim * pairs`` per call), so they follow
whatever the cache returned. Decoding runs the tokenizer's one-scale path (``RasterEngine.decode``)
over the last generation's tokens in chunks of ``--decode-chunk`` images.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Any, TextIO

import torch

RASTER_GRIDS = {"llamagen-b": (24, 24), "raster-tiny": (3, 3)}
"""Raster model ids -> their token grid."""

SSD_STAND_IN = "h2o"
"""The cache that stands in for an ``ssd`` configuration without a head map in the compatibility
check (the same families and headwise storage; the head map comes from the calibration)."""


def needs_calibration(combo) -> bool:
    """An ``ssd`` configuration whose head map the matrix calibrates itself."""
    return combo.cache == "ssd" and not combo.options.get("cache", {}).get("head_map")


def _build(spec, cell: dict[str, Any]):
    """(RasterGPT, tokenizer) with random weights from ``cell["seed"]`` (every process builds the same)."""
    from .config import EngineConfig
    from .models.raster_gpt import RasterGPT, RasterGPTConfig
    from .models.tokenizer import MultiScaleVQVAE, TokenizerConfig
    from .pipeline import build_raster_models

    grid = RASTER_GRIDS[spec.id]
    if spec.id == "raster-tiny":
        torch.manual_seed(cell["seed"])
        tokenizer = MultiScaleVQVAE(TokenizerConfig(vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                                    using_sa=False, using_mid_sa=False, quant_resi=0.0,
                                                    patch_nums=(grid,)))
        return RasterGPT(RasterGPTConfig.tiny(grid=grid, vocab_size=16)), tokenizer
    return build_raster_models(EngineConfig(trajectory="raster", model={"random_weights": True,
                                                                        "patch_nums": (grid[0],)},
                                            sampling={"seed": cell["seed"]}))


def raster_cfg(cfg: float) -> float:
    """The matrix's ``--cfg`` for a raster engine: 0 (no guidance in the matrix's terms) is 1.0 there."""
    return 1.0 if cfg <= 0 else cfg


def engine_config(combo, cell: dict[str, Any]):
    from .config import EngineConfig

    components = combo.engine_components()
    if cell.get("head_map") and needs_calibration(combo):
        components["cache"]["options"] = {**components["cache"]["options"], "head_map": cell["head_map"]}
    return EngineConfig(**components, backend=cell["backend"], device=cell["device"], dtype=cell["dtype"],
                        sampling={"cfg": raster_cfg(cell["cfg"]), "seed": cell["seed"]})


class FlopCounter:
    """Wraps ``backends.attend`` and adds ``4 * B * H * D * pairs`` per call while ``counting``."""

    def __init__(self, backends) -> None:
        self.flops, self.counting = 0, False
        self._attend = backends.attend
        backends.attend = self

    def __call__(self, q, k, v, spec, *, scale):
        if self.counting:
            self.flops += 4 * q.shape[0] * q.shape[1] * q.shape[-1] * spec.pair_count(q.shape[-2], k.shape[-2])
        return self._attend(q, k, v, spec, scale=scale)


def run_raster_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Measure one (raster model, batch, configuration) cell in this process; returns the row."""
    from .bench_cache import cache_bytes
    from .bench_matrix import MemoryProbe, _module_bytes, model_spec, parse_combo
    from .bench_report import synchronizer
    from .pipeline import Pipeline, resolve_components, resolve_device
    from .registry import get_registry
    from ..plugins.budget_cache import budget_tokens

    spec = model_spec(cell["model"])
    combo = parse_combo(cell["config"])
    if cell.get("threads"):
        torch.set_num_threads(cell["threads"])
    device = resolve_device(cell["device"])
    probe = MemoryProbe(device)
    sync = synchronizer(device)
    start = time.perf_counter()
    config = engine_config(combo, {**cell, "device": str(device)})
    components = resolve_components(config)
    model, tokenizer = _build(spec, cell)
    pipe = Pipeline(config, model.to(device).eval(), tokenizer.to(device).eval(), components, device)
    engine = pipe.engine
    counter = FlopCounter(components.backends)
    sync()
    load_s = time.perf_counter() - start
    peak_load = probe.peak()
    probe.reset()
    baseline = probe.current()

    cfg = raster_cfg(cell["cfg"])
    rows = cell["batch"] * (2 if cfg != 1.0 else 1)
    labels = (torch.arange(cell["batch"]) % model.num_classes).to(device)
    generator = torch.Generator(device=device).manual_seed(cell["seed"])
    cache_options = config.cache.options
    fresh_cache = lambda: get_registry().create("cache", combo.cache, cache_options)  # noqa: E731
    held = {"kv": 0, "bookkeeping": 0}
    last: list[Any] = [None]

    def poll(_step: int) -> None:
        kv, bookkeeping = cache_bytes(engine.cache)
        held["kv"], held["bookkeeping"] = max(held["kv"], kv), max(held["bookkeeping"], bookkeeping)

    def generate(first: bool) -> float:
        last[0] = None
        engine.cache = fresh_cache()  # a new policy per call: the previous call's buffers are freed first
        counter.counting = first
        gc.collect()
        sync()
        t0 = time.perf_counter()
        last[0] = engine.generate(labels, cfg=cfg, generator=generator, progress=poll)
        sync()
        return time.perf_counter() - t0

    calls = cell["warmup"] + cell["repeats"]
    durations = [generate(i == 0) for i in range(calls)]
    warm, times = durations[:cell["warmup"]], durations[cell["warmup"]:]
    peak_transformer = probe.peak()
    out = last[0]
    tokens_out, cache_peak = out.tokens, out.cache_peak_bytes
    del out
    last[0] = None
    engine.cache = fresh_cache()

    probe.reset()
    decode_times = []
    engine.decode(tokens_out[:1])  # warm-up (first-call allocations), untimed
    for chunk in torch.split(tokens_out, cell["decode_chunk"]):
        sync()
        t0 = time.perf_counter()
        images = engine.decode(chunk)
        sync()
        decode_times.append((time.perf_counter() - t0) / chunk.shape[0])
        del images
    peak_decode = probe.peak()
    median_s = statistics.median(times)
    tokens = spec.tokens_per_image
    peak_total = max(peak_transformer, peak_decode)
    length = model.layout.length
    budget = cache_options.get("budget")
    return {
        "status": "ok", "reason": None,
        "model": spec.id, "family": spec.family, "random_weights": True, "depth": spec.depth,
        "resolution": spec.resolution, "grid": list(RASTER_GRIDS[spec.id]), "tokens_per_image": tokens,
        "sequence_length": length, "batch": cell["batch"], "cfg": cfg, "rows": rows, "config": combo.text,
        "trajectory": combo.trajectory, "attention": combo.attention, "cache": combo.cache,
        "options": {**combo.options, "cache": dict(cache_options)} if cache_options else combo.options,
        "backend": cell["backend"], "backends_used": dict(components.backends.used),
        "device": str(device), "dtype": cell["dtype"], "torch_threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "tokenizer_params": sum(p.numel() for p in tokenizer.parameters()),
        "weights_bytes": _module_bytes(model) + _module_bytes(tokenizer),
        "memory_source": "cuda max_memory_allocated" if probe.cuda else "process peak RSS (VmHWM)",
        "peak_resets": probe.resets,
        "load_s": load_s, "peak_load": peak_load, "baseline_rss": baseline,
        "peak_rss_transformer": peak_transformer, "peak_rss_decode": peak_decode, "peak_rss_total": peak_total,
        "working_memory": peak_total - baseline, "working_memory_transformer": peak_transformer - baseline,
        "cache_peak_bytes": cache_peak, "kv_bytes": held["kv"], "cache_bookkeeping_bytes": held["bookkeeping"],
        "budget_tokens": (min(length, budget_tokens(budget, length)) if budget is not None
                          else (length if engine.cache.stores_history else 0)),
        "attention_gflops": counter.flops / 1e9, "attention_gflops_per_image": counter.flops / 1e9 / cell["batch"],
        "transformer_s": median_s, "transformer_s_per_image": median_s / cell["batch"],
        "transformer_times_s": times, "warmup_times_s": warm, "repeats": len(times),
        "decode_s_per_image": statistics.median(decode_times), "decode_chunk": cell["decode_chunk"],
        "tokens_per_s": cell["batch"] * tokens / median_s,
    }


def calibrate_for_matrix(model_id: str, cell: dict[str, Any], path: Path, images: int, log: TextIO) -> dict[str, Any]:
    """Calibrate a head map for ``ssd`` cells of ``model_id`` in this process (the parent: its memory
    is not measured) with the same random weights the cells build; returns the report's record."""
    from .bench_cache import calibrate_head_map
    from .bench_matrix import model_spec
    from .pipeline import Pipeline, resolve_components, resolve_device

    spec = model_spec(model_id)
    device = resolve_device(cell["device"])
    config = engine_config(_full_combo(), {**cell, "device": str(device)})
    model, tokenizer = _build(spec, cell)
    engine = Pipeline(config, model.to(device).eval(), tokenizer.to(device).eval(), resolve_components(config),
                      device).engine
    record = calibrate_head_map(engine, path, log, images=images, batch=min(images, cell["batch"]),
                                cfg=raster_cfg(cell["cfg"]), top_k=2000, top_p=1.0, seed=cell["seed"] + 1,
                                model=model_id, source="mvar-engine bench matrix (random weights)")
    return {**record, "path": str(path.resolve()), "model": model_id}


def _full_combo():
    from .bench_matrix import parse_combo

    return parse_combo("raster/dense/full")


__all__ = ["RASTER_GRIDS", "FlopCounter", "calibrate_for_matrix", "needs_calibration", "run_raster_cell"]
