"""``ssd``: head-adaptive compression from an offline head map (:mod:`mvar_engine.plugins.head_map`).

Every head stores ``budget`` tokens (the same count in every head, so the saving is real memory,
not masking). Spatial-locality heads keep the class prefix and the most recent tokens (a window of
``budget - 1`` tokens: a few image rows); semantic-sink heads keep the class prefix and the tokens
with the most accumulated attention (the step's new token competes like any other). With every
head a locality head this is ``window``; with every head a sink head, ``h2o --cache-recent 0``.
A *headwise* policy (:mod:`.budget_cache`). The head map comes from ``mvar-engine profile-heads``.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from ..core.errors import UsageError
from .budget_cache import BudgetedCache, BudgetOptions
from .head_map import HeadMap, load_head_map


class SSDOptions(BudgetOptions):
    head_map: str | None = Field(None, description="head map JSON written by `mvar-engine profile-heads` (required)")

    @field_validator("head_map")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise PydanticCustomError("empty_path", "the path is empty: give the head map JSON written by "
                                                    "`mvar-engine profile-heads`")
        return value


class SSDCache(BudgetedCache):
    """Locality heads: recent window; sink heads: top accumulated attention; both within ``budget``."""

    name = "ssd"
    headwise = stand_in_spans = True  # per (row pair, head) storage; the spans it returns only count its keys
    track_scores = True

    def __init__(self, options: SSDOptions | None = None, head_map: HeadMap | None = None) -> None:
        super().__init__(options or SSDOptions())
        if head_map is None:
            if not self.options.head_map:
                raise UsageError("cache 'ssd' needs --cache-head-map FILE (write one with `mvar-engine profile-heads`)")
            head_map = load_head_map(self.options.head_map)
        self.head_map = head_map
        self._sink_heads: list[torch.Tensor] = []
        self._any_sink: list[bool] = []

    def check_layout(self, layout, *, num_layers, num_heads, weights_id=None):
        """Beside the budget: the head map was made for this many layers and heads (and, when both
        know it, for these weights)."""
        super().check_layout(layout, num_layers=num_layers, num_heads=num_heads)
        self.head_map.check_model(num_layers, num_heads)
        self.head_map.check_weights(weights_id)

    def prepare(self, *, num_layers, num_heads):
        device = self.layers[0].k.device if self.layers else torch.device("cpu")
        rows = self.head_map.sink_mask()
        self._sink_heads = [torch.tensor(row, device=device)[None, :, None] for row in rows]
        self._any_sink = [any(row) for row in rows]

    def select(self, layer, store, retain):
        sink = self._sink_heads[layer]  # [1, H, 1] True for semantic-sink heads
        window = self.window_rows(store, retain, store.k.shape[0])
        if not self._any_sink[layer]:
            return window
        heavy = self.heavy_index(store, retain, recent=0)
        return torch.where(sink, heavy, window)

    def victim(self, layer, store, position, n=None):
        """Locality heads: the oldest movable slot; sink heads: the least attended (``n``: the slots
        considered, default the filled ones)."""
        if not self._any_sink[layer]:
            return self.oldest_victim(store, n)
        return self.heavy_or_oldest_victim(store, self._sink_heads[layer], n)

    def static_victim(self, layer, store, position):
        return self.victim(layer, store, position, n=store.capacity)


__all__ = ["SSDCache", "SSDOptions"]
