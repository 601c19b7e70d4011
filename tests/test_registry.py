"""Tests of plugin discovery and the component registry (``mvar_engine.core.registry``).

Fast and model-free: third-party plugins are simulated with fake entry points (objects with
``name``, ``value``, ``dist`` and ``load()``) passed to ``load_registry(entry_points=[...])``; the
built-ins are then loaded from their modules directly, exactly as from a source tree.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mvar_engine import (
    AttentionPatternRecord,
    Availability,
    CachePolicyRecord,
    NoOptions,
    TrajectoryRecord,
    hookimpl,
)
from mvar_engine.core.attention import AttentionPattern, Dense, Neighborhood2D
from mvar_engine.core.cache import CachePolicy
from mvar_engine.core.errors import (
    ComponentFailedError,
    ConfigError,
    DuplicateComponentError,
    MvarEngineError,
    UnknownComponentError,
    UsageError,
)
from mvar_engine.core.layout import SequenceLayout
from mvar_engine.core.registry import (
    ENV_ALLOW,
    ENV_DISABLE_AUTOLOAD,
    failing_component,
    get_registry,
    load_registry,
    normalize_name,
    reset_registry,
)
from mvar_engine.plugins.trajectories import FullTrajectory

FAST = settings(max_examples=max(40, settings().max_examples), deadline=None, suppress_health_check=[HealthCheck.too_slow])

BUILTINS = {
    "trajectory": {"full", "markov"},
    "attention": {"dense", "neighborhood"},
    "cache": {"none", "full", "window", "sink"},
    "backend": {"reference", "sdpa", "flex", "natten", "xformers", "flash-attn"},
}
ALL_BUILTIN_NAMES = sorted((kind, name) for kind, names in BUILTINS.items() for name in names)


# ------------------------------------------------------------------------------------- fakes


@dataclass
class FakeDist:
    name: str
    version: str = "1.0"


class FakeEntryPoint:
    """What ``load_registry`` needs of an ``importlib.metadata.EntryPoint``.

    ``target``: the object ``load()`` returns; when None, ``load()`` really imports ``value``.
    """

    def __init__(self, name: str, dist: str | None, target: Any = None, value: str | None = None):
        self.name = name
        self.value = value or f"{(dist or name).replace('-', '_')}.plugin"
        self.dist = FakeDist(dist) if dist else None
        self._target = target

    def load(self):
        if self._target is None:
            import importlib

            return importlib.import_module(self.value)
        return self._target


class _Cache(CachePolicy):
    """A do-nothing cache policy for fake plugins."""

    stores_history = False

    def __init__(self, options=None):
        self.options = options

    def begin(self, **kwargs):
        pass

    def update(self, layer, k, v, spans):
        return k, v, spans

    def nbytes(self):
        return 0


class _Pattern(AttentionPattern):
    def __init__(self, options=None):
        self.options = options

    def spec(self, layout, queries, keys, visible):
        return Dense()


def plugin_module(name: str, **hooks) -> types.ModuleType:
    """A plugin module whose hooks (hook name -> zero-argument function) are marked ``@hookimpl``."""
    module = types.ModuleType(name)
    for hook, function in hooks.items():
        setattr(module, hook, hookimpl(function))
    return module


def cache_plugin(name: str, *cache_names: str) -> types.ModuleType:
    return plugin_module(name, mvar_engine_cache_policies=lambda: [
        CachePolicyRecord(name=n, factory=_Cache, description=f"{n} from {name}") for n in cache_names])


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """The discovery switches must not leak in from the caller's environment."""
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    monkeypatch.delenv(ENV_ALLOW, raising=False)


@pytest.fixture(scope="module")
def builtin_registry():
    """Only the built-ins (no third-party entry point), loaded from the source tree."""
    return load_registry(entry_points=[])


# ----------------------------------------------------------------------------------- built-ins


