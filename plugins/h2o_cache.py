"""``h2o``: Heavy-Hitter Oracle eviction (Zhang et al. 2023) in bounded storage (:mod:`.budget_cache`).

Per (sample, head): the class prefix, the ``recent`` share of the rest as a window of the newest
tokens, and the remaining slots for the tokens that received the most attention so far (the sum,
over every step's queries, of the softmax attention a key received while it was kept; cond and
uncond rows summed under CFG). A *headwise* policy: every head keeps its own positions.
"""

from __future__ import annotations

from pydantic import Field

from .budget_cache import BudgetedCache, BudgetOptions


class H2OOptions(BudgetOptions):
    recent: float = Field(0.5, ge=0, le=1, description="share of the budget after the class prefix kept as a "
                                                       "window of the newest tokens (H2O: half)")


class H2OCache(BudgetedCache):
    """Class prefix + heavy hitters by accumulated attention + the most recent tokens."""

    name = "h2o"
    headwise = stand_in_spans = True  # per (row pair, head) storage; the spans it returns only count its keys
    track_scores = True

    def __init__(self, options: H2OOptions | None = None) -> None:
        super().__init__(options or H2OOptions())

    def _recent(self) -> int:
        return int(round(self.options.recent * max(0, self.budget - 1 - self.prefix)))

    def select(self, layer, store, retain):
        return self.heavy_index(store, retain, recent=self._recent())

    def victim(self, layer, store, position):
        return self.heavy_victim(store, position, recent=self._recent())

    def static_victim(self, layer, store, position):
        return self.heavy_victim(store, position, recent=self._recent(), n=store.capacity)


__all__ = ["H2OCache", "H2OOptions"]
