"""Token layout of a multi-scale (or single-map) sequence.

A sequence is the concatenation of scales in order; scale ``s`` is an ``h_s x w_s`` map stored
row-major. Positions are indices into the flattened sequence of length ``L = sum(h_s * w_s)``.
Token sets are described by *spans*: sorted, disjoint ``(begin, end)`` position ranges.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

Spans = tuple[tuple[int, int], ...]
"""Sorted, disjoint half-open position ranges; hashable, so masks can be memoised on them."""


@dataclass(frozen=True)
class Scale:
    """One scale of the sequence: its index, map size and position range ``[begin, end)``."""

    index: int
    height: int
    width: int
    begin: int

    @property
    def numel(self) -> int:
        return self.height * self.width

    @property
    def end(self) -> int:
        return self.begin + self.numel

    @property
    def span(self) -> tuple[int, int]:
        return (self.begin, self.end)


def normalize_grids(patch_nums: Sequence[int | Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """``(1, 2, (3, 4))`` -> ``((1, 1), (2, 2), (3, 4))``; every side must be positive."""
    grids = []
    for entry in patch_nums:
        h, w = (entry, entry) if isinstance(entry, int) else tuple(int(x) for x in entry)
        if h < 1 or w < 1:
            raise ValueError(f"scale sides must be positive, got {entry!r}")
        grids.append((int(h), int(w)))
    if not grids:
        raise ValueError("a scale schedule needs at least one scale")
    return tuple(grids)


@dataclass(frozen=True)
class SequenceLayout:
    """Scales of a sequence in generation order (hashable; build with :meth:`from_patch_nums`)."""

    grids: tuple[tuple[int, int], ...]

    @classmethod
    def from_patch_nums(cls, patch_nums: Sequence[int | Sequence[int]]) -> "SequenceLayout":
        return cls(normalize_grids(patch_nums))

    @functools.cached_property
    def scales(self) -> tuple[Scale, ...]:
        out, begin = [], 0
        for index, (h, w) in enumerate(self.grids):
            out.append(Scale(index, h, w, begin))
            begin += h * w
        return tuple(out)

    @property
    def num_scales(self) -> int:
        return len(self.grids)

    @property
    def length(self) -> int:
        return self.scales[-1].end

    def resolve_scale(self, index: int) -> int:
        """A scale index that may count from the end (``-2``: the second to last), clamped at 0."""
        return max(0, self.num_scales + index) if index < 0 else index

    def spans_of(self, scale_indices: Sequence[int]) -> Spans:
        """Spans covering the given scales (merged where adjacent)."""
        return merge_spans(self.scales[i].span for i in sorted(scale_indices))

    def coords(self, device: torch.device | str = "cpu") -> "TokenCoords":
        """Per-position (scale index, row, column, map height, map width), each LongTensor[L]."""
        return _coords(self, str(device))


@dataclass(frozen=True)
class TokenCoords:
    scale: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor

    def take(self, positions: torch.Tensor) -> "TokenCoords":
        return TokenCoords(*(t[positions] for t in (self.scale, self.row, self.col, self.height, self.width)))


@functools.lru_cache(maxsize=64)
def _coords(layout: SequenceLayout, device: str) -> TokenCoords:
    parts = {name: [] for name in ("scale", "row", "col", "height", "width")}
    for sc in layout.scales:
        rows = torch.arange(sc.height).repeat_interleave(sc.width)
        cols = torch.arange(sc.width).repeat(sc.height)
        parts["scale"].append(torch.full((sc.numel,), sc.index))
        parts["row"].append(rows)
        parts["col"].append(cols)
        parts["height"].append(torch.full((sc.numel,), sc.height))
        parts["width"].append(torch.full((sc.numel,), sc.width))
    return TokenCoords(**{k: torch.cat(v).to(device) for k, v in parts.items()})


def merge_spans(spans) -> Spans:
    out: list[list[int]] = []
    for begin, end in sorted(spans):
        if end <= begin:
            continue
        if out and begin <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([begin, end])
    return tuple((b, e) for b, e in out)


def spans_length(spans: Spans) -> int:
    return sum(e - b for b, e in spans)


def spans_to_positions(spans: Spans, device: torch.device | str = "cpu") -> torch.Tensor:
    """LongTensor of the positions covered by ``spans``, in order."""
    if not spans:
        return torch.empty(0, dtype=torch.long, device=device)
    if len(spans) == 1:
        return torch.arange(*spans[0], device=device)
    return torch.cat([torch.arange(b, e, device=device) for b, e in spans])
