"""The conditioning trajectory: which earlier scales a scale's queries see.

Next-scale models generate one scale a step. A trajectory decides, at scale level, which scales'
keys the tokens of scale ``s`` may attend to (``visible``) and so which earlier steps must be
either cached or recomputed (``history``). Token-level restrictions are the attention pattern's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class Trajectory(ABC):
    """Contract: ``history(s)`` is exactly the set of scales ``j`` with ``visible(s, j)``; it always
    contains ``s`` itself and only scales ``<= s`` (no step sees the future)."""

    name: ClassVar[str] = "trajectory"
    family: ClassVar[str] = "next-scale"
    default_attention: ClassVar[str] = "dense"
    default_cache: ClassVar[str] = "full"

    @abstractmethod
    def visible(self, q_scale: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
        """BoolTensor: may a query of scale ``q_scale`` see a key of scale ``k_scale`` (broadcasts)."""

    def history(self, scale: int) -> list[int]:
        """Scales whose keys the queries of ``scale`` see, ascending, ``scale`` included."""
        candidates = torch.arange(scale + 1)
        keep = self.visible(torch.tensor(scale), candidates)
        return [int(j) for j in candidates[keep]]

    def check_cache(self, cache_name: str, cache: object) -> None:
        """Raise ``IncompatibleComponentsError`` (with the reason) for a cache that makes no sense here."""

    @property
    def mask_structure(self) -> str:
        """Name of the teacher-forced scale mask (``block-causal``, ``block-diagonal``, ...)."""
        return "scale-mask"
