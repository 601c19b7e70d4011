"""``mvar-engine profile-heads``: classify a raster model's attention heads for the ``ssd`` cache.

Calibration generations run with the full cache; at every step and layer the profiler sees each
query's attention over every earlier token (:class:`ProfilingCache`, through the cache ``observe``
hook). Per (layer, head) the sparsity score is the share of a query's attention mass on image tokens
that falls outside its causal k x k spatial neighbourhood on the 2-D token grid (rows and columns
within ``k // 2``), averaged over every image query of every calibration row (cond and uncond).
Attention on the class prefix is left out (the prefix is always kept, and many heads park mass
there). Heads scoring above the threshold are semantic-sink heads, the rest spatial-locality heads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence, TextIO

import torch

from ..core.attention import AttentionSpec
from ..core.errors import UsageError
from ..core.registry import get_registry
from ..plugins.budget_cache import attention_probabilities
from ..plugins.caches import FullCache
from ..plugins.head_map import HeadMap, classify, write_head_map, write_heatmap
from .cli import parse_generate_args
from .config import EngineConfig
from .cli_helpers import PROG, Parser, check_output_path
from .output_files import add_overwrite_flag, check_outputs
from .pipeline import Pipeline, check_model_facts, resolve_components, with_weights


class ProfilingCache(FullCache):
    """The ``full`` cache (keys at positions ``0 .. n-1``, the step's queries last) that also
    accumulates every (layer, head)'s out-of-neighbourhood attention share."""

    families = ("next-token",)

    def __init__(self, grid: tuple[int, int], prefix: int, neighborhood: int = 3) -> None:
        super().__init__()
        self.grid, self.prefix, self.radius = tuple(grid), prefix, neighborhood // 2
        self.neighborhood = neighborhood
        self.share_sum: torch.Tensor | None = None  # float64 [layers, heads]
        self.queries: torch.Tensor | None = None

    def begin(self, *, num_layers, batch, num_heads, head_dim, layout, device, dtype, guided=False):
        super().begin(num_layers=num_layers, batch=batch, num_heads=num_heads, head_dim=head_dim, layout=layout,
                      device=device, dtype=dtype, guided=guided)
        if self.share_sum is None:  # accumulate over every generation of a calibration run
            self.share_sum = torch.zeros(num_layers, num_heads, dtype=torch.float64)
            self.queries = torch.zeros(num_layers, num_heads, dtype=torch.float64)

    def _outside(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image [n], outside [l, n])``: which keys are image tokens, and which of them lie outside
        each query's neighbourhood."""
        w = self.grid[1]
        image = k_pos >= self.prefix
        qt, kt = (q_pos - self.prefix).clamp(min=0), (k_pos - self.prefix).clamp(min=0)
        near = ((qt[:, None] // w - kt[None, :] // w).abs() <= self.radius) & (
            (qt[:, None] % w - kt[None, :] % w).abs() <= self.radius)
        return image, image[None, :] & ~near

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, scale: float) -> None:
        l, n = q.shape[2], k.shape[2]
        q_pos = torch.arange(n - l, n, device=q.device)
        image, outside = self._outside(q_pos, torch.arange(n, device=q.device))
        for start, probs in attention_probabilities(q, k, spec, scale):  # probs: [rows, heads, c, n]
            stop = start + probs.shape[2]
            on_image = (probs * image).sum(-1)
            off = (probs * outside[start:stop]).sum(-1)
            valid = (q_pos[start:stop] >= self.prefix) & (on_image > 1e-12)  # image queries that see image keys
            share = torch.where(valid, off / on_image.clamp(min=1e-12), torch.zeros_like(off))
            self.share_sum[layer] += share.sum(dim=(0, 2)).double().cpu()
            self.queries[layer] += valid.expand_as(share).sum(dim=(0, 2)).double().cpu()

    def scores(self) -> list[list[float]]:
        """``[layers][heads]`` mean out-of-neighbourhood share (0 for a head that saw no image query)."""
        if self.share_sum is None:
            raise RuntimeError("no calibration generation has run")
        return (self.share_sum / self.queries.clamp(min=1)).tolist()

    def head_map(self, threshold: float | None = None, calibration: dict | None = None,
                 weights_id: str | None = None) -> HeadMap:
        """The classified map; ``weights_id`` records the weights profiled (checked when ``ssd`` loads it)."""
        return classify(self.scores(), threshold, neighborhood=self.neighborhood, calibration=calibration,
                        weights_id=weights_id)


__all__ = ["ProfilingCache", "calibrate_head_map", "calibration_config"]


def calibrate_head_map(engine, path: Path, log: TextIO, *, images: int, batch: int, cfg: float, top_k: int,
                       top_p: float, seed: int, model: str, source: str, device: torch.device) -> dict[str, Any]:
    """Profile a raster engine's heads (an :class:`~mvar_engine.core.engine.Engine` over a next-token
    adapter with ``grid``, ``prefix`` and ``num_tokens``: the raster GPT's, Janus') over ``images``
    generations (labels ``0, 1, ...`` modulo the classes, ``batch`` at a time, the full cache, sampled
    from ``seed``); write the head map (and its heat map) to ``path``; returns what a report records."""
    start = time.perf_counter()
    neighborhood = 3
    adapter = engine.model
    profiler = ProfilingCache(adapter.grid, adapter.prefix, neighborhood)
    labels = (torch.arange(images) % adapter.num_classes).to(device)
    generator = torch.Generator(device=labels.device).manual_seed(seed)
    print(f"calibrating SSD heads: {len(labels)} generations with the full cache ...", file=log, flush=True)
    for chunk in torch.split(labels, batch):
        engine.generate(chunk, profiler, cfg=cfg, top_k=top_k, top_p=top_p, generator=generator)
    calibration = {"images": len(labels), "cfg": cfg, "seed": seed, "tokens_per_image": adapter.num_tokens,
                   "model": model, "source": source}
    head_map = profiler.head_map(None, calibration)
    write_head_map(head_map, path)
    write_heatmap(head_map, path.with_suffix(".png"))
    counts = head_map.counts()
    return {"path": str(path), "calibrated": True, "images": len(labels), "tokens_per_image": adapter.num_tokens,
            "neighborhood": neighborhood, "threshold": head_map.threshold, "sink_heads": counts["sink"],
            "local_heads": counts["local"], "seconds": time.perf_counter() - start}


def calibration_config(argv: Sequence[str], command: str, trajectory: str, family: str) -> tuple[EngineConfig, Any]:
    """The generation flags ``argv`` of a calibration command as a config with the full cache
    (``trajectory`` unless one is given, of ``family``), and the model's facts (None when its family
    tells none); one-line ``UsageError`` on ``--cache`` or a trajectory of another family."""
    if any(a == "--cache" or a.startswith("--cache=") for a in argv):
        raise UsageError(f"{command} calibrates with the full cache: drop --cache")
    if not any(a == "--trajectory" or a.startswith("--trajectory=") for a in argv):
        argv = ["--trajectory", trajectory, *argv]
    config = parse_generate_args([*argv, "--cache", "full"])
    chosen = get_registry().create("trajectory", config.trajectory.name, config.trajectory.options)
    if chosen.family != family:
        raise UsageError(f"{command} profiles {family} models, not trajectory '{config.trajectory.name}': use "
                         f"--trajectory {trajectory}")
    filled = with_weights(config)
    return config, check_model_facts(filled, resolve_components(filled))


def cmd_profile_heads(argv: Sequence[str]) -> int:
    p = Parser(prog=f"{PROG} profile-heads", allow_abbrev=False,
                description="Calibrate a raster model's heads for --cache ssd: generate with the full cache, score "
                            "every (layer, head) by the share of attention outside the query's k x k neighbourhood "
                            "on the token grid, write a JSON head map and a PNG heat map. Every other flag is a "
                            "generation flag (model, --labels, --samples-per-label, --seed, --cfg, ...).")
    p.add_argument("--head-map", default="head_map.json", help="JSON to write (the PNG goes beside it); default "
                   "head_map.json")
    p.add_argument("--neighborhood", type=int, default=3, help="neighbourhood side k in tokens (default 3)")
    p.add_argument("--threshold", default="auto", help="sparsity above which a head is a sink head; 'auto' "
                   "(default) splits the scores into two groups by Otsu's method")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_overwrite_flag(p)
    args, rest = p.parse_known_args(argv)
    if args.neighborhood < 1:
        raise UsageError(f"--neighborhood must be at least 1, got {args.neighborhood}")
    try:
        threshold = None if args.threshold == "auto" else float(args.threshold)
    except ValueError:
        raise UsageError(f"--threshold must be a number or 'auto', got {args.threshold!r}") from None
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold must be 'auto' or a share in [0, 1] (scores are attention shares), "
                         f"got {args.threshold}")
    json_target = check_output_path("--head-map", args.head_map, (".json",))
    check_outputs({"--head-map": json_target, "--head-map's heat map": json_target.with_suffix(".png")}, args.overwrite)
    config, facts = calibration_config(rest, "profile-heads", "raster", "next-token")
    grid = facts.layout.grids[-1] if facts else None
    if grid and max(grid) > 1 and args.neighborhood // 2 >= max(grid) - 1:
        raise UsageError(f"--neighborhood {args.neighborhood} covers the whole {grid[0]}x{grid[1]} token grid from "
                         f"every query (every head would score 0); use at most {2 * max(grid) - 3}")
    pipe = Pipeline.from_config(config)
    start = time.perf_counter()
    profiler = ProfilingCache(pipe.adapter.grid, pipe.adapter.prefix, args.neighborhood)
    result = pipe.generate(cache=profiler)
    calibration = {"images": len(result.labels), "labels": sorted(set(int(x) for x in result.labels)),
                   "cfg": config.sampling.cfg, "seed": config.sampling.seed, "grid": list(pipe.adapter.grid),
                   "model": str(next(iter(pipe.components.model.input_files().values()), "default weights"))}
    weights_id = pipe.facts.weights_id if pipe.facts else None
    head_map = profiler.head_map(threshold, calibration, weights_id)
    json_path = write_head_map(head_map, json_target)
    png_path = write_heatmap(head_map, json_target.with_suffix(".png"))
    counts = head_map.counts()
    print(f"wrote {json_path} and {png_path}: {head_map.layers} layers x {head_map.heads} heads, {counts['sink']} sink / "
          f"{counts['local']} local at threshold {head_map.threshold:.3f} ({len(result.labels)} calibration images, "
          f"{time.perf_counter() - start:.1f} s)")
    return 0
