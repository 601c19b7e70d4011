"""Next-scale generation: cached vs recomputed vs teacher-forced, Markov vs full, patterns, seeds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_engine, small_models
from mvar_engine.core.errors import IncompatibleComponentsError

ATOL = 2e-4


@st.composite
def schedules(draw, max_scales=4, max_side=6, square=False):
    """Scale schedules with non-decreasing sides, e.g. (1, 2, 4) or ((1, 1), (2, 3), (3, 5))."""
    n = draw(st.integers(2, max_scales))
    hs = sorted(draw(st.lists(st.integers(1, max_side), min_size=n, max_size=n)))
    if square or draw(st.booleans()):
        return tuple(hs)
    ws = sorted(draw(st.lists(st.integers(1, max_side), min_size=n, max_size=n)))
    return tuple(zip(hs, ws))


def labels_for(batch, num_classes=5, seed=0):
    return torch.randint(0, num_classes, (batch,), generator=torch.Generator().manual_seed(seed))


def run(engine, labels, *, cfg=1.5, top_k=0, top_p=0.0, seed=0, forced=None):
    return engine.generate(labels, cfg=cfg, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(seed),
                           forced_tokens=forced, return_logits=True)


def teacher_forced(engine, tokenizer, labels, tokens, cfg):
    rows = torch.cat([labels, torch.full_like(labels, engine.model.num_classes)]) if cfg > 0 else labels
    var_input = tokenizer.indices_to_var_input(tokens)
    if var_input is not None and cfg > 0:
        var_input = var_input.repeat(2, 1, 1)
    with torch.no_grad():
        return engine.teacher_forced_logits(rows, var_input)


def split_by_scale(logits, layout):
    return [logits[:, sc.begin:sc.end] for sc in layout.scales]


@given(patch_nums=schedules(), batch=st.integers(1, 3), cfg=st.sampled_from([0.0, 2.0]), seed=st.integers(0, 3))
def test_full_cached_equals_recomputed_equals_teacher_forced(patch_nums, batch, cfg, seed):
    model, tok = small_models(patch_nums, seed=seed)
    labels = labels_for(batch, seed=seed)
    cached = run(make_engine(model, tok, "full", "dense", "full"), labels, cfg=cfg, seed=seed)
    recomputed = run(make_engine(model, tok, "full", "dense", "none"), labels, cfg=cfg, forced=cached.tokens)
    tf = split_by_scale(teacher_forced(make_engine(model, tok, "full", "dense", "none"), tok, labels, cached.tokens, cfg),
                        model.layout)
    for s, (a, b, c) in enumerate(zip(cached.logits, recomputed.logits, tf)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"scale {s}: cached vs recomputed")
        torch.testing.assert_close(a, c, atol=ATOL, rtol=0, msg=f"scale {s}: cached vs teacher-forced")


@given(patch_nums=schedules(), batch=st.integers(1, 3), seed=st.integers(0, 3),
       attention=st.sampled_from(["dense", "neighborhood"]))
def test_markov_incremental_equals_teacher_forced_block_diagonal(patch_nums, batch, seed, attention):
    model, tok = small_models(patch_nums, seed=seed)
    labels = labels_for(batch, seed=seed)
    options = {"kernel_size": 3, "apply_from": 1} if attention == "neighborhood" else {}
    engine = make_engine(model, tok, "markov", attention, "none", attention_options=options)
    inc = run(engine, labels, cfg=1.0, seed=seed)
    tf = split_by_scale(teacher_forced(engine, tok, labels, inc.tokens, 1.0), model.layout)
    for s, (a, b) in enumerate(zip(inc.logits, tf)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"scale {s}")


def test_markov_teacher_forced_mask_is_block_diagonal():
    """A change on scale 0's input changes only scale 0's logits under markov order 1."""
    model, tok = small_models((1, 2, 3))
    engine = make_engine(model, tok, "markov", "dense", "none")
    labels = torch.tensor([1])
    tokens = [torch.zeros(1, sc.numel, dtype=torch.long) for sc in model.layout.scales]
    var_input = tok.indices_to_var_input(tokens)
    with torch.no_grad():
        base = engine.teacher_forced_logits(labels, var_input)
        other = engine.teacher_forced_logits(torch.tensor([2]), var_input)  # class changes sos AND AdaLN cond
        bumped = var_input.clone()
        bumped[:, :4] += 1.0  # scale 1's input tokens
        moved = engine.teacher_forced_logits(labels, bumped)
    changed = (moved - base).abs().amax(dim=-1)[0]
    assert changed[:1].max() == 0 and changed[5:].max() == 0, "only scale 1 may change"
    assert changed[1:5].min() > 0
    assert not torch.allclose(base, other)


@given(patch_nums=schedules(), seed=st.integers(0, 3), cache=st.sampled_from(["none", "full"]))
def test_markov_order_covering_every_scale_equals_full(patch_nums, seed, cache):
    model, tok = small_models(patch_nums, seed=seed)
    labels = labels_for(2, seed=seed)
    full = run(make_engine(model, tok, "full", "dense", "full"), labels, seed=seed)
    order = len(patch_nums) + seed  # any order >= number of scales
    markov = run(make_engine(model, tok, "markov", "dense", cache, trajectory_options={"order": order}), labels, seed=seed)
    for a, b in zip(full.tokens, markov.tokens):
        assert torch.equal(a, b)
    for a, b in zip(full.logits, markov.logits):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@given(patch_nums=schedules(max_scales=5), seed=st.integers(0, 3), order=st.integers(2, 3))
def test_markov_window_cache_is_exact_for_its_order(patch_nums, seed, order):
    model, tok = small_models(patch_nums, seed=seed)
    labels = labels_for(2, seed=seed)
    oracle = run(make_engine(model, tok, "markov", "dense", "none", trajectory_options={"order": order}), labels, seed=seed)
    windowed = run(make_engine(model, tok, "markov", "dense", "window", trajectory_options={"order": order},
                               cache_options={"scales": order - 1}), labels, forced=oracle.tokens)
    for a, b in zip(oracle.logits, windowed.logits):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@given(patch_nums=schedules(max_side=5), seed=st.integers(0, 3), trajectory=st.sampled_from(["full", "markov"]),
       extra=st.integers(0, 3))
def test_neighborhood_with_kernel_covering_the_map_equals_dense(patch_nums, seed, trajectory, extra):
    model, tok = small_models(patch_nums, seed=seed)
    labels = labels_for(2, seed=seed)
    cache = "full" if trajectory == "full" else "none"
    dense = run(make_engine(model, tok, trajectory, "dense", cache), labels, seed=seed)
    side = max(max(g) for g in model.layout.grids)
    neigh = run(make_engine(model, tok, trajectory, "neighborhood", cache,
                            attention_options={"kernel_size": side + extra, "apply_from": 0}), labels, seed=seed)
    for a, b in zip(dense.tokens, neigh.tokens):
        assert torch.equal(a, b)


def test_neighborhood_restricts_the_large_scales():
    """With a small kernel the last scales' logits differ from dense; earlier scales do not."""
    patch_nums = (1, 2, 6, 8)
    model, tok = small_models(patch_nums)
    labels = labels_for(2)
    dense = run(make_engine(model, tok, "markov", "dense", "none"), labels)
    neigh = run(make_engine(model, tok, "markov", "neighborhood", "none", attention_options={"kernel_size": 3}), labels,
                forced=dense.tokens)
    for s in (0, 1):  # apply_from=-2 -> scales 2 and 3 use the window
        torch.testing.assert_close(dense.logits[s], neigh.logits[s])
    assert not torch.allclose(dense.logits[3], neigh.logits[3], atol=1e-4)


