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

Scoring policies set ``track_scores``; their ``observe(layer, q, k, spec, scale)`` hook (called by
the engines after ``update`` with the step's queries, the returned keys and the spec the backend
computes) adds the attention each kept key receives, computed apart from the backend in chunks of
queries (at most ``SCORE_CHUNK_BYTES`` of probabilities at a time), so any backend can run.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..core.attention import AttentionSpec
from ..core.cache import CachePolicy
from ..core.errors import UsageError
from ..core.kv_store import BoundedKV
from ..core.layout import SequenceLayout, Spans, merge_spans

SCORE_CHUNK_BYTES = 64 * 2**20
"""Most bytes of attention probabilities a scoring policy materialises at once."""


def budget_tokens(budget: float, length: int) -> int:
    """``budget`` as a token count for a sequence of ``length`` (fractions round to the nearest token)."""
    return int(round(budget * length)) if budget <= 1 else int(budget)


def positions_to_spans(positions: list[int]) -> Spans:
    """Sorted distinct positions -> merged half-open spans."""
    return merge_spans((p, p + 1) for p in positions)


class BudgetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: float = Field(0.2, gt=0, description="tokens a layer stores: a fraction of the sequence (<= 1) or a "
                                                 "count (> 1); the class prefix counts against it")


class BudgetedCache(CachePolicy):
    """Base of the budgeted policies: subclasses implement :meth:`select`."""

    families: ClassVar[tuple[str, ...]] = ("next-scale", "next-token")
    headwise: ClassVar[bool] = False
    track_scores: ClassVar[bool] = False

    def __init__(self, options: BudgetOptions | None = None) -> None:
        self.options = options or BudgetOptions()
        self.layers: list[BoundedKV] = []
        self.budget = self.prefix = self.rows = self.heads = 0
        self.guided = False
        self._positions: list[list[int]] = []  # shared policies: kept positions per layer (host side)

    # -- life cycle -------------------------------------------------------------------------------
    def begin(self, *, num_layers: int, batch: int, num_heads: int, head_dim: int, layout: SequenceLayout,
              device: torch.device, dtype: torch.dtype, guided: bool = False) -> None:
        self.prefix = layout.scales[0].numel
        self.budget = budget_tokens(self.options.budget, layout.length)
        if self.budget < self.prefix + 1:
            raise UsageError(f"--cache-budget {self.options.budget:g} gives {self.budget} token(s), not more than the "
                             f"{self.prefix} class token(s) that are always kept (raise --cache-budget)")
        self.rows, self.heads = batch, num_heads
        self.guided = guided and batch % 2 == 0
        capacity = min(layout.length, self.budget)
        self.layers = [BoundedKV(batch, num_heads, capacity, head_dim, device, dtype, track_scores=self.track_scores)
                       for _ in range(num_layers)]
        self._positions = [[] for _ in range(num_layers)]
        self.prepare(num_layers=num_layers, num_heads=num_heads)

    def prepare(self, *, num_layers: int, num_heads: int) -> None:
        """Hook after ``begin`` sized the storage (``ssd`` checks its head map here)."""

    def update(self, layer, k, v, spans):
        store = self.layers[layer]
        held = store.filled
        k_all, v_all = store.append(k, v, spans)
        if self.headwise:
            return k_all, v_all, merge_spans(((0, held), *spans))
        kept = self._positions[layer]
        kept.extend(p for b, e in spans for p in range(b, e))
        return k_all, v_all, positions_to_spans(kept)

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, scale: float) -> None:
        """Accumulate the attention every returned key receives from the step's queries
        (``q: [rows, H, l, D]``, ``k: [rows, H, n, D]``) under ``spec``."""
        if not self.track_scores:
            return
        self.layers[layer].add_scores(received_attention(q, k, spec, scale))

    def end_step(self) -> None:
        retain = self.budget - 1
        for layer, store in enumerate(self.layers):
            if store.filled <= retain:
                continue
            index = self.select(layer, store, retain)
            store.keep(index)
            if not self.headwise:
                kept = self._positions[layer]
                self._positions[layer] = [kept[i] for i in index.tolist()]

    def select(self, layer: int, store: BoundedKV, retain: int) -> torch.Tensor:
        """Slots to keep, ascending: ``LongTensor [retain]`` (shared) or ``[rows, heads, retain]``
        (headwise); the first ``self.prefix`` slots (the class prefix) must be among them."""
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------------------
    def window_index(self, store: BoundedKV, retain: int, protected: int | None = None) -> torch.Tensor:
        """The first ``protected`` slots (default: the class prefix) and the most recent rest
        (``LongTensor [retain]`` on the CPU: shared policies keep their host-side positions in step
        without a device synchronisation)."""
        protected = min(self.prefix if protected is None else protected, retain)
        n = store.filled
        return torch.tensor([*range(protected), *range(n - (retain - protected), n)], dtype=torch.long)

    def pair_scores(self, store: BoundedKV) -> torch.Tensor:
        """``[groups, heads, filled]``: accumulated attention, cond and uncond rows summed under CFG."""
        scores = store.scores[:, :, :store.filled]
        if self.guided:
            half = scores.shape[0] // 2
            scores = scores[:half] + scores[half:]
        return scores

    def unpair(self, index: torch.Tensor) -> torch.Tensor:
        """A per-group index ``[groups, heads, n]`` -> per row (both CFG rows of a sample alike)."""
        return torch.cat([index, index]) if self.guided else index

    def heavy_index(self, store: BoundedKV, retain: int, recent: int) -> torch.Tensor:
        """``[rows, heads, retain]``: the class prefix, the ``recent`` newest slots and the top
        ``retain - prefix - recent`` of the rest by accumulated attention (ties: the older slot)."""
        n, protected = store.filled, min(self.prefix, retain)
        recent = min(recent, retain - protected)
        heavy = retain - protected - recent
        scores = self.pair_scores(store)
        groups, heads = scores.shape[:2]
        device = scores.device
        parts = [torch.arange(protected, device=device).expand(groups, heads, -1)]
        if heavy:
            middle = scores[:, :, protected:n - recent]
            top = torch.topk(middle, heavy, dim=-1, sorted=False).indices + protected
            parts.append(top.sort(dim=-1).values)
        if recent:
            parts.append(torch.arange(n - recent, n, device=device).expand(groups, heads, -1))
        return self.unpair(torch.cat(parts, dim=-1))

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


