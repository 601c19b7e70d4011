"""``--compile``: the one-token raster steps run one compiled graph (fullgraph, no recompilation
after the first decode step, none for a second generation of the same shape), with the greedy
tokens of the eager engine; where it cannot run, one line before any model is built. Compiling
takes tens of seconds on the CPU: these tests are few and share one pipeline."""

from __future__ import annotations

import pytest
import torch

from mvar_engine.apps.config import EngineConfig
from mvar_engine.apps.pipeline import Pipeline
from mvar_engine.core import compiled_decoding
from mvar_engine.models.default_models import default_checkpoints
from mvar_engine.plugins.caches import FullCache

pytestmark = pytest.mark.skipif(default_checkpoints("raster") is None,
                                reason="the default raster weights are not installed")


def _greedy(pipeline, labels, cfg, cache=None):
    return pipeline.engine.generate(torch.tensor(labels), cache or pipeline.components.cache, cfg=cfg, top_k=1,
                                    top_p=1.0, return_logits=True)


def test_compiled_raster_steps_equal_eager_and_compile_once():
    from torch._dynamo.utils import counters

    config = EngineConfig(trajectory={"name": "raster"}, device="cpu", progress=False)
    eager = Pipeline.from_config(config)
    compiled = Pipeline.from_config(config.model_copy(update={"compile": True}))
    torch._dynamo.reset()
    counters.clear()
    for labels, cfg in (([1, 7], 4.0), ([2, 3], 4.0)):  # the second generation, a new cache, reuses the graph
        want, got = _greedy(eager, labels, cfg), _greedy(compiled, labels, cfg, cache=FullCache())
        assert torch.equal(got.tokens, want.tokens)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_the_compiled_step_is_not_vacuous(monkeypatch):
    """The compiled graph really runs the steps: a broken static update changes the tokens."""
    config = EngineConfig(trajectory={"name": "raster"}, device="cpu", progress=False, compile=True)
    pipeline = Pipeline.from_config(config)
    eager = _greedy(Pipeline.from_config(config.model_copy(update={"compile": False})), [1, 7], 4.0)
    cache = pipeline.components.cache
    original = cache.update_static

    def forgetful(layer, k, v, position):  # shows only the prefix and the new token
        k_all, v_all, valid = original(layer, k, v, position)
        return k_all, v_all, valid & ((cache.slots < 1) | (cache.slots == position))

    monkeypatch.setattr(cache, "update_static", forgetful)
    torch._dynamo.reset()
    assert not torch.equal(_greedy(pipeline, [1, 7], 4.0).tokens, eager.tokens)


def _budgeted(name, layers, heads, buffer=0):
    """A fresh budgeted cache (budget 0.3 of the shipped raster model's 65 tokens: 20 slots; ``buffer``
    slots beside them)."""
    from mvar_engine.plugins.budget_cache import BudgetOptions, NeighborhoodWindowCache, TokenWindowCache
    from mvar_engine.plugins.h2o_cache import H2OCache, H2OOptions
    from mvar_engine.plugins.head_map import classify
    from mvar_engine.plugins.sink_cache import SinkCache, SinkOptions
    from mvar_engine.plugins.ssd_cache import SSDCache, SSDOptions

    if name == "ssd":  # half the heads semantic-sink, half spatial-locality, drawn once
        scores = torch.rand(layers, heads, generator=torch.Generator().manual_seed(0)).tolist()
        return SSDCache(SSDOptions(budget=0.3, buffer=buffer), head_map=classify(scores, 0.5))
    return {"sink": lambda: SinkCache(SinkOptions(budget=0.3, buffer=buffer)),
            "window": lambda: TokenWindowCache(BudgetOptions(budget=0.3, buffer=buffer)),
            "neighborhood": lambda: NeighborhoodWindowCache(BudgetOptions(budget=0.3, buffer=buffer)),
            "h2o": lambda: H2OCache(H2OOptions(budget=0.3, buffer=buffer))}[name]()


# (cache, --cache-buffer, graphs): one graph without a buffer; an appending and a compacting one with it
BUDGETED_COMPILED = [("sink", 0, 1), ("window", 0, 1), ("neighborhood", 0, 1), ("h2o", 0, 1), ("ssd", 0, 1), ("sink", 4, 2), ("ssd", 4, 2)]


@pytest.mark.parametrize("name,buffer,graphs", BUDGETED_COMPILED,
                         ids=[f"{n}-buffer{b}" for n, b, _ in BUDGETED_COMPILED])
