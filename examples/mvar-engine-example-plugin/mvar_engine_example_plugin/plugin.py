"""An mvar-engine plugin with four components, written only against mvar-engine's public API.

- ``sink-scales`` (cache policy): keep the keys/values of the first ``sink`` scales for the whole
  generation plus those of the last ``recent`` scales -- StreamingLLM's "attention sinks" idea at
  scale granularity.
- ``axial`` (attention pattern): from scale ``apply_from`` on, a query sees only the keys in the
  same row or the same column as its corresponding position on each visible scale (criss-cross).
- ``first-row`` (raster cache policy, on the public ``BudgetedCache`` base): within ``budget``
  tokens, keep the class prefix, the first image row and the most recent tokens.
- ``causal-local`` (raster attention pattern): each image token sees the class prefix and the
  earlier image tokens of the ``kernel_size`` x ``kernel_size`` window centred on it.

mvar-engine finds this module through the entry point in ``pyproject.toml``::

    [project.entry-points.mvar_engine]
    example = "mvar_engine_example_plugin.plugin"

and calls the ``@hookimpl`` functions at the bottom, which return one record per component: its
name, the factory that builds it (called with the validated options model) and the options model.
"""

from __future__ import annotations

import functools

import torch
from mvar_engine import (AttentionPatternRecord, BudgetedCache, BudgetOptions, CachePolicyRecord, Causal, SegmentCache,
                         SegmentStore, hookimpl, visible_positions)
from mvar_engine.core.attention import AttentionPattern, Dense, Masked
from mvar_engine.core.layout import SequenceLayout, spans_to_positions
from pydantic import BaseModel, ConfigDict, Field

# ---------------------------------------------------------------------------------- sink-scales


class SinkScalesOptions(BaseModel):
    # extra="forbid": a misspelt option is an error; frozen: options are hashable values.
    model_config = ConfigDict(extra="forbid", frozen=True)

    sink: int = Field(1, ge=0, description="first scales kept for the whole generation (the sinks)")
    recent: int = Field(1, ge=1, description="most recent scales kept besides the sinks")


def kept_scales(step: int, sink: int, recent: int) -> list[int]:
    """Earlier scales whose keys/values the step generating scale ``step`` sees from the cache."""
    return [j for j in range(step) if j < sink or j >= step - recent]


class SinkScalesCache(SegmentCache):
    """Keeps scales ``0 .. sink-1`` and the last ``recent`` scales; one step stores one scale.

    On the public :class:`mvar_engine.SegmentCache` base (a :class:`mvar_engine.SegmentStore` per layer, a
    segment per step): in
    position order the sink scales (never moved), the recent scales, then the scale being generated.
    Evicting (``end_step``) drops the scales between the sinks and the recent ones; the buffer is
    sized for the largest step.
    """

    name = "sink-scales"

    def __init__(self, options: SinkScalesOptions | None = None) -> None:
        self.options = options or SinkScalesOptions()
        self.layers: list[SegmentStore] = []

    def capacity(self, layout: SequenceLayout) -> int:
        """Tokens of the largest step: its kept scales plus the scale being generated."""
        sizes = [scale.numel for scale in layout.scales]
        sink, recent = self.options.sink, self.options.recent
        return max(sum(sizes[j] for j in kept_scales(i, sink, recent)) + sizes[i] for i in range(len(sizes)))

    def end_step(self):
        for store in self.layers:
            store.keep_segments(self.options.sink, self.options.recent)


# ---------------------------------------------------------------------------------------- axial


class AxialOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    apply_from: int = Field(-2, description="first scale index that uses the criss-cross pattern; negative "
                            "counts from the end (earlier scales are dense)")


class AxialPattern(AttentionPattern):
    """Criss-cross attention: on scales from ``apply_from`` on, a query at row ``r``, column ``c``
    sees the keys of each visible scale lying in row ``r'`` or column ``c'``, where ``(r', c')`` is
    its corresponding position on that scale's map. Never more than the trajectory makes visible."""

    name = "axial"

    def __init__(self, options: AxialOptions | None = None) -> None:
        self.options = options or AxialOptions()

    def first_scale(self, layout: SequenceLayout) -> int:
        return layout.resolve_scale(self.options.apply_from)

    @functools.lru_cache(maxsize=256)  # spec() is pure and its arguments are hashable
    def spec(self, layout, queries, keys, visible):
        coords = layout.coords()
        q = coords.take(spans_to_positions(queries))
        k = coords.take(spans_to_positions(keys))
        allowed = visible(q.scale[:, None], k.scale[None, :])  # the trajectory's rule comes first
        # corresponding position of the query on the key's map: floor((i + 0.5) * n_key / n_query)
        row = torch.div((2 * q.row[:, None] + 1) * k.height[None, :], 2 * q.height[:, None], rounding_mode="floor")
        col = torch.div((2 * q.col[:, None] + 1) * k.width[None, :], 2 * q.width[:, None], rounding_mode="floor")
        criss_cross = (k.row[None, :] == row) | (k.col[None, :] == col)
        restricted = (q.scale >= self.first_scale(layout))[:, None]
        allowed = allowed & (~restricted | criss_cross)
        return Dense() if bool(allowed.all()) else Masked(allowed, "axial")


