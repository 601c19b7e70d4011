"""The conditioning trajectory: which earlier steps a step's queries see.

A trajectory splits a :class:`SequenceLayout` into generation :class:`Step` s (next-scale: one scale
a step; next-token: the prefix, then one token a step) and decides which keys a query may see:
at scale level (``visible``) and at token level (``visible_tokens``, by default the scale rule).
The steps a step sees (``Step.history``) must be either cached or recomputed. Token-level
restrictions within what the trajectory shows are the attention pattern's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from .layout import SequenceLayout, Spans
from .records import NoOptions


@dataclass(frozen=True)
class Step:
    """One generation step: the tokens fed at positions ``spans`` run as queries; the hidden states
    of the last ``emits`` of them give the tokens sampled this step; ``history`` lists the steps
    (indices, ascending, this one included) whose keys the queries see."""

    index: int
    spans: Spans
    emits: int
    history: tuple[int, ...]


class Trajectory(ABC):
    """Contract: ``history(s)`` is exactly the set of scales ``j`` with ``visible(s, j)``; it always
    contains ``s`` itself and only scales ``<= s`` (no step sees the future).

    Traits (class attributes the engine checks): ``family`` (``"next-scale"`` or ``"next-token"``:
    which models, patterns and caches serve it); ``sees_all_history`` (every step sees every key of
    every earlier step: a cache with stand-in spans needs it); ``token_causal`` (``visible_tokens`` is exactly
    ``k_pos <= q_pos``, so patterns may decide a step's spec from its spans alone, without building a
    mask); ``step_unit`` (what one step makes, for progress)."""

    name: ClassVar[str] = "trajectory"
    family: ClassVar[str] = "next-scale"
    sees_all_history: ClassVar[bool] = False
    token_causal: ClassVar[bool] = False
    step_unit: ClassVar[str] = "scale"
    default_attention: ClassVar[str] = "dense"
    default_cache: ClassVar[str] = "full"

    def __init__(self, options: NoOptions | None = None) -> None:
        """A trajectory that takes no options keeps ``NoOptions``; one that takes options overrides this."""
        self.options = options or NoOptions()

    @abstractmethod
    def visible(self, q_scale: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
        """BoolTensor: may a query of scale ``q_scale`` see a key of scale ``k_scale`` (broadcasts)."""

    def visible_tokens(self, layout: SequenceLayout, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """BoolTensor[Lq, Lk]: may the query at position ``q_pos[i]`` see the key at ``k_pos[j]``
        (``LongTensor[Lq]``, ``LongTensor[Lk]``). Default: the scale-level rule."""
        scale = layout.coords().scale
        return self.visible(scale[q_pos][:, None], scale[k_pos][None, :])

    def history(self, scale: int) -> list[int]:
        """Scales whose keys the queries of ``scale`` see, ascending, ``scale`` included."""
        candidates = torch.arange(scale + 1)
        keep = self.visible(torch.tensor(scale), candidates)
        return [int(j) for j in candidates[keep]]

    def steps(self, layout: SequenceLayout) -> list[Step]:
        """The generation steps over ``layout``. Default (next-scale): one step a scale."""
        return [Step(sc.index, (sc.span,), sc.numel, tuple(self.history(sc.index))) for sc in layout.scales]

    def check_cache(self, cache_name: str, cache: object) -> None:
        """Raise ``IncompatibleComponentsError`` (with the reason) for a cache that makes no sense here."""


@dataclass(frozen=True)
class Visibility:
    """What an attention pattern receives as ``visible``: the trajectory's rule at both levels.

    Called as ``visible(q_scale, k_scale)`` it is the scale-level rule (what patterns written for
    next-scale trajectories use); ``visible.tokens(layout, q_pos, k_pos)`` is the token-level rule
    every family defines (raster: ``k_pos <= q_pos``). Hashable: patterns may cache specs on it."""

    trajectory: Trajectory

    def __call__(self, q_scale: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
        return self.trajectory.visible(q_scale, k_scale)

    def tokens(self, layout: SequenceLayout, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return self.trajectory.visible_tokens(layout, q_pos, k_pos)