def test_builtins_are_all_present(builtin_registry):
    for kind, names in BUILTINS.items():
        assert names <= set(builtin_registry.names(kind)), kind
    assert builtin_registry.broken == []
    for component in builtin_registry.components():
        if (component.kind, component.name) in ALL_BUILTIN_NAMES:
            assert component.provider.builtin
            assert component.provider.package == "mvar-engine"
            assert component.record.description, component.name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer; this machine has CUDA")
@pytest.mark.parametrize("name", ["xformers", "flash-attn"])
def test_cuda_backends_unavailable_on_cpu(builtin_registry, name):
    availability = builtin_registry.get("backend", name).availability
    assert not availability.ok
    assert re.search(r"CUDA|not installed", availability.reason), availability.reason
    # listed, not hidden, and still described in the machine-readable listing
    listed = builtin_registry.get("backend", name).as_dict()
    assert listed["available"] is False and listed["reason"] == availability.reason


def test_always_available_builtins(builtin_registry):
    for kind, name in [("backend", "reference"), ("backend", "sdpa"), ("cache", "window"), ("attention", "dense")]:
        assert builtin_registry.get(kind, name).availability.ok, (kind, name)


def test_get_registry_is_cached_and_resettable():
    reset_registry()
    first = get_registry()
    assert get_registry() is first
    reset_registry()
    assert get_registry() is not first
    reset_registry()


# -------------------------------------------------------------------------------- name lookup


def test_unknown_name_lists_available_and_closest(builtin_registry):
    with pytest.raises(UnknownComponentError) as info:
        builtin_registry.get("cache", "windw")
    message = str(info.value)
    assert "did you mean 'window'" in message
    for name in BUILTINS["cache"]:
        assert name in message
    assert "\n" not in message


def test_unknown_name_without_close_match(builtin_registry):
    with pytest.raises(UnknownComponentError) as info:
        builtin_registry.get("backend", "qqqqqqqq")
    assert "did you mean" not in str(info.value)
    assert "reference" in str(info.value) and "flash-attn" in str(info.value)


def test_unknown_kind(builtin_registry):
    with pytest.raises(UnknownComponentError, match="kind"):
        builtin_registry.get("sampler", "top-k")


def test_flash_attn_spellings(builtin_registry):
    assert normalize_name("Flash_Attn") == "flash-attn"
    assert builtin_registry.get("backend", "Flash_Attn").name == "flash-attn"
    assert builtin_registry.get("backend", "  FLASH attn ").name == "flash-attn"


@st.composite
def spelling_variants(draw):
    """A built-in (kind, name) and a spelling of it: any case, '-' as '-', '_' or ' ', padded."""
    kind, name = draw(st.sampled_from(ALL_BUILTIN_NAMES))
    chars = []
    for char in name:
        if char == "-":
            chars.append(draw(st.sampled_from(["-", "_", " ", "__"])))
        else:
            chars.append(char.upper() if draw(st.booleans()) else char)
    pad = draw(st.sampled_from(["", " ", "\t"]))
    return kind, name, pad + "".join(chars) + pad


@FAST
@given(spelling_variants())
def test_name_normalisation(builtin_registry, variant):
    kind, name, spelling = variant
    assert normalize_name(spelling) == name
    assert builtin_registry.get(kind, spelling).name == name


# --------------------------------------------------------------------------------- duplicates


def test_duplicate_names_from_two_providers():
    eps = [
        FakeEntryPoint("alpha", "pkg-alpha", cache_plugin("alpha", "shared", "only-alpha")),
        FakeEntryPoint("beta", "pkg-beta", cache_plugin("beta", "shared")),
    ]
    registry = load_registry(entry_points=eps)
    with pytest.raises(DuplicateComponentError) as info:
        registry.get("cache", "shared")
    assert "pkg-alpha" in str(info.value) and "pkg-beta" in str(info.value)
    with pytest.raises(DuplicateComponentError):
        registry.create("cache", "Shared")
    # listed as unavailable, with the other provider as the reason
    entry = next(c for c in registry.components("cache") if c.name == "shared")
    assert not entry.availability.ok and "pkg-" in entry.availability.reason
    # everything else still works
    assert isinstance(registry.create("cache", "only-alpha"), _Cache)
    assert registry.get("cache", "only-alpha").provider.package == "pkg-alpha"
    assert isinstance(registry.create("cache", "window", {"scales": 2}), CachePolicy)
    assert registry.broken == []


