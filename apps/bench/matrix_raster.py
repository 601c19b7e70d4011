"""The raster (next-token) family of ``mvar-engine bench matrix``: LlamaGen-style models, one cell per
process like the next-scale family (:mod:`.bench_matrix`), with the same row fields.

Models: ``llamagen-b`` (LlamaGen GPT-B: 12 layers, width 768, 12 heads, 16384 codes, on a 24 x 24
grid = 576 image tokens, 384px; with a tokenizer of LlamaGen VQ-16's size for decoding, see
:func:`~mvar_engine.models.tokenizer.llamagen_vq16_sized`) and ``raster-tiny`` (for tests); both
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

from pathlib import Path
from typing import Any, TextIO

import torch

from ...models.janus import JANUS_PRO_1B_TEXT, JANUS_PRO_BOI, JanusPromptedModel, janus_pro_1b, janus_tiny
from ...models.raster_gpt import RasterGPT, RasterGPTConfig
from ...models.tokenizer import MultiScaleVQVAE, TokenizerConfig
from ...plugins.budget_cache import budget_tokens
from ..config import EngineConfig
from ..model_options import RasterOptions
from ..pipeline import Pipeline, build_models, resolve_components, resolve_device
from ..profile_heads import calibrate_head_map
from .cache import cache_bytes
from .step_calls import StepCallCounter
from .cells import (JANUS_MODELS, JANUS_PROMPT_TOKENS, RASTER_GRIDS, CellRun, model_spec, needs_calibration,
                    parse_combo)


def bench_raster_models(spec, cell: dict[str, Any]):
    """(RasterGPT, tokenizer) with random weights from ``cell["seed"]`` (every process builds the same)."""

    grid = RASTER_GRIDS[spec.id]
    if spec.id in JANUS_MODELS:
        return janus_bench_model(spec.id, cell["seed"]), None
    if spec.id == "raster-tiny":
        torch.manual_seed(cell["seed"])
        tokenizer = MultiScaleVQVAE(TokenizerConfig(vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                                    using_sa=False, using_mid_sa=False, quant_resi=0.0,
                                                    patch_nums=(grid,)))
        return RasterGPT(RasterGPTConfig.tiny(grid=grid, vocab_size=16)), tokenizer
    return build_models(RasterOptions(random_weights=True, patch_nums=(grid[0],), init_seed=cell["seed"]))


def janus_bench_model(model_id: str, seed: int):
    """``janus-pro-1b``: Janus-Pro-1B's architecture with random weights (the understanding tower cut to
    one layer: image generation never runs it); ``janus-tiny``: a 2-layer model of width 64 on a 4 x 4
    grid (tests). Both with a fixed prompt of :data:`JANUS_PROMPT_TOKENS` ids."""
    if model_id == "janus-tiny":
        model, bos, boi, first = janus_tiny(seed=seed), 1, 5, 10
    else:
        model, bos, boi, first = janus_pro_1b(understanding_layers=1, seed=seed), JANUS_PRO_1B_TEXT["bos_token_id"], \
            JANUS_PRO_BOI, 1000
    text = torch.arange(JANUS_PROMPT_TOKENS - 2) % 30 + first
    return JanusPromptedModel(model, torch.cat([torch.tensor([bos]), text, torch.tensor([boi])]))


def raster_cfg(cfg: float) -> float:
    """The matrix's ``--cfg`` for a raster engine: 0 (no guidance in the matrix's terms) is 1.0 there."""
    return 1.0 if cfg <= 0 else cfg


def engine_config(combo, cell: dict[str, Any]):

    components = combo.engine_components()
    if cell.get("head_map") and needs_calibration(combo):
        components["cache"]["options"] = {**components["cache"]["options"], "head_map": cell["head_map"]}
    # Janus cells build their random-weights model here (bench_raster_models): the family only wraps it in
    # its adapter, and its required folder option names no folder, never read
    model = {"name": "janus", "model_dir": "random-weights"} if cell.get("model") in JANUS_MODELS else {}
    return EngineConfig(**components, backend=cell["backend"], device=cell["device"], dtype=cell["dtype"],
                        sampling={"cfg": raster_cfg(cell["cfg"]), "seed": cell["seed"]}, model=model,
                        compile=combo.compile)


class FlopCounter:
    """Wraps ``backends.attend`` and ``backends.attend_and_score`` (scoring caches' path) and adds
    ``4 * B * H * D * pairs`` per call while ``counting``."""

    def __init__(self, backends) -> None:
        self.flops, self.counting = 0, False
        for name in ("attend", "attend_and_score"):
            setattr(backends, name, self.counted(getattr(backends, name)))

    def counted(self, method):
        def call(q, k, v, spec, *, scale):
            if self.counting:
                self.flops += 4 * q.shape[0] * q.shape[1] * q.shape[-1] * spec.pair_count(q.shape[-2], k.shape[-2])
            return method(q, k, v, spec, scale=scale)

        return call


def count_step_calls(engine, cache, labels: torch.Tensor, cfg: float, generator) -> dict[str, float]:
    """Aten calls and host syncs per steady step (3 onward: eviction included wherever the budget is
    below the sequence) of one more, untimed generation (:class:`StepCallCounter`), and per layer."""
    counter = StepCallCounter()
    with counter:
        engine.generate(labels, cache, cfg=cfg, top_k=2000, top_p=1.0, generator=generator, progress=counter.end_step)
    figures = counter.steady()
    return {**figures, "aten_calls_per_layer_step": figures["aten_calls_per_step"] / engine.model.num_layers}


def run_raster_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Measure one (raster model, batch, configuration) cell in this process; returns the row."""

    combo = parse_combo(cell["config"])
    run = CellRun(cell, lambda device: engine_config(combo, {**cell, "device": str(device)}),
                  lambda: bench_raster_models(model_spec(cell["model"]), cell))
    engine = run.engine
    counter = FlopCounter(run.components.backends)
    cfg = raster_cfg(cell["cfg"])
    rows = cell["batch"] * (2 if engine.model.guided(cfg) else 1)
    labels = (torch.arange(cell["batch"]) % engine.model.num_classes).to(run.device)
    generator = torch.Generator(device=run.device).manual_seed(cell["seed"])
    held = {"kv": 0, "bookkeeping": 0}
    last: list[Any] = [None]
    cache: list[Any] = [None]

    def poll(_step: int) -> None:
        kv, bookkeeping = cache_bytes(cache[0])
        held["kv"], held["bookkeeping"] = max(held["kv"], kv), max(held["bookkeeping"], bookkeeping)

    def prepare(index: int) -> None:
        last[0] = None
        cache[0] = run.fresh_cache()
        counter.counting = index == 0  # the first generation counts the FLOPs

    def call() -> None:
        last[0] = engine.generate(labels, cache[0], cfg=cfg, top_k=2000, top_p=1.0, generator=generator, progress=poll)

    run.generations(prepare, call)
    tokens, cache_peak = last[0].tokens, last[0].cache_peak_bytes
    counter.counting = False
    calls = count_step_calls(engine, run.fresh_cache(), labels, cfg, generator) if cell.get("count_calls") and \
        not combo.compile else {}
    prepare(-1)
    run.decoding(engine.model.decode, tokens)
    length = engine.model.layout.length
    options = run.config.cache.options
    budget = options.get("budget")
    return run.row(
        rows=rows, cfg=cfg, flops=None if combo.compile else counter.flops, cache_peak=cache_peak,
        options={**combo.options, "cache": dict(options)} if options else combo.options,
        grid=list(RASTER_GRIDS[run.spec.id]), sequence_length=length,
        kv_bytes=held["kv"], cache_bookkeeping_bytes=held["bookkeeping"], **calls,
        budget_tokens=(min(length, budget_tokens(budget, length)) if budget is not None
                       else (length if run.components.cache.stores_history else 0)))


def calibrate_for_matrix(model_id: str, cell: dict[str, Any], path: Path, images: int, log: TextIO) -> dict[str, Any]:
    """Calibrate a head map for ``ssd`` cells of ``model_id`` in this process (the parent: its memory
    is not measured) with the same random weights the cells build; returns the report's record."""

    spec = model_spec(model_id)
    device = resolve_device(cell["device"])
    config = engine_config(_full_combo(), {**cell, "model": model_id, "device": str(device)})
    model, tokenizer = bench_raster_models(spec, cell)
    components = resolve_components(config)
    engine = Pipeline(config, model.to(device).eval(), None if tokenizer is None else tokenizer.to(device).eval(),
                      components, device).engine
    record = calibrate_head_map(engine, path, log, images=images, batch=min(images, cell["batch"]),
                                cfg=raster_cfg(cell["cfg"]), top_k=2000, top_p=1.0, seed=cell["seed"] + 1,
                                model=model_id, source="mvar-engine bench matrix (random weights)", device=device)
    return {**record, "path": str(path.resolve()), "model": model_id}


def _full_combo():

    return parse_combo("raster/dense/full")


__all__ = ["RASTER_GRIDS", "FlopCounter", "calibrate_for_matrix", "needs_calibration", "run_raster_cell"]
