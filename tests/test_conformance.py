"""The conformance kit (``mvar_engine.testing``) on every built-in cache, pattern and backend; a
deliberately broken component of each kind makes it fail; and the issue's acceptance for a
third-party raster pattern: the example plugin's ``causal-local`` runs from the CLI and gives the
same tokens as ``causal`` over a cache that keeps only the window's keys."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import torch

from mvar_engine import BudgetOptions, Dense, Masked, spans_to_positions
from mvar_engine.backends.flex import FlexBackend, FlexOptions, flex_availability
from mvar_engine.backends.natten_backend import NattenBackend
from mvar_engine.backends.reference import ReferenceBackend
from mvar_engine.backends.sdpa import SdpaBackend, SdpaOptions
from mvar_engine.core.registry import ENV_ALLOW, ENV_DISABLE_AUTOLOAD, get_registry, reset_registry
from mvar_engine.plugins.budget_cache import TokenWindowCache, positions_to_spans, received_attention
from mvar_engine.plugins.caches import FullCache, NoCache, WindowCache, WindowOptions, make_window
from mvar_engine.plugins.h2o_cache import H2OCache, H2OOptions
from mvar_engine.plugins.head_map import classify
from mvar_engine.plugins.patterns import CausalPattern, DensePattern, NeighborhoodOptions, NeighborhoodPattern
from mvar_engine.plugins.sink_cache import SinkCache, SinkOptions
from mvar_engine.plugins.ssd_cache import SSDCache, SSDOptions
from mvar_engine.testing import check_attention_backend, check_attention_pattern, check_cache_policy

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mvar-engine-example-plugin"


def budget(tokens):
    """The kit's token budget as a ``--cache-budget`` value (None: the whole sequence)."""
    return 1.0 if tokens is None else float(tokens)


def mixed_head_map(layers: int, heads: int):
    scores = torch.rand(layers, heads, generator=torch.Generator().manual_seed(layers * 7 + heads)).tolist()
    return classify(scores, 0.5)


CACHES = {
    "full": (lambda b, layers, heads: FullCache(), False),
    "window-tokens": (lambda b, layers, heads: make_window(WindowOptions(budget=budget(b))), True),
    "sink": (lambda b, layers, heads: SinkCache(SinkOptions(budget=budget(b))), True),
    "h2o": (lambda b, layers, heads: H2OCache(H2OOptions(budget=budget(b))), True),
    "ssd": (lambda b, layers, heads: SSDCache(SSDOptions(budget=budget(b)), head_map=mixed_head_map(layers, heads)),
            True),
}


# ------------------------------------------------------------------------------------ built-ins
@pytest.mark.parametrize("name", sorted(CACHES))
def test_builtin_cache_conforms(name):
    make, bounded = CACHES[name]
    check_cache_policy(make, bounded=bounded, max_examples=5)


def test_none_cache_conforms():
    """``none`` stores nothing (``nbytes() == 0`` within any bound); the engine recomputes, so the
    covering check is the oracle against itself and ``full``: a few examples suffice."""
    check_cache_policy(lambda b, layers, heads: NoCache(), bounded=False, max_examples=3)


def test_window_by_steps_conforms_where_it_covers():
    """``window --cache-scales`` serves next-scale only (refused under raster, the traits check);
    with more scales than any layout it keeps every key and equals ``full``."""
    check_cache_policy(lambda b, layers, heads: WindowCache(WindowOptions(scales=8)), bounded=False, max_examples=8)


@pytest.mark.parametrize("pattern", [DensePattern(), CausalPattern(), NeighborhoodPattern(),
                                     NeighborhoodPattern(NeighborhoodOptions(kernel_size=3, dilation=2, apply_from=0))],
                         ids=["dense", "causal", "neighborhood", "neighborhood-k3-d2"])
def test_builtin_pattern_conforms(pattern):
    check_attention_pattern(pattern)


CPU_BACKENDS = {"reference": ReferenceBackend(), "sdpa": SdpaBackend(),
                "sdpa-tiled": SdpaBackend(SdpaOptions(tiled="always", tile=3))}


@pytest.mark.parametrize("name", sorted(CPU_BACKENDS))
def test_builtin_backend_conforms(name):
    report = check_attention_backend(CPU_BACKENDS[name], dtypes=(torch.float32, torch.float64))
    assert set(report.compared) == {"dense", "causal", "window1d", "block-causal", "block-diagonal", "neighborhood2d",
                                    "masked"}


@pytest.mark.skipif(not flex_availability().ok, reason="torch.nn.attention.flex_attention is unavailable")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_conforms_eagerly():
    """One small flex check: eager flex (compiling costs ~20 s on a CPU; test_flex.py covers it)."""
    report = check_attention_backend(FlexBackend(FlexOptions(compile=False)), max_examples=7)
    assert report.compared and report.refused.get("neighborhood2d") is None