def test_third_party_shadowing_a_builtin_is_a_conflict():
    registry = load_registry(entry_points=[FakeEntryPoint("shadow", "pkg-shadow", cache_plugin("shadow", "window"))])
    with pytest.raises(DuplicateComponentError) as info:
        registry.get("cache", "window")
    assert "pkg-shadow" in str(info.value) and "mvar-engine" in str(info.value)
    assert isinstance(registry.create("cache", "full"), CachePolicy)


def test_both_entries_of_a_duplicated_name_are_listed_with_their_providers():
    registry = load_registry(entry_points=[FakeEntryPoint("shadow", "pkg-shadow", cache_plugin("shadow", "window"))])
    windows = [c for c in registry.components("cache") if c.name == "window"]
    assert [(c.provider.package, c.provider.builtin) for c in windows] == [("mvar-engine", True), ("pkg-shadow", False)]
    assert windows[1].record.description == "window from shadow"  # its own record, not the built-in's
    for entry, other in zip(windows, reversed(windows)):
        assert [p.package for p in entry.conflicts] == [other.provider.package]
        assert not entry.availability.ok and other.provider.package in entry.availability.reason
        listed = entry.as_dict()
        assert listed["provider"]["package"] == entry.provider.package and listed["available"] is False
        assert [c["package"] for c in listed["conflicts"]] == [other.provider.package]
    assert registry.names("cache").count("window") == 1
    assert all(c.conflicts == [] for c in registry.components() if c.name != "window")


def test_using_a_duplicated_name_is_a_one_line_usage_error_naming_both_and_the_fix():
    registry = load_registry(entry_points=[FakeEntryPoint("shadow", "pkg-shadow", cache_plugin("shadow", "window"))])
    for use in (lambda: registry.get("cache", "Window"), lambda: registry.create("cache", "window", {"scales": 2}),
                lambda: registry.validate_options("cache", "window")):
        with pytest.raises(DuplicateComponentError) as info:
            use()
        message = str(info.value)
        assert isinstance(info.value, UsageError)  # the CLI exits with status 2
        assert "\n" not in message
        assert "cache policy 'window'" in message and "mvar-engine" in message and "pkg-shadow" in message
        assert "pip uninstall pkg-shadow" in message and ENV_ALLOW in message


@FAST
@given(st.lists(st.lists(st.sampled_from(["a", "b", "c", "window", "full"]), max_size=4, unique=True),
                min_size=1, max_size=3))
def test_every_registration_is_listed_and_only_shared_names_fail(plugins):
    eps = [FakeEntryPoint(f"p{i}", f"pkg-{i}", cache_plugin(f"p{i}", *names)) for i, names in enumerate(plugins)]
    registry = load_registry(entry_points=eps)
    providers: dict[str, list[str]] = {}
    for name in sorted(BUILTINS["cache"] | set(registry.names("cache"))):
        providers[name] = [c.provider.package for c in registry.components("cache") if c.name == name]
    for i, names in enumerate(plugins):
        for name in names:
            assert f"pkg-{i}" in providers[name]
    for name, packages in providers.items():
        if len(packages) > 1:
            with pytest.raises(DuplicateComponentError) as info:
                registry.get("cache", name)
            assert all(package in str(info.value) for package in packages)
        else:
            assert registry.get("cache", name).provider.package == packages[0]


# -------------------------------------------------------------------- errors raised in plugin code


class _BoomCache(_Cache):
    def update(self, layer, k, v, spans):
        return self._helper()

    def _helper(self):
        raise RuntimeError("boom in update")


def _boom_factory(options):
    raise RuntimeError("boom in factory")


def _refusing_factory(options):
    raise UsageError("--cache-x must be even")


def _boom_plugin():
    return plugin_module("boom", mvar_engine_cache_policies=lambda: [
        CachePolicyRecord(name="boom-factory", factory=_boom_factory),
        CachePolicyRecord(name="refusing", factory=_refusing_factory),
        CachePolicyRecord(name="boom-update", factory=_BoomCache),
    ])


