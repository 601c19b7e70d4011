"""``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``.

Any spec runs through its materialised boolean mask (``is_causal`` for square causal specs).
``neighborhood2d`` specs whose halo is small next to the map take the tiled path
(:mod:`.tiling`): per chunk of query tiles, gather the tiles' queries and halo keys from the
token-major layout and run one masked SDPA over ``[tiles, heads, Q, halo]``; memory grows as
``N x halo``, never ``N x N``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..core.attention import AttentionBackend, Causal, Dense, Neighborhood2D, scores_bytes
from .tiling import default_tile, map_tiles

CHUNK_BYTES = 4 << 20
"""Target size of one chunk's gathered keys: small enough to stay in cache and below glibc's mmap
threshold (large fresh allocations page-fault on every call)."""


class SdpaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tiled: Literal["auto", "always", "never"] = Field(
        "auto", description="tiled path for neighbourhood specs: auto = when the halo is at most a quarter of the map")
    tile: int = Field(0, ge=0, description="query tile side for the tiled path (0 = 4 for k <= 9, else 8)")


class SdpaBackend(AttentionBackend):
    """Every spec kind on every device PyTorch's SDPA runs on, forward and backward."""

    name = "sdpa"

    def __init__(self, options: SdpaOptions | None = None) -> None:
        self.options = options or SdpaOptions()

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

    def workspace_bytes(self, spec, *, batch, heads, q_len, kv_len, head_dim, dtype, device):
        if self.uses_tiles(spec):
            return 4 * CHUNK_BYTES
        mask = 0 if isinstance(spec, Dense) or (isinstance(spec, Causal) and q_len == kv_len) else q_len * kv_len
        # the fused CPU/CUDA kernels work in blocks; the math fallback (e.g. float64) materialises scores
        fused = device.type in ("cpu", "cuda") and dtype != torch.float64
        itemsize = torch.empty((), dtype=dtype).element_size()
        return mask + (0 if fused else scores_bytes(batch, heads, q_len, kv_len, itemsize, copies=2))

    def attend(self, q, k, v, spec, *, scale):
        if self.uses_tiles(spec):
            return self._tiled(q, k, v, spec, scale)
        if isinstance(spec, Causal) and q.shape[-2] == k.shape[-2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        mask = spec.mask(q.shape[-2], k.shape[-2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

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
