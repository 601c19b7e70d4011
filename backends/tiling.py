"""Tiling a neighbourhood map: query tiles, the key halo each tile needs, and the window mask inside it.

A ``Neighborhood2D`` query only sees keys near it, so the map is cut into ``tile_h x tile_w`` query
tiles; each tile attends to its halo (at most ``(tile_h + k - 1) x (tile_w + k - 1)`` keys) with a
small mask, instead of to all ``N`` keys. Work is ``N x halo`` instead of ``N x N``, and no tensor
grows as ``N x N``. Each axis is tiled separately (per dilation group, in group-local coordinates);
the 2-D tiles are the products.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..core.attention import Neighborhood2D
from ..core.neighborhood import axis_allowed, group_length


@dataclass(frozen=True)
class AxisTiles:
    """One axis of ``length``: ``queries [T, t]`` (indices; a ragged last tile repeats its last
    query), ``keys [T, L]`` (the halo; out-of-group slots repeat a valid key and are masked), and
    ``allowed [T, t, L]`` (NATTEN's window rule, False on padding)."""

    queries: torch.Tensor
    keys: torch.Tensor
    allowed: torch.Tensor


def axis_tiles(length: int, tile: int, kernel_size: int, dilation: int, causal: bool) -> AxisTiles:
    groups = [g for g in range(min(dilation, length))]
    group_sizes = [int(group_length(length, torch.tensor(g), dilation)) for g in groups]
    halo = min(tile + kernel_size - 1, max(group_sizes))
    queries, keys, valid = [], [], []
    for g, n_g in zip(groups, group_sizes):
        for a in range(0, n_g, tile):
            local_q = torch.clamp(torch.arange(a, a + tile), max=n_g - 1)
            k_eff = min(kernel_size, n_g)
            start = max(a - k_eff + 1, 0) if causal else min(max(a - kernel_size // 2, 0), n_g - k_eff)
            first = max(0, min(start, n_g - halo))
            local_k = torch.arange(first, first + halo)
            valid.append(local_k < n_g)
            queries.append(g + dilation * local_q)
            keys.append(g + dilation * torch.clamp(local_k, max=n_g - 1))
    queries, keys, valid = torch.stack(queries), torch.stack(keys), torch.stack(valid)
    allowed = axis_allowed(queries[:, :, None], keys[:, None, :], length, kernel_size, dilation, causal) & valid[:, None, :]
    return AxisTiles(queries, keys, allowed)


@dataclass(frozen=True)
class MapTiles:
    """The 2-D tiling of a map (row-major token index ``r * W + c``): ``queries [T, Q]``, ``keys [T, L]``,
    ``mask [T, 1, Q, L]`` (broadcasts over heads), ``inverse [N]``: where each token's output sits
    in the flattened ``[T * Q]`` tile outputs (its first occurrence), and ``keep [T, Q]``: whether a
    slot is that first occurrence (False only on the repeated queries of ragged tiles)."""

    queries: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor
    inverse: torch.Tensor
    keep: torch.Tensor

    @property
    def ragged(self) -> bool:
        return not bool(self.keep.all())

    @property
    def halo(self) -> int:
        return self.keys.shape[1]


def default_tile(kernel_size: int) -> int:
    """Tile side used when none is given: small tiles keep the halo overhead ``((t + k - 1) / t)^2``
    low; 4 for windows up to 9 (the fastest for k = 7 on CPU: ``mvar-engine bench attention``)."""
    return 4 if kernel_size <= 9 else 8


@functools.lru_cache(maxsize=64)
def map_tiles(spec: Neighborhood2D, tile_h: int, tile_w: int, device: str) -> MapTiles:
    rows = axis_tiles(spec.height, tile_h, spec.kernel_size, spec.dilation, spec.causal)
    cols = axis_tiles(spec.width, tile_w, spec.kernel_size, spec.dilation, spec.causal)
    width = spec.width
    ta, tb = rows.queries.shape[0], cols.queries.shape[0]
    queries = (rows.queries[:, None, :, None] * width + cols.queries[None, :, None, :]).reshape(ta * tb, -1)
    keys = (rows.keys[:, None, :, None] * width + cols.keys[None, :, None, :]).reshape(ta * tb, -1)
    mask = rows.allowed[:, None, :, None, :, None] & cols.allowed[None, :, None, :, None, :]
    mask = mask.reshape(ta * tb, 1, queries.shape[1], keys.shape[1])
    flat = queries.flatten()
    n = spec.height * spec.width
    inverse = torch.full((n,), flat.numel(), dtype=torch.long)
    inverse.scatter_reduce_(0, flat, torch.arange(flat.numel()), reduce="amin")  # first occurrence
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[inverse] = True
    return MapTiles(queries.to(device), keys.to(device), mask.to(device), inverse.to(device),
                    keep.view_as(queries).to(device))
