"""Built-in next-scale trajectories: ``full`` (VAR) and ``markov`` (MVAR)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..core.errors import IncompatibleComponentsError, setting
from ..core.trajectory import Trajectory


class FullTrajectory(Trajectory):
    """VAR: every scale sees itself and all earlier scales (block-causal over scales)."""

    name = "full"
    sees_all_history = True
    default_attention = "dense"
    default_cache = "full"

    def visible(self, q_scale, k_scale):
        return k_scale <= q_scale


class MarkovOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    order: int = Field(1, ge=1, description="scales a scale's queries see, itself included "
                       "(1 = MVAR: own block only; the previous scale enters through the input)")


class MarkovTrajectory(Trajectory):
    """MVAR: scale s sees only scales s-order+1 .. s (order 1: its own block, no KV cache needed)."""

    name = "markov"
    default_attention = "neighborhood"
    default_cache = "none"

    def __init__(self, options: MarkovOptions | None = None) -> None:
        self.options = options or MarkovOptions()
        self.order = self.options.order

    def visible(self, q_scale, k_scale):
        return (k_scale <= q_scale) & (k_scale > q_scale - self.order)

    def check_cache(self, cache_name, cache):
        if self.order == 1 and getattr(cache, "stores_history", False):
            wider = ("" if getattr(cache, "stand_in_spans", False)  # it needs all history: a wider markov is refused too
                     else f", or {setting('trajectory_order', 2)} to let a scale see the one before")
            raise IncompatibleComponentsError(
                f"cache '{cache_name}' makes no sense under trajectory 'markov' with order 1: each scale sees "
                f"only its own block, so no step reads a cached key (use {setting('cache', 'none')}{wider})")
