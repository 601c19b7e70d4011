"""mvar-engine: efficient autoregressive image generation with swappable, pluggy-registered plugins.

Public API for plugin authors and users:

- ``hookimpl``: the pluggy marker for plugin hook implementations (project name ``mvar_engine``).
- Component records (``TrajectoryRecord``, ``AttentionPatternRecord``, ``CachePolicyRecord``,
  ``AttentionBackendRecord``) returned from the hooks.
- The interfaces: :mod:`mvar_engine.core.trajectory`, :mod:`mvar_engine.core.attention`,
  :mod:`mvar_engine.core.cache` (and :mod:`mvar_engine.core.layout` for positions).
- ``get_registry()``: the registry of every installed component.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .core.hookspecs import hookimpl
from .core.records import (
    AttentionBackendRecord,
    AttentionPatternRecord,
    Availability,
    CachePolicyRecord,
    NoOptions,
    TrajectoryRecord,
)
from .core.registry import get_registry

__all__ = [
    "__version__",
    "hookimpl",
    "AttentionBackendRecord",
    "AttentionPatternRecord",
    "Availability",
    "CachePolicyRecord",
    "NoOptions",
    "TrajectoryRecord",
    "get_registry",
]
