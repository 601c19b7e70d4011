"""Plugin discovery and the name-keyed component registry.

Discovery: every entry point of the ``mvar_engine`` group is loaded (the built-ins too), each
plugin's hooks are called one by one, and every record lands in a registry keyed by
``(kind, normalised name)``. A plugin that fails to import, register or return valid records is
kept in ``Registry.broken`` with its error; the rest still work. Whatever plugin code raises there
counts as its failure, ``SystemExit`` and ``KeyboardInterrupt`` included.

A name registered by two providers keeps both entries (both listed, each unavailable with the other
as the reason); using it is a one-line :class:`DuplicateComponentError` naming both and the way out.
Components built by :meth:`Registry.create` remember where they come from, so that an exception
raised in plugin code is reported with the component and its provider (:func:`failing_component`).

Environment:

- ``MVAR_ENGINE_DISABLE_PLUGIN_AUTOLOAD=1``: load only the built-in plugins (for tests).
- ``MVAR_ENGINE_PLUGINS=a,b``: allow-list of third-party plugins (entry-point names or
  distribution names); others are skipped and listed as such.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
import types
import weakref
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable, Mapping

import pluggy
from pydantic import BaseModel, ValidationError

from . import __version__, hookspecs
from .errors import (ComponentFailedError, ConfigError, DuplicateComponentError, MvarEngineError, UnknownComponentError,
                     setting)
from .records import KIND_LABELS, RECORD_TYPES, Availability, ComponentRecord

ENTRY_POINT_GROUP = "mvar_engine"
DISTRIBUTION = "mvar-engine"
ENV_DISABLE_AUTOLOAD = "MVAR_ENGINE_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOW = "MVAR_ENGINE_PLUGINS"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")


def normalize_name(name: str) -> str:
    """Registry key of a component name: stripped, lower case, ``_`` and spaces become ``-``."""
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def _normalize_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Provider:
    """Where a component comes from: the distribution (or module) and the plugin's name in it."""

    package: str
    version: str | None
    plugin: str
    builtin: bool = False

    def __str__(self) -> str:
        return f"{self.package} {self.version}" if self.version else self.package

    def describe(self) -> str:
        """``str(self)`` and, for a third-party provider, its plugin (entry point) name."""
        if self.builtin:
            return f"{self} (built-in)"
        return f"{self} (plugin '{self.plugin}')" if self.plugin != self.package else str(self)

    def as_dict(self) -> dict[str, Any]:
        return {"package": self.package, "version": self.version, "plugin": self.plugin, "builtin": self.builtin}