def test_an_exception_in_a_plugin_factory_names_the_component_and_provider():
    registry = load_registry(entry_points=[FakeEntryPoint("boom", "pkg-boom", _boom_plugin())])
    with pytest.raises(ComponentFailedError) as info:
        registry.create("cache", "boom-factory")
    assert str(info.value) == "cache policy 'boom-factory' (from pkg-boom 1.0) failed: RuntimeError: boom in factory"
    assert isinstance(info.value.__cause__, RuntimeError)  # the traceback (--debug) goes down to the plugin
    assert info.value.origin.provider.package == "pkg-boom" and info.value.origin.kind == "cache"
    # the plugin's own one-line errors are bad input, not failures: passed on unchanged
    with pytest.raises(UsageError, match="--cache-x must be even"):
        registry.create("cache", "refusing")


def test_an_exception_in_a_plugin_method_is_attributed_to_the_component():
    registry = load_registry(entry_points=[FakeEntryPoint("boom", "pkg-boom", _boom_plugin())])
    cache = registry.create("cache", "boom-update")
    assert type(cache) is _BoomCache  # not wrapped
    with pytest.raises(RuntimeError) as info:
        cache.update(0, None, None, ())
    origin = failing_component(info.value)
    assert (origin.kind, origin.name, origin.provider.package) == ("cache", "boom-update", "pkg-boom")
    assert str(origin) == "cache policy 'boom-update' (from pkg-boom 1.0)"
    # another instance of the same class, not built by the registry, is no component
    with pytest.raises(RuntimeError) as info:
        _BoomCache().update(0, None, None, ())
    assert failing_component(info.value) is None
    # an error raised while handling a plugin's error still names the plugin
    try:
        try:
            cache.update(0, None, None, ())
        except RuntimeError:
            raise KeyError("engine bookkeeping")
    except KeyError as error:
        assert failing_component(error).name == "boom-update"


def test_a_plugin_is_named_before_the_builtin_it_calls():
    builtin = load_registry(entry_points=[]).create("cache", "full")
    with pytest.raises(Exception) as info:  # a built-in used outside its life cycle
        builtin.update(0, torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), ((0, 1),))
    assert failing_component(info.value).provider.builtin

    class Wrapper(_Cache):  # a plugin component delegating to a built-in one that raises
        def update(self, layer, k, v, spans):
            return builtin.update(layer, k, v, spans)

    wrapper_plugin = plugin_module("wrap", mvar_engine_cache_policies=lambda: [CachePolicyRecord(name="wrap", factory=Wrapper)])
    registry = load_registry(entry_points=[FakeEntryPoint("wrap", "pkg-wrap", wrapper_plugin)])
    with pytest.raises(Exception) as info:
        registry.create("cache", "wrap").update(0, torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), ((0, 1),))
    assert failing_component(info.value).name == "wrap"


# ----------------------------------------------------------------------------- broken plugins


def _raise():
    raise RuntimeError("boom: no GPU driver")


