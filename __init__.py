"""mvar-engine: efficient autoregressive image generation with swappable, pluggy-registered plugins.

The whole plugin API, importable from here (the contracts live in ``mvar_engine.core``; the
budgeted-cache base in ``mvar_engine.plugins.budget_cache``; those paths keep working too):

- ``hookimpl`` and the records the hooks return (``TrajectoryRecord``, ``AttentionPatternRecord``,
  ``CachePolicyRecord``, ``AttentionBackendRecord``, ``ModelAdapterRecord``), ``Availability``,
  ``NoOptions``; ``get_registry()`` for every installed component.
- Trajectories: ``Trajectory``, ``Step``, ``Visibility``.
- Attention patterns and their specs: ``AttentionPattern``, ``AttentionSpec``, ``Dense``,
  ``Causal``, ``SlidingWindow1D``, ``BlockCausal``, ``BlockDiagonal``, ``Neighborhood2D``,
  ``Masked``, ``visible_positions``.
- Backends: ``AttentionBackend``, ``BackendCapabilities``.
- Caches: ``CachePolicy`` (``observe`` and the traits ``families``, ``headwise``,
  ``stores_history``, ``track_scores``), ``BudgetedCache`` with ``BudgetOptions`` and
  ``budget_tokens``, the bounded token store ``BoundedKV``, the per-step store ``SegmentStore`` and its cache base ``SegmentCache``,
  ``attention_probabilities``.
- Token layout: ``SequenceLayout``, ``Spans``, ``merge_spans``, ``spans_length``,
  ``spans_to_positions``.
- Models: ``ModelFamily`` (the registered component), ``ModelAdapter``, ``GenerationState`` and the
  ``Engine`` that drives them.
- Errors: ``MvarEngineError``, ``UsageError``, ``ConfigError``, ``IncompatibleComponentsError``,
  ``BackendUnsupportedError``, ``CheckpointError``, ``UnknownComponentError``,
  ``DuplicateComponentError``, ``ComponentFailedError``; ``setting(name, value)`` names a run setting
  inside a message (the CLI shows ``--name value``, the Python API ``name='value'``).

The conformance kit for plugin packages is :mod:`mvar_engine.testing`.

Generation: ``mvar_engine.Pipeline.from_pretrained("digits-mvar")(labels=[3])`` (:mod:`mvar_engine.apps.pipeline`).
"""

from __future__ import annotations

from .core import __version__
from .core.adapter import GenerationState, ModelAdapter, ModelFamily
from .core.attention import (AttentionBackend, AttentionPattern, AttentionSpec, BackendCapabilities, BlockCausal,
                             BlockDiagonal, Causal, Dense, Masked, Neighborhood2D, SlidingWindow1D, visible_positions)
from .core.cache import CachePolicy
from .core.engine import Engine
from .core.errors import (BackendUnsupportedError, CheckpointError, ComponentFailedError, ConfigError,
                          DuplicateComponentError, IncompatibleComponentsError, MvarEngineError, UnknownComponentError,
                          UsageError, setting)
from .core.hookspecs import hookimpl
from .core.kv_store import BoundedKV
from .core.layout import SequenceLayout, Spans, merge_spans, spans_length, spans_to_positions
from .core.records import (AttentionBackendRecord, AttentionPatternRecord, Availability, CachePolicyRecord,
                           ModelAdapterRecord, NoOptions, TrajectoryRecord)
from .core.registry import get_registry
from .core.trajectory import Step, Trajectory, Visibility
from .plugins.budget_cache import (BudgetedCache, BudgetOptions, attention_probabilities, budget_tokens,
                                   received_attention)
from .plugins.caches import SegmentCache, SegmentStore
from .plugins.scored_scales import ScoredScalesCache, ScoredScalesOptions

__all__ = [
    "__version__", "hookimpl", "get_registry", "Pipeline", "PipelineOutput",
    "AttentionBackendRecord", "AttentionPatternRecord", "Availability", "CachePolicyRecord", "NoOptions",
    "TrajectoryRecord", "ModelAdapterRecord",
    "Trajectory", "Step", "Visibility",
    "AttentionPattern", "AttentionSpec", "Dense", "Causal", "SlidingWindow1D", "BlockCausal", "BlockDiagonal",
    "Neighborhood2D", "Masked", "visible_positions",
    "AttentionBackend", "BackendCapabilities",
    "CachePolicy", "BudgetedCache", "BudgetOptions", "budget_tokens", "BoundedKV", "SegmentCache", "SegmentStore",
    "attention_probabilities", "received_attention", "ScoredScalesCache", "ScoredScalesOptions",
    "SequenceLayout", "Spans", "merge_spans", "spans_length", "spans_to_positions",
    "ModelAdapter", "ModelFamily", "GenerationState", "Engine",
    "MvarEngineError", "UsageError", "ConfigError", "IncompatibleComponentsError", "BackendUnsupportedError",
    "CheckpointError", "UnknownComponentError", "DuplicateComponentError", "ComponentFailedError", "setting",
]

# The generation API last: apps/ reads the names above while it loads.
from .apps.pipeline import Pipeline, PipelineOutput  # noqa: E402
