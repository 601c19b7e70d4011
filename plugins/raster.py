"""The ``raster`` trajectory: next-token generation, one image token per step in raster order
(LlamaGen), after a class prefix.

Design decisions:

- Layout: a raster sequence is a :class:`SequenceLayout` of two "scales": the class prefix as a
  ``1 x P`` grid, then the ``h x w`` image grid (``RasterGPTConfig.layout``). Positions are the
  usual flattened indices (prefix ``0 .. P-1``, token ``(r, c)`` at ``P + r * w + c``), so spans,
  ``layout.coords()`` (row/column of every token, for future 2-D-aware caches) and cache ``begin``
  work unchanged. A step is NOT a scale here: each decoding step is one token.
- Steps (``steps``): the class prefix (it gives token 0), then one step a token.
- Visibility is token-causal (``visible_tokens``: ``k_pos <= q_pos``), which a scale-level rule
  cannot express (within the image "scale" it is not dense); ``visible`` gives the scale-level
  superset (``k_scale <= q_scale``). Attention patterns see both through the engine's
  ``Visibility``; the default pattern ``causal`` shows every earlier token (``Causal`` specs when
  the keys end with the queries, else ``Dense`` or an explicit ``Masked`` mask), and any pattern
  that serves the ``next-token`` family may restrict it further.
- ``family = "next-token"``: patterns, caches and models declare whether they serve it.
- Caches: a cache serves raster decoding when it declares ``families`` containing
  ``"next-token"`` (``none``, the exact oracle; ``full``; ``window`` in token mode; ``sink``;
  ``h2o``; ``ssd``). Caches that evict by next-scale *steps* (``window --cache-scales``) would
  silently turn into a last-n-tokens window that drops the class prefix, so they are refused.
"""

from __future__ import annotations

from typing import ClassVar

from ..core.errors import IncompatibleComponentsError, setting
from ..core.layout import SequenceLayout
from ..core.trajectory import Step, Trajectory


class RasterTrajectory(Trajectory):
    """Next-token (raster) order: each token sees the class prefix and every earlier token."""

    name = "raster"
    family: ClassVar[str] = "next-token"
    sees_all_history: ClassVar[bool] = True
    token_causal: ClassVar[bool] = True
    step_unit: ClassVar[str] = "token"
    default_attention = "causal"
    default_cache = "full"

    def visible(self, q_scale, k_scale):
        return k_scale <= q_scale

    def visible_tokens(self, layout, q_pos, k_pos):
        """Token-level rule: a query at position ``q_pos`` sees keys at ``k_pos <= q_pos``."""
        return k_pos[None, :] <= q_pos[:, None]

    def steps(self, layout: SequenceLayout) -> list[Step]:
        """The class prefix (it gives token 0), then one step a token: step ``t`` feeds token
        ``t - 1`` at position ``P + t - 1`` and gives token ``t``."""
        prefix, count = layout.scales[0].numel, layout.scales[-1].numel
        steps = [Step(0, ((0, prefix),), 1, (0,))]
        steps += [Step(t, ((prefix + t - 1, prefix + t),), 1, tuple(range(t + 1))) for t in range(1, count)]
        return steps

    def check_cache(self, cache_name, cache):
        """``window`` by scales names its token mode; any other cache's families are checked (and
        worded) by the engine's compatibility check."""
        if cache_name == "window" and "next-token" not in getattr(cache, "families", ()):
            raise IncompatibleComponentsError(
                f"cache 'window' by scales ({setting('cache_scales')}) keeps whole next-scale steps, which trajectory "
                f"'raster' does not have; give {setting('cache_budget', 0.2)} for a window of recent tokens")

