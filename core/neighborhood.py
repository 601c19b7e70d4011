"""The neighbourhood window rule (NATTEN's), vectorised over index tensors.

One axis of length ``n``, kernel ``k``, dilation ``d``: the axis splits into ``d`` interleaved
groups (positions with the same ``i mod d``); a query at group-local index ``t`` of a group of
length ``n_g`` sees group-local keys ``start .. start + k - 1`` where

- non-causal: ``start = clamp(t - k // 2, 0, n_g - k)`` (the window shifts to stay inside the map,
  so every query sees exactly k keys; even k: k/2 before and k/2 - 1 after);
- causal: keys ``max(t - k + 1, 0) .. t`` (cut short at the start).

Where NATTEN rejects a kernel larger than the (group) axis, mvar-engine defines the window as the
whole group (``k_eff = min(k, n_g)``): a kernel at least the map side is dense attention.
"""

from __future__ import annotations

import torch


def group_length(n: torch.Tensor | int, group: torch.Tensor, dilation: int) -> torch.Tensor:
    """Number of positions ``g, g + d, ...`` below ``n`` for group ``g`` (= ceil((n - g) / d))."""
    return torch.div(n - group + dilation - 1, dilation, rounding_mode="floor")


def axis_allowed(
    query: torch.Tensor,
    key: torch.Tensor,
    length: torch.Tensor | int,
    kernel_size: int,
    dilation: int = 1,
    causal: bool = False,
) -> torch.Tensor:
    """Whether key index ``key`` lies in the window of query index ``query`` on an axis of ``length``.

    All tensor arguments broadcast together (e.g. ``query[:, None]`` against ``key[None, :]``).
    ``query`` and ``key`` are indices on the same axis of the same map.
    """
    group = torch.remainder(query, dilation)
    same_group = torch.remainder(key, dilation) == group
    n_g = group_length(length, group, dilation)
    k_eff = torch.clamp(n_g, max=kernel_size)
    t = torch.div(query, dilation, rounding_mode="floor")
    key_t = torch.div(key, dilation, rounding_mode="floor")
    if causal:
        start = torch.clamp(t - k_eff + 1, min=0)
        end = t
    else:
        start = torch.minimum(torch.clamp(t - kernel_size // 2, min=0), n_g - k_eff)
        end = start + k_eff - 1
    return same_group & (key_t >= start) & (key_t <= end)


def neighborhood_mask_2d(
    height: int, width: int, kernel_size: int | tuple[int, int], dilation: int | tuple[int, int] = 1,
    causal: bool | tuple[bool, bool] = False, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """BoolTensor[h*w, h*w] of a 2-D neighbourhood over one row-major map (queries x keys)."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    ch, cw = (causal, causal) if isinstance(causal, bool) else causal
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    allowed_rows = axis_allowed(rows[:, None], rows[None, :], height, kh, dh, ch)
    allowed_cols = axis_allowed(cols[:, None], cols[None, :], width, kw, dw, cw)
    return allowed_rows & allowed_cols
