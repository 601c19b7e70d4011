"""Budgeted caches (window by tokens, sink, h2o, ssd): exact with a covering budget, bounded
storage, the class prefix never evicted, CFG rows consistent, the SSD reductions, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_engine, small_models
from mvar_engine.core.attention import Causal, Dense
from mvar_engine.apps.cli import main
from mvar_engine.core.errors import IncompatibleComponentsError, UsageError
from mvar_engine.plugins.head_map import classify
from mvar_engine.core.kv_store import BoundedKV
from mvar_engine.plugins import budget_cache
from mvar_engine.plugins.budget_cache import BudgetOptions, TokenWindowCache, budget_tokens, received_attention
from mvar_engine.plugins.h2o_cache import H2OCache, H2OOptions
from mvar_engine.plugins.sink_cache import SinkCache, SinkOptions
from mvar_engine.plugins.ssd_cache import SSDCache, SSDOptions
from test_raster import engine as raster_engine
from test_raster import tiny_model

POLICIES = ("window", "sink", "h2o", "ssd")


def head_map_for(model_layers: int, heads: int, kinds: str | list[list[str]] = "mixed", seed: int = 0):
    """A head map with every head ``local``, every head ``sink``, or a random mix."""
    if isinstance(kinds, str) and kinds in ("local", "sink"):
        scores = [[0.0 if kinds == "local" else 1.0] * heads for _ in range(model_layers)]
    else:
        g = torch.Generator().manual_seed(seed)
        scores = torch.rand(model_layers, heads, generator=g).tolist()
    return classify(scores, 0.5)


def make_policy(name: str, budget: float, layers: int, heads: int, seed: int = 0, buffer: int | str = 0, **options):
    if name == "window":
        return TokenWindowCache(BudgetOptions(budget=budget, buffer=buffer))
    if name == "sink":
        return SinkCache(SinkOptions(budget=budget, buffer=buffer, **options))
    if name == "h2o":
        return H2OCache(H2OOptions(budget=budget, buffer=buffer, **options))
    return SSDCache(SSDOptions(budget=budget, buffer=buffer),
                    head_map=head_map_for(layers, heads, options.get("kinds", "mixed"), seed))


class Recording:
    """Wraps a policy's ``end_step`` to record, after every step, each layer's kept positions and
    storage capacity."""

    def __init__(self, cache):
        self.cache, self.steps = cache, []
        original = cache.end_step

        def end_step():
            original()
            self.steps.append([(store.kept_positions().clone(), store.capacity, store.filled) for store in cache.layers])

        cache.end_step = end_step


def raster_run(model, cache, labels, cfg, tokens=None, seed=0):
    eng = raster_engine(model, cache)
    if tokens is None:
        return eng.generate(labels, cfg=cfg, top_k=0, generator=torch.Generator().manual_seed(seed), return_logits=True)
    return eng.generate(labels, cfg=cfg, forced_tokens=tokens, return_logits=True)


# ---------------------------------------------------------------------------------------- exactness
@given(name=st.sampled_from(POLICIES), h=st.integers(1, 3), w=st.integers(2, 4), batch=st.integers(1, 2),
       cls_token_num=st.sampled_from([1, 2]), cfg=st.sampled_from([1.0, 4.0]), seed=st.integers(0, 5))
def test_raster_policies_with_a_covering_budget_equal_full(name, h, w, batch, cls_token_num, cfg, seed):
    model = tiny_model((h, w), cls_token_num, seed)
    labels = torch.randint(0, model.num_classes, (batch,), generator=torch.Generator().manual_seed(seed))
    full = raster_run(model, "full", labels, cfg, seed=seed)
    cache = make_policy(name, 1.0, model.config.depth, model.config.heads, seed)
    out = raster_run(model, cache, labels, cfg, tokens=full.tokens)
    torch.testing.assert_close(out.logits, full.logits, atol=1e-5, rtol=1e-5)
    sampled = raster_run(model, make_policy(name, 1.0, model.config.depth, model.config.heads, seed), labels, cfg, seed=seed)
    assert torch.equal(sampled.tokens, full.tokens)


@pytest.mark.parametrize("name", POLICIES)
def test_next_scale_full_dense_with_a_covering_budget_equals_full(name):
    model, tok = small_models((1, 2, 3, 4))
    labels = torch.tensor([1, 3])
    full = make_engine(model, tok, "full", "dense", "full").generate(labels, cfg=1.5, top_k=1, return_logits=True)
    options = {"budget": 1.0}
    if name == "ssd":
        options["head_map"] = None
    eng = make_engine(model, tok, "full", "dense", "full")
    eng.cache = make_policy(name, 1.0, len(model.blocks), model.blocks[0].attn.heads)
    out = eng.generate(labels, cfg=1.5, forced_tokens=full.tokens, return_logits=True)
    for a, b in zip(full.logits, out.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", POLICIES)
def test_compression_changes_the_logits(name):
    """Not vacuous: a small budget evicts keys a later token attends to."""
    model = tiny_model((3, 3), 1, 0)
    labels = torch.tensor([1])
    full = raster_run(model, "full", labels, 4.0)
    out = raster_run(model, make_policy(name, 4, model.config.depth, model.config.heads), labels, 4.0, tokens=full.tokens)
    assert not torch.allclose(out.logits, full.logits, atol=1e-4)


# ---------------------------------------------------------------------------------------- bounds
@settings(max_examples=30)
@given(name=st.sampled_from(POLICIES), h=st.integers(1, 4), w=st.integers(1, 4), batch=st.integers(1, 2),
       cls_token_num=st.sampled_from([1, 2]), heads=st.sampled_from([1, 2]), budget=st.integers(2, 14),
       fraction=st.booleans(), cfg=st.sampled_from([1.0, 4.0]), seed=st.integers(0, 5))
def test_storage_never_exceeds_the_budget_and_keeps_the_class_prefix(name, h, w, batch, cls_token_num, heads, budget,
                                                                     fraction, cfg, seed):
    model = tiny_model((h, w), cls_token_num, seed, heads=heads, width=8 * heads)
    length = cls_token_num + h * w
    spec_budget = budget / length if fraction and budget <= length else float(budget)
    tokens = budget_tokens(spec_budget, length)
    cache = make_policy(name, spec_budget, model.config.depth, heads, seed)
    labels = torch.randint(0, model.num_classes, (batch,), generator=torch.Generator().manual_seed(seed))
    if tokens < cls_token_num + 1:
        with pytest.raises(UsageError, match="class token"):
            raster_run(model, cache, labels, cfg, seed=seed)
        return
    rec = Recording(cache)
    out = raster_run(model, cache, labels, cfg, seed=seed)
    row_bytes = 2 * model.config.head_dim * 4 * heads * (2 * batch if cfg > 1.0 else batch)
    assert cache.kv_bytes() <= model.config.depth * min(length, tokens) * row_bytes
    for step, layers in enumerate(rec.steps):
        seen = cls_token_num + step  # positions 0 .. seen - 1 were fed by the end of this step
        for kept, capacity, filled in layers:
            assert capacity <= min(length, tokens) and filled == min(seen, tokens)
            assert kept.shape[-1] == filled
            assert bool((kept[..., :cls_token_num] == torch.arange(cls_token_num)).all())  # class prefix kept
            assert bool((kept[..., 1:] > kept[..., :-1]).all())  # distinct, ascending
            assert bool((kept < seen).all())
            if cfg > 1.0:  # cond and uncond rows of a sample keep the same positions
                assert torch.equal(kept[:batch], kept[batch:])
    assert out.tokens.shape == (batch, h * w)


def test_window_and_sink_keep_exactly_prefix_sinks_and_recent():
    model = tiny_model((3, 4), 2, 0)
    for cache, protected in ((TokenWindowCache(BudgetOptions(budget=6)), 2), (SinkCache(SinkOptions(budget=6, sink=2)), 4)):
        rec = Recording(cache)
        raster_run(model, cache, torch.tensor([1, 2]), 4.0)
        for step, layers in enumerate(rec.steps):
            seen = 2 + step
            expected = list(range(seen)) if seen <= 6 else list(range(protected)) + list(range(seen - (6 - protected), seen))
            for kept, _, _ in layers:
                assert kept[0, 0].tolist() == expected and bool((kept == kept[:1, :1]).all())


def test_next_scale_sink_keeps_true_positions_and_grows_once():
    model, tok = small_models((1, 2, 3, 4))
    small = make_engine(model, tok, "full", "dense", "sink", cache_options={"budget": 7, "sink": 1})
    full = make_engine(model, tok, "full", "dense", "full").generate(torch.tensor([1, 3]), cfg=1.5, top_k=1,
                                                                     return_logits=True)
    out = small.generate(torch.tensor([1, 3]), cfg=1.5, forced_tokens=full.tokens, return_logits=True)
    # before the last scale (positions 14 .. 29) the layer was compacted to budget - 1 = 6: class token,
    # one sink, the 4 most recent; the last scale was then appended (eviction happens when tokens arrive)
    assert small.cache.kept_positions_list() == [0, 1, 10, 11, 12, 13] + list(range(14, 30))
    assert small.cache.layers[0].capacity == 6 + 16  # budget - 1 kept + the largest step, not the 30-token sequence
    assert not torch.allclose(out.logits[-1], full.logits[-1], atol=1e-4)


def test_budget_fractions_round_to_tokens():
    assert budget_tokens(0.2, 577) == 115 and budget_tokens(1.0, 577) == 577 and budget_tokens(40, 577) == 40


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), heads=st.integers(1, 4), capacity=st.integers(1, 9), dim=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_replace_writes_one_slot_per_row_and_head(rows, heads, capacity, dim, dtype, seed):
    """``BoundedKV.replace`` with a slot per (row, head) writes exactly those slots (keys, values,
    position, score reset) and nothing else, in float32 and bfloat16: against a loop over rows and heads."""
    gen = torch.Generator().manual_seed(seed)
    store = BoundedKV(rows, heads, capacity, dim, torch.device("cpu"), dtype, track_scores=True)
    store.append(torch.randn(rows, heads, capacity, dim, generator=gen), torch.randn(rows, heads, capacity, dim,
                                                                                     generator=gen), ((0, capacity),))
    store.add_scores(torch.rand(rows, heads, capacity, generator=gen) + 1)
    before = [t.clone() for t in (store.k, store.v, store.positions, store.scores)]
    slots = torch.randint(0, capacity, (rows, heads), generator=gen)
    k, v = torch.randn(rows, heads, 1, dim, generator=gen), torch.randn(rows, heads, 1, dim, generator=gen)
    keys, values = store.replace(slots, k, v, capacity + 3)
    expected = [t.clone() for t in before]
    for r in range(rows):
        for h in range(heads):
            slot = slots[r, h]
            expected[0][r, h, slot], expected[1][r, h, slot] = k[r, h, 0].to(dtype), v[r, h, 0].to(dtype)
            expected[2][r, h, slot], expected[3][r, h, slot] = capacity + 3, 0.0
    for got, want in zip((store.k, store.v, store.positions, store.scores), expected):
        assert torch.equal(got, want)
    assert keys.shape == (rows, heads, capacity, dim) and not store.ordered


# ---------------------------------------------------------------------------------------- scoring
def test_h2o_keeps_prefix_heavy_hitters_and_recent_per_head():
    cache = H2OCache(H2OOptions(budget=7, recent=0.4))
    cache.prefix, cache.budget, cache.guided = 1, 7, True
    store = BoundedKV(4, 2, 10, 3, torch.device("cpu"), torch.float32, track_scores=True)
    store.append(torch.randn(4, 2, 10, 3), torch.randn(4, 2, 10, 3), ((0, 10),))
    scores = torch.zeros(4, 2, 10)
    scores[0, 0, [2, 5]] = 3.0  # sample 0 head 0: cond row
    scores[2, 0, [3]] = 5.0  # sample 0 head 0: uncond row (summed with its cond row)
    scores[1, 1, [4, 6]] = 1.0
    store.add_scores(scores)
    index = cache.select(0, store, 6)  # prefix 1, recent round(0.4 * 5) = 2, heavy 3
    assert index.shape == (4, 2, 6)
    assert index[0, 0].tolist() == [0, 2, 3, 5, 8, 9]
    assert torch.equal(index[0], index[2]) and torch.equal(index[1], index[3])
    assert index[1, 1].tolist()[:1] == [0] and {4, 6} <= set(index[1, 1].tolist()) and index[1, 1].tolist()[-2:] == [8, 9]


@pytest.mark.parametrize("kinds, twin", [("local", "window"), ("sink", "h2o0")])
def test_ssd_reduces_to_window_and_to_h2o_without_recent(kinds, twin):
    model = tiny_model((3, 4), 1, 3)
    labels = torch.tensor([0, 1])
    full = raster_run(model, "full", labels, 4.0)
    ssd = make_policy("ssd", 5, model.config.depth, model.config.heads, kinds=kinds)
    other = TokenWindowCache(BudgetOptions(budget=5)) if twin == "window" else H2OCache(H2OOptions(budget=5, recent=0))
    rec_ssd, rec_other = Recording(ssd), Recording(other)
    a = raster_run(model, ssd, labels, 4.0, tokens=full.tokens)
    b = raster_run(model, other, labels, 4.0, tokens=full.tokens)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    for la, lb in zip(rec_ssd.steps, rec_other.steps):
        for (ka, _, _), (kb, _, _) in zip(la, lb):
            assert torch.equal(ka, kb.expand_as(ka))


def test_ssd_mixes_policies_per_head():
    model = tiny_model((3, 4), 1, 3, heads=2, width=16)
    kinds = [["local", "sink"]] * model.config.depth
    cache = SSDCache(SSDOptions(budget=5), head_map=classify([[0.0, 1.0]] * model.config.depth, 0.5))
    assert cache.head_map.classification == kinds
    rec = Recording(cache)
    raster_run(model, cache, torch.tensor([2]), 4.0)
    kept = rec.steps[-1][0][0]  # [rows, heads, 5]
    assert kept[0, 0].tolist() == [0, 8, 9, 10, 11]  # locality head: prefix + recent (position 11 is the last fed)
    assert kept[0, 1].tolist() != [0, 8, 9, 10, 11]  # sink head: by attention


@given(l=st.integers(1, 6), n=st.integers(1, 9), seed=st.integers(0, 9), causal=st.booleans())
def test_received_attention_is_the_softmax_mass_in_any_chunking(l, n, seed, causal):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 3, l, 4, generator=g), torch.randn(2, 3, max(n, l), 4, generator=g)
    spec = Causal() if causal else Dense()
    mask = spec.mask(l, k.shape[2], "cpu")
    logits = q @ k.transpose(-1, -2) * 0.7
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    expected = torch.softmax(logits, -1).sum(2)
    torch.testing.assert_close(received_attention(q, k, spec, 0.7), expected)
    saved = budget_cache.SCORE_CHUNK_BYTES
    budget_cache.SCORE_CHUNK_BYTES = 1  # one query at a time
    try:
        torch.testing.assert_close(received_attention(q, k, spec, 0.7), expected)
    finally:
        budget_cache.SCORE_CHUNK_BYTES = saved


@given(l=st.integers(1, 6), n=st.integers(1, 40), seed=st.integers(0, 99), causal=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_received_attention_of_16_bit_keys_is_the_float32_mass_within_rounding(l, n, seed, causal, dtype):
    """16-bit queries and keys (a bf16 run): the product runs in their dtype, the softmax in float32;
    the masses stay within rounding of float32 scores of the same (rounded) inputs, and are float32."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 3, l, 16, generator=g).to(dtype), torch.randn(2, 3, max(n, l), 16, generator=g).to(dtype)
    spec = Causal() if causal else Dense()
    got = received_attention(q, k, spec, 0.25)
    expected = received_attention(q.float(), k.float(), spec, 0.25)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    # the keys as the filled prefix of a larger buffer (whose other slots hold anything, NaN too)
    buffer = torch.cat([k, torch.full_like(k[:, :, :5], float("nan"))], dim=2)
    prefix = buffer[:, :, :k.shape[2]]
    torch.testing.assert_close(received_attention(q, prefix, spec, 0.25, key_buffer=buffer), got, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.full_like(got.sum(-1), float(l)), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------- bad input
def _one_line_error(capsys, argv, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


RASTER = ["--trajectory", "raster", "--random-weights", "--depth", "1", "--patch-nums", "2", "--labels", "0",
          "--samples-per-label", "1", "--no-progress", "--output", "/dev/null"]


def test_a_budget_below_the_class_tokens_is_one_line(capsys):
    line = _one_line_error(capsys, RASTER + ["--cache", "sink", "--cache-budget", "0.01"])
    assert "class token" in line and "--cache-budget" in line


def test_a_head_map_for_another_model_is_one_line(capsys, tmp_path):
    from mvar_engine.plugins.head_map import write_head_map

    path = tmp_path / "heads.json"
    write_head_map(head_map_for(5, 3), path)
    line = _one_line_error(capsys, RASTER + ["--cache", "ssd", "--cache-budget", "1.0", "--cache-head-map", str(path)])
    assert "5 layers x 3 heads" in line and "1 layers x 12 heads" in line and "profile-heads" in line


@pytest.mark.parametrize("content, words", [(None, "does not exist"), ("{", "not readable JSON"),
                                            ('{"layers": 1, "heads": 2, "threshold": 0.5, "scores": [[0.1]], '
                                             '"classification": [["local", "sink"]]}', "1 layers x 2 heads")])
def test_a_bad_head_map_file_is_one_line(capsys, tmp_path, content, words):
    path = tmp_path / "heads.json"
    if content is not None:
        path.write_text(content)
    line = _one_line_error(capsys, RASTER + ["--cache", "ssd", "--cache-budget", "1.0", "--cache-head-map", str(path)])
    assert words in line and str(path) in line


def test_ssd_without_a_head_map_is_one_line(capsys):
    assert "--cache-head-map" in _one_line_error(capsys, RASTER + ["--cache", "ssd"])


def test_window_by_steps_under_raster_is_refused_with_the_fix(capsys):
    line = _one_line_error(capsys, RASTER + ["--cache", "window"])
    assert "raster" in line and "--cache-budget" in line
    line = _one_line_error(capsys, RASTER + ["--cache", "window", "--cache-scales", "2", "--cache-budget", "0.2"])
    assert "--cache-scales" in line and "--cache-budget" in line


@pytest.mark.parametrize("trajectory, attention", [("full", "neighborhood"), ("markov", "dense")])
def test_headwise_caches_need_every_kept_key_visible(trajectory, attention):
    model, tok = small_models((1, 2, 3, 4))
    options = {"trajectory_options": {"order": 2}} if trajectory == "markov" else {}
    with pytest.raises(IncompatibleComponentsError, match="keeps positions that differ per row or per head"):
        make_engine(model, tok, trajectory, attention, "h2o", **options)


@settings(max_examples=15)
@given(name=st.sampled_from(POLICIES), budget=st.integers(3, 9), cfg=st.sampled_from([1.0, 4.0]),
       batch=st.integers(1, 2), seed=st.integers(0, 9))
def test_in_place_replacement_equals_compaction(name, budget, cfg, batch, seed):
    """The O(1) one-token eviction (write over the victim) keeps the same positions and gives the
    same logits as compacting the layer to ``budget - 1`` and appending."""
    model = tiny_model((3, 4), 1, seed)
    labels = torch.randint(0, model.num_classes, (batch,), generator=torch.Generator().manual_seed(seed))
    fast = make_policy(name, budget, model.config.depth, model.config.heads, seed)
    slow = make_policy(name, budget, model.config.depth, model.config.heads, seed)

    def compacting_update(layer, k, v, spans, original=slow.update):
        store = slow.layers[layer]
        if k.shape[2] == 1 and store.filled == slow.budget:
            slow.compact(layer, slow.budget - 1)
        return original(layer, k, v, spans)

    slow.update = compacting_update
    rec_fast, rec_slow = Recording(fast), Recording(slow)
    full = raster_run(model, "full", labels, cfg, seed=seed)
    a = raster_run(model, fast, labels, cfg, tokens=full.tokens)
    b = raster_run(model, slow, labels, cfg, tokens=full.tokens)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    for la, lb in zip(rec_fast.steps, rec_slow.steps):
        for (ka, _, _), (kb, _, _) in zip(la, lb):
            assert torch.equal(ka, kb.expand_as(ka))


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(("h2o", "ssd")), budget=st.integers(3, 9), cfg=st.sampled_from([1.0, 4.0]),
       batch=st.integers(1, 2), seed=st.integers(0, 9))
def test_scores_from_the_backend_equal_the_cache_s_own(name, budget, cfg, batch, seed, monkeypatch):
    """Where the backend materialises the probabilities (``sdpa`` forced onto its materialised path)
    the scoring caches take the received attention from it and never compute it again; the kept
    positions and the logits equal those of a run whose cache scores apart (the fused kernel)."""
    from mvar_engine.core.backend_selection import selector_for

    model = tiny_model((3, 4), 1, seed)
    labels = torch.randint(0, model.num_classes, (batch,), generator=torch.Generator().manual_seed(seed))
    tokens = raster_run(model, "full", labels, cfg, seed=seed).tokens
    runs = []
    for short_queries in ("fused", "materialised"):
        cache = make_policy(name, budget, model.config.depth, model.config.heads, seed)
        recording = Recording(cache)
        engine = raster_engine(model, cache)
        engine.backends = selector_for("sdpa", {"short_queries": short_queries})
        with monkeypatch.context() as patch:  # one context per example: hypothesis reuses the fixture
            if short_queries == "materialised":  # the cache must not score apart
                patch.setattr(budget_cache, "received_attention", lambda *a, **k: pytest.fail("scored apart"))
            runs.append((engine.generate(labels, cfg=cfg, forced_tokens=tokens, return_logits=True), recording, cache))
    (apart, rec_apart, cache_apart), (shared, rec_shared, cache_shared) = runs
    torch.testing.assert_close(shared.logits, apart.logits, atol=1e-5, rtol=1e-5)
    for step_apart, step_shared in zip(rec_apart.steps, rec_shared.steps, strict=True):
        for (ka, _, _), (kb, _, _) in zip(step_apart, step_shared):
            assert torch.equal(ka, kb)
    for a, b in zip(cache_apart.layers, cache_shared.layers):
        torch.testing.assert_close(b.scores[:, :, :b.filled], a.scores[:, :, :a.filled], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- the buffer variant
BUFFERS = st.sampled_from([1, 2, 3, "row"])


@settings(max_examples=25)
@given(name=st.sampled_from(POLICIES), buffer=BUFFERS, h=st.integers(1, 3), w=st.integers(2, 4),
       batch=st.integers(1, 2), cfg=st.sampled_from([1.0, 4.0]), seed=st.integers(0, 5))
def test_buffered_policies_with_a_covering_budget_equal_full(name, buffer, h, w, batch, cfg, seed):
    model = tiny_model((h, w), 1, seed)
    labels = torch.randint(0, model.num_classes, (batch,), generator=torch.Generator().manual_seed(seed))
    full = raster_run(model, "full", labels, cfg, seed=seed)
    cache = make_policy(name, 1.0, model.config.depth, model.config.heads, seed, buffer=buffer)
    out = raster_run(model, cache, labels, cfg, tokens=full.tokens)
    torch.testing.assert_close(out.logits, full.logits, atol=1e-5, rtol=1e-5)


@settings(max_examples=20)
@given(name=st.sampled_from(POLICIES), budget=st.integers(3, 8), cfg=st.sampled_from([1.0, 4.0]), seed=st.integers(0, 9))
def test_a_one_slot_buffer_is_the_per_token_policy(name, budget, cfg, seed):
    """W = 1: merging every token is exactly the per-token eviction."""
    model = tiny_model((3, 4), 1, seed)
    labels = torch.tensor([1, 2])
    full = raster_run(model, "full", labels, cfg, seed=seed)
    plain = raster_run(model, make_policy(name, budget, model.config.depth, model.config.heads, seed), labels, cfg,
                       tokens=full.tokens)
    one = raster_run(model, make_policy(name, budget, model.config.depth, model.config.heads, seed, buffer=1), labels,
                     cfg, tokens=full.tokens)
    torch.testing.assert_close(one.logits, plain.logits, atol=1e-5, rtol=1e-5)  # slot order differs: sums reorder


@settings(max_examples=25)
@given(name=st.sampled_from(POLICIES), buffer=st.integers(2, 5), budget=st.integers(3, 8), seed=st.integers(0, 5))
def test_the_buffer_merges_once_per_fill_and_stays_bounded(name, buffer, budget, seed):
    """Storage holds at most ``budget - 1 + W`` tokens; the kept count climbs by one per token and
    drops back to ``budget`` exactly when the buffer was full (one selection per ``W`` tokens)."""
    model = tiny_model((4, 4), 1, seed)
    length = 1 + 16
    cache = make_policy(name, budget, model.config.depth, model.config.heads, seed, buffer=buffer)
    rec = Recording(cache)
    raster_run(model, cache, torch.tensor([1]), 1.0, seed=seed)
    limit = budget - 1 + buffer
    expected, filled = [], 0
    for step in range(len(rec.steps)):
        new = 1 if step else 1  # the class-token prefill (1 token) then one token per step
        filled = budget - 1 + new if filled + new > limit else filled + new
        expected.append(min(filled, length))
    for layers, want in zip(rec.steps, expected):
        for kept, capacity, got in layers:
            assert capacity <= min(length, limit) and got == want
            assert bool((kept[..., :1] == 0).all()) and bool((kept[..., 1:] > kept[..., :-1]).all())


def test_the_buffer_changes_what_is_kept():
    """Not vacuous: with W = 4 the kept set differs from the per-token policy's at a small budget."""
    model = tiny_model((3, 3), 1, 0)
    full = raster_run(model, "full", torch.tensor([1]), 4.0)
    plain = raster_run(model, make_policy("sink", 4, model.config.depth, model.config.heads), torch.tensor([1]), 4.0,
                       tokens=full.tokens)
    buffered = raster_run(model, make_policy("sink", 4, model.config.depth, model.config.heads, buffer=4),
                          torch.tensor([1]), 4.0, tokens=full.tokens)
    assert not torch.allclose(plain.logits, buffered.logits, atol=1e-4)


def test_a_negative_buffer_is_refused():
    with pytest.raises(ValueError, match="slot count >= 0"):
        BudgetOptions(buffer=-1)
