"""``sink``: StreamingLLM's cache, token by token, in bounded preallocated storage.

Keeps the class prefix (the layout's first scale: the class token of VAR, the class-token prefix of
the raster GPT), the next ``sink`` tokens (attention sinks) and the most recent tokens, within a
budget of ``budget`` tokens (a fraction of the whole sequence when <= 1). Storage per layer is
``[rows, heads, budget + step, head_dim]``: allocated at ``begin`` for the prefill (raster then adds
one token a step) and grown once when a larger step arrives (a next-scale scale); eviction moves the
kept entries to the front of the buffer (never masks a full-size cache). All heads and all rows (cond and
uncond under CFG alike) keep the same positions, so the kept keys have one span list.

Serves the ``raster`` trajectory (a step is one token) and the next-scale ``full`` trajectory (a
step is one scale; the budget then counts positions of the flattened multi-scale sequence). With a
budget of at least the sequence length nothing is evicted: exactly the ``full`` cache.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..core.cache import CachePolicy
from ..core.errors import UsageError
from ..core.layout import SequenceLayout, Spans, merge_spans


class SinkOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: float = Field(0.2, gt=0, description="tokens kept between steps: a fraction of the sequence (<= 1) "
                                                 "or a count (> 1)")
    sink: int = Field(4, ge=0, description="first tokens after the class prefix that are always kept")


def budget_tokens(budget: float, length: int) -> int:
    """``budget`` as a token count for a sequence of ``length`` (fractions round to the nearest token)."""
    return int(round(budget * length)) if budget <= 1 else int(budget)


def positions_to_spans(positions: list[int]) -> Spans:
    """Sorted distinct positions -> merged half-open spans."""
    return merge_spans((p, p + 1) for p in positions)


class _SinkStore:
    """One layer: ``k, v [rows, heads, capacity, D]``, the first ``filled`` slots in use at ``positions``."""

    def __init__(self, rows, heads, capacity, head_dim, device, dtype):
        self.k = torch.empty(rows, heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.positions: list[int] = []

    def append(self, k, v, spans: Spans):
        start, n = len(self.positions), k.shape[2]
        if start + n > self.k.shape[2]:  # a step larger than any before (next-scale): grow once to fit it
            self.k = torch.cat([self.k[:, :, :start], self.k.new_empty(*self.k.shape[:2], n, self.k.shape[3])], dim=2)
            self.v = torch.cat([self.v[:, :, :start], self.v.new_empty(*self.v.shape[:2], n, self.v.shape[3])], dim=2)
        self.k[:, :, start:start + n].copy_(k)
        self.v[:, :, start:start + n].copy_(v)
        self.positions.extend(p for b, e in spans for p in range(b, e))
        return self.k[:, :, :start + n], self.v[:, :, :start + n], positions_to_spans(self.positions)

    def keep(self, slots: list[int]) -> None:
        """Keep the entries in ``slots`` (ascending), moved to the front."""
        if len(slots) == len(self.positions):
            return
        index = torch.tensor(slots, device=self.k.device)
        n = len(slots)
        self.k[:, :, :n] = self.k.index_select(2, index)
        self.v[:, :, :n] = self.v.index_select(2, index)
        self.positions = [self.positions[s] for s in slots]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class SinkCache(CachePolicy):
    """Class prefix + ``sink`` first tokens + the most recent tokens, ``budget`` tokens in all."""

    name = "sink"
    families: ClassVar[tuple[str, ...]] = ("next-scale", "next-token")

    def __init__(self, options: SinkOptions | None = None) -> None:
        self.options = options or SinkOptions()
        self.layers: list[_SinkStore] = []
        self.budget = 0
        self.protected = 0

    def begin(self, *, num_layers, batch, num_heads, head_dim, layout: SequenceLayout, device, dtype):
        prefix = layout.scales[0].numel
        self.budget = budget_tokens(self.options.budget, layout.length)
        self.protected = prefix + self.options.sink
        if self.budget < prefix + 1:
            raise UsageError(f"--cache-budget {self.options.budget:g} keeps {self.budget} tokens, fewer than the "
                             f"{prefix} class token(s) plus one (raise --cache-budget)")
        # budget + the class prefix (the prefill step; raster then adds one token a step); a larger step
        # (a next-scale scale) grows the buffer once to budget + that step
        capacity = min(layout.length, self.budget + prefix)
        self.layers = [_SinkStore(batch, num_heads, capacity, head_dim, device, dtype) for _ in range(num_layers)]

    def update(self, layer, k, v, spans):
        return self.layers[layer].append(k, v, spans)

    def end_step(self):
        for store in self.layers:
            count = len(store.positions)
            if count <= self.budget:
                continue
            protected = min(self.protected, self.budget)
            recent = self.budget - protected
            store.keep(list(range(protected)) + list(range(count - recent, count)))

    def kept_positions(self) -> list[int]:
        """Positions held after the last ``end_step`` (the same in every layer)."""
        return list(self.layers[0].positions) if self.layers else []

    def nbytes(self) -> int:
        return sum(store.nbytes() for store in self.layers)


__all__ = ["SinkCache", "SinkOptions", "budget_tokens", "positions_to_spans"]