@dataclass(frozen=True)
class ComponentOrigin:
    """Which component an object is (or which plugin a piece of code belongs to: ``kind`` None)."""

    kind: str | None
    name: str
    provider: Provider

    def __str__(self) -> str:
        what = f"{KIND_LABELS.get(self.kind, self.kind)} '{self.name}'" if self.kind else f"plugin '{self.name}'"
        return f"{what} (from {self.provider})"


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin (or one of its records) that could not be used, with the error in one line."""

    plugin: str
    provider: Provider
    error: str

    def as_dict(self) -> dict[str, Any]:
        return {"plugin": self.plugin, "provider": self.provider.as_dict(), "error": self.error}


@dataclass(frozen=True)
class SkippedPlugin:
    """A third-party plugin not loaded because of the environment (autoload off, not allow-listed)."""

    plugin: str
    package: str
    reason: str


@dataclass
class RegisteredComponent:
    """One record in the registry, with its provider and (lazily checked) availability."""

    name: str
    record: ComponentRecord
    provider: Provider
    conflicts: list[Provider] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.record.kind

    @functools.cached_property
    def availability(self) -> Availability:
        if self.conflicts:
            others = ", ".join(str(p) for p in self.conflicts)
            return Availability.no(f"name also registered by {others}")
        return self.record.check_availability()

    def as_dict(self) -> dict[str, Any]:
        availability = self.availability
        return {
            "kind": self.kind,
            "name": self.name,
            "provider": self.provider.as_dict(),
            "conflicts": [p.as_dict() for p in self.conflicts],
            "available": availability.ok,
            "reason": availability.reason or None,
            "description": self.record.description,
            "options": self.record.options.model_json_schema().get("properties", {}),
        }


KIND_ALIASES = {"pattern": "attention", "family": "model"}
"""Other names of the component kinds (an attention pattern is registered under ``attention``, a
model family under ``model``)."""


def component_kind(kind: str) -> str:
    """``kind`` (or an alias: ``pattern``, ``family``) as a registry kind; one-line error listing them."""
    kind = KIND_ALIASES.get(kind, kind)
    if kind not in RECORD_TYPES:
        raise UnknownComponentError(f"unknown component kind {kind!r} (kinds: {', '.join(RECORD_TYPES)}; "
                                    f"also {', '.join(f'{a} for {k}' for a, k in KIND_ALIASES.items())})")
    return kind


def _check_numbers(record: ComponentRecord, name: str, options: BaseModel) -> None:
    """Refuse, for every component (plugins too), option numbers torch cannot take: inf/nan floats
    and integers beyond int64 (they overflow in C++ far from the setting that gave them)."""
    problems, kind = [], record.kind
    for option_name in type(options).model_fields:
        value = getattr(options, option_name, None)
        flag = f"set by {setting(record.option_setting(option_name))}"
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{KIND_LABELS[kind]} '{name}' option {option_name}: Input should be a finite number "
                            f"(got {value!r}) ({flag})")
        elif isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            problems.append(f"{KIND_LABELS[kind]} '{name}' option {option_name}: Input should be an integer of at most "
                            f"63 bits (got {value!r}) ({flag})")
    if problems:
        raise ConfigError(problems)


def format_validation_error(error: ValidationError, prefix: str = "", allowed: Iterable[str] = ()) -> list[str]:
    """One line per problem: ``field: message (got value)``; ``allowed`` lists valid field names."""
    lines = []
    allowed = list(allowed)
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "value"
        if problem["type"] == "extra_forbidden":
            hint = f" (valid: {', '.join(allowed)})" if allowed else " (this component takes no options)"
            lines.append(f"{prefix}{where}: unknown option{hint}")
            continue
        if problem["type"] == "missing":
            lines.append(f"{prefix}{where}: required, and not given")
            continue
        got = problem.get("input")
        shown = "" if isinstance(got, (dict, BaseModel)) or got is None else f" (got {got!r})"
        message = problem["msg"]
        named = message.startswith(("--", "[["))  # the message names its setting itself
        lines.append(f"{prefix}{message}{shown}" if named else f"{prefix}{where}: {message}{shown}")
    return lines


class Registry:
    """Components of every kind, keyed by normalised name; build with :func:`load_registry`."""

    def __init__(self) -> None:
        # kind -> name -> its entries in registration order (more than one: a conflict)
        self._components: dict[str, dict[str, list[RegisteredComponent]]] = {kind: {} for kind in RECORD_TYPES}
        self.broken: list[BrokenPlugin] = []
        self.skipped: list[SkippedPlugin] = []
        self.command_hooks: list[tuple[Provider, Any]] = []  # (provider, hook function), registration order

    def register_commands(self, commands: Any) -> None:
        """Let every plugin add its subcommands to ``commands`` (the ``mvar_engine_register_commands``
        hook); a plugin whose hook raises is recorded in :attr:`broken` and spares the rest."""
        for provider, function in self.command_hooks:
            try:
                function(commands=commands)
            except BaseException as error:  # plugin code: SystemExit and KeyboardInterrupt too
                self.broken.append(BrokenPlugin(provider.plugin, provider, f"{hookspecs.COMMAND_HOOK}: {_one_line(error)}"))

    # -- building -------------------------------------------------------------------------------
    def add(self, record: ComponentRecord, provider: Provider) -> None:
        """Register one record; a duplicate (kind, name) keeps both entries, each marked as
        conflicting with the other's provider (the first registered stays the primary entry)."""
        name = normalize_name(record.name)
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid component name {record.name!r} (use letters, digits, '-', '.')")
        entries = self._components[record.kind].setdefault(name, [])
        entry = RegisteredComponent(name=name, record=record, provider=provider)
        for existing in entries:
            existing.conflicts.append(provider)
            existing.__dict__.pop("availability", None)
            entry.conflicts.append(existing.provider)
        entries.append(entry)

    # -- queries --------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        """The registered names of ``kind``, sorted."""
        return sorted(self._components[component_kind(kind)])

    def components(self, kind: str | None = None) -> list[RegisteredComponent]:
        """Every entry (both entries of a duplicated name), by kind, then name, then registration."""
        kinds = [component_kind(kind)] if kind else list(RECORD_TYPES)
        return [entry for k in kinds for n in sorted(self._components[k]) for entry in self._components[k][n]]

    def get(self, kind: str, name: str) -> RegisteredComponent:
        """The component called ``name``; unknown or duplicated names raise a one-line error."""
        kind = component_kind(kind)
        if not isinstance(name, str):
            raise UnknownComponentError(f"a {KIND_LABELS[kind]} is named by a string, got {type(name).__name__} "
                                        f"{name!r} (available: {', '.join(sorted(self._components[kind])) or 'none'})")
        key = normalize_name(name)
        table = self._components[kind]
        if key not in table:
            label = KIND_LABELS[kind]
            available = ", ".join(sorted(table)) or "none installed"
            close = difflib.get_close_matches(key, list(table), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UnknownComponentError(f"unknown {label} '{name}' ({hint}available: {available})")
        entries = table[key]
        if len(entries) > 1:
            raise DuplicateComponentError(_duplicate_message(kind, key, [e.provider for e in entries]))
        return entries[0]

    def validate_options(self, kind: str, name: str, options: dict[str, Any] | BaseModel | None = None) -> BaseModel:
        """The component's options model validated from ``options``; errors raise ``ConfigError``."""
        entry = self.get(kind, name)
        model = entry.record.options
        if isinstance(options, model):
            return options
        if options is not None and not isinstance(options, (Mapping, BaseModel)):
            raise ConfigError([f"{KIND_LABELS[kind]} '{entry.name}' options must be a mapping of option names to "
                               f"values (or its {model.__name__}), got {type(options).__name__}"])
        if isinstance(options, BaseModel):
            options = options.model_dump()
        try:
            validated = model.model_validate(dict(options or {}))
        except ValidationError as error:
            prefix = f"{KIND_LABELS[kind]} '{entry.name}' option "
            lines = format_validation_error(error, prefix, model.model_fields)
            for i, problem in enumerate(error.errors()):  # name the setting that gives each known option
                field = str(problem["loc"][0]) if problem["loc"] else ""
                if field in model.model_fields and i < len(lines) and not problem["msg"].startswith("[["):
                    lines[i] += f" (set by {setting(entry.record.option_setting(field))})"
            raise ConfigError(lines) from None
        _check_numbers(entry.record, entry.name, validated)
        return validated

    def create(self, kind: str, name: str, options: dict[str, Any] | BaseModel | None = None) -> Any:
        """Build the component with validated options (the record's factory gets the options model)."""
        entry = self.get(kind, name)
        validated = self.validate_options(kind, name, options)
        origin = ComponentOrigin(entry.kind, entry.name, entry.provider)
        try:
            component = entry.record.factory(validated)
        except MvarEngineError:
            raise  # the plugin's own one-line error (bad input, incompatible options)
        except (Exception, SystemExit) as error:  # a plugin's sys.exit is its failure, not the command's
            if entry.provider.builtin:
                raise
            raise ComponentFailedError(f"{origin} failed: {_one_line(error)}", origin) from error
        remember_component(component, origin)
        return component


def _duplicate_message(kind: str, name: str, providers: list[Provider]) -> str:
    """One line: who registers ``name``, and how to keep only one of them."""
    label = KIND_LABELS[kind]
    if len({str(p) for p in providers}) == 1:
        head = f"{label} '{name}' is registered {len(providers)} times by {providers[0].describe()}"
    elif len(providers) == 2:
        head = f"{label} '{name}' is registered by both {providers[0].describe()} and {providers[1].describe()}"
    else:
        head = f"{label} '{name}' is registered by {', '.join(p.describe() for p in providers)}"
    third_party = list({p.package: p for p in providers if not p.builtin}.values())
    if not third_party:
        return f"{head}: reinstall mvar-engine"
    uninstall = " or ".join(f"pip uninstall {p.package}" for p in third_party)
    plugins = " or ".join(f"'{p.plugin}'" for p in third_party)
    return (f"{head}: uninstall one of them ({uninstall}) or set {ENV_ALLOW} to the plugins to load, "
            f"leaving out {plugins}")


# -- where a component comes from (for errors raised in plugin code) --------------------------------
_ORIGINS: dict[int, tuple[weakref.ref, ComponentOrigin]] = {}
_PLUGIN_PACKAGES: dict[str, Provider] = {}  # top-level module of a third-party plugin -> its provider


def remember_component(component: Any, origin: ComponentOrigin) -> None:
    """Record that ``component`` (built by the registry) is ``origin``; the object itself is not
    wrapped or modified. Objects that cannot be weakly referenced are not recorded."""
    key = id(component)

    def forget(ref: weakref.ref, key: int = key) -> None:
        if _ORIGINS.get(key, (None,))[0] is ref:
            del _ORIGINS[key]

    try:
        ref = weakref.ref(component, forget)
    except TypeError:
        return
    _ORIGINS[key] = (ref, origin)


def component_origin(obj: Any) -> ComponentOrigin | None:
    """The component ``obj`` is, if the registry built it."""
    item = _ORIGINS.get(id(obj))
    return item[1] if item is not None and item[0]() is obj else None


def _frame_origin(frame: types.FrameType) -> ComponentOrigin | None:
    try:
        origin = component_origin(frame.f_locals.get("self"))
    except Exception:  # an exotic frame: no attribution
        origin = None
    if origin is None and _PLUGIN_PACKAGES:
        module = str(frame.f_globals.get("__name__", "")).split(".")[0]
        provider = _PLUGIN_PACKAGES.get(module)
        if provider is not None:
            origin = ComponentOrigin(None, provider.plugin, provider)
    return origin


def failing_component(error: BaseException) -> ComponentOrigin | None:
    """The component (or third-party plugin module) whose code raised ``error``: the innermost
    frame of the traceback whose ``self`` is a component the registry built, preferring third-party
    components over built-in ones; the exception's cause or context is searched when it names none.
    None when no component's code is on the traceback."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found: ComponentOrigin | None = None
        tb = current.__traceback__
        while tb is not None:
            origin = _frame_origin(tb.tb_frame)
            if origin is not None and (found is None or found.provider.builtin or not origin.provider.builtin):
                found = origin
            tb = tb.tb_next
        if found is not None:
            return found
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None


# -- discovery ----------------------------------------------------------------------------------
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _allow_list() -> set[str] | None:
    raw = os.environ.get(ENV_ALLOW, "").strip()
    if not raw:
        return None
    parts = [part for part in raw.split(",") if part.strip()]
    return {normalize_name(part) for part in parts} | {_normalize_dist(part.strip()) for part in parts}


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _collect(pm: pluggy.PluginManager, registry: Registry, providers: dict[int, Provider]) -> None:
    """Call every hook of every plugin separately, so that one failing plugin spares the rest."""
    for impl in getattr(pm.hook, hookspecs.COMMAND_HOOK).get_hookimpls():
        provider = providers.get(id(impl.plugin)) or Provider(impl.plugin_name, None, impl.plugin_name)
        registry.command_hooks.append((provider, impl.function))
    for record_type in RECORD_TYPES.values():
        caller = getattr(pm.hook, record_type.hook)
        for impl in caller.get_hookimpls():  # registration order
            provider = providers.get(id(impl.plugin)) or Provider(impl.plugin_name, None, impl.plugin_name)
            plugin = provider.plugin
            try:
                records = list(impl.function() or ())
            except BaseException as error:  # plugin code: SystemExit and KeyboardInterrupt too
                registry.broken.append(BrokenPlugin(plugin, provider, f"{record_type.hook}: {_one_line(error)}"))
                continue
            for record in records:
                if not isinstance(record, record_type):
                    message = f"{record_type.hook} returned {type(record).__name__}, expected {record_type.__name__}"
                    registry.broken.append(BrokenPlugin(plugin, provider, message))
                    continue
                try:
                    registry.add(record, provider)
                except Exception as error:
                    registry.broken.append(BrokenPlugin(plugin, provider, _one_line(error)))


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, provider: Provider, registry: Registry,
              providers: dict[int, Provider]) -> None:
    try:
        pm.register(plugin, name=name)
    except Exception as error:
        registry.broken.append(BrokenPlugin(provider.plugin, provider, _one_line(error)))
        return
    providers[id(plugin)] = provider
    if not provider.builtin and isinstance(plugin, types.ModuleType):
        package = plugin.__name__.split(".")[0]
        if package and package not in ("mvar_engine", "__main__"):
            _PLUGIN_PACKAGES[package] = provider
    known = {record.hook for record in RECORD_TYPES.values()} | {hookspecs.COMMAND_HOOK}
    for attr in dir(plugin):
        if attr.startswith("mvar_engine_") and attr not in known and callable(getattr(plugin, attr, None)):
            registry.broken.append(BrokenPlugin(provider.plugin, provider, f"unknown hook {attr} (hooks: {', '.join(sorted(known))})"))


def builtin_entry_points() -> list[Any]:
    """This distribution's own entry points in the group (its built-in components), from its
    installed metadata; none when it is not installed."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return []
    return [ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]


def _package_of(ep: Any) -> str:
    """The distribution an entry point comes from (its module's top package when it has none)."""
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else ep.value.split(":")[0].split(".")[0]


def load_registry(extra_plugins: Iterable[tuple[str, Any]] = (), *, entry_points: Iterable[Any] | None = None) -> Registry:
    """Discover plugins and build a registry.

    ``extra_plugins``: ``(name, module_or_object)`` pairs registered after the entry points
    (tests, notebooks). ``entry_points``: the third-party entry points, overriding their discovery
    (default: the installed ``mvar_engine`` group). The built-ins are always this distribution's
    own entry points in that group, exactly as a plugin registers; when its metadata is missing
    (a source tree never installed) the registry records that as a broken plugin with the fix.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    providers: dict[int, Provider] = {}
    autoload = not _env_flag(ENV_DISABLE_AUTOLOAD)
    allow = _allow_list()
    own = builtin_entry_points()
    own_keys = {(ep.name, ep.value) for ep in own}
    others = list(entry_points) if entry_points is not None else list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    eps = own + [ep for ep in others if (ep.name, ep.value) not in own_keys]
    if not own:
        registry.broken.append(BrokenPlugin(DISTRIBUTION, Provider(DISTRIBUTION, __version__, DISTRIBUTION, True),
                                            f"its built-in components' entry points are not installed (run pip install "
                                            f"-e . in the source tree, or pip install {DISTRIBUTION})"))
    loadable = []  # (entry point, provider), built-ins first so they are the primary providers of their names
    for ep in eps:
        dist = getattr(ep, "dist", None)
        package = _package_of(ep)
        version = dist.version if dist is not None else None
        builtin = _normalize_dist(package) == DISTRIBUTION
        provider = Provider(package, version, ep.name, builtin)
        if not builtin:
            if not autoload:
                registry.skipped.append(SkippedPlugin(ep.name, package, f"{ENV_DISABLE_AUTOLOAD} is set"))
                continue
            if allow is not None and not {normalize_name(ep.name), normalize_name(package), _normalize_dist(package)} & allow:
                registry.skipped.append(SkippedPlugin(ep.name, package, f"not in {ENV_ALLOW}"))
                continue
        loadable.append((ep, provider))

    def load_entry_point(ep, provider: Provider) -> None:
        try:
            plugin = ep.load()
        except BaseException as error:  # plugin code: SystemExit and KeyboardInterrupt too
            registry.broken.append(BrokenPlugin(ep.name, provider, f"import failed: {_one_line(error)}"))
            return
        _register(pm, plugin, f"{provider.package}:{ep.name}", provider, registry, providers)

    for ep, provider in [item for item in loadable if item[1].builtin]:
        load_entry_point(ep, provider)

    for ep, provider in [item for item in loadable if not item[1].builtin]:
        load_entry_point(ep, provider)

    for name, plugin in extra_plugins:
        _register(pm, plugin, name, Provider(name, None, name), registry, providers)

    _collect(pm, registry, providers)
    return registry


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry (discovered once); see :func:`reset_registry`."""
    return load_registry()


def reset_registry() -> None:
    """Forget the cached registry (after installing a plugin, or in tests)."""
    get_registry.cache_clear()