# ------------------------------------------------------------------------------------ first-row


class FirstRowCache(BudgetedCache):
    """Raster decoding within ``budget`` tokens a layer: the class prefix and the first image row
    are never evicted (a global context, like attention sinks), the rest is the most recent tokens.
    The base class does the storage (``BoundedKV``), the eviction points and the budget check; a
    policy only says which slots survive (``select``) and which one a new token overwrites
    (``victim``). Every head keeps the same positions, so any raster pattern may run over it."""

    name = "first-row"
    families = ("next-token",)  # one image row only means something in raster order

    def begin(self, *, layout, **kwargs):
        self.row = layout.grids[-1][1]  # the image grid's width
        super().begin(layout=layout, **kwargs)

    def select(self, layer, store, retain):
        return self.window_slots(store, retain, protected=self.prefix + self.row)

    def victim(self, layer, store, position):
        return self.oldest_slot(layer, protected=self.prefix + self.row)


# ---------------------------------------------------------------------------------- causal-local


class CausalLocalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel_size: int = Field(3, ge=1, description="window side k: a token sees earlier tokens within k // 2 rows and "
                                                  "columns of itself")


class CausalLocalPattern(AttentionPattern):
    """A causal ``k x k`` neighbourhood on the raster image grid: the image token at ``(r, c)``
    sees the class prefix and the earlier image tokens ``(r', c')`` with ``|r - r'| <= k // 2`` and
    ``|c - c'| <= k // 2``; prefix queries see the prefix causally. ``Causal`` when that is every
    earlier key, ``Dense`` when it is every key, else ``Masked(..., "causal-local")``."""

    name = "causal-local"
    families = ("next-token",)

    def __init__(self, options: CausalLocalOptions | None = None) -> None:
        self.options = options or CausalLocalOptions()

    @functools.lru_cache(maxsize=256)
    def spec(self, layout, queries, keys, visible):
        allowed = visible_positions(layout, queries, keys, visible)  # raster: keys at or before the query
        coords, half = layout.coords(), self.options.kernel_size // 2
        q = coords.take(spans_to_positions(queries))
        k = coords.take(spans_to_positions(keys))
        image = (q.scale > 0)[:, None] & (k.scale > 0)[None, :]  # scale 0 is the class prefix
        near = ((q.row[:, None] - k.row[None, :]).abs() <= half) & ((q.col[:, None] - k.col[None, :]).abs() <= half)
        allowed = allowed & (~image | near)
        q_len, k_len = allowed.shape
        if len(queries) == 1 and keys[-1][1] == queries[0][1] and keys[-1][0] <= queries[0][0]:
            causal = Causal().mask(q_len, k_len, allowed.device)
            if bool(allowed.all()) if causal is None else torch.equal(causal, allowed):
                return Causal()
        return Dense() if bool(allowed.all()) else Masked(allowed, "causal-local")


# ------------------------------------------------------------------------------------ the hooks


@hookimpl
def mvar_engine_cache_policies():
    return [
        CachePolicyRecord(name="sink-scales", factory=SinkScalesCache, options=SinkScalesOptions,
                          description="keep the first `sink` and the last `recent` scales (attention sinks per scale)"),
        CachePolicyRecord(name="first-row", factory=FirstRowCache, options=BudgetOptions,
                          description="raster: the class prefix, the first image row and the most recent tokens"),
    ]


@hookimpl
def mvar_engine_attention_patterns():
    return [
        AttentionPatternRecord(name="axial", factory=AxialPattern, options=AxialOptions,
                               description="same row or column of the corresponding position on each visible scale"),
        AttentionPatternRecord(name="causal-local", factory=CausalLocalPattern, options=CausalLocalOptions,
                               description="raster: the class prefix and the earlier tokens of a k x k window"),
    ]
