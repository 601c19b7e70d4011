"""``mvar-engine profile-heads``: classify a raster model's attention heads for the ``ssd`` cache.

Calibration generations run with the full cache; at every step and layer the profiler sees each
query's attention over every earlier token (:class:`ProfilingCache`, through the cache ``observe``
hook). Per (layer, head) the sparsity score is the share of a query's attention mass on image tokens
that falls outside its causal k x k spatial neighbourhood on the 2-D token grid (rows and columns
within ``k // 2``), averaged over every image query of every calibration row (cond and uncond).
Attention on the class prefix is left out (the prefix is always kept, and many heads park mass
there). Heads scoring above the threshold are semantic-sink heads, the rest spatial-locality heads.
"""

from __future__ import annotations

import torch

from ..plugins.budget_cache import attention_probabilities
from ..plugins.caches import FullCache
from ..core.attention import AttentionSpec
from ..plugins.head_map import HeadMap, classify


class ProfilingCache(FullCache):
    """The ``full`` cache (keys at positions ``0 .. n-1``, the step's queries last) that also
    accumulates every (layer, head)'s out-of-neighbourhood attention share."""

    families = ("next-token",)

    def __init__(self, grid: tuple[int, int], prefix: int, neighborhood: int = 3) -> None:
        super().__init__()
        self.grid, self.prefix, self.radius = tuple(grid), prefix, neighborhood // 2
        self.neighborhood = neighborhood
        self.share_sum: torch.Tensor | None = None  # float64 [layers, heads]
        self.queries: torch.Tensor | None = None

    def begin(self, *, num_layers, batch, num_heads, head_dim, layout, device, dtype, guided=False):
        super().begin(num_layers=num_layers, batch=batch, num_heads=num_heads, head_dim=head_dim, layout=layout,
                      device=device, dtype=dtype, guided=guided)
        if self.share_sum is None:  # accumulate over every generation of a calibration run
            self.share_sum = torch.zeros(num_layers, num_heads, dtype=torch.float64)
            self.queries = torch.zeros(num_layers, num_heads, dtype=torch.float64)

    def _outside(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image [n], outside [l, n])``: which keys are image tokens, and which of them lie outside
        each query's neighbourhood."""
        w = self.grid[1]
        image = k_pos >= self.prefix
        qt, kt = (q_pos - self.prefix).clamp(min=0), (k_pos - self.prefix).clamp(min=0)
        near = ((qt[:, None] // w - kt[None, :] // w).abs() <= self.radius) & (
            (qt[:, None] % w - kt[None, :] % w).abs() <= self.radius)
        return image, image[None, :] & ~near

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, scale: float) -> None:
        l, n = q.shape[2], k.shape[2]
        q_pos = torch.arange(n - l, n, device=q.device)
        image, outside = self._outside(q_pos, torch.arange(n, device=q.device))
        for start, probs in attention_probabilities(q, k, spec, scale):  # probs: [rows, heads, c, n]
            stop = start + probs.shape[2]
            on_image = (probs * image).sum(-1)
            off = (probs * outside[start:stop]).sum(-1)
            valid = (q_pos[start:stop] >= self.prefix) & (on_image > 1e-12)  # image queries that see image keys
            share = torch.where(valid, off / on_image.clamp(min=1e-12), torch.zeros_like(off))
            self.share_sum[layer] += share.sum(dim=(0, 2)).double().cpu()
            self.queries[layer] += valid.expand_as(share).sum(dim=(0, 2)).double().cpu()

    def scores(self) -> list[list[float]]:
        """``[layers][heads]`` mean out-of-neighbourhood share (0 for a head that saw no image query)."""
        if self.share_sum is None:
            raise RuntimeError("no calibration generation has run")
        return (self.share_sum / self.queries.clamp(min=1)).tolist()

    def head_map(self, threshold: float | None = None, calibration: dict | None = None) -> HeadMap:
        return classify(self.scores(), threshold, neighborhood=self.neighborhood, calibration=calibration)


__all__ = ["ProfilingCache"]