def received_attention(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, scale: float) -> torch.Tensor:
    """``[B, H, n]``: the softmax attention mass each of the ``n`` keys receives, summed over the
    ``l`` queries (``q: [B, H, l, D]``, ``k: [B, H, n, D]``, float32), at most
    :data:`SCORE_CHUNK_BYTES` of probabilities at a time."""
    b, h, l, _ = q.shape
    n = k.shape[2]
    mask = spec.mask(l, n, q.device)
    chunk = max(1, SCORE_CHUNK_BYTES // max(1, b * h * n * 4))
    kf = k.float()
    total = torch.zeros(b, h, n, device=q.device, dtype=torch.float32)
    for start in range(0, l, chunk):
        logits = torch.matmul(q[:, :, start:start + chunk].float(), kf.transpose(-1, -2)) * scale
        if mask is not None:
            logits = logits.masked_fill(~mask[start:start + chunk], float("-inf"))
        total += torch.softmax(logits, dim=-1).sum(dim=2)
    return total


class TokenWindowOptions(BudgetOptions):
    pass


class TokenWindowCache(BudgetedCache):
    """``window`` with a token budget: the class prefix and the most recent tokens (SSD's
    locality heads; StreamingLLM without sinks)."""

    name = "window"

    def select(self, layer, store, retain):
        return self.window_index(store, retain)


__all__ = ["BudgetOptions", "BudgetedCache", "SCORE_CHUNK_BYTES", "TokenWindowCache", "budget_tokens",
           "positions_to_spans", "received_attention"]
