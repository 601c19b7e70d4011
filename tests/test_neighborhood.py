"""The neighbourhood rule against an independent per-element implementation of NATTEN's window
start formula, against natten.na2d itself, and the pattern's specs under each trajectory."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from mvar_engine.core.attention import Dense, Masked, Neighborhood2D
from mvar_engine.core.layout import SequenceLayout
from mvar_engine.core.neighborhood import neighborhood_mask_2d
from mvar_engine.plugins.patterns import NeighborhoodOptions, NeighborhoodPattern
from mvar_engine.plugins.trajectories import FullTrajectory, MarkovTrajectory


def natten_window_start(index: int, length: int, kernel: int, dilation: int) -> int:
    """NATTEN's non-causal window start (its get_window_start, written out per element)."""
    before = kernel // 2
    if dilation <= 1:
        start = max(index - before, 0)
        if index + (kernel - before) > length:  # window would run past the end: shift it back
            start = length - kernel
        return start
    group = index % dilation
    if index - before * dilation < 0:
        return group
    if index + (kernel - before - 1) * dilation >= length:
        a = (length // dilation) * dilation
        b = length - a
        if group < b:
            return length - b + group - (kernel - 1) * dilation
        return a + group - kernel * dilation
    return index - before * dilation


def brute_axis(length: int, kernel: int, dilation: int, causal: bool) -> list[set[int]]:
    windows = []
    for i in range(length):
        group = [j for j in range(length) if j % dilation == i % dilation]
        k = min(kernel, len(group))  # mvar-engine's extension: a kernel larger than the axis covers it
        if causal:
            t = group.index(i)
            windows.append(set(group[max(t - k + 1, 0):t + 1]))
        elif k == kernel:
            start = natten_window_start(i, length, kernel, dilation)
            windows.append({start + dilation * m for m in range(kernel)})
        else:
            windows.append(set(group))
    return windows


@given(h=st.integers(1, 12), w=st.integers(1, 12), k=st.integers(1, 9), d=st.integers(1, 3), causal=st.booleans())
def test_mask_matches_independent_natten_rule(h, w, k, d, causal):
    rows, cols = brute_axis(h, k, d, causal), brute_axis(w, k, d, causal)
    expected = torch.zeros(h * w, h * w, dtype=torch.bool)
    for qi in range(h * w):
        for ki in range(h * w):
            expected[qi, ki] = (ki // w in rows[qi // w]) and (ki % w in cols[qi % w])
    assert torch.equal(neighborhood_mask_2d(h, w, k, d, causal), expected)


@given(h=st.integers(1, 12), w=st.integers(1, 12), k=st.integers(1, 9), d=st.integers(1, 3))
def test_every_query_sees_exactly_k_by_k_keys_when_the_map_allows(h, w, k, d):
    assume(k * d <= min(h, w))
    mask = neighborhood_mask_2d(h, w, k, d)
    assert torch.all(mask.sum(dim=1) == k * k)
    assert torch.all(mask.diagonal())


@given(h=st.integers(3, 10), w=st.integers(3, 10), k=st.integers(2, 5), d=st.integers(1, 2), causal=st.booleans(),
       seed=st.integers(0, 5))
def test_attention_matches_natten_na2d(h, w, k, d, causal, seed):
    natten = pytest.importorskip("natten", reason="natten is not installed")
    assume(k * d <= min(h, w))
    from mvar_engine.backends.natten_backend import NattenBackend
    from mvar_engine.backends.reference import ReferenceBackend

    g = torch.Generator().manual_seed(seed)
    q, kk, v = (torch.randn(2, 3, h * w, 8, generator=g) for _ in range(3))
    spec = Neighborhood2D(h, w, k, d, causal)
    expected = ReferenceBackend().attend(q, kk, v, spec, scale=0.3)
    got = NattenBackend().attend(q, kk, v, spec, scale=0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert natten is not None


def _pattern(k=3, apply_from=-2, d=1):
    return NeighborhoodPattern(NeighborhoodOptions(kernel_size=k, apply_from=apply_from, dilation=d))


def test_markov_last_scale_is_a_single_map_neighborhood():
    layout = SequenceLayout.from_patch_nums((1, 2, (5, 7), (8, 9)))
    pattern, markov = _pattern(), MarkovTrajectory()
    last = layout.scales[-1]
    spec = pattern.spec(layout, (last.span,), (last.span,), markov.visible)
    assert spec == Neighborhood2D(8, 9, 3, 1)
    small = layout.scales[1]  # below apply_from: dense
    assert isinstance(pattern.spec(layout, (small.span,), (small.span,), markov.visible), Dense)


@given(seed=st.integers(0, 20))
def test_full_trajectory_neighborhood_is_cross_scale_and_never_sees_the_future(seed):
    layout = SequenceLayout.from_patch_nums((1, 2, 4, 6, 9))
    full = FullTrajectory()
    spec = _pattern(k=3, apply_from=2).spec(layout, ((0, layout.length),), ((0, layout.length),), full.visible)
    assert isinstance(spec, Masked)
    mask = spec.allowed
    coords = layout.coords()
    g = torch.Generator().manual_seed(seed)
    q = int(torch.randint(0, layout.length, (1,), generator=g))
    qs, qr, qc = int(coords.scale[q]), int(coords.row[q]), int(coords.col[q])
    for key in range(layout.length):
        ks, kr, kc = int(coords.scale[key]), int(coords.row[key]), int(coords.col[key])
        if ks > qs:
            assert not mask[q, key], "a query saw a later scale"
            continue
        if qs < 2:
            assert mask[q, key]
            continue
        hq, wq = layout.grids[qs]
        hk, wk = layout.grids[ks]
        cr, cc = (2 * qr + 1) * hk // (2 * hq), (2 * qc + 1) * wk // (2 * wq)
        rows, cols = brute_axis(hk, 3, 1, False), brute_axis(wk, 3, 1, False)
        assert bool(mask[q, key]) == (kr in rows[cr] and kc in cols[cc])
