"""Hook implementations registering the built-in trajectories, patterns and caches (entry point
``builtin-plugins``): exactly what a third-party plugin module looks like."""

from __future__ import annotations

from ..core.hookspecs import hookimpl
from ..core.records import AttentionPatternRecord, CachePolicyRecord, TrajectoryRecord
from .caches import FullCache, NoCache, WindowCache, WindowOptions
from .patterns import DensePattern, NeighborhoodOptions, NeighborhoodPattern
from .raster import RasterTrajectory
from .sink_cache import SinkCache, SinkOptions
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
        AttentionPatternRecord(name="neighborhood", factory=NeighborhoodPattern, options=NeighborhoodOptions,
                               description="k x k window at corresponding positions on the larger scales (MVAR)"),
    ]


@hookimpl
def mvar_engine_cache_policies():
    return [
        CachePolicyRecord(name="none", factory=NoCache,
                          description="keep nothing; history the trajectory needs is recomputed (the exact oracle)"),
        CachePolicyRecord(name="full", factory=FullCache, description="keep every key/value (VAR's KV cache)"),
        CachePolicyRecord(name="window", factory=WindowCache, options=WindowOptions,
                          description="keep the keys/values of the last n scales"),
        CachePolicyRecord(name="sink", factory=SinkCache, options=SinkOptions,
                          description="StreamingLLM: class prefix + first tokens + recent tokens within a budget "
                                      "(raster and full)"),
    ]
