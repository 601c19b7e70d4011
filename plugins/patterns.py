"""Built-in attention patterns: ``dense`` (every visible key), ``causal`` (the same under a raster
trajectory: every earlier token; its default) and ``neighborhood`` (MVAR's spatial-Markov attention).

A pattern states its spec's structure from its rules, never by comparing token masks: the
trajectory's scale rule over the spans' scale runs (:func:`scale_structure`: a matrix of a few
entries), the raster rule over the spans (:func:`token_causal_spec`), the window rule per axis
(:meth:`NeighborhoodPattern.window_restricts`); a token mask is built only for a ``Masked`` spec."""

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


def scale_runs(layout: SequenceLayout, spans: Spans) -> list[tuple[int, int]]:
    """``(scale index, token count)`` of each run of consecutive tokens of one scale in ``spans``, in order."""
    runs: list[tuple[int, int]] = []
    for begin, end in spans:
        for scale in layout.scales:
            low, high = max(begin, scale.span[0]), min(end, scale.span[1])
            if low >= high:
                continue
            if runs and runs[-1][0] == scale.index:
                runs[-1] = (scale.index, runs[-1][1] + high - low)
            else:
                runs.append((scale.index, high - low))
    return runs


def scale_structure(layout: SequenceLayout, queries: Spans, keys: Spans, visible: VisibilityFn) -> AttentionSpec | None:
    """The spec a scale-level rule states over the spans, read off the runs' scale matrix (a few
    entries, never the token mask): ``Dense`` when every query scale sees every key scale; over the
    same queries and keys, ``BlockCausal`` (a run sees itself and the runs before it) or
    ``BlockDiagonal`` (itself only) with the runs as blocks; None when only a mask says it."""
    q_runs, k_runs = scale_runs(layout, queries), scale_runs(layout, keys)
    rule = visible(torch.tensor([s for s, _ in q_runs])[:, None], torch.tensor([s for s, _ in k_runs])[None, :])
    if bool(rule.all()):
        return Dense()
    if queries == keys:
        blocks = tuple(count for _, count in q_runs)
        lower = torch.ones(len(blocks), len(blocks), dtype=torch.bool).tril()
        if torch.equal(rule, lower):
            return BlockCausal(blocks)
        if torch.equal(rule, torch.eye(len(blocks), dtype=torch.bool)):
            return BlockDiagonal(blocks)
    return None


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
        stated = scale_structure(layout, queries, keys, visible)
        return stated if stated is not None else Masked(visible_positions(layout, queries, keys, visible), "scale-mask")


class CausalPattern(DensePattern):
    """Every key the trajectory shows: under ``raster`` each token sees the prefix and every earlier
    token (LlamaGen), intersected with what the cache keeps."""

    name = "causal"


def causal_spec(layout: SequenceLayout, queries: Spans, keys: Spans, visible: VisibilityFn) -> AttentionSpec:
    """The most specific spec of what the trajectory shows, in token order: ``Causal`` (bottom-right
    aligned) when that is the rule, ``Dense`` when every query sees every key (one query over kept
    keys in any slot order), else the explicit ``Masked`` mask. Under a ``token_causal`` trajectory
    the structure is read off the spans (:func:`token_causal_spec`): no mask unless it is ``Masked``;
    only a plugin trajectory of another rule has its structure read off its mask."""
    if spans_length(queries) == 0 or spans_length(keys) < 1:
        raise ValueError(f"attention needs queries and keys, got {queries} over {keys}")
    token_causal = isinstance(visible, Visibility) and visible.trajectory.token_causal
    spec = token_causal_spec(queries, keys) if token_causal else None
    if spec is not None:
        return spec
    allowed = visible_positions(layout, queries, keys, visible)
    if not bool(allowed.any(dim=1).all()):
        raise ValueError(f"a query in {queries} sees no key of {keys}")
    if token_causal:  # token_causal_spec states every Causal and Dense case of the rule: the rest is a mask
        return Masked(allowed, "raster-causal")
    q_len, k_len = allowed.shape  # a next-token trajectory of unknown rule: its mask tells the structure
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

    def window_restricts(self, layout: SequenceLayout, q_scales: list[int], k_scales: list[int],
                         visible: VisibilityFn) -> bool:
        """Does the window hide a key the trajectory shows, for some restricted query scale and a key
        scale it sees? Read per axis (a window rule is a row rule and a column rule), never as the
        token mask."""
        k, d = self.options.kernel_size, self.options.dilation
        for qs in q_scales:
            for ks in k_scales:
                if not bool(visible(torch.tensor(qs), torch.tensor(ks))):
                    continue
                (qh, qw), (kh, kw) = layout.grids[qs], layout.grids[ks]
                for q_side, k_side in ((qh, kh), (qw, kw)):
                    center = torch.div((2 * torch.arange(q_side) + 1) * k_side, 2 * q_side, rounding_mode="floor")
                    if not bool(axis_allowed(center[:, None], torch.arange(k_side)[None, :], k_side, k, d).all()):
                        return True
        return False

    @functools.lru_cache(maxsize=256)
    def spec(self, layout, queries, keys, visible):
        """Where the window hides nothing the trajectory shows, the trajectory's own structure
        (:func:`scale_structure`); a whole restricted scale over itself, ``Neighborhood2D``; else the
        mask of the trajectory's rule and the window."""
        first = self.first_scale(layout)
        q_scales = [s for s, _ in scale_runs(layout, queries)]
        restricted_scales = sorted({s for s in q_scales if s >= first})
        if not self.window_restricts(layout, restricted_scales, sorted({s for s, _ in scale_runs(layout, keys)}),
                                     visible):
            stated = scale_structure(layout, queries, keys, visible)
            if stated is not None:
                return stated
        k, d = self.options.kernel_size, self.options.dilation
        scale = _single_scale(layout, queries)
        if scale is not None and scale >= first and queries == keys:
            grid_h, grid_w = layout.grids[scale]
            return Neighborhood2D(grid_h, grid_w, k, d)
        allowed, qc, kc = scale_visibility(layout, queries, keys, visible)
        restricted = qc.scale >= first
        # corresponding position of the query on the key's map: floor((i + 0.5) * n_k / n_q)
        center_r = torch.div((2 * qc.row[:, None] + 1) * kc.height[None, :], 2 * qc.height[:, None], rounding_mode="floor")
        center_c = torch.div((2 * qc.col[:, None] + 1) * kc.width[None, :], 2 * qc.width[:, None], rounding_mode="floor")
        window = axis_allowed(center_r, kc.row[None, :], kc.height[None, :], k, d) & axis_allowed(
            center_c, kc.col[None, :], kc.width[None, :], k, d)
        allowed = allowed & (~restricted[:, None] | window)
        multi = bool((allowed & (qc.scale[:, None] != kc.scale[None, :]) & restricted[:, None]).any())
        return Masked(allowed, "cross-scale-neighborhood" if multi else "neighborhood")
