"""Typed records that plugins return from the hooks, one record class per component kind.

A record names a component, says how to build it and with which options, and (optionally) how to
tell whether it can run on this machine. The registry turns records into named, resolvable
components; nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict


class NoOptions(BaseModel):
    """Options model of a component that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Availability:
    """Whether a component can run here; ``reason`` says why not (and how to fix it) when it cannot."""

    ok: bool
    reason: str = ""

    @classmethod
    def yes(cls) -> "Availability":
        return cls(True, "")

    @classmethod
    def no(cls, reason: str) -> "Availability":
        return cls(False, reason)


@dataclass(frozen=True, kw_only=True)
class ComponentRecord:
    """What a plugin hook returns for one component.

    - ``name``: the user-facing name (normalised by the registry: lower case, ``_`` -> ``-``).
    - ``factory``: called as ``factory(options)`` with a validated instance of ``options``;
      returns the component (usually the component class itself).
    - ``options``: a pydantic model of the component's options; use ``extra="forbid"`` so that a
      misspelt option is an error. Defaults must describe the published method's setting.
    - ``description``: one line for ``mvar-engine plugins``.
    - ``availability``: optional zero-argument check; return ``Availability.no(reason)`` when a
      dependency or device is missing. It must be cheap and must not raise.
    """

    kind: ClassVar[str] = "component"
    hook: ClassVar[str] = ""

    name: str
    factory: Callable[[Any], Any]
    options: type[BaseModel] = NoOptions
    description: str = ""
    availability: Callable[[], Availability] | None = field(default=None, compare=False)

    def option_setting(self, option: str) -> str:
        """The run setting (:func:`~mvar_engine.core.errors.setting`) that gives ``option``:
        ``{kind}_{option}`` (a cache's ``budget`` is the run's ``cache_budget``)."""
        return f"{self.kind}_{option}"

    def check_availability(self) -> Availability:
        if self.availability is None:
            return Availability.yes()
        try:
            result = self.availability()
        except Exception as error:  # a broken check must not break the listing
            return Availability.no(f"availability check failed: {type(error).__name__}: {error}")
        return result if isinstance(result, Availability) else Availability.no(f"availability check returned {result!r}")


@dataclass(frozen=True, kw_only=True)
class TrajectoryRecord(ComponentRecord):
    """A conditioning trajectory (``full``, ``markov``, ``raster``); factory returns a ``Trajectory``."""

    kind, hook = "trajectory", "mvar_engine_trajectories"


@dataclass(frozen=True, kw_only=True)
class AttentionPatternRecord(ComponentRecord):
    """An attention pattern (``dense``, ``neighborhood``); factory returns an ``AttentionPattern``."""

    kind, hook = "attention", "mvar_engine_attention_patterns"


@dataclass(frozen=True, kw_only=True)
class CachePolicyRecord(ComponentRecord):
    """A KV-cache policy (``none``, ``full``, ``window``, ...); factory returns a ``CachePolicy``."""

    kind, hook = "cache", "mvar_engine_cache_policies"


@dataclass(frozen=True, kw_only=True)
class AttentionBackendRecord(ComponentRecord):
    """An attention backend (``reference``, ``sdpa``, ...); factory returns an ``AttentionBackend``.

    ``priority``: higher is preferred by the ``auto`` backend among backends that support a pattern.
    """

    kind, hook = "backend", "mvar_engine_attention_backends"

    priority: int = 0


@dataclass(frozen=True, kw_only=True)
class ModelAdapterRecord(ComponentRecord):
    """A model family (``var``, ``raster-gpt``, ``janus``, ...); ``factory(options)`` returns a
    ``ModelFamily`` that builds the models its options name and their engine adapter. ``family``:
    the trajectory family it serves. With no family named, a run takes the first one serving its
    trajectory whose ``options`` accept the model settings it gives."""

    kind, hook = "model", "mvar_engine_model_adapters"

    family: str = "next-scale"

    def option_setting(self, option: str) -> str:
        """A model's options are the run's model settings: ``checkpoint``, not ``model_checkpoint``."""
        return option


RECORD_TYPES: dict[str, type[ComponentRecord]] = {
    record.kind: record
    for record in (TrajectoryRecord, AttentionPatternRecord, CachePolicyRecord, AttentionBackendRecord,
                   ModelAdapterRecord)
}
"""Component kind -> record class, in the order the CLI lists them."""

KIND_LABELS: dict[str, str] = {
    "trajectory": "trajectory",
    "attention": "attention pattern",
    "cache": "cache policy",
    "backend": "attention backend",
    "model": "model adapter",
}