def test_broken_plugins_are_reported_and_isolated():
    good = cache_plugin("good", "good-cache")
    raising = plugin_module("raising", mvar_engine_cache_policies=_raise,
                            mvar_engine_trajectories=lambda: [])
    wrong_type = plugin_module("wrong", mvar_engine_attention_patterns=lambda: [
        CachePolicyRecord(name="not-a-pattern", factory=_Cache),
        AttentionPatternRecord(name="right-pattern", factory=_Pattern),
    ])
    not_iterable = plugin_module("single", mvar_engine_cache_policies=lambda: CachePolicyRecord(name="solo", factory=_Cache))
    bad_name = plugin_module("badname", mvar_engine_cache_policies=lambda: [CachePolicyRecord(name="no/slash", factory=_Cache)])
    eps = [
        FakeEntryPoint("raising", "pkg-raising", raising),
        FakeEntryPoint("missing", "pkg-missing", value="mvar_engine_no_such_module_for_tests.plugin"),
        FakeEntryPoint("wrong", "pkg-wrong", wrong_type),
        FakeEntryPoint("single", "pkg-single", not_iterable),
        FakeEntryPoint("badname", "pkg-badname", bad_name),
        FakeEntryPoint("good", "pkg-good", good),
    ]
    registry = load_registry(entry_points=eps)
    # keyed by the provider's plugin (= entry-point name); BrokenPlugin.plugin itself is the
    # entry-point name for import failures but pluggy's "package:name" for hook failures
    broken = {b.provider.plugin: b for b in registry.broken}
    assert len(registry.broken) == len(broken)
    assert set(broken) == {"raising", "missing", "wrong", "single", "badname"}

    assert "mvar_engine_cache_policies" in broken["raising"].error
    assert "RuntimeError" in broken["raising"].error and "boom: no GPU driver" in broken["raising"].error
    assert broken["raising"].provider.package == "pkg-raising"

    assert broken["missing"].error.startswith("import failed")
    assert "ModuleNotFoundError" in broken["missing"].error
    assert "mvar_engine_no_such_module_for_tests" in broken["missing"].error

    assert "CachePolicyRecord" in broken["wrong"].error and "AttentionPatternRecord" in broken["wrong"].error
    assert "TypeError" in broken["single"].error
    assert "no/slash" in broken["badname"].error

    for b in registry.broken:  # one line each, serialisable for `plugins --json`
        assert "\n" not in b.error and b.provider.plugin in b.plugin
        assert b.as_dict()["provider"]["package"].startswith("pkg-")

    # the rest still works: other plugins, the valid record of a half-broken plugin, the built-ins
    assert isinstance(registry.create("cache", "good-cache"), _Cache)
    assert isinstance(registry.create("attention", "right-pattern"), _Pattern)
    assert "not-a-pattern" not in registry.names("cache") + registry.names("attention")
    for kind, names in BUILTINS.items():
        assert names <= set(registry.names(kind))


def test_failing_availability_check_is_not_fatal():
    def check():
        raise OSError("driver probe crashed")

    plugin = plugin_module("probe", mvar_engine_trajectories=lambda: [
        TrajectoryRecord(name="probe", factory=FullTrajectory, availability=check),
        TrajectoryRecord(name="odd", factory=FullTrajectory, availability=lambda: "yes"),
        TrajectoryRecord(name="fine", factory=FullTrajectory, availability=Availability.yes),
    ])
    registry = load_registry(entry_points=[FakeEntryPoint("probe", "pkg-probe", plugin)])
    probe = registry.get("trajectory", "probe").availability
    assert not probe.ok and "OSError" in probe.reason and "driver probe crashed" in probe.reason
    assert not registry.get("trajectory", "odd").availability.ok
    assert registry.get("trajectory", "fine").availability.ok


def test_extra_plugins_are_registered():
    registry = load_registry([("notebook", cache_plugin("notebook", "scratch"))], entry_points=[])
    entry = registry.get("cache", "scratch")
    assert entry.provider.plugin == "notebook" and not entry.provider.builtin


# -------------------------------------------------------------------------------- environment


def _two_plugins():
    return [
        FakeEntryPoint("alpha", "pkg-alpha", cache_plugin("alpha", "alpha-cache")),
        FakeEntryPoint("beta", "pkg_beta", cache_plugin("beta", "beta-cache")),
    ]


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_disable_autoload_keeps_builtins_only(monkeypatch, value):
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, value)
    registry = load_registry(entry_points=_two_plugins())
    assert "alpha-cache" not in registry.names("cache") and "beta-cache" not in registry.names("cache")
    assert {(s.plugin, s.package) for s in registry.skipped} == {("alpha", "pkg-alpha"), ("beta", "pkg_beta")}
    assert all(ENV_DISABLE_AUTOLOAD in s.reason for s in registry.skipped)
    for kind, names in BUILTINS.items():
        assert names <= set(registry.names(kind))


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_autoload_flag_off_values(monkeypatch, value):
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, value)
    registry = load_registry(entry_points=_two_plugins())
    assert {"alpha-cache", "beta-cache"} <= set(registry.names("cache"))
    assert registry.skipped == []


