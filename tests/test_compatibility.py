"""Compatibility is decided by the traits components declare, for every family, before any model runs."""

from __future__ import annotations

import pytest

from mvar_engine import AttentionPattern, Dense, IncompatibleComponentsError
from mvar_engine.core.compatibility import check_compatible
from mvar_engine.plugins.caches import FullCache, NoCache
from mvar_engine.plugins.h2o_cache import H2OCache
from mvar_engine.plugins.patterns import CausalPattern, DensePattern, NeighborhoodPattern
from mvar_engine.plugins.raster import RasterTrajectory
from mvar_engine.plugins.trajectories import FullTrajectory, MarkovOptions, MarkovTrajectory


class TokenOnlyCache(FullCache):
    name = "token-only"
    families = ("next-token",)


class RasterOnlyPattern(AttentionPattern):
    name = "raster-only"
    families = ("next-token",)

    def spec(self, layout, queries, keys, visible):
        return Dense()


def test_next_token_only_cache_is_refused_under_a_next_scale_trajectory():
    with pytest.raises(IncompatibleComponentsError, match="cache 'token-only' serves next-token trajectories, not "
                                                          "trajectory 'full'"):
        check_compatible(FullTrajectory(), DensePattern(), TokenOnlyCache())
    check_compatible(RasterTrajectory(), CausalPattern(), TokenOnlyCache())


def test_pattern_family_is_checked():
    with pytest.raises(IncompatibleComponentsError, match="attention 'neighborhood' describes next-scale steps"):
        check_compatible(RasterTrajectory(), NeighborhoodPattern(), FullCache())
    with pytest.raises(IncompatibleComponentsError, match="attention 'raster-only' describes next-token steps"):
        check_compatible(FullTrajectory(), RasterOnlyPattern(), FullCache())
    with pytest.raises(IncompatibleComponentsError, match="generates next-scale"):
        check_compatible(RasterTrajectory(), CausalPattern(), FullCache(), model_family="next-scale")


def test_headwise_needs_all_history_and_every_visible_key():
    check_compatible(FullTrajectory(), DensePattern(), H2OCache())
    check_compatible(RasterTrajectory(), CausalPattern(), H2OCache())
    with pytest.raises(IncompatibleComponentsError, match="trajectory 'markov' hides some earlier keys"):
        check_compatible(MarkovTrajectory(MarkovOptions(order=2)), DensePattern(), H2OCache())
    with pytest.raises(IncompatibleComponentsError, match="attention 'raster-only' hides some visible keys"):
        check_compatible(RasterTrajectory(), RasterOnlyPattern(), H2OCache())
    check_compatible(MarkovTrajectory(), NeighborhoodPattern(), NoCache())


def test_the_old_headwise_name_still_declares_stand_in_spans():
    class OldStyle(FullCache):
        name = "old-style"
        families = ("next-token",)
        headwise = True

    assert OldStyle.stand_in_spans and not FullCache.stand_in_spans
    with pytest.raises(IncompatibleComponentsError, match="cache 'old-style' keeps positions that differ per row"):
        check_compatible(RasterTrajectory(), RasterOnlyPattern(), OldStyle())


def test_a_cache_words_its_own_refusal():
    class FirstScalesOnly(FullCache):
        name = "first-scales"

        def incompatibility(self, name, trajectory, pattern):
            if trajectory.name != "full":
                return f"cache '{name}' keeps the first scales, which trajectory '{trajectory.name}' never reads"
            return None

    check_compatible(FullTrajectory(), DensePattern(), FirstScalesOnly())
    with pytest.raises(IncompatibleComponentsError) as error:
        check_compatible(MarkovTrajectory(MarkovOptions(order=2)), DensePattern(), FirstScalesOnly())
    assert str(error.value) == "cache 'first-scales' keeps the first scales, which trajectory 'markov' never reads"


def test_refusals_fit_the_cache_at_hand():
    """A cache that needs all history is not sent to a wider markov (which refuses it too); a
    next-scale-only plugin cache under raster gets the family rule, not window's hint."""
    from mvar_engine.plugins.caches import WindowCache, WindowOptions

    with pytest.raises(IncompatibleComponentsError) as error:
        check_compatible(MarkovTrajectory(), NeighborhoodPattern(), H2OCache())
    assert str(error.value).endswith("(use --cache none)")
    with pytest.raises(IncompatibleComponentsError, match="--trajectory-order 2 to let a scale see the one before"):
        check_compatible(MarkovTrajectory(), NeighborhoodPattern(), FullCache())
    with pytest.raises(IncompatibleComponentsError, match="give --cache-budget 0.2 for a window of recent tokens"):
        check_compatible(RasterTrajectory(), CausalPattern(), WindowCache(WindowOptions(scales=2)), names={"cache": "window"})

    class ScalesOnly(FullCache):
        name = "scales-only"
        families = ("next-scale",)

    with pytest.raises(IncompatibleComponentsError, match="cache 'scales-only' serves next-scale trajectories, not "
                                                          "trajectory 'raster'"):
        check_compatible(RasterTrajectory(), CausalPattern(), ScalesOnly())
