"""Hook implementations registering the built-in trajectories, patterns and caches (entry point
``builtin-plugins``): exactly what a third-party plugin module looks like."""

from __future__ import annotations

from ..core.hookspecs import hookimpl
from ..core.records import AttentionPatternRecord, CachePolicyRecord, NoOptions, TrajectoryRecord
from .ams_cache import AmsCache, AmsOptions
from .caches import FullCache, NoCache, WindowOptions, make_window
from .h2o_cache import H2OCache, H2OOptions
from .lines_cache import LinesCache, LinesOptions
from .patterns import CausalPattern, DensePattern, NeighborhoodOptions, NeighborhoodPattern
from .raster import RasterTrajectory
from .scalekv_cache import ScaleKVCache, ScaleKVOptions
from .sink_cache import SinkCache, SinkOptions
from .ssd_cache import SSDCache, SSDOptions
from .trajectories import FullTrajectory, MarkovOptions, MarkovTrajectory


@hookimpl
def mvar_engine_trajectories():
    return [
        TrajectoryRecord(name="full", factory=FullTrajectory,
                         description="next-scale, every earlier scale visible (VAR, block-causal)"),
        TrajectoryRecord(name="markov", factory=MarkovTrajectory, options=MarkovOptions,
                         description="next-scale, only the last `order` scales visible (MVAR: order 1, no KV cache)"),
        TrajectoryRecord(name="raster", factory=RasterTrajectory,
                         description="next-token, one image token a step in raster order after a class prefix (LlamaGen)"),
    ]


@hookimpl
def mvar_engine_attention_patterns():
    return [
        AttentionPatternRecord(name="dense", factory=DensePattern, description="every visible key"),
        AttentionPatternRecord(name="causal", factory=CausalPattern,
                               description="every earlier token (raster's default; as dense, named for next-token)"),
        AttentionPatternRecord(name="neighborhood", factory=NeighborhoodPattern, options=NeighborhoodOptions,
                               description="k x k window at corresponding positions on the larger scales (MVAR)"),
    ]


CACHE_POLICIES = (  # name, factory, options model, description
    ("none", NoCache, NoOptions, "keep nothing; history the trajectory needs is recomputed (the exact oracle)"),
    ("full", FullCache, NoOptions, "keep every key/value (VAR's KV cache)"),
    ("window", make_window, WindowOptions,
     "the last n scales (--cache-scales), or with --cache-budget the class prefix + the most recent tokens "
     "(--cache-shape neighborhood: the nearest on the raster grid)"),
    ("sink", SinkCache, SinkOptions,
     "StreamingLLM: class prefix + first tokens + recent tokens within a budget (raster and full)"),
    ("h2o", H2OCache, H2OOptions, "H2O: class prefix + heavy hitters by accumulated attention + recent tokens, "
     "per head within a budget (raster; full with dense attention)"),
    ("ssd", SSDCache, SSDOptions, "SSD: per head from a profiled head map, locality heads a recent window, "
     "sink heads the most attended tokens, within a budget"),
    ("lines", LinesCache, LinesOptions, "after LineAR (raster): class prefix + anchors + the current and recent "
     "image lines + the middle tokens the current line attends to most, per head within a budget"),
    ("scalekv", ScaleKVCache, ScaleKVOptions, "ScaleKV's rule (next-scale): the newest scale's grid-centre window "
     "and the keys its queries score highest, per head within a budget (per layer and scale from a scale profile)"),
    ("ams", AmsCache, AmsOptions, "AMS-KV's scale rule (next-scale): the coarsest scales and the most recent ones, "
     "the middle dropped (more recent ones in a scale profile's low-similarity layers)"),
)
"""The built-in cache policies, in registration order."""


@hookimpl
def mvar_engine_cache_policies():
    return [CachePolicyRecord(name=name, factory=factory, options=options, description=description)
            for name, factory, options, description in CACHE_POLICIES]
