"""pluggy hook specifications of mvar-engine: one hook per component kind.

A plugin module (or object) implements any of these with ``@mvar_engine.hookimpl`` and returns an
iterable of the matching record type; it is found through the ``mvar_engine`` entry-point group::

    [project.entry-points.mvar_engine]
    my-plugin = "my_package.plugin"
"""

from __future__ import annotations

from typing import Any, Iterable

import pluggy

from .records import (AttentionBackendRecord, AttentionPatternRecord, CachePolicyRecord, ModelAdapterRecord,
                      TrajectoryRecord)

PROJECT_NAME = "mvar_engine"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def mvar_engine_trajectories() -> Iterable[TrajectoryRecord]:
    """Return the conditioning trajectories this plugin provides."""


@hookspec
def mvar_engine_attention_patterns() -> Iterable[AttentionPatternRecord]:
    """Return the attention patterns this plugin provides."""


@hookspec
def mvar_engine_cache_policies() -> Iterable[CachePolicyRecord]:
    """Return the KV-cache policies this plugin provides."""


@hookspec
def mvar_engine_attention_backends() -> Iterable[AttentionBackendRecord]:
    """Return the attention backends this plugin provides."""


@hookspec
def mvar_engine_model_adapters() -> Iterable[ModelAdapterRecord]:
    """Return the model families (model adapters of the engine) this plugin provides."""


@hookspec
def mvar_engine_register_commands(commands: Any) -> None:
    """Add subcommands of ``mvar-engine`` to ``commands`` (the CLI's command table):
    ``commands.add(name, run, help)`` for ``mvar-engine NAME``, ``commands.add(name, run, help,
    group="bench")`` for ``mvar-engine bench NAME``; ``run(argv) -> exit status``."""


COMMAND_HOOK = "mvar_engine_register_commands"
