"""Patterns state their specs' structure from their rules (issue 31): no token mask is built for a
``Dense``, ``BlockCausal``, ``BlockDiagonal``, ``Causal`` or ``Neighborhood2D`` spec."""

from __future__ import annotations

import pytest

from mvar_engine.core.layout import SequenceLayout
from mvar_engine.core.trajectory import Visibility
from mvar_engine.plugins import patterns
from mvar_engine.plugins.raster import RasterTrajectory
from mvar_engine.plugins.trajectories import FullTrajectory, MarkovOptions, MarkovTrajectory


@pytest.fixture
def no_token_masks(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a token mask was built")

    monkeypatch.setattr(patterns, "visible_positions", refuse)
    monkeypatch.setattr(patterns, "scale_visibility", refuse)
    patterns.DensePattern.spec.cache_clear()  # specs are cached per (pattern, shape): compute them here
    patterns.NeighborhoodPattern.spec.cache_clear()


LAYOUT = SequenceLayout.from_patch_nums((1, 2, 3, 4))


@pytest.mark.parametrize("trajectory, queries, keys, kind", [
    (FullTrajectory(), LAYOUT.spans_of(range(4)), LAYOUT.spans_of(range(4)), "block-causal"),
    (FullTrajectory(), LAYOUT.spans_of([3]), LAYOUT.spans_of(range(4)), "dense"),
    (MarkovTrajectory(), LAYOUT.spans_of(range(4)), LAYOUT.spans_of(range(4)), "block-diagonal"),
    (MarkovTrajectory(MarkovOptions(order=2)), LAYOUT.spans_of([3]), LAYOUT.spans_of([2, 3]), "dense"),
])
def test_dense_states_the_trajectory_structure(trajectory, queries, keys, kind, no_token_masks):
    pattern = patterns.DensePattern()
    assert pattern.spec(LAYOUT, queries, keys, Visibility(trajectory)).kind == kind


def test_neighborhood_states_its_structure(no_token_masks):
    pattern = patterns.NeighborhoodPattern(patterns.NeighborhoodOptions(kernel_size=3, apply_from=-1))
    last = LAYOUT.spans_of([3])
    spec = pattern.spec(LAYOUT, last, last, Visibility(MarkovTrajectory()))
    assert spec.kind == "neighborhood2d" and (spec.height, spec.width, spec.kernel_size) == (4, 4, 3)
    # a window as large as every map hides nothing: the trajectory's own structure
    wide = patterns.NeighborhoodPattern(patterns.NeighborhoodOptions(kernel_size=7, apply_from=0))
    whole = LAYOUT.spans_of(range(4))
    assert wide.spec(LAYOUT, whole, whole, Visibility(FullTrajectory())).kind == "block-causal"


def test_raster_steps_are_read_off_the_spans(no_token_masks):
    layout = SequenceLayout(((1, 1), (4, 4)))
    visible = Visibility(RasterTrajectory())
    assert patterns.CausalPattern().spec(layout, ((5, 6),), ((0, 6),), visible).kind == "causal"
    assert patterns.CausalPattern().spec(layout, ((5, 6),), ((0, 1), (3, 4), (5, 6)), visible).kind == "causal"
