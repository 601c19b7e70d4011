"""Which trajectories, patterns, caches and models compose: decided by the traits components
declare on their classes (never by their names), checked before any model runs.

Rules: the pattern, the cache and the model serve the trajectory's family; a trajectory may refuse
a cache itself (``Trajectory.check_cache``) and a cache may refuse a trajectory and pattern
(``CachePolicy.incompatibility``: by default, ``stand_in_spans`` needs every kept key visible).
"""

from __future__ import annotations

from .attention import AttentionPattern
from .cache import CachePolicy
from .errors import IncompatibleComponentsError
from .trajectory import Trajectory


def _label(component: object, kind: str, names: dict[str, str] | None) -> str:
    return (names or {}).get(kind) or getattr(component, "name", type(component).__name__)


def check_compatible(trajectory: Trajectory, pattern: AttentionPattern, cache: CachePolicy, *,
                     model_family: str | None = None, names: dict[str, str] | None = None) -> None:
    """Raise :class:`IncompatibleComponentsError` with the reason when the components do not compose.

    ``names`` maps ``trajectory``/``attention``/``cache`` to the names they were chosen by (the
    messages use them; default: each component's ``name``)."""
    family = trajectory.family
    t_name, p_name, c_name = (_label(trajectory, "trajectory", names), _label(pattern, "attention", names),
                              _label(cache, "cache", names))
    if model_family is not None and model_family != family:
        raise IncompatibleComponentsError(
            f"trajectory '{t_name}' is a {family} trajectory but the model generates {model_family}; pick a "
            f"{model_family} trajectory or a {family} model")
    pattern_families = tuple(getattr(pattern, "families", ("next-scale",)))
    if family not in pattern_families:
        raise IncompatibleComponentsError(
            f"attention '{p_name}' describes {' and '.join(pattern_families)} steps, not the {family} steps of "
            f"trajectory '{t_name}'; pick a pattern that serves {family}")
    trajectory.check_cache(c_name, cache)
    cache_families = tuple(getattr(cache, "families", ("next-scale",)))
    if family not in cache_families:
        raise IncompatibleComponentsError(
            f"cache '{c_name}' serves {' and '.join(cache_families)} trajectories, not trajectory '{t_name}' "
            f"({family}); pick a cache that serves {family}")
    refusal = cache.incompatibility(c_name, trajectory, pattern) if isinstance(cache, CachePolicy) else None
    if refusal:
        raise IncompatibleComponentsError(refusal)
