"""Decoding steps shaped for a GPU: no host syncs in a steady-state raster step, for every built-in
cache policy, and a bounded number of aten calls per layer (counted at the dispatch level, as a GPU
would launch them); the spans-only spec recognition of token-causal trajectories equals the masks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mvar_engine.apps.bench.step_calls import StepCallCounter
from mvar_engine.apps.config import EngineConfig
from mvar_engine.apps.pipeline import Pipeline, resolve_components
from mvar_engine.core.attention import visible_positions
from mvar_engine.core.layout import SequenceLayout
from mvar_engine.core.trajectory import Visibility
from mvar_engine.models.default_models import default_checkpoints
from mvar_engine.plugins.budget_cache import slot_order_spans
from mvar_engine.plugins.patterns import CausalPattern, causal_spec, token_causal_spec
from mvar_engine.plugins.raster import RasterTrajectory
from mvar_engine.plugins.ssd_cache import SSDCache, SSDOptions

from test_compressed_caches import head_map_for

# (cache, options, most aten calls per layer in any steady step, most on average over the steady
# steps): the goal is 45 with the full cache, 60 with the others. A --cache-buffer policy compacts
# once every `buffer` steps (a sort-free selection and a gather of every kept entry): its compaction
# steps are a ratchet at the figures of main when written (lower them as they get leaner), its
# average meets the goal.
POLICIES = [
    ("full", {}, 45, 45),
    ("window", {"budget": 12}, 47, 60),
    ("sink", {"budget": 12}, 47, 60),
    ("h2o", {"budget": 12}, 59, 60),
    ("ssd", {"budget": 12}, 58, 60),
    ("sink", {"budget": 12, "buffer": 4}, 57, 60),
    ("h2o", {"budget": 12, "buffer": 4}, 80, 60),
    ("ssd", {"budget": 12, "buffer": 4}, 82, 60),
]


@pytest.fixture(scope="module")
def raster_pipeline():
    if default_checkpoints("raster") is None:
        pytest.skip("the default raster weights are not installed")
    config = EngineConfig(trajectory={"name": "raster"}, device="cpu", progress=False)
    return Pipeline.from_config(config)


def _cache(pipeline, name, options):
    if name == "ssd":
        adapter = pipeline.adapter
        return SSDCache(SSDOptions(**options), head_map=head_map_for(adapter.num_layers, adapter.num_heads))
    config = EngineConfig(trajectory={"name": "raster"}, cache={"name": name, "options": options}, device="cpu")
    return resolve_components(config).cache


def _counted_steps(pipeline, cache, cfg=4.0, top_k=0):
    counter = StepCallCounter()
    labels = torch.tensor([1, 7])
    with counter:
        pipeline.engine.generate(labels, cache, cfg=cfg, top_k=top_k, top_p=1.0,
                                 generator=torch.Generator().manual_seed(0), progress=counter.end_step)
    return counter.steps


@pytest.mark.parametrize("name,options,ceiling,mean_ceiling", POLICIES, ids=[f"{n}-{o}" for n, o, _, _ in POLICIES])
def test_steady_raster_steps_sync_nothing_and_stay_lean(raster_pipeline, name, options, ceiling, mean_ceiling):
    """Steps 3 onward (eviction included: the budget is well below the 65 positions): no call that
    reads a tensor's value on the host, at most ``ceiling`` aten calls per layer in any step and
    ``mean_ceiling`` on average (sampling and the next input included)."""
    steps = _counted_steps(raster_pipeline, _cache(raster_pipeline, name, options))
    layers = raster_pipeline.adapter.num_layers
    assert len(steps) == raster_pipeline.adapter.num_tokens
    syncs = {index: dict(step.syncs) for index, step in enumerate(steps) if index >= 3 and step.syncs}
    assert not syncs, f"{name} {options}: host syncs in steady steps: {syncs}"
    per_layer = [step.aten_total / layers for step in steps[3:]]
    assert max(per_layer) <= ceiling, f"{name} {options}: {max(per_layer):.1f} aten calls per layer in a step (ceiling {ceiling})"
    mean = sum(per_layer) / len(per_layer)
    assert mean <= mean_ceiling, f"{name} {options}: {mean:.1f} aten calls per layer per step on average (ceiling {mean_ceiling})"


def test_the_counter_sees_a_sync_where_a_step_has_one(raster_pipeline, monkeypatch):
    """Not vacuous: a cache whose ``update`` reads a value on the host is caught."""
    cache = _cache(raster_pipeline, "full", {})
    original = cache.update

    def update(layer, k, v, spans):
        float(k.abs().max())  # a host read of a tensor value
        return original(layer, k, v, spans)

    monkeypatch.setattr(cache, "update", update)
    steps = _counted_steps(raster_pipeline, cache)
    assert steps[5].syncs[".__float__()"] == raster_pipeline.adapter.num_layers


@given(data=st.data(), length=st.integers(2, 24), shuffle=st.booleans())
def test_spans_read_specs_equal_the_token_causal_mask(data, length, shuffle):
    """Under ``raster`` the spec read off the spans (no mask built) allows exactly what the
    trajectory's token rule allows, whatever subset of keys is kept and in whatever slot order."""
    layout = SequenceLayout(((1, 1), (1, length - 1)))
    visible = Visibility(RasterTrajectory())
    q_len = data.draw(st.integers(1, min(4, length)))
    q_start = data.draw(st.integers(0, length - q_len))
    queries = ((q_start, q_start + q_len),)
    kept = data.draw(st.lists(st.integers(0, length - 1), unique=True, max_size=length))
    with_queries = data.draw(st.booleans())
    order = [p for p in kept if not with_queries or not q_start <= p < q_start + q_len]
    if shuffle:
        order = data.draw(st.permutations(order))
    if with_queries:
        order = list(order) + list(range(q_start, q_start + q_len))
    if not order:
        return
    keys = slot_order_spans(order)
    allowed = visible_positions(layout, queries, keys, visible)
    spec = token_causal_spec(queries, keys)
    if spec is None:
        return
    mask = spec.mask(q_len, len(order), "cpu")
    assert torch.equal(allowed, torch.ones_like(allowed) if mask is None else mask), (queries, keys, spec)
    if bool(allowed.any(dim=1).all()):  # what the pattern returns for a valid step is the same spec
        assert CausalPattern().spec(layout, queries, keys, visible) == spec == causal_spec(layout, queries, keys,
                                                                                             visible)


def test_spans_read_specs_are_taken_in_the_usual_steps():
    """Not vacuous: a raster step over a full cache, a compacted one, or slots out of order is read
    off the spans (no mask); a key after the queries is left to the mask."""
    assert token_causal_spec(((7, 8),), ((0, 8),)).kind == "causal"
    assert token_causal_spec(((7, 8),), ((0, 1), (4, 8))).kind == "causal"
    assert token_causal_spec(((7, 8),), ((0, 1), (7, 8), (3, 5))).kind == "dense"  # slot order after a replace
    assert token_causal_spec(((3, 5),), ((0, 3),)).kind == "dense"
    assert token_causal_spec(((7, 8),), ((8, 9), (0, 1), (7, 8))) is None
