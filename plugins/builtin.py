"""Hook implementations registering the built-in trajectories, patterns and caches (entry point
``builtin-plugins``): exactly what a third-party plugin module looks like."""

from __future__ import annotations

from ..core.hookspecs import hookimpl
from ..core.records import AttentionPatternRecord, CachePolicyRecord, TrajectoryRecord
from .caches import FullCache, NoCache, WindowOptions, make_window
from .h2o_cache import H2OCache, H2OOptions
from .patterns import CausalPattern, DensePattern, NeighborhoodOptions, NeighborhoodPattern
from .raster import RasterTrajectory
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


@hookimpl
def mvar_engine_cache_policies():
    return [
        CachePolicyRecord(name="none", factory=NoCache,
                          description="keep nothing; history the trajectory needs is recomputed (the exact oracle)"),
        CachePolicyRecord(name="full", factory=FullCache, description="keep every key/value (VAR's KV cache)"),
        CachePolicyRecord(name="window", factory=make_window, options=WindowOptions,
                          description="the last n scales (--cache-scales), or with --cache-budget the class prefix "
                                      "+ the most recent tokens"),
        CachePolicyRecord(name="sink", factory=SinkCache, options=SinkOptions,
                          description="StreamingLLM: class prefix + first tokens + recent tokens within a budget "
                                      "(raster and full)"),
        CachePolicyRecord(name="h2o", factory=H2OCache, options=H2OOptions,
                          description="H2O: class prefix + heavy hitters by accumulated attention + recent tokens, "
                                      "per head within a budget (raster; full with dense attention)"),
        CachePolicyRecord(name="ssd", factory=SSDCache, options=SSDOptions,
                          description="SSD: per head from a profiled head map, locality heads a recent window, "
                                      "sink heads the most attended tokens, within a budget"),
    ]