@pytest.mark.parametrize(("allow", "loaded", "skipped"), [
    ("alpha", {"alpha-cache"}, {"beta"}),                     # entry-point name
    ("pkg-beta", {"beta-cache"}, {"alpha"}),                  # distribution name (normalised)
    (" Alpha , PKG_BETA ", {"alpha-cache", "beta-cache"}, set()),
    ("nothing-installed", set(), {"alpha", "beta"}),
])
def test_allow_list(monkeypatch, allow, loaded, skipped):
    monkeypatch.setenv(ENV_ALLOW, allow)
    registry = load_registry(entry_points=_two_plugins())
    assert {"alpha-cache", "beta-cache"} & set(registry.names("cache")) == loaded
    assert {s.plugin for s in registry.skipped} == skipped
    assert all(ENV_ALLOW in s.reason for s in registry.skipped)
    assert BUILTINS["cache"] <= set(registry.names("cache"))  # built-ins are never filtered


# ----------------------------------------------------------------------------------- options


def test_invalid_option_value_is_one_line(builtin_registry):
    with pytest.raises(ConfigError) as info:
        builtin_registry.create("attention", "neighborhood", {"kernel_size": 0})
    message = str(info.value)
    assert "\n" not in message and len(info.value.problems) == 1
    assert "kernel_size" in message and "neighborhood" in message
    assert "greater than or equal to 1" in message and "0" in message


def test_unknown_option_lists_valid_names(builtin_registry):
    with pytest.raises(ConfigError) as info:
        builtin_registry.create("attention", "neighborhood", {"kernal_size": 3})
    message = str(info.value)
    assert "kernal_size" in message and "unknown option" in message
    for option in ("kernel_size", "dilation", "apply_from"):
        assert option in message


def test_component_without_options_rejects_any(builtin_registry):
    with pytest.raises(ConfigError, match="takes no options"):
        builtin_registry.create("cache", "full", {"scales": 2})


def test_several_problems_one_line_each(builtin_registry):
    with pytest.raises(ConfigError) as info:
        builtin_registry.create("attention", "neighborhood", {"kernel_size": -1, "dilation": 0})
    assert len(info.value.problems) == 2
    assert str(info.value).count("\n") == 1


def test_options_model_instance_passes_through(builtin_registry):
    options = builtin_registry.validate_options("cache", "window", {"scales": 3})
    assert builtin_registry.create("cache", "window", options).options.scales == 3
    assert options.scales == 3
    assert isinstance(builtin_registry.validate_options("trajectory", "full"), NoOptions)


@FAST
@given(kernel_size=st.integers(1, 40), side=st.integers(2, 9))
def test_valid_kernel_sizes_build_the_pattern(builtin_registry, kernel_size, side):
    pattern = builtin_registry.create("attention", "neighborhood", {"kernel_size": kernel_size})
    assert isinstance(pattern, AttentionPattern)
    assert pattern.options.kernel_size == kernel_size
    # the option really reaches the spec: a k x k window on a single side x side map
    layout = SequenceLayout.from_patch_nums([side])
    span = layout.spans_of([0])
    spec = pattern.spec(layout, span, span, FullTrajectory().visible)
    if kernel_size >= side:
        assert isinstance(spec, Dense)
    else:
        assert spec == Neighborhood2D(side, side, kernel_size)


@FAST
@given(kernel_size=st.integers(-50, 0))
def test_invalid_kernel_sizes_are_config_errors(builtin_registry, kernel_size):
    with pytest.raises(ConfigError, match="kernel_size"):
        builtin_registry.create("attention", "neighborhood", {"kernel_size": kernel_size})


# ------------------------------------------------------------------ regressions (review findings)


