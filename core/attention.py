"""Attention patterns, the specs they produce, and the backends that compute them.

Layout of every attention tensor: ``q: [B, H, Lq, D]``, ``k: [B, H, Lk, D]``, ``v: [B, H, Lk, Dv]``
(batch, heads, tokens, head dim), output ``[B, H, Lq, Dv]``. ``scale`` multiplies ``q @ k^T``
before the softmax (VAR with ``attn_l2_norm`` uses 1.0).

A pattern describes itself once as an :class:`AttentionSpec`; each backend materialises the spec
its own way (a boolean mask, a BlockMask, a NATTEN call) or says why it cannot.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from .layout import SequenceLayout, Spans
from .neighborhood import neighborhood_mask_2d

VisibilityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``visible(q_scale, k_scale) -> BoolTensor``: the trajectory's scale-level rule (broadcasting)."""


class AttentionSpec(ABC):
    """What a backend must compute: which of the ``Lk`` keys each of the ``Lq`` queries may see.

    Every query sees at least one key. ``mask()`` is the universal fallback every backend can use;
    structured subclasses let specialised backends do better.
    """

    kind: ClassVar[str]

    @abstractmethod
    def mask(self, q_len: int, kv_len: int, device: torch.device | str) -> torch.Tensor | None:
        """BoolTensor[Lq, Lk] (True = may attend), or None when every query sees every key."""

    def mask_mod(self, q_len: int, kv_len: int, device: torch.device | str) -> Callable:
        """FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> BoolTensor`` over the mask."""
        mask = self.mask(q_len, kv_len, device)
        if mask is None:
            return lambda b, h, q_idx, kv_idx: q_idx >= 0
        return lambda b, h, q_idx, kv_idx: mask[q_idx, kv_idx]


@dataclass(frozen=True)
class Dense(AttentionSpec):
    """Every query sees every key."""

    kind: ClassVar[str] = "dense"

    def mask(self, q_len, kv_len, device):
        return None


@dataclass(frozen=True)
class Neighborhood2D(AttentionSpec):
    """Queries and keys are the same row-major ``height x width`` map; NATTEN's window rule.

    See :mod:`mvar_engine.core.neighborhood` (a kernel larger than the map covers the map).
    """

    kind: ClassVar[str] = "neighborhood2d"
    height: int
    width: int
    kernel_size: int
    dilation: int = 1
    causal: bool = False

    def mask(self, q_len, kv_len, device):
        n = self.height * self.width
        if q_len != n or kv_len != n:
            raise ValueError(f"Neighborhood2D over {self.height}x{self.width} needs {n} queries and keys, got {q_len} and {kv_len}")
        return _neighborhood_mask(self, str(device))


@functools.lru_cache(maxsize=32)
def _neighborhood_mask(spec: Neighborhood2D, device: str) -> torch.Tensor:
    return neighborhood_mask_2d(spec.height, spec.width, spec.kernel_size, spec.dilation, spec.causal, device)


@dataclass(frozen=True, eq=False)
class Masked(AttentionSpec):
    """An explicit BoolTensor[Lq, Lk] mask; ``structure`` names it for messages and backends
    (``block-causal``, ``block-diagonal``, ``cross-scale-neighborhood``, ...)."""

    kind: ClassVar[str] = "masked"
    allowed: torch.Tensor = field(repr=False)
    structure: str = "mask"

    def mask(self, q_len, kv_len, device):
        if tuple(self.allowed.shape) != (q_len, kv_len):
            raise ValueError(f"mask of shape {tuple(self.allowed.shape)} does not fit {q_len} queries x {kv_len} keys")
        return self.allowed.to(device)


class AttentionPattern(ABC):
    """Decides which keys a query may see, at token level, within what the trajectory makes visible.

    Contract: ``spec`` is pure (same inputs, same spec) and cheap enough to call once per step;
    it must not look at tensor values, only at positions.
    """

    name: ClassVar[str] = "pattern"

    @abstractmethod
    def spec(self, layout: SequenceLayout, queries: Spans, keys: Spans, visible: VisibilityFn) -> AttentionSpec:
        """The spec for queries at positions ``queries`` over keys at positions ``keys``.

        ``visible(q_scale, k_scale)`` is the trajectory's scale-level rule; the result must never
        let a query see a key the trajectory hides.
        """


class AttentionBackend(ABC):
    """Computes attention for a spec on some devices and dtypes.

    Contract: ``supports`` answers without running a kernel and returns the reason (one line,
    naming the constraint and the way out) when it cannot; ``attend`` is only called when
    ``supports`` returned None, and must not modify its inputs.
    """

    name: ClassVar[str] = "backend"

    @abstractmethod
    def supports(self, spec: AttentionSpec, *, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        """None if this backend can compute ``spec`` here, else the reason it cannot."""

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, *, scale: float) -> torch.Tensor:
        """softmax(scale * q @ k^T restricted to ``spec``) @ v, shape [B, H, Lq, Dv]."""