@pytest.mark.skipif(not get_registry().get("backend", "natten").availability.ok, reason="natten is not installed")
def test_natten_conforms():
    report = check_attention_backend(NattenBackend(), max_examples=8)
    assert report.compared == {"neighborhood2d": report.compared["neighborhood2d"]}  # the only kind it computes
    assert all(kind == "neighborhood2d" for kind in report.refused)  # e.g. a kernel larger than the map


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is available here")
@pytest.mark.parametrize("name", ["sdpa", "flex"])
def test_backend_conforms_on_cuda(name):
    backend = SdpaBackend() if name == "sdpa" else FlexBackend()
    report = check_attention_backend(backend, device="cuda", dtypes=(torch.float32, torch.bfloat16), max_examples=21)
    assert report.compared


# ------------------------------------------------------------------------------------ the kit can fail
class DropsTheClassToken(TokenWindowCache):
    """Keeps every token but hides the class token from every step after the prefill."""

    name = "drops-class-token"

    def update(self, layer, k, v, spans):
        k_all, v_all, k_spans = super().update(layer, k, v, spans)
        positions = spans_to_positions(k_spans).tolist()
        if len(positions) <= self.prefix or spans[0][0] < self.prefix:
            return k_all, v_all, k_spans
        return k_all[:, :, 1:], v_all[:, :, 1:], positions_to_spans(positions[1:])


def test_kit_catches_a_cache_that_drops_a_kept_token():
    with pytest.raises(AssertionError, match="covering budget"):
        check_cache_policy(lambda b, layers, heads: DropsTheClassToken(BudgetOptions(budget=budget(b))),
                           families="next-token", max_examples=5, shrink=False)


def test_kit_catches_a_cache_that_exceeds_its_budget():
    with pytest.raises(AssertionError, match="budget of"):
        check_cache_policy(lambda b, layers, heads: FullCache(), families="next-token", max_examples=5, shrink=False)


class ClaimsAFamily(FullCache):
    name = "claims-next-pixel"
    families = ("next-token", "next-pixel")


def test_kit_catches_inconsistent_traits():
    with pytest.raises(AssertionError, match="families"):
        check_cache_policy(lambda b, layers, heads: ClaimsAFamily(), bounded=False, max_examples=2, shrink=False)

    class NotABool(FullCache):
        name = "not-a-bool"
        stand_in_spans = "yes"

    with pytest.raises(AssertionError, match="stand_in_spans"):
        check_cache_policy(lambda b, layers, heads: NotABool(), bounded=False, max_examples=2, shrink=False)


class LiesAboutItsSpans(H2OCache):
    """H2O's per-(row, head) positions, declared as if every row and head kept the same ones."""

    name = "lies-about-its-spans"
    stand_in_spans = False


class SumsOverTheBatch(H2OCache):
    """H2O ranking by the attention summed over the whole batch: a sample's keys depend on the others."""

    name = "sums-over-the-batch"

    def observe(self, layer, q, k, spec, scale, *, received=None):
        received = received_attention(q, k, spec, scale)
        self.layers[layer].add_scores(received.sum(0, keepdim=True).expand_as(received).contiguous())


@pytest.mark.parametrize("cache, needle", [
    (LiesAboutItsSpans, "must declare stand_in_spans = True"),
    (SumsOverTheBatch, "keeps other positions for sample"),
])
def test_kit_catches_a_lying_spans_trait_and_a_batch_coupled_score(cache, needle):
    with pytest.raises(AssertionError, match=needle) as error:
        check_cache_policy(lambda b, layers, heads: cache(H2OOptions(budget=budget(b))), families="next-token",
                           max_examples=10, shrink=False)
    assert "\n" not in str(error.value).split("Falsifying")[0].strip()


class LeaksTheFuture(CausalPattern):
    """Every key, whatever the trajectory hides."""

    name = "leaks-the-future"

    def spec(self, layout, queries, keys, visible):
        return Dense()


class HidesTheQuery(CausalPattern):
    """A query sees no key at all under a masked spec (and lies about sees_every_visible_key)."""

    name = "hides-the-query"

    def spec(self, layout, queries, keys, visible):
        spec = super().spec(layout, queries, keys, visible)
        mask = spec.mask(sum(e - b for b, e in queries), sum(e - b for b, e in keys), "cpu")
        if mask is None or mask.shape[0] < 2:
            return spec
        mask = mask.clone()
        mask[-1] = False
        return Masked(mask, "broken")


def test_kit_catches_a_pattern_that_leaks_a_future_key():
    with pytest.raises(AssertionError, match="which the trajectory hides"):
        check_attention_pattern(LeaksTheFuture(), shrink=False)


def test_kit_catches_a_pattern_whose_query_sees_nothing():
    with pytest.raises(AssertionError, match="sees no key"):
        check_attention_pattern(HidesTheQuery(), shrink=False)


class IgnoresTheMask(SdpaBackend):
    name = "ignores-the-mask"

    def attend(self, q, k, v, spec, *, scale):
        return super().attend(q, k, v, Dense(), scale=scale)


