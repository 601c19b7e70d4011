"""Built-in attention patterns: ``dense`` (every visible key), ``causal`` (the same under a raster
trajectory: every earlier token; its default) and ``neighborhood`` (MVAR's spatial-Markov attention)."""

from __future__ import annotations

import functools

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..core.attention import (AttentionPattern, AttentionSpec, BlockCausal, BlockDiagonal, Causal, Dense, Masked,
                              Neighborhood2D, VisibilityFn, visible_positions)
from ..core.errors import UsageError
from ..core.layout import SequenceLayout, Spans, spans_length, spans_to_positions
from ..core.neighborhood import axis_allowed
from ..core.records import NoOptions
from ..core.trajectory import Visibility


def scale_visibility(layout: SequenceLayout, queries: Spans, keys: Spans, visible: VisibilityFn):
    """(allowed BoolTensor[Lq, Lk] from the trajectory, query coords, key coords)."""
    coords = layout.coords()
    qc = coords.take(spans_to_positions(queries))
    kc = coords.take(spans_to_positions(keys))
    return visible_positions(layout, queries, keys, visible), qc, kc


def structured(layout: SequenceLayout, queries: Spans, keys: Spans, allowed: torch.Tensor, structure: str) -> AttentionSpec:
    """The most specific spec equal to ``allowed``: Dense, BlockCausal or BlockDiagonal over the
    scales of the spans (queries == keys), else ``Masked(allowed, structure)``."""
    if bool(allowed.all()):
        return Dense()
    if queries == keys:
        scales = layout.coords().scale[spans_to_positions(queries)]
        change = torch.ones(len(scales), dtype=torch.bool)
        change[1:] = scales[1:] != scales[:-1]
        starts = torch.nonzero(change).flatten().tolist() + [len(scales)]
        blocks = tuple(b - a for a, b in zip(starts, starts[1:]))
        for candidate in (BlockCausal(blocks), BlockDiagonal(blocks)):
            if torch.equal(candidate.mask(len(scales), len(scales), allowed.device), allowed):
                return candidate
    return Masked(allowed, structure)


def _single_scale(layout: SequenceLayout, spans: Spans) -> int | None:
    for scale in layout.scales:
        if spans == (scale.span,):
            return scale.index
    return None


class DensePattern(AttentionPattern):
    """Every visible key (VAR; under a raster trajectory every earlier token, as ``causal``)."""

    name = "dense"
    families = ("next-scale", "next-token")
    sees_every_visible_key = True

    def __init__(self, options: NoOptions | None = None) -> None:
        self.options = options or NoOptions()

    @functools.lru_cache(maxsize=256)
    def spec(self, layout, queries, keys, visible):
        if isinstance(visible, Visibility) and visible.trajectory.family == "next-token":
            return causal_spec(layout, queries, keys, visible)  # token order: Causal before Dense
        allowed, _, _ = scale_visibility(layout, queries, keys, visible)
        return structured(layout, queries, keys, allowed, "scale-mask")


class CausalPattern(DensePattern):
    """Every key the trajectory shows: under ``raster`` each token sees the prefix and every earlier
    token (LlamaGen), intersected with what the cache keeps."""

    name = "causal"


def causal_spec(layout: SequenceLayout, queries: Spans, keys: Spans, visible: VisibilityFn) -> AttentionSpec:
    """The most specific spec of what the trajectory shows, in token order: ``Causal`` (bottom-right
    aligned) when that is the rule, ``Dense`` when every query sees every key (one query over kept
    keys in any slot order), else the explicit ``Masked`` mask. Under a ``token_causal`` trajectory
    the usual cases are read off the spans (:func:`token_causal_spec`): no mask, no tensor."""
    if spans_length(queries) == 0 or spans_length(keys) < 1:
        raise ValueError(f"attention needs queries and keys, got {queries} over {keys}")
    if isinstance(visible, Visibility) and visible.trajectory.token_causal:
        spec = token_causal_spec(queries, keys)
        if spec is not None:
            return spec
    allowed = visible_positions(layout, queries, keys, visible)
    if not bool(allowed.any(dim=1).all()):
        raise ValueError(f"a query in {queries} sees no key of {keys}")
    q_len, k_len = allowed.shape
    if len(queries) == 1 and _ends_with(keys, queries[0]):
        causal = Causal().mask(q_len, k_len, allowed.device)
        if bool(allowed.all()) if causal is None else torch.equal(causal, allowed):
            return Causal()
    if bool(allowed.all()):
        return Dense()
    return Masked(allowed, "raster-causal")


