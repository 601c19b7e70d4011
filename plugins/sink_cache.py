"""``sink``: StreamingLLM's cache, token by token, in bounded storage (:mod:`.budget_cache`).

Keeps the class prefix (the layout's first scale), the next ``sink`` tokens (attention sinks) and
the most recent tokens, ``budget`` tokens of storage per layer in all. Every head and row keeps the
same positions (a *shared* policy: honest spans, so it also serves next-scale ``full`` with any
pattern, where a token is one position of the flattened multi-scale sequence).
"""

from __future__ import annotations

from pydantic import Field

from .budget_cache import BudgetedCache, BudgetOptions, budget_tokens, positions_to_spans


class SinkOptions(BudgetOptions):
    sink: int = Field(4, ge=0, description="first tokens after the class prefix that are always kept")


class SinkCache(BudgetedCache):
    """Class prefix + ``sink`` first tokens + the most recent tokens."""

    name = "sink"

    def __init__(self, options: SinkOptions | None = None) -> None:
        super().__init__(options or SinkOptions())

    def select(self, layer, store, retain):
        return self.window_index(store, retain, protected=self.prefix + self.options.sink)

    def victim(self, layer, store, position):
        return self.oldest_slot(layer, protected=self.prefix + self.options.sink)

    def kept_positions_list(self, layer: int = 0) -> list[int]:
        """Positions ``layer`` holds now, ascending (the same in every row and head)."""
        return sorted(self._positions[layer]) if self._positions else []


__all__ = ["SinkCache", "SinkOptions", "budget_tokens", "positions_to_spans"]