class CrashesOnMasks(SdpaBackend):
    name = "crashes-on-masks"

    def attend(self, q, k, v, spec, *, scale):
        if spec.kind == "masked":
            raise RuntimeError("no masks here")
        return super().attend(q, k, v, spec, scale=scale)


def test_kit_catches_a_backend_with_a_wrong_output():
    with pytest.raises(AssertionError, match="differs from the float64 reference"):
        check_attention_backend(IgnoresTheMask(), shrink=False)


def test_kit_catches_a_backend_that_crashes_on_a_spec_it_accepts():
    with pytest.raises(AssertionError, match="attend raised RuntimeError"):
        check_attention_backend(CrashesOnMasks(), kinds=("masked",), max_examples=3, shrink=False)


# ------------------------------------------------------------------------------------ acceptance
@pytest.fixture
def example_plugin(tmp_path, monkeypatch):
    """The example plugin installed as a distribution (a dist-info on ``sys.path``, as
    tests/test_example_plugin.py does), the registry rediscovered with it, and forgotten after."""
    info = tmp_path / "site" / "mvar_engine_example_plugin-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mvar-engine-example-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[mvar_engine]\nexample = mvar_engine_example_plugin.plugin\n")
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    monkeypatch.delenv(ENV_ALLOW, raising=False)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert any(ep.name == "example" for ep in metadata.entry_points(group="mvar_engine"))
    reset_registry()
    yield get_registry()
    monkeypatch.undo()
    reset_registry()


class WindowKeysCache(FullCache):
    """Stores every key but gives each raster decode step (one query) only the keys of its causal
    ``k x k`` window: the class prefix and the earlier image tokens within ``k // 2`` rows and
    columns; the prefill step gets the prefix. With ``causal`` attention this is ``causal-local``."""

    name = "window-keys"
    families = ("next-token",)

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.half = kernel_size // 2

    def begin(self, *, layout, **kwargs):
        super().begin(layout=layout, **kwargs)
        self.coords, self.prefix = layout.coords(), layout.scales[0].numel

    def update(self, layer, k, v, spans):
        k_all, v_all, k_spans = super().update(layer, k, v, spans)  # slots hold positions 0 .. p in order
        (begin, end), = spans
        if end - begin != 1 or begin < self.prefix:
            return k_all, v_all, k_spans  # the prefill: the prefix sees itself causally
        c, p = self.coords, begin
        keep = [j for j in range(p + 1) if j < self.prefix or (abs(int(c.row[j] - c.row[p])) <= self.half
                                                               and abs(int(c.col[j] - c.col[p])) <= self.half)]
        index = torch.tensor(keep, device=k_all.device)
        return k_all.index_select(2, index), v_all.index_select(2, index), positions_to_spans(keep)


def test_causal_local_runs_from_the_cli(example_plugin, tmp_path):
    from mvar_engine.apps.cli import main

    assert example_plugin.get("attention", "causal-local").provider.package == "mvar-engine-example-plugin"
    out = tmp_path / "tmp.png"
    code = main(["--trajectory", "raster", "--attention", "causal-local", "--attention-kernel-size", "3",
                 "--labels", "0", "--samples-per-label", "1", "--top-k", "1", "--no-progress", "--output", str(out)])
    assert code == 0 and out.stat().st_size > 0


def test_causal_local_equals_causal_over_a_cache_that_keeps_only_the_window(example_plugin):
    from mvar_engine.apps.config import EngineConfig
    from mvar_engine.apps.model_options import RasterOptions
    from mvar_engine.apps.pipeline import build_models, with_weights
    from mvar_engine.core.backend_selection import selector_for
    from mvar_engine.models.raster_adapter import RasterEngine
    from mvar_engine.plugins.raster import RasterTrajectory

    model, _ = build_models(RasterOptions(**with_weights(EngineConfig(trajectory="raster")).model.options))
    model = model.eval()
    kernel_size = 3
    local = example_plugin.create("attention", "causal-local", {"kernel_size": kernel_size})
    labels = torch.tensor([0, 3])

    def run(pattern, cache):
        engine = RasterEngine(model, None, RasterTrajectory(), cache, selector_for("sdpa"), pattern=pattern)
        return engine.generate(labels, cache, cfg=4.0, top_k=1, return_logits=True)

    windowed = run(local, FullCache())
    kept = run(CausalPattern(), WindowKeysCache(kernel_size))
    assert torch.equal(windowed.tokens, kept.tokens)
    torch.testing.assert_close(windowed.logits, kept.logits, atol=1e-4, rtol=1e-4)
    causal = run(CausalPattern(), FullCache())  # not vacuous: the window changes the logits
    assert not torch.allclose(causal.logits, windowed.logits, atol=1e-3)
    assert model.config.grid[1] > kernel_size and model.config.grid[0] > kernel_size