@pytest.mark.parametrize("cache", ["full", "window"])
def test_markov_order_one_refuses_caches(cache):
    model, tok = small_models()
    with pytest.raises(IncompatibleComponentsError, match="makes no sense under trajectory 'markov'"):
        make_engine(model, tok, "markov", "dense", cache)


def test_greedy_full_cache_equals_no_cache_tokens():
    """Acceptance: same weights, same seed, greedy: full/dense/full tokens == full/dense/none tokens."""
    model, tok = small_models((1, 2, 3, 4, 6), depth=3)
    labels = torch.tensor([0, 1, 2, 3])
    a = run(make_engine(model, tok, "full", "dense", "full"), labels, top_k=1)
    b = run(make_engine(model, tok, "full", "dense", "none"), labels, top_k=1)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))


def test_same_seed_same_tokens_and_different_seed_differs():
    model, tok = small_models((1, 2, 4, 6), vocab=64)
    labels = torch.tensor([0, 1, 2])
    engine = make_engine(model, tok, "markov", "neighborhood", "none", attention_options={"kernel_size": 3})
    a, b = run(engine, labels, seed=7), run(engine, labels, seed=7)
    c = run(engine, labels, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert any(not torch.equal(x, y) for x, y in zip(a.tokens, c.tokens))


@pytest.mark.parametrize("backend", ["reference", "natten"])
def test_generation_backends_agree_with_sdpa(backend):
    if backend == "natten":
        pytest.importorskip("natten", reason="natten is not installed")
    model, tok = small_models((1, 2, 5, 7))
    labels = labels_for(2)
    opts = {"kernel_size": 3, "apply_from": 2}
    ref = run(make_engine(model, tok, "markov", "neighborhood", "none", backend="sdpa", attention_options=opts), labels)
    if backend == "natten":  # natten only computes single-map windows: the dense scales go to sdpa under auto
        engine = make_engine(model, tok, "markov", "neighborhood", "none", backend="auto", attention_options=opts)
        engine.backends.candidates.sort(key=lambda c: c.name != "natten")
        engine.backends.keep_order = True
    else:
        engine = make_engine(model, tok, "markov", "neighborhood", "none", backend=backend, attention_options=opts)
    other = run(engine, labels, forced=ref.tokens)
    for a, b in zip(ref.logits, other.logits):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    if backend == "natten":
        assert engine.backends.used.get("neighborhood2d") == "natten"


def test_window_cache_holds_at_most_its_window():
    from mvar_engine.plugins.caches import WindowCache, WindowOptions

    model, tok = small_models((1, 2, 3, 4, 5))
    engine = make_engine(model, tok, "full", "dense", "window", cache_options={"scales": 2})
    run(engine, labels_for(2))
    cache = engine.cache
    assert isinstance(cache, WindowCache)
    sizes = [sc.numel for sc in model.layout.scales]
    assert cache.capacity(model.layout) == max(sum(sizes[i:i + 3]) for i in range(len(sizes)))
    assert cache.cached_tokens() == sizes[-2] + sizes[-1]
    assert WindowCache(WindowOptions(scales=1)).capacity(model.layout) == sizes[-2] + sizes[-1]
