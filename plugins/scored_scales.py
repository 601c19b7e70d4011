"""A base for next-scale cache policies that rank tokens, on the model of kvpress' ``ScorerPress``: a
policy is one :meth:`ScoredScalesCache.score` method.

After each scale (``end_step``) every layer keeps the class prefix (the first scale), the scale just
computed, whole, and the ``share`` of its other kept tokens that :meth:`~ScoredScalesCache.score`
ranks highest (ScaleKV-like: the newest scale attends to the most useful earlier tokens). Each
(sample, head) chooses its own tokens, so the policy declares ``stand_in_spans``: it serves the
``full`` trajectory with the ``dense`` pattern. Under CFG the cond and uncond rows of a sample keep
the same tokens, ranked by the sum of their two scores. Storage is one
:class:`~mvar_engine.core.kv_store.BoundedKV` per layer sized for the largest step.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..core.attention import AttentionSpec
from ..core.cache import CachePolicy
from ..core.kv_store import BoundedKV
from ..core.layout import SequenceLayout, Spans, merge_spans
from .budget_cache import received_attention, sum_row_pairs, to_row_pairs


class ScoredScalesOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    share: float = Field(0.25, ge=0, le=1, description="share of the earlier scales' kept tokens (after the class "
                                                       "prefix) that stays after each scale, by score (1: all)")


def slot_range(like: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Slots ``start .. stop - 1`` for every (group, head) of ``like: [groups, heads, n]``."""
    return torch.arange(start, stop, device=like.device).expand(*like.shape[:2], -1)


class ScoredScalesCache(CachePolicy):
    """Keep the class prefix, the newest scale and the top ``share`` of the rest by :meth:`score`."""

    families: ClassVar[tuple[str, ...]] = ("next-scale",)
    stand_in_spans: ClassVar[bool] = True
    track_scores: ClassVar[bool] = True

    def __init__(self, options: ScoredScalesOptions | None = None) -> None:
        self.options = options or ScoredScalesOptions()
        self.layers: list[BoundedKV] = []
        self.received: list[torch.Tensor | None] = []
        self.prefix = self.last = 0
        self.guided = False

    def score(self, layer: int, store: BoundedKV, received: torch.Tensor) -> torch.Tensor:
        """``float [groups, heads, filled]``, higher kept, for the ``filled`` slots of ``layer``
        (``store.positions`` says which tokens; ``store.scores`` holds the attention each received
        over every step). ``received``: the attention each received from the scale just computed,
        summed over its queries. Groups are samples: under CFG both rows' values are summed."""
        raise NotImplementedError

    def kept_after(self, kept: int, new: int) -> int:
        """Tokens a layer keeps after a scale of ``new`` tokens arrives when it held ``kept``."""
        return self.prefix + new + math.ceil(self.options.share * max(0, kept - self.prefix))

    def begin(self, *, num_layers: int, batch: int, num_heads: int, head_dim: int, layout: SequenceLayout,
              device: torch.device, dtype: torch.dtype, guided: bool = False) -> None:
        sizes = [scale.numel for scale in layout.scales]
        self.prefix, kept, capacity = sizes[0], sizes[0], sizes[0]
        for new in sizes[1:]:
            capacity, kept = max(capacity, kept + new), self.kept_after(kept, new)
        self.guided = guided and batch % 2 == 0
        self.layers = [BoundedKV(batch, num_heads, capacity, head_dim, device, dtype, track_scores=True)
                       for _ in range(num_layers)]
        self.received = [None] * num_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, spans: Spans):
        store = self.layers[layer]
        self.last = k.shape[2]
        k_all, v_all = store.append(k, v, spans)
        return k_all, v_all, merge_spans(((0, store.filled - self.last), *spans))  # stand-in: kept keys first

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, scale: float, *,
                received: torch.Tensor | None = None) -> None:
        received = received_attention(q, k, spec, scale) if received is None else received
        self.layers[layer].add_scores(received)
        self.received[layer] = received

    def pairs(self, values: torch.Tensor) -> torch.Tensor:
        """``[rows, ...]`` -> per sample ``[groups, ...]``: under CFG the cond and uncond rows summed."""
        return sum_row_pairs(values) if self.guided else values

    def end_step(self) -> None:
        for layer, store in enumerate(self.layers):
            earlier = store.filled - self.last - self.prefix  # rankable: after the prefix, before the new scale
            if earlier <= 0 or self.received[layer] is None:
                continue
            keep = math.ceil(self.options.share * earlier)
            scores = self.score(layer, store, self.pairs(self.received[layer]))[..., self.prefix:self.prefix + earlier]
            top = scores.topk(keep, dim=-1).indices.sort(dim=-1).values + self.prefix  # slots in position order
            index = torch.cat([slot_range(top, 0, self.prefix), top,
                               slot_range(top, store.filled - self.last, store.filled)], dim=-1)
            store.keep(to_row_pairs(index) if self.guided else index)
            self.received[layer] = None

    def nbytes(self) -> int:
        return sum(store.nbytes() for store in self.layers)


__all__ = ["ScoredScalesCache", "ScoredScalesOptions"]
