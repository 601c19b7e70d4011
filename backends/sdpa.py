"""``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``.

Any spec runs through its materialised boolean mask (``is_causal`` for square causal specs).
``neighborhood2d`` specs whose halo is small next to the map take the tiled path
(:mod:`.tiling`): per chunk of query tiles, gather the tiles' queries and halo keys from the
token-major layout and run one masked SDPA over ``[tiles, heads, Q, halo]``; memory grows as
``N x halo``, never ``N x N``.

On the CPU, 16-bit queries of at most :data:`SHORT_QUERY_ROWS` rows (a raster model's decoding
step) take the materialised path instead (:func:`~.reference.materialised_attention`: two matrix
products in the inputs' dtype, the softmax in float32), where PyTorch's fused CPU kernel is the
slower one (docs/measurements.md). Strided keys and values (a growing cache's
filled prefix) are staged first (:meth:`SdpaBackend.staged_operands`), since the CPU's bf16
batched products lose their fast kernel on strided operands. ``short_queries="fused"`` turns this
off. On this path :meth:`SdpaBackend.attend_and_score` also returns the attention each key received,
which scoring caches (``h2o``, ``ssd``) would otherwise compute again.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..core.attention import AttentionBackend, Causal, Dense, Neighborhood2D, scores_bytes
from .reference import materialised_probabilities, received_mass, weighted_values
from .tiling import default_tile, map_tiles

CHUNK_BYTES = 4 << 20
"""Target size of one chunk's gathered keys: small enough to stay in cache and below glibc's mmap
threshold (large fresh allocations page-fault on every call)."""


STAGED_KEY_MULTIPLE = 64
"""Strided keys staged for the materialised path are padded to a multiple of this many (see
:meth:`SdpaBackend.staged_operands`)."""


def staged_length(kv_len: int) -> int:
    """``kv_len`` rounded up to a multiple of :data:`STAGED_KEY_MULTIPLE`."""
    return -(-kv_len // STAGED_KEY_MULTIPLE) * STAGED_KEY_MULTIPLE


SHORT_QUERY_ROWS = 16
"""Queries per call up to which 16-bit CPU attention takes the materialised path (faster than the
fused kernel there, slower at 64 queries: docs/measurements.md)."""


class SdpaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tiled: Literal["auto", "always", "never"] = Field(
        "auto", description="tiled path for neighbourhood specs: auto = when the halo is at most a quarter of the map")
    tile: int = Field(0, ge=0, description="query tile side for the tiled path (0 = 4 for k <= 9, else 8)")
    short_queries: Literal["auto", "fused", "materialised"] = Field(
        "auto", description="16-bit CPU calls of at most 16 queries: auto = materialised scores "
                            "(faster there than the fused kernel), fused = always the fused kernel")


class SdpaBackend(AttentionBackend):
    """Every spec kind on every device PyTorch's SDPA runs on, forward and backward."""

    name = "sdpa"

    def __init__(self, options: SdpaOptions | None = None) -> None:
        self.options = options or SdpaOptions()
        self.staging: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # see staged_operands

    def staged_operands(self, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(k, v, mask)`` for the materialised path. Contiguous operands pass unchanged. Strided ones
        (a growing cache's filled prefix) are copied into one flat buffer this backend keeps per
        (device, dtype), with the keys padded to a multiple of :data:`STAGED_KEY_MULTIPLE` (zeros,
        masked out), so that a decode loop neither allocates every step nor hands oneDNN a new
        product shape every step: each new shape builds and caches a kernel, and a 577-step sweep
        of shapes grew this CPU's resident set by 0.5 GB. The views are valid until the next call;
        operands that need gradients are copied fresh instead."""
        if k.is_contiguous() and v.is_contiguous():
            return k, v, mask
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            return k.contiguous(), v.contiguous(), mask  # autograd keeps what it saw: no reused buffer
        batch, heads, kv_len, _ = k.shape
        padded = staged_length(kv_len)
        k_shape, v_shape = (batch, heads, padded, k.shape[-1]), (batch, heads, padded, v.shape[-1])
        k_size, need = math.prod(k_shape), math.prod(k_shape) + math.prod(v_shape)
        key = (str(k.device), k.dtype)
        buffer = self.staging.get(key)
        if buffer is None or buffer.numel() < need:
            buffer = self.staging[key] = torch.empty(max(need, 0 if buffer is None else 2 * buffer.numel()),
                                                     device=k.device, dtype=k.dtype)
        staged = []
        for source, flat, shape in ((k, buffer[:k_size], k_shape), (v, buffer[k_size:need], v_shape)):
            out = flat.view(shape)
            out[:, :, :kv_len].copy_(source)
            out[:, :, kv_len:].zero_()
            staged.append(out)
        visible = torch.zeros(1 if mask is None else mask.shape[0], padded, dtype=torch.bool, device=k.device)
        visible[:, :kv_len] = True if mask is None else mask
        return staged[0], staged[1], visible

    def preference(self, spec, device):
        return 50

    def tile_for(self, spec: Neighborhood2D) -> tuple[int, int]:
        side = self.options.tile or default_tile(spec.kernel_size)
        return min(side, spec.height), min(side, spec.width)

    def uses_tiles(self, spec) -> bool:
        """Whether ``spec`` takes the tiled path under the current options."""
        if not isinstance(spec, Neighborhood2D) or self.options.tiled == "never":
            return False
        if self.options.tiled == "always":
            return True
        th, tw = self.tile_for(spec)
        halo = min(th + spec.kernel_size - 1, spec.height) * min(tw + spec.kernel_size - 1, spec.width)
        return 4 * halo <= spec.height * spec.width

    def materialises(self, spec, *, q_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether a call of ``q_len`` queries takes the materialised path (see the module docstring)."""
        if self.options.short_queries == "fused" or self.uses_tiles(spec):
            return False
        if self.options.short_queries == "materialised":
            return True
        return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and q_len <= SHORT_QUERY_ROWS

    def workspace_bytes(self, spec, *, batch, heads, q_len, kv_len, head_dim, dtype, device):
        if self.uses_tiles(spec):
            return 4 * CHUNK_BYTES
        if self.materialises(spec, q_len=q_len, dtype=dtype, device=device):  # scores, and contiguous k and v
            itemsize = torch.empty((), dtype=dtype).element_size()
            staged = staged_length(kv_len)
            return (scores_bytes(batch, heads, q_len, staged, 4, copies=2) + q_len * staged
                    + 2 * batch * heads * staged * head_dim * itemsize)
        mask = 0 if isinstance(spec, Dense) or (isinstance(spec, Causal) and q_len == kv_len) else q_len * kv_len
        # the fused CPU/CUDA kernels work in blocks; the math fallback (e.g. float64) materialises scores
        fused = device.type in ("cpu", "cuda") and dtype != torch.float64
        itemsize = torch.empty((), dtype=dtype).element_size()
        return mask + (0 if fused else scores_bytes(batch, heads, q_len, kv_len, itemsize, copies=2))

    def attend(self, q, k, v, spec, *, scale):
        if self.uses_tiles(spec):
            return self._tiled(q, k, v, spec, scale)
        if self.materialises(spec, q_len=q.shape[-2], dtype=q.dtype, device=q.device):
            probs, v = self.materialised(q, k, v, spec, scale)
            return weighted_values(probs, v, q.dtype, q.dtype)
        if isinstance(spec, Causal) and q.shape[-2] == k.shape[-2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        mask = spec.mask(q.shape[-2], k.shape[-2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def attend_and_score(self, q, k, v, spec, *, scale):
        """The materialised path's probabilities give the received attention at no extra product."""
        if not self.materialises(spec, q_len=q.shape[-2], dtype=q.dtype, device=q.device):
            return None
        probs, staged_v = self.materialised(q, k, v, spec, scale)
        return weighted_values(probs, staged_v, q.dtype, q.dtype), received_mass(probs, k.shape[-2])

    def materialised(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The materialised path up to the values: ``(probs, v)`` with ``probs: float32 [B, H, Lq, Lk']``
        over the staged keys (``Lk' >= Lk``; padded keys get zero) and ``v`` staged alike."""
        k, v, mask = self.staged_operands(k, v, spec.mask(q.shape[-2], k.shape[-2], q.device))
        return materialised_probabilities(q, k, mask, scale=scale, compute_dtype=q.dtype,
                                          softmax_dtype=torch.float32), v

    def _tiled(self, q, k, v, spec: Neighborhood2D, scale: float) -> torch.Tensor:
        batch, heads, n, dim = q.shape
        dv = v.shape[-1]
        tiles = map_tiles(spec, *self.tile_for(spec), str(q.device))
        num_tiles, per_tile = tiles.queries.shape
        halo = tiles.halo
        chunk = max(1, CHUNK_BYTES // (halo * heads * max(dim, dv) * q.element_size()))
        # token-major [B, N, H, D]: a gather then copies whole tokens (all heads) at once
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        out = q.new_empty(batch, n, heads, dv)
        for b in range(batch):
            for first in range(0, num_tiles, chunk):
                last = min(first + chunk, num_tiles)
                count = last - first
                q_idx = tiles.queries[first:last].flatten()
                k_idx = tiles.keys[first:last].flatten()
                qc = qt[b].index_select(0, q_idx).view(count, per_tile, heads, dim).transpose(1, 2)
                kc = kt[b].index_select(0, k_idx).view(count, halo, heads, dim).transpose(1, 2)
                vc = vt[b].index_select(0, k_idx).view(count, halo, heads, dv).transpose(1, 2)
                o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=tiles.mask[first:last], scale=scale)
                o = o.transpose(1, 2).reshape(count * per_tile, heads, dv)
                if tiles.ragged:  # repeated queries of ragged tiles must not write (or get gradient) twice
                    keep = tiles.keep[first:last].flatten()
                    q_idx, o = q_idx[keep], o[keep]
                out[b].index_copy_(0, q_idx, o)
        return out.transpose(1, 2)
