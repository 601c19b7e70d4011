"""``ams``: AMS-KV's scale rule (arXiv 2511.16047) for next-scale models under ``full``: keep the
coarsest ("condensed") scales and the most recent ("local") ones, drop the middle.

After each scale every layer keeps its first ``condensed`` scales (the class token's scale among
them) and its last ``local`` scales, whole; the next scale attends to those and itself. Every row
and head keeps the same scales, so the returned spans are exact and any pattern of the ``full``
trajectory runs over them. Storage is one :class:`~mvar_engine.plugins.caches.SegmentStore` a layer,
sized for that layer's largest step. The paper gives more local scales to the layers whose keys
change most from scale to scale: with ``calibration`` (a scale profile from ``mvar-engine
profile-scales``), the layers it marks ``keeps_more`` (inter-scale key similarity below the split)
keep ``extra_local`` more; without one every layer keeps ``local``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..core.errors import UsageError, setting
from ..core.layout import SequenceLayout
from .caches import SegmentCache, SegmentStore
from .scale_profile import load_scale_profile


class AmsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    condensed: int = Field(2, ge=1, description="coarsest scales always kept (the first holds the class token)")
    local: int = Field(1, ge=1, description="most recent scales kept beside them")
    calibration: str | None = Field(None, description="scale profile (mvar-engine profile-scales): its low-similarity "
                                                      "layers keep extra_local more scales")
    extra_local: int = Field(1, ge=0, description="more recent scales the profile's low-similarity layers keep")


class AmsCache(SegmentCache):
    """The first ``condensed`` and the last ``local`` scales of every layer (more in the layers a
    profile marks)."""

    name = "ams"
    families = ("next-scale",)

    def __init__(self, options: AmsOptions | None = None) -> None:
        self.options = options or AmsOptions()
        self.profile = load_scale_profile(self.options.calibration) if self.options.calibration else None
        self.layers = []
        self.local: list[int] = []

    def local_scales(self, num_layers: int) -> list[int]:
        """Recent scales each layer keeps."""
        more = self.profile.keeps_more if self.profile is not None else [False] * num_layers
        return [self.options.local + (self.options.extra_local if flag else 0) for flag in more]

    def kept_scales(self, done: int, local: int | None = None) -> list[int]:
        """The scales a layer keeping ``local`` recent ones (default: the option) keeps after scales
        ``0 .. done - 1``, ascending."""
        condensed, local = self.options.condensed, self.options.local if local is None else local
        return sorted(set(range(min(condensed, done))) | set(range(max(0, done - local), done)))

    def capacity(self, layout: SequenceLayout, local: int | None = None) -> int:
        sizes = [scale.numel for scale in layout.scales]
        return max(sum(sizes[s] for s in self.kept_scales(step, local)) + sizes[step] for step in range(len(sizes)))

    def check_layout(self, layout: SequenceLayout, *, num_layers: int, num_heads: int,
                     weights_id: str | None = None) -> None:
        """``condensed`` names scales of the schedule (a rule that keeps every scale equals ``full``);
        a profile was made on this model."""
        if self.options.condensed > layout.num_scales:
            raise UsageError(f"{setting('cache_condensed', self.options.condensed)}: the schedule has "
                             f"{layout.num_scales} scales (give at most {layout.num_scales})")
        if self.profile is not None:
            self.profile.check_model(layout, num_layers, weights_id,
                                     source=f"{setting('cache_calibration', self.options.calibration)}")

    def begin(self, *, num_layers, batch, num_heads, head_dim, layout, device, dtype, guided=False):
        self.check_layout(layout, num_layers=num_layers, num_heads=num_heads)
        self.local = self.local_scales(num_layers)
        self.layers = [SegmentStore(batch, num_heads, self.capacity(layout, local), head_dim, device, dtype)
                       for local in self.local]

    def end_step(self) -> None:
        for store, local in zip(self.layers, self.local):
            if len(store.segments) > self.options.condensed + local:
                store.keep_segments(self.options.condensed, local)


__all__ = ["AmsCache", "AmsOptions"]
