"""The example third-party plugin (``examples/mvar-engine-example-plugin``), discovered for real.

The plugin is not pip-installed: the test writes a minimal ``*.dist-info`` (METADATA and
``entry_points.txt`` taken from the example's ``pyproject.toml``) into a temporary folder and puts
that folder and the example's source folder on ``sys.path``, so that
``importlib.metadata.entry_points`` finds it exactly as it finds an installed distribution.
"""

from __future__ import annotations

import ast
import itertools
import math
from fractions import Fraction
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mvar_engine.core.attention import AttentionPattern, Dense, Masked
from mvar_engine.core.cache import CachePolicy
from mvar_engine.core.errors import ConfigError
from mvar_engine.core.layout import SequenceLayout, merge_spans
from mvar_engine.core.registry import ENV_ALLOW, ENV_DISABLE_AUTOLOAD, load_registry
from mvar_engine.plugins.trajectories import FullTrajectory, MarkovOptions, MarkovTrajectory

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mvar-engine-example-plugin"
PYPROJECT = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
DIST_NAME = PYPROJECT["project"]["name"]
VERSION = PYPROJECT["project"]["version"]
PUBLIC_MODULES = {"mvar_engine", "mvar_engine.core.attention", "mvar_engine.core.cache", "mvar_engine.core.layout"}