def test_compiled_budgeted_steps_equal_eager(name, buffer, graphs, monkeypatch):
    """A budgeted cache under --compile: slot = position while a layer fills, then the policy's
    victim chosen on the device (oldest movable slot; least attended for h2o and ssd's sink heads,
    from probabilities the graph materialises). With a buffer it appends after the kept set, and
    every ``buffer`` steps a compacting step (the policy's selection inside the graph) keeps
    ``budget - 1`` (ssd: device-side top-k per sink head beside windowed locality heads). The
    greedy tokens and kept positions (every layer) of eager decoding; no graph break and no graph
    more for a second generation. A wrong victim (the class prefix's slot) changes the tokens: the
    graph really evicts."""
    from torch._dynamo.utils import counters

    config = EngineConfig(trajectory={"name": "raster"}, cache={"name": "h2o", "options": {"budget": 0.3}},
                          device="cpu", progress=False)
    eager = Pipeline.from_config(config)
    compiled = Pipeline.from_config(config.model_copy(update={"compile": True}))
    model = eager.engine.model
    torch._dynamo.reset()
    counters.clear()
    for labels in ([1, 7], [2, 3]):
        want_cache = _budgeted(name, model.num_layers, model.num_heads, buffer=buffer)
        got_cache = _budgeted(name, model.num_layers, model.num_heads, buffer=buffer)
        assert got_cache.static_decoding
        want, got = _greedy(eager, labels, 4.0, want_cache), _greedy(compiled, labels, 4.0, got_cache)
        assert torch.equal(got.tokens, want.tokens)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
        for layer in range(model.num_layers):
            assert torch.equal(got_cache.kept_positions(layer), want_cache.kept_positions(layer))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    if name in ("sink", "h2o", "neighborhood") and not buffer:
        cache = _budgeted(name, model.num_layers, model.num_heads)
        monkeypatch.setattr(type(cache), "static_victim", lambda self, layer, store, position: torch.zeros(1, dtype=torch.long))
        torch._dynamo.reset()
        assert not torch.equal(_greedy(compiled, [1, 7], 4.0, cache).tokens,
                               _greedy(eager, [1, 7], 4.0, _budgeted(name, model.num_layers, model.num_heads)).tokens)


def test_a_budgeted_cache_without_a_device_side_victim_is_refused():
    from mvar_engine.plugins.budget_cache import BudgetedCache
    from mvar_engine.plugins.patterns import CausalPattern
    from mvar_engine.plugins.raster import RasterTrajectory

    class HostOnly(BudgetedCache):
        name = "host-only"

    problem = compiled_decoding.compile_problem(trajectory=RasterTrajectory(), pattern=CausalPattern(), cache=HostOnly(),
                                                compiles_token_steps=True, backend="sdpa")
    assert "cache 'host-only' keeps no fixed-shape storage" in problem
    assert BudgetedCache.static_decoding.fget(_budgeted("sink", 1, 1, buffer=4))


NEXT_SCALE_COMPILED = [("full", "dense", "full"), ("markov", "neighborhood", "none")]


@pytest.mark.skipif(default_checkpoints("markov") is None, reason="the default next-scale weights are not installed")
@pytest.mark.parametrize("trajectory,attention,cache", NEXT_SCALE_COMPILED, ids=["/".join(c) for c in NEXT_SCALE_COMPILED])
def test_compiled_next_scale_steps_equal_eager_one_graph_per_scale(trajectory, attention, cache, monkeypatch):
    """Next-scale under --compile: every scale runs its own graph (fullgraph, no graph break, one
    graph per scale and none more for a second generation), never the eager forward, with the
    greedy tokens of the eager engine on the shipped digits model."""
    from torch._dynamo.utils import counters

    config = EngineConfig(trajectory={"name": trajectory}, attention={"name": attention}, cache={"name": cache},
                          device="cpu", progress=False)
    eager = Pipeline.from_config(config)
    compiled = Pipeline.from_config(config.model_copy(update={"compile": True}))
    adapter = compiled.engine.model

    def refuse_eager(*args, **kwargs):
        raise AssertionError("a compiled next-scale step ran the eager forward")

    monkeypatch.setattr(adapter, "run", refuse_eager)
    torch._dynamo.reset()
    counters.clear()
    for labels in ([1, 7], [2, 3]):
        want = eager.engine.generate(torch.tensor(labels), eager.components.cache, cfg=1.5, top_k=1, top_p=0.0,
                                     return_logits=True)
        got = compiled.engine.generate(torch.tensor(labels), compiled.components.cache, cfg=1.5, top_k=1, top_p=0.0,
                                       return_logits=True)
        for scale, (a, b) in enumerate(zip(want.tokens, got.tokens)):
            assert torch.equal(a, b), f"scale {scale}"
        for a, b in zip(want.logits, got.logits):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == adapter.layout.num_scales, dict(counters["stats"])


@pytest.mark.parametrize("flags,needle", [
    (["--trajectory", "full", "--cache", "window"], "cache 'window' does not keep every earlier scale in place"),
    (["--trajectory", "full", "--cache", "none"], "without a cache every step of trajectory 'full' recomputes"),
    (["--trajectory", "raster", "--backend", "reference"], "--backend reference cannot be traced"),
])
def test_compile_where_it_cannot_run_is_one_line(refused, flags, needle):
    refused(flags + ["--compile"], needle)


def test_compile_without_a_cpu_compiler_is_one_line(refused, monkeypatch):
    monkeypatch.setattr(compiled_decoding, "cpu_compiler", lambda: None)
    refused(["--trajectory", "raster", "--device", "cpu", "--compile"], "needs a C++ compiler")
