"""``ams``: AMS-KV's scale rule (arXiv 2511.16047) for next-scale models under ``full``: keep the
coarsest ("condensed") scales and the most recent ("local") ones, drop the middle.

After each scale every layer keeps its first ``condensed`` scales (the class token's scale among
them) and its last ``local`` scales, whole; the next scale attends to those and itself. Every row
and head keeps the same scales, so the returned spans are exact and any pattern of the ``full``
trajectory runs over them. Storage is one :class:`~mvar_engine.plugins.caches.SegmentStore` a layer,
sized for the largest step. The paper also gives more local scales to the layers whose keys change
most from scale to scale (low inter-scale similarity, measured in a calibration run); this policy
keeps the same scales in every layer (``local`` is the one setting).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..core.errors import UsageError, setting
from ..core.layout import SequenceLayout
from .caches import SegmentCache


class AmsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    condensed: int = Field(2, ge=1, description="coarsest scales always kept (the first holds the class token)")
    local: int = Field(1, ge=1, description="most recent scales kept beside them")


class AmsCache(SegmentCache):
    """The first ``condensed`` and the last ``local`` scales of every layer."""

    name = "ams"
    families = ("next-scale",)

    def __init__(self, options: AmsOptions | None = None) -> None:
        self.options = options or AmsOptions()
        self.layers = []

    def kept_scales(self, done: int) -> list[int]:
        """The scales a layer keeps after scales ``0 .. done - 1``, ascending."""
        condensed, local = self.options.condensed, self.options.local
        return sorted(set(range(min(condensed, done))) | set(range(max(0, done - local), done)))

    def capacity(self, layout: SequenceLayout) -> int:
        sizes = [scale.numel for scale in layout.scales]
        return max(sum(sizes[s] for s in self.kept_scales(step)) + sizes[step] for step in range(len(sizes)))

    def check_layout(self, layout: SequenceLayout, *, num_layers: int, num_heads: int,
                     weights_id: str | None = None) -> None:
        """``condensed`` names scales of the schedule (a rule that keeps every scale equals ``full``)."""
        if self.options.condensed > layout.num_scales:
            raise UsageError(f"{setting('cache_condensed', self.options.condensed)}: the schedule has "
                             f"{layout.num_scales} scales (give at most {layout.num_scales})")

    def end_step(self) -> None:
        for store in self.layers:
            done = len(store.segments)
            if done > self.options.condensed + self.options.local:
                store.keep_segments(self.options.condensed, self.options.local)


__all__ = ["AmsCache", "AmsOptions"]
