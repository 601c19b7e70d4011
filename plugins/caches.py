"""Built-in cache policies ``none``, ``full`` and ``window``.

``window`` has two modes: by steps (``--cache-scales n``: the last n next-scale scales, the
default) and by tokens (``--cache-budget``: the class prefix and the most recent tokens, see
:mod:`.budget_cache`; the mode raster decoding needs). Storage is real and bounded: each layer
preallocates key and value buffers ``[B, H, capacity, D]`` sized for the policy's worst step;
eviction moves kept entries to the front of the buffer.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..core.cache import CachePolicy
from ..core.errors import UsageError
from ..core.layout import SequenceLayout, Spans, merge_spans, spans_length
from ..core.records import NoOptions
from .budget_cache import BudgetOptions, NeighborhoodWindowCache, TokenWindowCache


class NoCache(CachePolicy):
    """Keep nothing. Under a trajectory that needs history the engine recomputes it each step
    (slow, but the exact oracle of every cached run)."""

    name = "none"
    stores_history = False
    families = ("next-scale", "next-token")

    def __init__(self, options: NoOptions | None = None) -> None:
        self.options = options or NoOptions()

    def begin(self, **kwargs) -> None:
        pass

    def update(self, layer, k, v, spans):
        return k, v, spans

    def nbytes(self) -> int:
        return 0


class SegmentStore:
    """One layer's preallocated keys and values ``[B, H, capacity, D]`` holding whole steps
    ("segments", oldest first, in position order): the storage of caches that keep or evict
    next-scale steps (``window --cache-scales``, the example plugin's ``sink-scales``)."""

    def __init__(self, batch, heads, capacity, head_dim, device, dtype):
        self.k = torch.empty(batch, heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.segments: list[tuple[Spans, int]] = []  # (spans, token count)
        self.merged: Spans = ()  # the union of the segments' spans, kept up to date incrementally
        self.filled = 0

    def append(self, k, v, spans):
        """Store a step's keys/values at ``spans``; returns (every kept key, value, their spans)."""
        n = k.shape[2]
        if self.filled + n > self.k.shape[2]:
            raise RuntimeError(f"cache overflow: {self.filled} + {n} > capacity {self.k.shape[2]}")
        self.k[:, :, self.filled:self.filled + n].copy_(k)
        self.v[:, :, self.filled:self.filled + n].copy_(v)
        self.record(spans, n)
        return self.k[:, :, :self.filled], self.v[:, :, :self.filled], self.merged

    def record(self, spans: Spans, count: int | None = None) -> None:
        """The bookkeeping of a step of ``count`` tokens at ``spans`` whose keys and values were
        written at the end of the filled slots (by :meth:`append`, or by a compiled step)."""
        count = spans_length(spans) if count is None else count
        self.filled += count
        self.segments.append((spans, count))
        self.merged = merge_spans((*self.merged, *spans))  # O(kept spans), not O(segments): raster appends 1 token a step

    def keep_segments(self, first: int, last: int) -> None:
        """Keep the oldest ``first`` and the newest ``last`` segments; the newest move down over the
        dropped ones (positions stay in order)."""
        count = len(self.segments)
        if count <= first + last:
            return
        head = sum(n for _, n in self.segments[:first])
        drop = sum(n for _, n in self.segments[first:count - last])
        tail = self.filled - head - drop
        if tail:  # the source and target ranges may overlap: copy through a temporary
            self.k[:, :, head:head + tail] = self.k[:, :, head + drop:self.filled].clone()
            self.v[:, :, head:head + tail] = self.v[:, :, head + drop:self.filled].clone()
        self.segments = self.segments[:first] + self.segments[count - last:]
        self.merged = merge_spans(s for sp, _ in self.segments for s in sp)
        self.filled = head + tail

    def keep_last(self, count: int) -> None:
        """Keep the newest ``count`` segments."""
        self.keep_segments(0, count)

    def nbytes(self) -> int:
        """Bytes reserved for keys and values (the whole capacity)."""
        return self.k.numel() * self.k.element_size() * 2


class WindowOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    scales: int = Field(1, ge=1, description="number of most recent scales kept for the next step (step mode)")
    budget: float | None = Field(None, gt=0, description="token mode: tokens stored per layer, a fraction of the "
                                 "sequence (<= 1) or a count; the class prefix plus the most recent tokens "
                                 "(needed under raster)")
    shape: Literal["recent", "neighborhood"] = Field("recent", description="token mode: keep the most recent tokens, or "
                                                     "(raster) those nearest the new token on the image grid")


class SegmentCache(CachePolicy):
    """Base of caches that keep or evict whole steps: one :class:`SegmentStore` a layer, sized by
    :meth:`capacity`; subclasses evict in ``end_step``."""

    layers: list[SegmentStore]

    def capacity(self, layout: SequenceLayout) -> int:
        """Tokens the largest step needs: what it keeps plus the step being computed."""
        return layout.length

    def begin(self, *, num_layers, batch, num_heads, head_dim, layout, device, dtype, guided=False):
        cap = self.capacity(layout)
        self.layers = [SegmentStore(batch, num_heads, cap, head_dim, device, dtype) for _ in range(num_layers)]

    def update(self, layer, k, v, spans):
        return self.layers[layer].append(k, v, spans)

    def nbytes(self) -> int:
        return sum(store.nbytes() for store in self.layers)


class WindowCache(SegmentCache):
    """Keep the keys/values of the last ``scales`` steps (exact under ``markov`` with
    ``order <= scales + 1``; an approximation under ``full``)."""

    name = "window"
    keep: int | None = 1

    def __init__(self, options: WindowOptions | None = None) -> None:
        self.options = options or WindowOptions()
        self.keep = self.options.scales
        self.layers: list[SegmentStore] = []

    def capacity(self, layout: SequenceLayout) -> int:
        sizes = [sc.numel for sc in layout.scales]
        if self.keep is None:
            return sum(sizes)
        n = self.keep + 1  # kept scales plus the step being computed
        return max(sum(sizes[max(0, i - n + 1):i + 1]) for i in range(len(sizes)))

    def end_step(self):
        if self.keep is not None:
            for store in self.layers:
                store.keep_last(self.keep)

    def cached_tokens(self) -> int:
        return self.layers[0].filled if self.layers else 0


def make_window(options: WindowOptions | None = None) -> CachePolicy:
    """The ``window`` factory: step mode, or token mode when ``budget`` is given."""
    options = options or WindowOptions()
    if options.budget is None:
        if options.shape != "recent":
            raise UsageError("--cache-shape neighborhood is a token window: give --cache-budget too")
        return WindowCache(options)
    if "scales" in options.model_fields_set:
        raise UsageError("--cache-scales (a window of steps) and --cache-budget (a window of tokens) exclude each "
                         "other; give one")

    if options.shape == "neighborhood":
        return NeighborhoodWindowCache(BudgetOptions(budget=options.budget))
    return TokenWindowCache(BudgetOptions(budget=options.budget))


class FullCache(WindowCache):
    """Keep every key/value (VAR's KV cache): capacity is the whole sequence. Slot ``i`` holds
    position ``i`` under a raster trajectory, so its fixed-shape decoding step writes the token at
    its position and shows the slots up to it (gpt-fast's static cache)."""

    name = "full"
    families = ("next-scale", "next-token")
    static_decoding = True
    static_scale_decoding = True

    def __init__(self, options: NoOptions | None = None) -> None:
        self.options = options or NoOptions()
        self.keep = None
        self.layers = []
        self.slots: torch.Tensor | None = None

    def begin(self, *, num_layers, batch, num_heads, head_dim, layout, device, dtype, guided=False):
        super().begin(num_layers=num_layers, batch=batch, num_heads=num_heads, head_dim=head_dim, layout=layout,
                      device=device, dtype=dtype, guided=guided)
        self.slots = torch.arange(self.capacity(layout), device=device)

    def update_static(self, layer, k, v, position):
        store = self.layers[layer]
        store.k.index_copy_(2, position, k.to(store.k.dtype))
        store.v.index_copy_(2, position, v.to(store.v.dtype))
        return store.k, store.v, (self.slots <= position)[None, None, None, :]

    def static_buffers(self):
        return [t for store in self.layers for t in (store.k, store.v)]

    def update_static_scale(self, layer, k, v, start):
        store = self.layers[layer]
        end = start + k.shape[2]
        store.k[:, :, start:end] = k
        store.v[:, :, start:end] = v
        return store.k[:, :, :end], store.v[:, :, :end]

    def static_scale_done(self, spans):
        for store in self.layers:
            store.record(spans)


__all__ = ["NoCache", "FullCache", "WindowCache", "WindowOptions", "make_window", "spans_length"]
