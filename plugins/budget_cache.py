"""Budgeted, token-level cache policies: the shared machinery of ``window`` (token mode), ``sink``,
``h2o`` and ``ssd``.

Budget. ``budget`` is the storage of one layer in tokens: a count (> 1) or a fraction (<= 1) of the
whole sequence (``layout.length``). Between steps a policy keeps ``budget - 1`` tokens, so a raster
step (one new token) attends to at most ``budget`` keys and the buffers hold exactly ``budget``
slots; a next-scale step of ``l`` tokens grows them once to ``budget - 1 + l``. The class prefix
(the layout's first scale: VAR's class token, the raster GPT's class-token prefix) is always kept,
so a budget must exceed it. With a budget of at least the sequence length nothing is evicted and
every policy equals the ``full`` cache exactly.

Rows under CFG (``begin(guided=True)``: rows ``[cond; uncond]``): row ``i`` and row ``i + B`` keep
the same positions; scoring policies rank by the sum of the two rows' scores. The guided logits
``uncond + cfg * (cond - uncond)`` then compare two predictions made from the same context.

Two kinds of policy:

- *shared* (``window``, ``sink``): every row and head keeps the same positions; ``update`` returns
  the true spans of the kept keys, so these serve any trajectory and pattern of their families.
- *headwise* (``h2o``, ``ssd``): each (row pair, head) keeps its own positions (the same count).
  ``update`` then returns the stand-in spans ``((0, n_kept), *new)``: only their count and the fact
  that every kept key precedes the new tokens are meaningful. The pipeline therefore accepts a
  headwise cache only where every kept past key is visible to every query of the step (``raster``,
  and next-scale ``full`` with ``dense`` attention); ``kept_positions()`` gives the real positions.

Scoring policies set ``track_scores``; their ``observe(layer, q, k, spec, scale, received=...)`` hook
(called by the engines after ``update`` with the step's queries, the returned keys and the spec the
backend computes) adds the attention each kept key receives: the backend's own ``received`` where it
materialised the probabilities (``sdpa``'s 16-bit CPU decoding path, ``reference``), else computed
apart from the backend in chunks of queries (at most ``SCORE_CHUNK_BYTES`` of probabilities at a
time), so any backend can run.
"""

from __future__ import annotations

from typing import ClassVar, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from ..core.attention import AttentionSpec
from ..core.cache import CachePolicy
from ..core.errors import UsageError, setting
from ..core.kv_store import BoundedKV
from ..core.layout import SequenceLayout, Spans, merge_spans

SCORE_CHUNK_BYTES = 64 * 2**20
"""Most bytes of attention probabilities a scoring policy materialises at once."""


def budget_tokens(budget: float, length: int) -> int:
    """``budget`` as a token count for a sequence of ``length`` (fractions round to the nearest token)."""
    return int(round(budget * length)) if budget <= 1 else int(budget)


def buffer_slots(buffer: int | str, layout: SequenceLayout) -> int:
    """The ``buffer`` option as a slot count: ``"row"`` is the width of the layout's last (image) grid."""
    return layout.grids[-1][1] if buffer == "row" else int(buffer)


def sum_row_pairs(values: torch.Tensor) -> torch.Tensor:
    """``[rows, ...]`` under CFG (rows ``[cond; uncond]``) -> per sample ``[rows // 2, ...]``: the
    two rows of a sample summed."""
    half = values.shape[0] // 2
    return values[:half] + values[half:]


def to_row_pairs(index: torch.Tensor) -> torch.Tensor:
    """A per-sample ``[samples, ...]`` index -> per row under CFG (both rows of a sample alike)."""
    return torch.cat([index, index])


def positions_to_spans(positions: list[int]) -> Spans:
    """Sorted distinct positions -> merged half-open spans."""
    return merge_spans((p, p + 1) for p in positions)


def slot_order_spans(positions: list[int]) -> Spans:
    """Positions in slot order -> spans in the same order (consecutive runs joined, never sorted),
    so that ``spans_to_positions`` gives each returned key's position."""
    out: list[list[int]] = []
    for p in positions:
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return tuple((b, e) for b, e in out)


class BudgetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    budget: float = Field(0.2, gt=0, description="tokens a layer stores: a fraction of the sequence (<= 1) or a "
                                                 "count (> 1); the class prefix counts against it")
    buffer: int | Literal["row"] = Field(0, description="SSD's buffer variant: new tokens gather in a buffer of this "
                                         "many slots beside the kept set and are merged into it (one eviction "
                                         "pass) once it is full, instead of one eviction per token; 'row': one row "
                                         "of the image's token grid; 0: off")

    @field_validator("buffer")
    @classmethod
    def _buffer_size(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise PydanticCustomError("buffer", "give a slot count >= 0 (0: off) or 'row'")
        return value


class BudgetedCache(CachePolicy):
    """Base of the budgeted policies: subclasses implement :meth:`select`."""

    families: ClassVar[tuple[str, ...]] = ("next-scale", "next-token")
    headwise: ClassVar[bool] = False
    track_scores: ClassVar[bool] = False

    def __init__(self, options: BudgetOptions | None = None) -> None:
        self.options = options or BudgetOptions()
        self.layers: list[BoundedKV] = []
        self.budget = self.prefix = self.rows = self.heads = self.buffer = 0
        self.guided = False
        self._positions: list[list[int]] = []  # shared policies: kept positions per layer (host side)
        self._guards: dict[int, torch.Tensor] = {}  # prefix_guard by capacity
        self.static_compacts = False  # the compiled step now compacts (static_step_begin)
        self._ranges: dict[tuple[int, ...], torch.Tensor] = {}  # slot_range by (start, stop, rows, heads)
        self._host_stale = False  # compiled steps wrote positions the host list does not hold yet

    # -- life cycle -------------------------------------------------------------------------------
    def begin(self, *, num_layers: int, batch: int, num_heads: int, head_dim: int, layout: SequenceLayout,
              device: torch.device, dtype: torch.dtype, guided: bool = False) -> None:
        self.check_layout(layout, num_layers=num_layers, num_heads=num_heads)
        self.prefix = layout.scales[0].numel
        self.budget = budget_tokens(self.options.budget, layout.length)
        self.buffer = buffer_slots(self.options.buffer, layout)
        self.rows, self.heads = batch, num_heads
        self.guided = guided and batch % 2 == 0
        capacity = min(layout.length, self.budget - 1 + max(1, self.buffer))
        self.layers = [BoundedKV(batch, num_heads, capacity, head_dim, device, dtype, track_scores=self.track_scores)
                       for _ in range(num_layers)]
        self._positions = [[] for _ in range(num_layers)]
        self._host_stale = False
        self.slots = torch.arange(capacity, device=device)
        self._guards, self._ranges = {}, {}
        if self.layers:
            self.prefix_guard(self.layers[0], capacity)
        self.prepare(num_layers=num_layers, num_heads=num_heads)

    def check_layout(self, layout: SequenceLayout, *, num_layers: int, num_heads: int,
                     weights_id: str | None = None) -> None:
        """The budget keeps more than the class prefix (and, in subclasses, what they always keep)."""
        prefix, budget = layout.scales[0].numel, budget_tokens(self.options.budget, layout.length)
        if budget < prefix + 1:
            raise UsageError(f"--cache-budget {self.options.budget:g} gives {budget} token(s), not more than the "
                             f"{prefix} class token(s) that are always kept (raise --cache-budget)")

    def prepare(self, *, num_layers: int, num_heads: int) -> None:
        """Hook after ``begin`` sized the storage (``ssd`` checks its head map here)."""

    # -- fixed-shape decoding (--compile) -----------------------------------------------------------
    @property
    def static_decoding(self) -> bool:  # type: ignore[override]
        """Policies that name their victim on the device (:meth:`static_victim`); with a ``buffer``
        their :meth:`select` runs inside the compacting step's graph too (the built-in ones select
        on the device or from the slot count alone)."""
        return type(self).static_victim is not BudgetedCache.static_victim

    def static_step_begin(self, position: int) -> None:
        """With a ``buffer``: whether the step storing ``position`` compacts (the layers are full,
        as :meth:`update` finds them) or appends; the compiled step has one graph for each."""
        self.static_compacts = bool(self.buffer) and self.buffered_compacts(position)

    def buffered_compacts(self, position: int) -> bool:
        """A buffered layer of capacity ``C = budget - 1 + buffer`` fills at positions ``0 .. C - 1``;
        the one-token steps at ``C``, ``C + buffer``, ... find it full and compact it to
        ``budget - 1`` before storing (as :meth:`update`)."""
        capacity = self.layers[0].capacity
        return position >= capacity and (position - capacity) % self.buffer == 0

    def static_victim(self, layer: int, store: BoundedKV, position: torch.Tensor) -> torch.Tensor:
        """The slot a one-token step at ``position`` overwrites in a full layer, as :meth:`victim`
        chooses it, on the device with no host read (it runs inside the compiled graph):
        ``LongTensor[1]`` (shared) or ``[rows, heads]`` (headwise)."""
        raise NotImplementedError

    def update_static(self, layer, k, v, position):
        """Slot ``p`` holds position ``p`` while the layer fills (as :meth:`update` appends); once
        full, the token is written over :meth:`static_victim` (its score restarts at 0, as in
        :meth:`~mvar_engine.core.kv_store.BoundedKV.replace`). Every filled slot is visible: each
        kept key precedes the new token and carries its position in its rotation, so slot order
        does not matter."""
        store = self.layers[layer]
        if self.buffer:
            return self._update_buffered_static(layer, store, k, v, position)
        full = position >= store.capacity
        slot = torch.where(full, self.static_victim(layer, store, position), position)
        at = (store.row_index, store.head_index, slot.expand(store.k.shape[0], store.k.shape[1]))
        store.k[at] = k[:, :, 0].to(store.k.dtype)
        store.v[at] = v[:, :, 0].to(store.v.dtype)
        store.positions[at] = position.to(store.positions.dtype)
        if store.scores is not None:
            store.scores[at] = 0.0
        valid = (self.slots <= position) | full
        return store.k, store.v, valid[None, None, None, :]

    def _update_buffered_static(self, layer: int, store: BoundedKV, k: torch.Tensor, v: torch.Tensor,
                                position: torch.Tensor):
        """:meth:`update_static` with a ``buffer``: while a layer fills, slot ``p`` holds position
        ``p``; a compacting step (:meth:`static_step_begin`) keeps the policy's :meth:`select` of
        ``budget - 1`` slots at the front (slots stay in position order) and stores the token after
        them; the steps between append after the last stored token."""
        capacity, kept = store.capacity, self.budget - 1
        if self.static_compacts:
            index = self.select(layer, store, kept)  # store.filled is the capacity (static_step_done)
            store.gather_front(torch.tensor(index, device=store.k.device) if isinstance(index, list) else index)
            slot = torch.full_like(position, kept)
        else:
            slot = torch.where(position < capacity, position, kept + (position - capacity) % self.buffer)
        store.k.index_copy_(2, slot, k.to(store.k.dtype))
        store.v.index_copy_(2, slot, v.to(store.v.dtype))
        store.positions.index_copy_(2, slot, position.to(store.positions.dtype).expand(*store.positions.shape[:2], 1))
        if store.scores is not None:
            store.scores.index_fill_(2, slot, 0.0)
        return store.k, store.v, (self.slots <= slot)[None, None, None, :]

    def observe_static(self, layer, probabilities):
        """Scoring policies: ``probabilities: float32 [rows, H, 1, capacity]`` of the compiled step
        (0 at invalid slots) add to the slots' scores, as :meth:`observe` does eagerly."""
        store = self.layers[layer]
        if store.scores is not None:
            store.scores += probabilities[:, :, 0]

    def static_buffers(self):
        return [t for store in self.layers for t in (store.k, store.v, store.positions, store.scores)
                if t is not None]

    def static_step_done(self, position: int) -> None:
        """The kept count; the host list of kept positions is read back from the device only when an
        eager step or an inspection needs it (:meth:`host_positions`), so compiled steps never sync."""
        for store in self.layers:
            if self.buffer:  # appends and compactions keep slots in position order
                capacity = store.capacity
                store.filled = position + 1 if position < capacity else self.budget + (position - capacity) % self.buffer
            else:
                store.filled = min(store.capacity, position + 1)
                store.ordered = False
        self._host_stale = True

    def host_positions(self, layer: int) -> list[int]:
        """Shared policies: the positions ``layer`` keeps, slot by slot (read back after compiled steps)."""
        if self._host_stale:
            self._positions = [store.positions[0, 0, :store.filled].tolist() for store in self.layers]
            self._host_stale = False
        return self._positions[layer]

    def oldest_static_slot(self, store: BoundedKV, protected: int | None = None) -> torch.Tensor:
        """:meth:`oldest_slot` on the device: ``LongTensor[1]``, the slot of the oldest position at
        or after ``protected`` (default: the class prefix) in a full layer."""
        protected = self.prefix if protected is None else protected
        positions = store.positions[0, 0]  # shared policies: every row and head alike
        movable = torch.where(positions >= protected, positions, torch.full_like(positions, torch.iinfo(positions.dtype).max))
        return movable.argmin().reshape(1)

    def update(self, layer, k, v, spans):
        """Evict first (lazily, right before new tokens need room), then store the step's tokens.

        A one-token step into a full layer writes the token over the policy's victim (O(1) per
        row and head; its query sees every kept key, so slot order does not matter). A larger step
        (a prefill, a next-scale scale) first compacts the layer to ``budget - 1`` kept tokens in
        position order, then appends (growing the buffers once if the step needs it). With a
        ``buffer`` of ``W`` slots a one-token step only appends while the layer holds fewer than
        ``budget - 1 + W`` tokens; the step that finds it full compacts the kept set and the
        buffer together to ``budget - 1`` (one selection every ``W`` tokens), then appends."""
        store = self.layers[layer]
        count = k.shape[2]
        kept = self.host_positions(layer)
        buffered = self.buffer > 0 and count == 1
        if buffered and store.filled < self.budget - 1 + self.buffer:
            k_all, v_all = store.append(k, v, spans)  # the buffer has room: no eviction this step
            if not self.headwise:
                kept.extend(p for b, e in spans for p in range(b, e))
        elif count == 1 and store.filled == self.budget and not buffered:
            position = spans[0][0]
            victim = self.victim(layer, store, position)
            k_all, v_all = store.replace(victim, k, v, position)
            if not self.headwise:
                kept[victim] = position
        else:
            if store.filled > self.budget - 1:
                self.compact(layer, self.budget - 1)
                kept = self._positions[layer]
            k_all, v_all = store.append(k, v, spans)
            if not self.headwise:
                kept.extend(p for b, e in spans for p in range(b, e))
        if self.headwise:  # stand-in spans: every kept key precedes the new tokens (module docstring)
            return k_all, v_all, merge_spans(((0, store.filled - count), *spans))
        return k_all, v_all, slot_order_spans(kept)

    def compact(self, layer: int, retain: int) -> None:
        """Put ``layer`` in position order and keep the policy's :meth:`select` of ``retain`` slots."""
        store = self.layers[layer]
        store.sort_by_position()
        kept = self.host_positions(layer)
        kept.sort()
        index = self.select(layer, store, retain)
        if not self.headwise:  # a list of slots keeps the host bookkeeping free of tensor reads
            slots = index if isinstance(index, list) else index.tolist()
            self._positions[layer] = [kept[i] for i in slots]
            index = torch.tensor(slots, dtype=torch.long) if isinstance(index, list) else index
        store.keep(index)

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, scale: float, *,
                received: torch.Tensor | None = None) -> None:
        """Accumulate the attention every returned key receives from the step's queries
        (``q: [rows, H, l, D]``, ``k: [rows, H, n, D]``) under ``spec``: ``received`` where the
        backend gave it, else computed here (:func:`received_attention`)."""
        if not self.track_scores:
            return
        store = self.layers[layer]
        if received is None:
            prefix = store.k.data_ptr() == k.data_ptr() and store.k.dtype == k.dtype  # k: store.k's filled slots
            received = received_attention(q, k, spec, scale, key_buffer=store.k if prefix else None)
        store.add_scores(received)

    def end_step(self) -> None:
        """Nothing: eviction happens when the next step's tokens arrive (see :meth:`update`), so a
        layer holds at most ``budget`` tokens between steps and a step attends to at most
        ``budget`` keys (``budget - 1`` kept plus the new token)."""

    def select(self, layer: int, store: BoundedKV, retain: int) -> torch.Tensor | list[int]:
        """Slots to keep from a layer in position order: ``LongTensor [retain]`` or a list of
        ``retain`` slots (shared; a list needs no read of a tensor on the host) or
        ``[rows, heads, retain]`` (headwise); the class prefix must be among them."""
        raise NotImplementedError

    def victim(self, layer: int, store: BoundedKV, position: int) -> int | torch.Tensor:
        """The slot a one-token step at ``position`` overwrites in a full layer: an int (shared) or
        ``LongTensor [rows, heads]`` (headwise); never a class-prefix slot."""
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------------------
    def window_bounds(self, store: BoundedKV, retain: int, protected: int | None = None) -> tuple[int, int]:
        """``(kept, start)`` of :meth:`window_slots`: slots ``0 .. kept - 1`` and ``start .. filled - 1``."""
        protected = min(self.prefix if protected is None else protected, retain)
        return protected, store.filled - (retain - protected)

    def window_slots(self, store: BoundedKV, retain: int, protected: int | None = None) -> list[int]:
        """The first ``protected`` slots (default: the class prefix) and the most recent rest of a
        layer in position order (``retain`` slots)."""
        kept, start = self.window_bounds(store, retain, protected)
        return [*range(kept), *range(start, store.filled)]

    def window_index(self, store: BoundedKV, retain: int, protected: int | None = None) -> torch.Tensor:
        """:meth:`window_slots` as ``LongTensor [retain]`` on the CPU."""
        return torch.tensor(self.window_slots(store, retain, protected), dtype=torch.long)

    def window_rows(self, store: BoundedKV, retain: int, rows: int) -> torch.Tensor:
        """:meth:`window_slots` for every row and head, ``LongTensor [rows, heads, retain]`` on the
        device (from :meth:`slot_range`, built once a generation)."""
        kept, start = self.window_bounds(store, retain)
        return torch.cat([self.slot_range(store, 0, kept, rows), self.slot_range(store, start, store.filled, rows)],
                         dim=-1)

    def oldest_slot(self, layer: int, protected: int | None = None) -> int:
        """Shared policies: the slot holding the oldest position at or after ``protected`` (the
        newest position when every kept one is protected: a budget within the protected tokens)."""
        protected = self.prefix if protected is None else protected
        kept = self.host_positions(layer)
        movable = [(p, i) for i, p in enumerate(kept) if p >= protected]
        return min(movable)[1] if movable else max((p, i) for i, p in enumerate(kept))[1]

    def _group_view(self, store: BoundedKV, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions, scores)`` per group ``[groups, heads, n]`` (default: the filled slots): cond
        and uncond rows of a sample share positions; their scores are summed under CFG."""
        n = store.filled if n is None else n
        whole = n == store.capacity  # no slicing: fewer calls a step
        positions = store.positions if whole else store.positions[:, :, :n]
        scores = store.scores if whole or store.scores is None else store.scores[:, :, :n]
        if self.guided:
            positions = positions[:positions.shape[0] // 2]
            scores = sum_row_pairs(scores) if scores is not None else None
        return positions, scores

    def pair_scores(self, store: BoundedKV) -> torch.Tensor:
        """``[groups, heads, filled]``: accumulated attention, cond and uncond rows summed under CFG."""
        return self._group_view(store)[1]

    def unpair(self, index: torch.Tensor) -> torch.Tensor:
        """A per-group index ``[groups, heads, ...]`` -> per row (both CFG rows of a sample alike)."""
        return to_row_pairs(index) if self.guided else index

    def prefix_guard(self, store: BoundedKV, n: int) -> torch.Tensor:
        """``float32 [n]``: ``inf`` at the class prefix's slots, 0 elsewhere; added to an eviction key
        (lowest evicted) it keeps the prefix. The prefix holds slots ``0 .. prefix - 1`` of every row
        and head: the first tokens stored, kept first by every selection (slots in position order)
        and never a victim."""
        guard = self._guards.get(store.capacity)
        if guard is None:  # built once per capacity (in begin for the usual one)
            guard = self._guards[store.capacity] = torch.zeros(store.capacity, device=store.k.device)
            guard[:self.prefix] = float("inf")
        return guard if n == store.capacity else guard[:n]

    def heavy_victim(self, store: BoundedKV, position: int | torch.Tensor, recent: int,
                     n: int | None = None) -> torch.Tensor:
        """``[rows, heads]``: the least attended slot outside the class prefix and the ``recent``
        newest positions (before ``position``) of a full layer; the oldest such slot when the window
        covers all. ``n``: the slots considered (default: the filled ones; a compiled step passes
        the capacity)."""
        positions, scores = self._group_view(store, n)
        n = positions.shape[-1]
        if recent < n - self.prefix:
            # the n - prefix movable positions are distinct and before ``position``: at most
            # ``recent`` of them are in the window, so a candidate always exists
            key = scores.masked_fill(positions >= position - recent, float("inf")) + self.prefix_guard(store, n)
            return self.unpair(key.argmin(dim=-1))
        candidates = (positions >= self.prefix) & (positions < position - recent)
        by_score = scores.masked_fill(~candidates, float("inf")).argmin(dim=-1)
        oldest = (positions + self.prefix_guard(store, n)).argmin(dim=-1)
        return self.unpair(torch.where(candidates.any(dim=-1), by_score, oldest))

    def oldest_victim(self, store: BoundedKV, n: int | None = None) -> torch.Tensor:
        """``[rows, heads]``: the slot of the oldest position outside the class prefix (``n``: as
        :meth:`heavy_victim`)."""
        positions, _ = self._group_view(store, n)
        return self.unpair((positions + self.prefix_guard(store, positions.shape[-1])).argmin(dim=-1))

    def heavy_or_oldest_victim(self, store: BoundedKV, heavy_heads: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """``[rows, heads]``: per head, :meth:`heavy_victim` with ``recent = 0`` where ``heavy_heads``
        (``BoolTensor[1, heads, 1]``) is True, else :meth:`oldest_victim`, as one selection (every
        kept position precedes the new token, so with no window every movable slot is a candidate)."""
        positions, scores = self._group_view(store, n)
        key = torch.where(heavy_heads, scores, positions) + self.prefix_guard(store, positions.shape[-1])
        return self.unpair(key.argmin(dim=-1))

    def heavy_index(self, store: BoundedKV, retain: int, recent: int) -> torch.Tensor:
        """``[rows, heads, retain]`` of a layer in position order: the class prefix, the ``recent``
        newest slots and the top ``retain - prefix - recent`` of the rest by accumulated attention."""
        n, protected = store.filled, min(self.prefix, retain)
        recent = min(recent, retain - protected)
        heavy = retain - protected - recent
        scores = self.pair_scores(store)
        groups, heads = scores.shape[:2]
        parts = [self.slot_range(store, 0, protected, groups)]
        if heavy:
            middle = scores[:, :, protected:n - recent]
            top = torch.topk(middle, heavy, dim=-1, sorted=False).indices + protected
            parts.append(top.sort(dim=-1).values)
        if recent:
            parts.append(self.slot_range(store, n - recent, n, groups))
        return self.unpair(torch.cat(parts, dim=-1))

    def slot_range(self, store: BoundedKV, start: int, stop: int, rows: int) -> torch.Tensor:
        """``LongTensor[rows, heads, stop - start]``: slots ``start .. stop - 1`` for every row and
        head (built once a generation: a buffered compaction asks for the same ranges each time)."""
        if torch.compiler.is_compiling():  # a constant of the graph: no Python state to guard on
            return torch.arange(start, stop, device=store.k.device).expand(rows, store.k.shape[1], -1)
        key = (start, stop, rows, store.k.shape[1])
        found = self._ranges.get(key)
        if found is None:
            found = self._ranges[key] = torch.arange(start, stop, device=store.k.device).expand(rows, store.k.shape[1], -1)
        return found

    # -- inspection -------------------------------------------------------------------------------
    def kept_positions(self, layer: int = 0) -> torch.Tensor:
        """``LongTensor [rows, heads, n]``: the positions ``layer`` holds now."""
        return self.layers[layer].kept_positions()

    def kv_bytes(self) -> int:
        """Bytes of key/value buffers (what the ``full`` cache's ``nbytes`` counts)."""
        return sum(store.kv_bytes() for store in self.layers)

    def nbytes(self) -> int:
        """Key/value buffers plus their bookkeeping (positions, scores)."""
        return sum(store.nbytes() for store in self.layers)


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, scale: float, *,
                            key_buffer: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, probs)`` over chunks of queries: ``probs: float32 [B, H, c, n]`` is the softmax
    attention of queries ``start .. start + c - 1`` (``q: [B, H, l, D]``) over the ``n`` keys
    (``k: [B, H, n, D]``) under ``spec``, at most :data:`SCORE_CHUNK_BYTES` at a time.

    16-bit keys: the product runs in their dtype and the logits are converted to float32 before the
    scale, mask and softmax (transformers' eager attention); converting the keys instead cost a
    third of a bf16 ``ssd`` step on the CPU (LlamaGen-B, batch 32). ``key_buffer``: the contiguous
    ``[B, H, capacity, D]`` storage whose first ``n`` slots are ``k`` (a cache's buffer while it
    fills); 16-bit products then run over all of it and the logits are cut to ``n``. Strided bf16
    operands lose the CPU's fast kernel, and a new shape every step makes oneDNN build (and keep) a
    kernel per shape: about 60 MB of a bf16 ``ssd`` process's peak at LlamaGen-B batch 12."""
    b, h, l, _ = q.shape
    n = k.shape[2]
    mask = spec.mask(l, n, q.device)
    chunk = max(1, SCORE_CHUNK_BYTES // max(1, b * h * n * 4))
    half = k.dtype in (torch.float16, torch.bfloat16)
    if not half:
        kf = k.float()
    else:
        kf = key_buffer if key_buffer is not None and not k.is_contiguous() else k
    for start in range(0, l, chunk):
        queries = q[:, :, start:start + chunk]
        if half:
            logits = torch.matmul(queries.to(k.dtype), kf.transpose(-1, -2))[..., :n].float() * scale
        else:
            # keys times queries, then transposed: with one query (a raster step) this is a batched
            # matrix-vector product, faster on the CPU than the 1-row matrix product q k^T
            logits = torch.matmul(kf, queries.float().transpose(-1, -2)).transpose(-1, -2) * scale
        if mask is not None:
            logits = logits.masked_fill(~mask[start:start + chunk], float("-inf"))
        yield start, torch.softmax(logits, dim=-1)


def received_attention(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, scale: float, *,
                       key_buffer: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, H, n]``: the softmax attention mass each of the ``n`` keys receives, summed over the
    ``l`` queries (``q: [B, H, l, D]``, ``k: [B, H, n, D]``, float32), chunked as
    :func:`attention_probabilities` (and ``key_buffer`` as there)."""
    if q.shape[2] == 1 and q.dtype == k.dtype == torch.float32 and spec.mask(1, k.shape[2], q.device) is None:
        # one query seeing every key (a raster step): the logits as a product summed over D, no
        # batched matrix product and its reshapes (4 calls instead of 16 a layer)
        return torch.softmax((k * q).sum(dim=-1) * scale, dim=-1)
    total = torch.zeros(q.shape[0], q.shape[1], k.shape[2], device=q.device, dtype=torch.float32)
    for _, probs in attention_probabilities(q, k, spec, scale, key_buffer=key_buffer):
        total += probs.sum(dim=2)
    return total


class TokenWindowCache(BudgetedCache):
    """``window`` with a token budget: the class prefix and the most recent tokens (SSD's
    locality heads; StreamingLLM without sinks)."""

    name = "window"

    def select(self, layer, store, retain):
        return self.window_slots(store, retain)

    def victim(self, layer, store, position):
        return self.oldest_slot(layer)

    def static_victim(self, layer, store, position):
        return self.oldest_static_slot(store)


class NeighborhoodWindowCache(BudgetedCache):
    """``window --cache-shape neighborhood`` (raster): the class prefix and the kept tokens nearest
    on the image grid to the token being generated (Chebyshev distance between grid cells: the row
    above around its column and the tokens to its left before older ones), rather than the last
    ``budget`` tokens. A full layer evicts the farthest token (the oldest of equals); once gone, a
    token does not come back, so later queries lose the row above's far right first."""

    name = "window"
    families = ("next-token",)

    def __init__(self, options: BudgetOptions | None = None) -> None:
        super().__init__(options)
        self.width = 1

    def check_layout(self, layout, *, num_layers, num_heads, weights_id=None):
        """Beside the budget: a raster layout (the class prefix, then one image grid)."""
        super().check_layout(layout, num_layers=num_layers, num_heads=num_heads)
        if layout.num_scales != 2:
            raise UsageError(f"{setting('cache_shape', 'neighborhood')} keeps a 2-D neighbourhood of one image grid; "
                             f"this layout has {layout.num_scales} scales (use it with --trajectory raster)")

    def begin(self, *, num_layers, batch, num_heads, head_dim, layout, device, dtype, guided=False):
        super().begin(num_layers=num_layers, batch=batch, num_heads=num_heads, head_dim=head_dim, layout=layout,
                      device=device, dtype=dtype, guided=guided)
        self.width = layout.grids[-1][1]

    def grid_distance(self, a: int, b: int) -> int:
        """Chebyshev distance between the grid cells of image positions ``a`` and ``b``."""
        (ra, ca), (rb, cb) = divmod(a - self.prefix, self.width), divmod(b - self.prefix, self.width)
        return max(abs(ra - rb), abs(ca - cb))

    def select(self, layer, store, retain):
        kept = self.host_positions(layer)
        following = max(kept) + 1
        image = sorted((slot for slot, p in enumerate(kept) if p >= self.prefix),
                       key=lambda slot: (self.grid_distance(kept[slot], following), -kept[slot]))
        chosen = [slot for slot, p in enumerate(kept) if p < self.prefix] + image
        return sorted(chosen[:retain], key=lambda slot: kept[slot])

    def victim(self, layer, store, position):
        kept = self.host_positions(layer)
        movable = [(self.grid_distance(p, position), -p, slot) for slot, p in enumerate(kept) if p >= self.prefix]
        return max(movable)[2]

    def static_victim(self, layer, store, position):
        """:meth:`victim` on the device (``position: LongTensor[1]``): no host read."""
        i, j = store.positions[0, 0].long() - self.prefix, position.reshape(()).long() - self.prefix
        rows = (i.div(self.width, rounding_mode="floor") - j.div(self.width, rounding_mode="floor")).abs()
        key = torch.maximum(rows, (i % self.width - j % self.width).abs()) * (1 << 32) - i
        return torch.where(i >= 0, key, torch.full_like(key, -(1 << 62))).argmax().reshape(1)


__all__ = ["BudgetOptions", "BudgetedCache", "NeighborhoodWindowCache", "SCORE_CHUNK_BYTES", "TokenWindowCache", "budget_tokens", "sum_row_pairs", "to_row_pairs",
           "attention_probabilities", "positions_to_spans", "received_attention"]
