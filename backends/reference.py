"""``reference``: materialised scores and mask; the oracle every other backend is tested against."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..core.attention import AttentionBackend, scores_bytes


class ReferenceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    precision: Literal["float64", "input"] = Field("float64", description="compute dtype: float64 (oracle) or the inputs' dtype")


class ReferenceBackend(AttentionBackend):
    """softmax(scale * q k^T + mask) v with every score materialised ([B, H, Lq, Lk])."""

    name = "reference"

    def __init__(self, options: ReferenceOptions | None = None) -> None:
        self.options = options or ReferenceOptions()

    def preference(self, spec, device):
        return 0  # the oracle: last wherever anything else computes the spec

    def check(self, spec, *, device, dtype, head_dim):
        if self.options.precision == "float64" and device.type == "mps":
            return "reference: float64 is not supported on MPS (use --backend-precision input)"
        return None

    def workspace_bytes(self, spec, *, batch, heads, q_len, kv_len, head_dim, dtype, device):
        itemsize = 8 if self.options.precision == "float64" else torch.empty((), dtype=dtype).element_size()
        return scores_bytes(batch, heads, q_len, kv_len, itemsize, copies=3) + q_len * kv_len

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if self.options.precision == "float64" else dtype

    def attend(self, q, k, v, spec, *, scale):
        return materialised_attention(q, k, v, spec.mask(q.shape[-2], k.shape[-2], q.device), scale=scale,
                                      compute_dtype=self.compute_dtype(q.dtype))

    def attend_and_score(self, q, k, v, spec, *, scale):
        compute = self.compute_dtype(q.dtype)
        probs = materialised_probabilities(q, k, spec.mask(q.shape[-2], k.shape[-2], q.device), scale=scale,
                                           compute_dtype=compute)
        return weighted_values(probs, v, compute, q.dtype), received_mass(probs, k.shape[-2])


def materialised_probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, *, scale: float,
                               compute_dtype: torch.dtype, softmax_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``softmax(scale * q k^T + mask)``: ``[B, H, Lq, Lk]`` in ``softmax_dtype`` (default
    ``compute_dtype``) for ``q [B, H, Lq, D]``, ``k [B, H, Lk, D]`` and ``mask`` as
    :func:`materialised_attention`; the product runs in ``compute_dtype``."""
    softmax_dtype = softmax_dtype or compute_dtype
    scores = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-2, -1)).to(softmax_dtype) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def materialised_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                           scale: float, compute_dtype: torch.dtype,
                           softmax_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``softmax(scale * q k^T + mask) v`` with the scores ``[B, H, Lq, Lk]`` materialised.

    ``q [B, H, Lq, D]``, ``k [B, H, Lk, D]``, ``v [B, H, Lk, Dv]``; ``mask``: BoolTensor ``[Lq, Lk]``
    (True = may attend) or None. The two products run in ``compute_dtype``; the scaling, mask and
    softmax in ``softmax_dtype`` (default ``compute_dtype``; float32 under 16-bit inputs is
    transformers' eager attention). Returns ``[B, H, Lq, Dv]`` in q's dtype.
    """
    probs = materialised_probabilities(q, k, mask, scale=scale, compute_dtype=compute_dtype, softmax_dtype=softmax_dtype)
    return weighted_values(probs, v, compute_dtype, q.dtype)


def weighted_values(probs: torch.Tensor, v: torch.Tensor, compute_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """``probs [B, H, Lq, Lk] @ v [B, H, Lk, Dv]`` in ``compute_dtype``, returned in ``out_dtype``."""
    return torch.matmul(probs.to(compute_dtype), v.to(compute_dtype)).to(out_dtype)


def received_mass(probs: torch.Tensor, kv_len: int) -> torch.Tensor:
    """``float32 [B, H, kv_len]``: the attention each of the first ``kv_len`` keys receives, summed
    over the queries of ``probs [B, H, Lq, Lk >= kv_len]`` (what ``attend_and_score`` returns)."""
    return probs[..., :kv_len].sum(dim=2, dtype=torch.float32)
