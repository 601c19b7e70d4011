"""``sink``: StreamingLLM's cache, token by token, in bounded storage (:mod:`.budget_cache`).

Keeps the class prefix (the layout's first scale), the next ``sink`` tokens (attention sinks) and
the most recent tokens, ``budget`` tokens of storage per layer in all. Every head and row keeps the
same positions (a *shared* policy: honest spans, so it also serves next-scale ``full`` with any
pattern, where a token is one position of the flattened multi-scale sequence).
"""

from __future__ import annotations

from pydantic import Field

from ..core.errors import UsageError
from .budget_cache import BudgetedCache, BudgetOptions, budget_tokens, positions_to_spans


class SinkOptions(BudgetOptions):
    sink: int = Field(4, ge=0, description="first tokens after the class prefix that are always kept (left at "
                                           "the default of 4, it shrinks to leave one recent slot in a small budget)")


class SinkCache(BudgetedCache):
    """Class prefix + ``sink`` first tokens + the most recent tokens."""

    name = "sink"

    def __init__(self, options: SinkOptions | None = None) -> None:
        super().__init__(options or SinkOptions())

    sink = 4

    def sink_tokens(self, prefix: int, budget: int) -> int:
        """Sink tokens kept for this budget: the option as given, or the default shrunk to leave a recent slot."""
        if "sink" in self.options.model_fields_set:
            return self.options.sink
        return max(0, min(self.options.sink, budget - prefix - 1))

    def prepare(self, *, num_layers: int, num_heads: int) -> None:
        self.sink = self.sink_tokens(self.prefix, self.budget)

    def check_layout(self, layout, *, num_layers, num_heads, weights_id=None):
        """Beside the base checks: the class prefix and the sink tokens leave room for the newest token."""
        super().check_layout(layout, num_layers=num_layers, num_heads=num_heads)
        prefix, budget = layout.scales[0].numel, budget_tokens(self.options.budget, layout.length)
        if prefix + self.sink_tokens(prefix, budget) >= budget:
            raise UsageError(f"--cache-sink {self.options.sink}: with the {prefix} class token(s) it fills the whole "
                             f"budget of {budget} token(s) (--cache-budget {self.options.budget:g}), leaving no room "
                             f"for recent tokens (lower --cache-sink below {budget - prefix} or raise --cache-budget)")

    def select(self, layer, store, retain):
        return self.window_slots(store, retain, protected=self.prefix + self.sink)

    def victim(self, layer, store, position):
        return self.oldest_slot(layer, protected=self.prefix + self.sink)

    def static_victim(self, layer, store, position):
        return self.oldest_static_slot(store, protected=self.prefix + self.sink)

    def kept_positions_list(self, layer: int = 0) -> list[int]:
        """Positions ``layer`` holds now, ascending (the same in every row and head)."""
        return sorted(self.host_positions(layer)) if self._positions else []


__all__ = ["SinkCache", "SinkOptions", "budget_tokens", "positions_to_spans"]
