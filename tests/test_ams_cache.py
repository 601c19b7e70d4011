"""``ams`` (AMS-KV's scale rule): the coarsest and the most recent scales, exact spans, bounded storage."""

from __future__ import annotations

import pytest
import torch

from mvar_engine.core.backend_selection import selector_for
from mvar_engine.models.var_adapter import NextScaleEngine
from mvar_engine.plugins.ams_cache import AmsCache, AmsOptions
from mvar_engine.plugins.caches import FullCache
from mvar_engine.plugins.patterns import DensePattern
from mvar_engine.plugins.trajectories import FullTrajectory
from mvar_engine.testing import check_cache_policy, tiny_next_scale_model


def make(setting, layers, heads):
    """The kit's cache: every scale kept (local beyond any drawn schedule), or a (condensed, local) rule."""
    options = AmsOptions(condensed=1, local=8) if setting is None else AmsOptions(condensed=setting[0], local=setting[1])
    return AmsCache(options)


def test_the_kit_passes_at_lossy_rules():
    check_cache_policy(make, bounded=False, lossy=((1, 1), (2, 1), (1, 2)), max_examples=6)


def test_it_keeps_the_condensed_and_local_scales_in_bounded_storage():
    """VAR scales 1, 4, 9, 16, 25 tokens; condensed 2, local 1: before the last scale the layer holds
    scales 0, 1 and 3 (1 + 4 + 16 tokens), so its storage is 46 slots, not 55."""
    model, tokenizer = tiny_next_scale_model((1, 2, 3, 4, 5))
    engine = NextScaleEngine(model, tokenizer, FullTrajectory(), DensePattern(), FullCache(), selector_for("sdpa"))
    cache = AmsCache(AmsOptions(condensed=2, local=1))
    assert [cache.kept_scales(done) for done in range(1, 6)] == [[0], [0, 1], [0, 1, 2], [0, 1, 3], [0, 1, 4]]
    seen = []
    original = cache.update

    def update(layer, k, v, spans):
        k_all, v_all, k_spans = original(layer, k, v, spans)
        if layer == 0:
            seen.append(k_spans)
        return k_all, v_all, k_spans

    cache.update = update
    with torch.no_grad():
        engine.generate(torch.tensor([1, 2]), cache, cfg=2.0, top_k=1, top_p=1.0)
    layout = engine.layout
    assert seen[-1] == layout.spans_of([0, 1, 3, 4])  # the last scale attends to the kept scales and itself
    assert cache.layers[0].k.shape[2] == 46 == cache.capacity(layout)


@pytest.mark.parametrize("argv, needle", [
    (["--trajectory", "full", "--cache", "ams", "--cache-condensed", "11"],
     "--cache-condensed 11: the schedule has 6 scales (give at most 6)"),
    (["--trajectory", "raster", "--cache", "ams"], "cache 'ams' serves next-scale trajectories, not trajectory 'raster'"),
])
def test_bad_settings_are_one_line(argv, needle, refused):
    refused(argv, needle)
