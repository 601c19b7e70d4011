"""The ``raster`` trajectory: next-token generation, one image token per step in raster order
(LlamaGen), after a class prefix.

Design decisions:

- Layout: a raster sequence is a :class:`SequenceLayout` of two "scales": the class prefix as a
  ``1 x P`` grid, then the ``h x w`` image grid (``RasterGPTConfig.layout``). Positions are the
  usual flattened indices (prefix ``0 .. P-1``, token ``(r, c)`` at ``P + r * w + c``), so spans,
  ``layout.coords()`` (row/column of every token, for future 2-D-aware caches) and cache ``begin``
  work unchanged. A step is NOT a scale here: each decoding step is one token.
- Visibility is token-causal, which the scale-level ``visible(q_scale, k_scale)`` of the
  next-scale :class:`Trajectory` cannot express (within the image "scale" it is not dense).
  ``visible`` therefore gives the scale-level superset (``k_scale <= q_scale``, so ``history``
  still means "the prefix and everything before"), and the token rule lives in
  :meth:`RasterTrajectory.spec`, which the raster engine calls directly: no next-scale attention
  pattern is involved. ``spec`` returns ``Causal`` (bottom-right aligned) whenever the keys end
  with the queries and every other key precedes them (always true for ``none`` and ``full``, and
  for any compressed cache that returns kept history then the new tokens), else an explicit
  ``Masked`` ``key_pos <= query_pos`` mask.
- ``family = "next-token"``: the next-scale pipeline refuses it; the raster engine serves it.
- Caches: a cache serves raster decoding when it declares ``families`` containing
  ``"next-token"`` (``none``, the exact oracle; ``full``; ``window`` in token mode; ``sink``;
  ``h2o``; ``ssd``). Caches that evict by next-scale *steps* (``window --cache-scales``) would
  silently turn into a last-n-tokens window that drops the class prefix, so they are refused.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch

from ..core.attention import AttentionSpec, Causal, Dense, Masked
from ..core.errors import IncompatibleComponentsError
from ..core.layout import Spans, spans_length, spans_to_positions
from ..core.records import NoOptions
from ..core.trajectory import Trajectory


class RasterTrajectory(Trajectory):
    """Next-token (raster) order: each token sees the class prefix and every earlier token."""

    name = "raster"
    family: ClassVar[str] = "next-token"
    default_attention = "dense"  # every visible (= earlier) key; the engine builds Causal specs itself
    default_cache = "full"

    def __init__(self, options: NoOptions | None = None) -> None:
        self.options = options or NoOptions()

    def visible(self, q_scale, k_scale):
        return k_scale <= q_scale

    @staticmethod
    def visible_positions(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Token-level rule: a query at position ``q_pos`` sees keys at ``k_pos <= q_pos`` (broadcasts)."""
        return k_pos <= q_pos

    @functools.lru_cache(maxsize=4096)
    def spec(self, queries: Spans, keys: Spans) -> AttentionSpec:
        """The spec for queries at ``queries`` over keys at ``keys`` (keys in the order given)."""
        q_len, k_len = spans_length(queries), spans_length(keys)
        if q_len == 0 or k_len < 1:
            raise ValueError(f"raster attention needs queries and keys, got {queries} over {keys}")
        if len(queries) == 1 and _ends_with(keys, queries[0]):
            return Causal()
        k_pos = spans_to_positions(keys)
        q_pos = spans_to_positions(queries)
        allowed = self.visible_positions(q_pos[:, None], k_pos[None, :])
        if not bool(allowed.any(dim=1).all()):
            raise ValueError(f"a query in {queries} sees no key of {keys}")
        if bool(allowed.all()):  # e.g. one query over kept keys in any slot order (compressed caches)
            return Dense()
        return Masked(allowed, "raster-causal")

    def check_cache(self, cache_name, cache):
        if "next-token" in getattr(cache, "families", ()):
            return
        fix = ("give --cache-budget (a window of recent tokens, e.g. 0.2)" if cache_name == "window"
               else "use a token-level cache: full, none, window --cache-budget, sink, h2o or ssd")
        raise IncompatibleComponentsError(
            f"cache '{cache_name}' cannot serve trajectory 'raster': it evicts by next-scale steps and would drop "
            f"the class prefix; {fix}")

    @property
    def mask_structure(self) -> str:
        return "causal"


def _ends_with(keys: Spans, q_span: tuple[int, int]) -> bool:
    """Do the keys end with exactly the positions of ``q_span``, every earlier key preceding it?"""
    begin, end = keys[-1]
    return begin <= q_span[0] and end == q_span[1]