FAST = settings(max_examples=max(60, settings().max_examples), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write_dist_info(site: Path) -> Path:
    """A dist-info as pip would install it, from the example's pyproject.toml."""
    info = site / f"{DIST_NAME.replace('-', '_')}-{VERSION}.dist-info"
    info.mkdir(parents=True)
    requires = "".join(f"Requires-Dist: {dep}\n" for dep in PYPROJECT["project"]["dependencies"])
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST_NAME}\nVersion: {VERSION}\n{requires}")
    lines = ["[mvar_engine]"] + [f"{name} = {value}" for name, value in PYPROJECT["project"]["entry-points"]["mvar_engine"].items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return info


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    path = tmp_path_factory.mktemp("site")
    write_dist_info(path)
    return path


@pytest.fixture(scope="module")
def registry(site):
    """``load_registry()`` with no arguments, the example installed as a distribution."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
        mp.delenv(ENV_ALLOW, raising=False)
        mp.syspath_prepend(str(EXAMPLE))
        mp.syspath_prepend(str(site))
        assert any(ep.name == "example" and ep.dist.name == DIST_NAME
                   for ep in metadata.entry_points(group="mvar_engine"))
        yield load_registry()


@pytest.fixture
def on_path(site, monkeypatch):
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    monkeypatch.delenv(ENV_ALLOW, raising=False)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(site))


# ------------------------------------------------------------------------------------ discovery


def test_pyproject_declares_the_entry_point():
    assert DIST_NAME == "mvar-engine-example-plugin"
    assert PYPROJECT["project"]["entry-points"]["mvar_engine"] == {"example": "mvar_engine_example_plugin.plugin"}
    assert any(dep.startswith("mvar-engine") for dep in PYPROJECT["project"]["dependencies"])


def test_components_listed_with_their_provider(registry):
    assert registry.broken == []
    for kind, name in [("cache", "sink-scales"), ("attention", "axial")]:
        entry = registry.get(kind, name)
        assert entry.provider.package == DIST_NAME and entry.provider.version == VERSION
        assert entry.provider.plugin == "example" and not entry.provider.builtin
        assert entry.availability.ok and entry.record.description
        listed = entry.as_dict()
        assert listed["provider"]["package"] == DIST_NAME and listed["available"] is True
    assert set(registry.get("cache", "sink-scales").as_dict()["options"]) == {"sink", "recent"}
    assert set(registry.get("attention", "axial").as_dict()["options"]) == {"apply_from"}
    # the built-ins are still there, next to the plugin's components
    assert {"none", "full", "window", "sink-scales"} <= set(registry.names("cache"))
    assert {"dense", "neighborhood", "axial"} <= set(registry.names("attention"))


def test_creatable_by_name_with_options(registry):
    cache = registry.create("cache", "Sink_Scales", {"sink": 2, "recent": 3})
    assert isinstance(cache, CachePolicy) and cache.stores_history
    assert (cache.options.sink, cache.options.recent) == (2, 3)
    assert registry.create("cache", "sink-scales").options.model_dump() == {"sink": 1, "recent": 1}
    pattern = registry.create("attention", "axial", {"apply_from": 3})
    assert isinstance(pattern, AttentionPattern) and pattern.options.apply_from == 3


@pytest.mark.parametrize(("options", "field", "constraint"), [
    ({"recent": 0}, "recent", "greater than or equal to 1"),
    ({"sink": -1}, "sink", "greater than or equal to 0"),
    ({"sinks": 2}, "sinks", "valid: sink, recent"),
])
def test_option_errors(registry, options, field, constraint):
    with pytest.raises(ConfigError) as info:
        registry.create("cache", "sink-scales", options)
    assert "\n" not in str(info.value) and field in str(info.value) and constraint in str(info.value)


def test_environment_switches_apply_to_the_plugin(on_path, monkeypatch):
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "1")
    registry = load_registry()
    assert "sink-scales" not in registry.names("cache")
    assert any(s.plugin == "example" and s.package == DIST_NAME for s in registry.skipped)
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD)
    for allow, loaded in [("mvar-engine-example-plugin", True), ("example", True), ("someone-else", False)]:
        monkeypatch.setenv(ENV_ALLOW, allow)
        assert ("sink-scales" in load_registry().names("cache")) is loaded, allow


def test_bare_entry_point_object(monkeypatch):
    """The lighter way: an ``EntryPoint`` without a distribution (the provider is then the module)."""
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    monkeypatch.delenv(ENV_ALLOW, raising=False)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    ep = metadata.EntryPoint(name="example", value="mvar_engine_example_plugin.plugin", group="mvar_engine")
    registry = load_registry(entry_points=[ep])
    assert registry.broken == []
    assert registry.get("attention", "axial").provider.package == "mvar_engine_example_plugin"
    assert "window" in registry.names("cache")


def test_plugin_uses_only_the_public_api():
    tree = ast.parse((EXAMPLE / "mvar_engine_example_plugin" / "plugin.py").read_text())
    imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    engine = {name for name in imported if name.split(".")[0] == "mvar_engine"}
    assert engine and engine <= PUBLIC_MODULES, engine - PUBLIC_MODULES


# ---------------------------------------------------------------------------------- sink-scales


def expected_scales(step: int, sink: int, recent: int) -> list[int]:
    """The first ``sink`` scales, the last ``recent`` earlier ones, and the current scale."""
    kept = set(range(min(sink, step))) | set(range(max(0, step - recent), step))
    return sorted(kept | {step})


grids = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=7)


@FAST
@given(grids=grids, batch=st.integers(1, 2), heads=st.integers(1, 3), head_dim=st.integers(1, 5),
       layers=st.integers(1, 3), sink=st.integers(0, 3), recent=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
def test_sink_scales_keeps_sinks_and_recent(registry, grids, batch, heads, head_dim, layers, sink, recent, dtype, seed):
    layout = SequenceLayout.from_patch_nums(grids)
    sizes = [h * w for h, w in grids]
    cache = registry.create("cache", "sink-scales", {"sink": sink, "recent": recent})
    assert cache.nbytes() == 0
    cache.begin(num_layers=layers, batch=batch, num_heads=heads, head_dim=head_dim, layout=layout,
                device=torch.device("cpu"), dtype=dtype)
    # the bound: per layer, keys and values for the largest set of scales any step sees
    capacity = max(sum(sizes[j] for j in expected_scales(i, sink, recent)) for i in range(len(sizes)))
    bound = layers * 2 * batch * heads * capacity * head_dim * torch.empty((), dtype=dtype).element_size()
    assert 0 < cache.nbytes() <= bound
    # with sink = 0 the policy is the built-in window cache
    window = registry.create("cache", "window", {"scales": recent}) if sink == 0 else None
    if window is not None:
        window.begin(num_layers=layers, batch=batch, num_heads=heads, head_dim=head_dim, layout=layout,
                     device=torch.device("cpu"), dtype=dtype)

    g = torch.Generator().manual_seed(seed)
    stored: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for scale in layout.scales:
        want = expected_scales(scale.index, sink, recent)
        for layer in range(layers):
            k = torch.randn(batch, heads, scale.numel, head_dim, generator=g).to(dtype)
            v = torch.randn(batch, heads, scale.numel, head_dim, generator=g).to(dtype)
            stored[layer, scale.index] = (k.clone(), v.clone())
            out_k, out_v, spans = cache.update(layer, k, v, (scale.span,))
            assert spans == layout.spans_of(want) == merge_spans(layout.scales[j].span for j in want)
            assert torch.equal(out_k, torch.cat([stored[layer, j][0] for j in want], dim=2))
            assert torch.equal(out_v, torch.cat([stored[layer, j][1] for j in want], dim=2))
            if window is not None:
                w_k, w_v, w_spans = window.update(layer, k, v, (scale.span,))
                assert w_spans == spans and torch.equal(w_k, out_k) and torch.equal(w_v, out_v)
            k.zero_()  # the cache holds its own copy: the caller may reuse its buffers
            v.zero_()
            assert cache.nbytes() <= bound
        cache.end_step()
        if window is not None:
            window.end_step()
        assert cache.nbytes() <= bound


def test_sink_scales_begin_resets(registry):
    layout = SequenceLayout.from_patch_nums([1, 2, 3, 4])
    cache = registry.create("cache", "sink-scales", {"sink": 1, "recent": 1})
    for run in range(2):  # a second generation starts from an empty cache
        cache.begin(num_layers=1, batch=1, num_heads=1, head_dim=2, layout=layout, device=torch.device("cpu"),
                    dtype=torch.float32)
        seen = []
        for scale in layout.scales:
            k = torch.full((1, 1, scale.numel, 2), float(scale.index + 10 * run))
            out_k, _, spans = cache.update(0, k, k, (scale.span,))
            seen.append(spans)
            last = out_k[0, 0, :, 0].tolist()  # a view into the cache's buffer: valid until end_step()
            cache.end_step()
        assert seen == [((0, 1),), ((0, 5),), ((0, 14),), ((0, 1), (5, 30))]
        assert last == [10 * run] + [2 + 10 * run] * 9 + [3 + 10 * run] * 16


def test_sink_scales_saves_memory_on_the_256px_schedule(registry):
    layout = SequenceLayout.from_patch_nums([1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
    kwargs = dict(num_layers=2, batch=1, num_heads=1, head_dim=4, layout=layout, device=torch.device("cpu"),
                  dtype=torch.float32)
    full, sink = registry.create("cache", "full"), registry.create("cache", "sink-scales", {"sink": 1, "recent": 1})
    full.begin(**kwargs)
    sink.begin(**kwargs)
    # sink-scales holds at most 1 + 169 + 256 tokens per layer, the full cache all 680
    assert sink.nbytes() == 2 * 2 * (1 + 169 + 256) * 4 * 4
    assert full.nbytes() == 2 * 2 * layout.length * 4 * 4


# ---------------------------------------------------------------------------------------- axial


def brute_force_axial(layout: SequenceLayout, queries, keys, visible, apply_from: int) -> torch.Tensor:
    """The axial rule, one (query, key) pair at a time, in plain Python."""
    where = []  # position -> (scale, row, col, height, width)
    for index, (h, w) in enumerate(layout.grids):
        where += [(index, r, c, h, w) for r in range(h) for c in range(w)]
    first = apply_from if apply_from >= 0 else max(0, layout.num_scales + apply_from)
    q_pos = [p for b, e in queries for p in range(b, e)]
    k_pos = [p for b, e in keys for p in range(b, e)]
    out = torch.zeros(len(q_pos), len(k_pos), dtype=torch.bool)
    for i, qp in enumerate(q_pos):
        qs, qr, qc, qh, qw = where[qp]
        for j, kp in enumerate(k_pos):
            ks, kr, kc, kh, kw = where[kp]
            if not bool(visible(torch.tensor(qs), torch.tensor(ks))):
                continue
            if qs < first:
                out[i, j] = True
                continue
            row = math.floor((Fraction(qr) + Fraction(1, 2)) * kh / qh)  # corresponding position
            col = math.floor((Fraction(qc) + Fraction(1, 2)) * kw / qw)
            out[i, j] = kr == row or kc == col
    return out


def _mask(spec, lq, lk):
    mask = spec.mask(lq, lk, "cpu")
    return torch.ones(lq, lk, dtype=torch.bool) if mask is None else mask


@st.composite
def axial_cases(draw):
    grids = draw(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=5))
    layout = SequenceLayout.from_patch_nums(grids)
    n = layout.num_scales
    mode = draw(st.sampled_from(["step", "teacher", "subsets"]))
    if mode == "step":  # one cached step: scale s over scales 0..s
        s = draw(st.integers(0, n - 1))
        queries, keys = layout.spans_of([s]), layout.spans_of(range(s + 1))
    elif mode == "teacher":  # the whole sequence at once
        queries = keys = layout.spans_of(range(n))
    else:
        q_scales = draw(st.sets(st.integers(0, n - 1), min_size=1))
        k_scales = draw(st.sets(st.integers(0, n - 1))) | q_scales
        queries, keys = layout.spans_of(q_scales), layout.spans_of(k_scales)
    trajectory = draw(st.sampled_from([FullTrajectory(), MarkovTrajectory(), MarkovTrajectory(MarkovOptions(order=2))]))
    apply_from = draw(st.integers(-6, 6))
    return layout, queries, keys, trajectory, apply_from


@FAST
@given(axial_cases())
def test_axial_matches_brute_force(registry, case):
    layout, queries, keys, trajectory, apply_from = case
    pattern = registry.create("attention", "axial", {"apply_from": apply_from})
    lq = sum(e - b for b, e in queries)
    lk = sum(e - b for b, e in keys)
    spec = pattern.spec(layout, queries, keys, trajectory.visible)
    assert isinstance(spec, (Dense, Masked))
    got = _mask(spec, lq, lk)
    want = brute_force_axial(layout, queries, keys, trajectory.visible, apply_from)
    assert torch.equal(got, want)
    assert isinstance(spec, Dense) == bool(want.all())
    # never more than the trajectory makes visible (FullTrajectory: nothing from a later scale)
    hidden = ~brute_force_axial(layout, queries, keys, FullTrajectory().visible, layout.num_scales)
    assert not (got & hidden).any()
    # every query sees at least its own position (keys include the query's scale)
    assert got.any(dim=1).all()


def test_axial_criss_cross_on_one_map(registry):
    layout = SequenceLayout.from_patch_nums([(3, 4)])
    span = layout.spans_of([0])
    spec = registry.create("attention", "axial", {"apply_from": 0}).spec(layout, span, span, FullTrajectory().visible)
    mask = _mask(spec, 12, 12)
    for q, k in itertools.product(range(12), repeat=2):
        assert bool(mask[q, k]) == (q // 4 == k // 4 or q % 4 == k % 4)
    assert mask.sum(dim=1).tolist() == [3 + 4 - 1] * 12


def test_axial_dense_below_apply_from(registry):
    layout = SequenceLayout.from_patch_nums([1, 2, (1, 3), 4])
    pattern = registry.create("attention", "axial")  # apply_from -2: scales 2 and 3 are criss-cross
    full = FullTrajectory().visible
    for s in (0, 1):  # dense below apply_from, a 2x2 map included
        assert isinstance(pattern.spec(layout, layout.spans_of([s]), layout.spans_of(range(s + 1)), full), Dense)
    assert isinstance(pattern.spec(layout, layout.spans_of([1]), layout.spans_of([1]), full), Dense)
    # a 1x3 map: every key shares the query's row; the earlier 1x1 and 2x2 maps are covered by
    # the corresponding row and column (2x2: the diagonal key is not)
    spec = pattern.spec(layout, layout.spans_of([2]), layout.spans_of([2]), full)
    assert isinstance(spec, Dense)
    spec = pattern.spec(layout, layout.spans_of([2]), layout.spans_of([0, 1, 2]), full)
    assert isinstance(spec, Masked) and spec.structure == "axial"
    spec = pattern.spec(layout, layout.spans_of([3]), layout.spans_of([0, 1, 2, 3]), full)
    assert isinstance(spec, Masked) and spec.structure == "axial"


def test_axial_spec_runs_on_the_cpu_backends(registry):
    layout = SequenceLayout.from_patch_nums([1, 2, 3, 5])
    queries, keys = layout.spans_of([3]), layout.spans_of([0, 1, 2, 3])
    spec = registry.create("attention", "axial").spec(layout, queries, keys, FullTrajectory().visible)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 25, 8, generator=g)
    k = torch.randn(2, 3, 39, 8, generator=g)
    v = torch.randn(2, 3, 39, 8, generator=g)
    reference, sdpa = registry.create("backend", "reference"), registry.create("backend", "sdpa")
    for backend in (reference, sdpa):
        assert backend.supports(spec, device=torch.device("cpu"), dtype=torch.float32, head_dim=8) is None
    want = reference.attend(q, k, v, spec, scale=0.3)
    torch.testing.assert_close(sdpa.attend(q, k, v, spec, scale=0.3), want, atol=1e-5, rtol=1e-5)
    # a key outside the criss-cross has no influence on the output
    mask = _mask(spec, 25, 39)
    outside = int((~mask[0]).nonzero()[0])
    v2 = v.clone()
    v2[:, :, outside] += 100.0
    torch.testing.assert_close(reference.attend(q, k, v2, spec, scale=0.3)[:, :, 0], want[:, :, 0])



# ------------------------------------------------------------------------ in the engine, for real


def _engine(registry, model, tokenizer, trajectory, attention, cache, trajectory_options=None, cache_options=None,
            attention_options=None):
    from mvar_engine.apps.config import EngineConfig
    from mvar_engine.models.var_adapter import NextScaleEngine
    from mvar_engine.apps.pipeline import resolve_components

    config = EngineConfig(trajectory={"name": trajectory, "options": trajectory_options or {}},
                          attention={"name": attention, "options": attention_options or {}},
                          cache={"name": cache, "options": cache_options or {}}, backend="sdpa")
    c = resolve_components(config, registry)
    return NextScaleEngine(model, tokenizer, c.trajectory, c.pattern, c.cache, c.backends)


def _generate(engine, forced=None, cfg=1.5):
    labels = torch.tensor([0, 3])
    return engine.generate(labels, cfg=cfg, top_k=0, top_p=0.0, generator=torch.Generator().manual_seed(0),
                           forced_tokens=forced, return_logits=True)


def _assert_same_logits(a, b):
    for s, (x, y) in enumerate(zip(a.logits, b.logits)):
        torch.testing.assert_close(x, y, atol=2e-4, rtol=0, msg=f"scale {s}")


PATCH_NUMS = (1, 2, (2, 3), 4, 5)


def test_engine_sink_scales_covering_every_scale_equals_full(registry):
    from conftest import small_models

    model, tok = small_models(PATCH_NUMS)
    full = _generate(_engine(registry, model, tok, "full", "dense", "full"))
    # sink 2 + recent 2 covers the 4 earlier scales of the last step: nothing is ever dropped
    engine = _engine(registry, model, tok, "full", "dense", "sink-scales", cache_options={"sink": 2, "recent": 2})
    kept = _generate(engine, forced=full.tokens)
    _assert_same_logits(full, kept)
    # sink 1 + recent 1 drops scales: an approximation under `full`, with a smaller cache
    engine = _engine(registry, model, tok, "full", "dense", "sink-scales", cache_options={"sink": 1, "recent": 1})
    small = _generate(engine, forced=full.tokens)
    assert small.cache_peak_bytes < full.cache_peak_bytes
    assert not torch.allclose(small.logits[-1], full.logits[-1], atol=1e-3)


def test_engine_sink_scales_is_exact_under_markov_order_two(registry):
    """The sink is in the cache but the trajectory hides it: results equal the recomputing oracle."""
    from conftest import small_models

    model, tok = small_models(PATCH_NUMS)
    order = {"order": 2}
    oracle = _generate(_engine(registry, model, tok, "markov", "dense", "none", trajectory_options=order))
    cached = _generate(_engine(registry, model, tok, "markov", "dense", "sink-scales", trajectory_options=order,
                               cache_options={"sink": 1, "recent": 1}), forced=oracle.tokens)
    _assert_same_logits(oracle, cached)


def test_engine_axial_cached_equals_recomputed_equals_teacher_forced(registry):
    from conftest import small_models

    model, tok = small_models(PATCH_NUMS)
    options = {"apply_from": 2}
    cached = _generate(_engine(registry, model, tok, "full", "axial", "full", attention_options=options))
    recomputed = _generate(_engine(registry, model, tok, "full", "axial", "none", attention_options=options),
                           forced=cached.tokens)
    _assert_same_logits(cached, recomputed)
    engine = _engine(registry, model, tok, "full", "axial", "none", attention_options=options)
    rows = torch.tensor([0, 3, model.num_classes, model.num_classes])
    var_input = tok.indices_to_var_input(cached.tokens).repeat(2, 1, 1)
    with torch.no_grad():
        teacher = engine.teacher_forced_logits(rows, var_input)
    for scale, step_logits in zip(model.layout.scales, cached.logits):
        torch.testing.assert_close(teacher[:, scale.begin:scale.end], step_logits, atol=2e-4, rtol=0)
    # and axial really differs from dense on the criss-cross scales
    dense = _generate(_engine(registry, model, tok, "full", "dense", "full"), forced=cached.tokens)
    torch.testing.assert_close(dense.logits[1], cached.logits[1], atol=2e-4, rtol=0)
    assert not torch.allclose(dense.logits[-1], cached.logits[-1], atol=1e-3)