def test_registration_order_makes_the_first_provider_primary():
    """Regression: hook implementations were walked in reverse, so a later plugin became the
    primary provider of a duplicated name and the built-in showed up as its 'conflict'."""
    eps = [
        FakeEntryPoint("alpha", "pkg-alpha", cache_plugin("alpha", "shared")),
        FakeEntryPoint("beta", "pkg-beta", cache_plugin("beta", "shared")),
    ]
    registry = load_registry(entry_points=eps)
    entry = next(c for c in registry.components("cache") if c.name == "shared")
    assert entry.provider.package == "pkg-alpha"
    assert [p.package for p in entry.conflicts] == ["pkg-beta"]
    shadowed = load_registry(entry_points=[FakeEntryPoint("shadow", "pkg-shadow", cache_plugin("shadow", "window"))])
    window = next(c for c in shadowed.components("cache") if c.name == "window")
    assert window.provider.builtin and [p.package for p in window.conflicts] == ["pkg-shadow"]


def test_misspelt_hook_is_reported_as_broken():
    """Regression: a hook name with no spec was silently ignored."""
    module = plugin_module("typo", mvar_engine_cache_polices=lambda: [])
    registry = load_registry(entry_points=[FakeEntryPoint("typo", "pkg-typo", module)])
    assert [b.plugin for b in registry.broken] == ["typo"]
    assert "unknown hook mvar_engine_cache_polices" in registry.broken[0].error


def test_a_missing_builtin_entry_point_is_loaded_from_the_source_tree():
    """Regression: stale metadata with only one built-in entry point lost every backend silently."""
    ep = FakeEntryPoint("builtin-plugins", "mvar-engine", value="mvar_engine.plugins.builtin")
    registry = load_registry(entry_points=[ep])
    assert "sdpa" in registry.names("backend") and "markov" in registry.names("trajectory")
    assert registry.broken == []


def test_allow_list_matches_dotted_distribution_names(monkeypatch):
    """Regression: 'acme-plugins' did not allow the distribution 'acme.plugins'."""
    monkeypatch.setenv(ENV_ALLOW, "acme-plugins")
    registry = load_registry(entry_points=[FakeEntryPoint("x", "acme.plugins", cache_plugin("x", "acme-cache"))])
    assert "acme-cache" in registry.names("cache") and registry.skipped == []


def test_a_source_tree_never_installed_is_a_broken_entry_with_the_fix(monkeypatch):
    """Without this distribution's metadata there are no built-ins (core/ names no module to fall
    back on): the registry says so, with the fix, instead of failing on a missing component later."""
    from importlib import metadata

    from mvar_engine.core import registry as registry_module

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(registry_module.metadata, "distribution", missing)
    registry = load_registry(entry_points=[])
    assert registry.components("trajectory") == []
    assert [b.plugin for b in registry.broken] == ["mvar-engine"]
    assert "pip install -e ." in registry.broken[0].error


def test_kind_aliases_and_unknown_kinds_are_one_line():
    from mvar_engine import UnknownComponentError, get_registry

    registry = get_registry()
    assert registry.components("pattern") == registry.components("attention")
    assert registry.get("family", "var").name == "var" and "var" in registry.names("model")
    with pytest.raises(UnknownComponentError, match="unknown component kind 'patterns' \\(kinds: trajectory, "
                                                    "attention, cache, backend, model; also pattern for attention"):
        registry.components("patterns")


@pytest.mark.parametrize("call, needle", [
    (lambda r: r.get("cachez", "full"), "unknown component kind 'cachez'"),
    (lambda r: r.get("cache", "fulll"), "did you mean 'full'?"),
    (lambda r: r.get("cache", None), "a cache policy is named by a string, got NoneType None"),
    (lambda r: r.create("cache", "h2o", "budget=0.2"), "options must be a mapping of option names to values"),
    (lambda r: r.create("cache", "h2o", {"budgett": 1}), "option budgett: unknown option (valid: budget"),
    (lambda r: r.validate_options("cache", "nope", {}), "unknown cache policy 'nope'"),
    (lambda r: r.components("foo"), "unknown component kind 'foo'"),
])
def test_the_registry_api_answers_bad_input_in_one_line(call, needle):
    with pytest.raises(MvarEngineError) as caught:
        call(get_registry())
    assert needle in str(caught.value) and "\n" not in str(caught.value)