def token_causal_spec(queries: Spans, keys: Spans) -> AttentionSpec | None:
    """Where a query at ``p`` sees exactly the keys at positions ``<= p``: ``Causal`` when the keys
    (spans in any order) end with the one query span and hold nothing after it, ``Dense`` when every
    key precedes or is the first query; None (build the mask) otherwise."""
    last_key = max(end for _, end in keys) - 1
    if len(queries) == 1 and _ends_with(keys, queries[0]) and last_key == queries[0][1] - 1:
        return Causal()
    if last_key <= queries[0][0]:
        return Dense()
    return None


def _ends_with(keys: Spans, q_span: tuple[int, int]) -> bool:
    """Do the keys end with exactly the positions of ``q_span``, every earlier key preceding it?"""
    begin, end = keys[-1]
    return begin <= q_span[0] and end == q_span[1]


class NeighborhoodOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kernel_size: int = Field(7, ge=1, description="window side k (MVAR: 7)")
    dilation: int = Field(1, ge=1, description="window dilation")
    apply_from: int = Field(-2, description="first scale index that uses the window; negative counts from the "
                            "end (MVAR: -2, i.e. refine_step 8 of the 10-scale 256px schedule: the 13x13 and 16x16 maps)")


class NeighborhoodPattern(AttentionPattern):
    """MVAR's spatial-Markov attention: on scales from ``apply_from`` on, a query sees a
    ``kernel_size`` x ``kernel_size`` window (NATTEN's border rule) at the corresponding position of
    every visible scale (under ``markov`` order 1 that is its own map); earlier scales are dense."""

    name = "neighborhood"

    def __init__(self, options: NeighborhoodOptions | None = None) -> None:
        self.options = options or NeighborhoodOptions()

    def first_scale(self, layout: SequenceLayout) -> int:
        return layout.resolve_scale(self.options.apply_from)

    def check_layout(self, layout: SequenceLayout) -> None:
        """``apply_from`` names a scale of the schedule (``-S .. S-1``), and with a dilation the
        window fits every map it applies to (``kernel_size * dilation <= side``, NATTEN's rule; an
        undilated window larger than a map covers the whole map)."""
        count, first = layout.num_scales, self.options.apply_from
        if not -count <= first < count:
            raise UsageError(f"--attention-apply-from {first}: the schedule has {count} scales, so give -{count} .. "
                             f"{count - 1} (negative counts from the end)")
        k, d = self.options.kernel_size, self.options.dilation
        if d == 1:
            return
        for index in range(layout.resolve_scale(first), count):
            h, w = layout.grids[index]
            if k * d > min(h, w):
                raise UsageError(f"--attention-dilation {d} with --attention-kernel-size {k} spans {k * d} tokens but "
                                 f"scale {index} is {h}x{w} (lower the dilation or kernel, or raise "
                                 f"--attention-apply-from)")

    @functools.lru_cache(maxsize=256)
    def spec(self, layout, queries, keys, visible):
        allowed, qc, kc = scale_visibility(layout, queries, keys, visible)
        k, d = self.options.kernel_size, self.options.dilation
        restricted = qc.scale >= self.first_scale(layout)
        if bool(restricted.any()):
            # corresponding position of the query on the key's map: floor((i + 0.5) * n_k / n_q)
            center_r = torch.div((2 * qc.row[:, None] + 1) * kc.height[None, :], 2 * qc.height[:, None], rounding_mode="floor")
            center_c = torch.div((2 * qc.col[:, None] + 1) * kc.width[None, :], 2 * qc.width[:, None], rounding_mode="floor")
            window = axis_allowed(center_r, kc.row[None, :], kc.height[None, :], k, d) & axis_allowed(
                center_c, kc.col[None, :], kc.width[None, :], k, d)
            allowed = allowed & (~restricted[:, None] | window)
        if bool(allowed.all()):
            return Dense()
        scale = _single_scale(layout, queries)
        if scale is not None and queries == keys and bool(restricted.all()):
            grid_h, grid_w = layout.grids[scale]
            return Neighborhood2D(grid_h, grid_w, k, d)
        multi = bool((allowed & (qc.scale[:, None] != kc.scale[None, :]) & restricted[:, None]).any())
        return structured(layout, queries, keys, allowed, "cross-scale-neighborhood" if multi else "neighborhood")
