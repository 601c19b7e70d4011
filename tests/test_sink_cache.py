"""The ``sink`` cache (StreamingLLM): exact when the budget covers the sequence, bounded otherwise,
the class prefix never evicted; under the raster and the next-scale ``full`` trajectories."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_engine, small_models
from mvar_engine.core.cli import main
from mvar_engine.plugins.caches import FullCache
from mvar_engine.plugins.sink_cache import SinkCache, SinkOptions, budget_tokens
from test_raster import engine as raster_engine
from test_raster import tiny_model


class Recording(SinkCache):
    """A sink cache that records what it holds after every step."""

    def begin(self, **kwargs):
        super().begin(**kwargs)
        self.history: list[list[int]] = []

    def end_step(self):
        super().end_step()
        self.history.append(self.kept_positions())


@given(h=st.integers(1, 3), w=st.integers(2, 4), batch=st.integers(1, 2), seed=st.integers(0, 5))
def test_raster_sink_with_a_covering_budget_equals_full(h, w, batch, seed):
    model = tiny_model((h, w), 1, seed)
    labels = torch.randint(0, model.num_classes, (batch,), generator=torch.Generator().manual_seed(seed))
    full = raster_engine(model, "full").generate(labels, cfg=4.0, top_k=0, generator=torch.Generator().manual_seed(seed),
                                                 return_logits=True)
    sink = raster_engine(model, SinkCache(SinkOptions(budget=1.0, sink=0))).generate(
        labels, cfg=4.0, forced_tokens=full.tokens, return_logits=True)
    torch.testing.assert_close(sink.logits, full.logits, atol=1e-5, rtol=1e-5)


@given(h=st.integers(2, 4), w=st.integers(2, 4), budget=st.integers(2, 12), sink=st.integers(0, 3),
       cls_token_num=st.sampled_from([1, 2]), seed=st.integers(0, 5))
def test_raster_sink_keeps_prefix_sinks_and_recent_within_the_budget(h, w, budget, sink, cls_token_num, seed):
    model = tiny_model((h, w), cls_token_num, seed)
    length = cls_token_num + h * w
    if budget < cls_token_num + 1:
        return
    cache = Recording(SinkOptions(budget=float(budget), sink=sink))
    labels = torch.tensor([0])
    full = raster_engine(model, "full").generate(labels, cfg=4.0, top_k=0, return_logits=True,
                                                 generator=torch.Generator().manual_seed(seed))
    out = raster_engine(model, cache).generate(labels, cfg=4.0, forced_tokens=full.tokens, return_logits=True)
    for step, kept in enumerate(cache.history):
        seen = cls_token_num + step  # positions 0 .. seen - 1 have been stored after this step
        protected = min(cls_token_num + sink, budget)
        expected = list(range(seen)) if seen <= budget else (
            list(range(protected)) + list(range(seen - (budget - protected), seen)))
        assert kept == expected, (step, kept, expected)
        assert len(kept) <= budget and all(p in kept for p in range(cls_token_num))
    capacity = cache.layers[0].k.shape[2]
    assert capacity <= min(length, budget + cls_token_num)
    if budget < length - 1:  # something was evicted while a later token still attended: logits must differ
        assert not torch.allclose(out.logits, full.logits, atol=1e-4)


def test_next_scale_full_trajectory_sink_with_a_covering_budget_equals_full():
    model, tok = small_models((1, 2, 3, 4))
    labels = torch.tensor([1, 3])
    full = make_engine(model, tok, "full", "dense", "full").generate(labels, cfg=1.5, top_k=1, return_logits=True)
    sink = make_engine(model, tok, "full", "dense", "sink", cache_options={"budget": 1.0}).generate(
        labels, cfg=1.5, forced_tokens=full.tokens, return_logits=True)
    for a, b in zip(full.logits, sink.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    small = make_engine(model, tok, "full", "dense", "sink", cache_options={"budget": 6, "sink": 1})
    out = small.generate(labels, cfg=1.5, forced_tokens=full.tokens, return_logits=True)
    assert small.cache.kept_positions() == [0, 1] + list(range(30 - 4, 30))
    assert small.cache.layers[0].k.shape[2] == 6 + 16  # budget + the largest step, not the 30-token sequence
    assert not torch.allclose(out.logits[-1], full.logits[-1], atol=1e-4)


def test_budget_fractions_round_to_tokens():
    assert budget_tokens(0.2, 577) == 115 and budget_tokens(1.0, 577) == 577 and budget_tokens(40, 577) == 40


def test_a_budget_below_the_class_tokens_is_one_line(capsys):
    argv = ["--trajectory", "raster", "--cache", "sink", "--cache-budget", "0.01", "--random-weights", "--depth", "1",
            "--patch-nums", "2", "--labels", "0", "--samples-per-label", "1", "--no-progress", "--output", "/dev/null"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class token" in err[0] and "--cache-budget" in err[0], err
