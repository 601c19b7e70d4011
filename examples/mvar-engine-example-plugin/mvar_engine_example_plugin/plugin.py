"""An mvar-engine plugin with two components, written only against mvar-engine's public API.

- ``sink-scales`` (cache policy): keep the keys/values of the first ``sink`` scales for the whole
  generation plus those of the last ``recent`` scales -- StreamingLLM's "attention sinks" idea at
  scale granularity.
- ``axial`` (attention pattern): from scale ``apply_from`` on, a query sees only the keys in the
  same row or the same column as its corresponding position on each visible scale (criss-cross).

mvar-engine finds this module through the entry point in ``pyproject.toml``::

    [project.entry-points.mvar_engine]
    example = "mvar_engine_example_plugin.plugin"

and calls the ``@hookimpl`` functions at the bottom, which return one record per component: its
name, the factory that builds it (called with the validated options model) and the options model.
"""

from __future__ import annotations

import functools

import torch
from pydantic import BaseModel, ConfigDict, Field

from mvar_engine import AttentionPatternRecord, CachePolicyRecord, hookimpl
from mvar_engine.core.attention import AttentionPattern, Dense, Masked
from mvar_engine.core.cache import CachePolicy
from mvar_engine.core.layout import SequenceLayout, merge_spans, spans_to_positions

# ---------------------------------------------------------------------------------- sink-scales


class SinkScalesOptions(BaseModel):
    # extra="forbid": a misspelt option is an error; frozen: options are hashable values.
    model_config = ConfigDict(extra="forbid", frozen=True)

    sink: int = Field(1, ge=0, description="first scales kept for the whole generation (the sinks)")
    recent: int = Field(1, ge=1, description="most recent scales kept besides the sinks")


def kept_scales(step: int, sink: int, recent: int) -> list[int]:
    """Earlier scales whose keys/values the step generating scale ``step`` sees from the cache."""
    return [j for j in range(step) if j < sink or j >= step - recent]


class _LayerStore:
    """One layer's preallocated keys/values ``[B, H, capacity, D]`` and the scales they hold."""

    def __init__(self, batch, heads, capacity, head_dim, device, dtype):
        self.k = torch.empty(batch, heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.segments: list[tuple[tuple[tuple[int, int], ...], int]] = []  # (spans, tokens), one per scale
        self.filled = 0


class SinkScalesCache(CachePolicy):
    """Keeps scales ``0 .. sink-1`` and the last ``recent`` scales; one step stores one scale.

    The buffer holds, in position order: the sink scales (never moved), the recent scales, then the
    scale being generated. Evicting (``end_step``) drops the scales between the sinks and the
    recent ones by moving the recent ones down; the buffer is sized for the largest step.
    """

    name = "sink-scales"

    def __init__(self, options: SinkScalesOptions | None = None) -> None:
        self.options = options or SinkScalesOptions()
        self.layers: list[_LayerStore] = []

    def capacity(self, layout: SequenceLayout) -> int:
        """Tokens of the largest step: its kept scales plus the scale being generated."""
        sizes = [scale.numel for scale in layout.scales]
        sink, recent = self.options.sink, self.options.recent
        return max(sum(sizes[j] for j in kept_scales(i, sink, recent)) + sizes[i] for i in range(len(sizes)))

    def begin(self, *, num_layers, batch, num_heads, head_dim, layout, device, dtype, guided=False):
        capacity = self.capacity(layout)
        self.layers = [_LayerStore(batch, num_heads, capacity, head_dim, device, dtype) for _ in range(num_layers)]

    def update(self, layer, k, v, spans):
        store = self.layers[layer]
        n = k.shape[2]
        if store.filled + n > store.k.shape[2]:
            raise RuntimeError(f"sink-scales cache overflow: {store.filled} + {n} > capacity {store.k.shape[2]}")
        store.k[:, :, store.filled:store.filled + n].copy_(k)
        store.v[:, :, store.filled:store.filled + n].copy_(v)
        store.filled += n
        store.segments.append((spans, n))
        kept_spans = merge_spans(span for segment, _ in store.segments for span in segment)
        return store.k[:, :, :store.filled], store.v[:, :, :store.filled], kept_spans

    def end_step(self):
        sink, recent = self.options.sink, self.options.recent
        for store in self.layers:
            count = len(store.segments)
            if count <= sink + recent:
                continue  # nothing between the sinks and the recent scales yet
            head = sum(n for _, n in store.segments[:sink])           # sink tokens stay where they are
            drop = sum(n for _, n in store.segments[sink:count - recent])
            tail = store.filled - head - drop                          # the recent scales' tokens
            # the source and target ranges may overlap: copy through a temporary
            store.k[:, :, head:head + tail] = store.k[:, :, head + drop:store.filled].clone()
            store.v[:, :, head:head + tail] = store.v[:, :, head + drop:store.filled].clone()
            store.segments = store.segments[:sink] + store.segments[count - recent:]
            store.filled = head + tail

    def nbytes(self) -> int:
        # reserved buffers count in full (the CachePolicy contract)
        return sum(store.k.numel() * store.k.element_size() + store.v.numel() * store.v.element_size()
                   for store in self.layers)


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
        start = self.options.apply_from
        return max(0, layout.num_scales + start) if start < 0 else start

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


# ------------------------------------------------------------------------------------ the hooks


@hookimpl
def mvar_engine_cache_policies():
    return [
        CachePolicyRecord(name="sink-scales", factory=SinkScalesCache, options=SinkScalesOptions,
                          description="keep the first `sink` and the last `recent` scales (attention sinks per scale)"),
    ]


@hookimpl
def mvar_engine_attention_patterns():
    return [
        AttentionPatternRecord(name="axial", factory=AxialPattern, options=AxialOptions,
                               description="same row or column of the corresponding position on each visible scale"),
    ]
