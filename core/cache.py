"""KV-cache policies: which past keys and values a step may use.

Tensors: ``k, v: [B, H, l, D]`` for the ``l`` new tokens of one step at one layer; positions are
:data:`~mvar_engine.core.layout.Spans` into the flattened sequence.

Life cycle per generation: ``begin(...)`` once (``guided=True``: the rows are ``[cond; uncond]``
halves under CFG); for each step and each layer ``update(layer, k, v, spans)``, which stores what
the policy keeps and returns the keys/values the step may attend to (kept history first, then the
new tokens, ascending positions); ``observe(layer, q, k, spec, scale, received=...)`` after it,
with the step's queries, the keys ``update`` returned and the attention spec the backend computes
(scoring policies accumulate attention statistics there); ``end_step()`` after the last
layer of a step (eviction point); ``nbytes()`` at any time. The tensors ``update`` returns may be
views of the policy's buffers: they are valid until the next ``end_step()`` and must not be modified.

Traits, declared on the class and checked by the engine before a generation:

- ``families``: the trajectory families it serves (``("next-scale", "next-token")``); a policy
  that serves only ``next-token`` is refused under a next-scale trajectory, and vice versa;
- ``headwise``: keeps different positions in each head (its returned spans stand in for the kept
  keys by their count), so it needs a trajectory that ``sees_all_history`` and a pattern that
  ``sees_every_visible_key``; see :mod:`mvar_engine.plugins.budget_cache`;
- ``stores_history``: ``False`` (``none``) keeps nothing: the engine then recomputes whatever
  history the trajectory requires, which makes it the exact oracle of cached runs;
- ``track_scores``: the storage keeps a float32 score per slot (scoring policies);
- ``static_decoding``: implements :meth:`~CachePolicy.update_static` and
  :meth:`~CachePolicy.static_buffers`, the fixed-shape form compiled decoding runs.
- ``static_scale_decoding``: implements :meth:`~CachePolicy.update_static_scale` and
  :meth:`~CachePolicy.static_scale_done` (compiled next-scale steps: every earlier scale kept in
  position order, slot = position).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from .attention import AttentionSpec
from .layout import SequenceLayout, Spans


class CachePolicy(ABC):
    name: ClassVar[str] = "cache"
    stores_history: ClassVar[bool] = True
    families: ClassVar[tuple[str, ...]] = ("next-scale",)
    headwise: ClassVar[bool] = False
    track_scores: ClassVar[bool] = False
    static_decoding: ClassVar[bool] = False
    static_scale_decoding: ClassVar[bool] = False

    @abstractmethod
    def begin(self, *, num_layers: int, batch: int, num_heads: int, head_dim: int, layout: SequenceLayout,
              device: torch.device, dtype: torch.dtype, guided: bool = False) -> None:
        """Allocate (or reset) storage for one generation of ``layout`` with ``batch`` rows
        (``guided``: rows ``i`` and ``i + batch // 2`` are the cond/uncond pair of one sample)."""

    @abstractmethod
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, spans: Spans) -> tuple[torch.Tensor, torch.Tensor, Spans]:
        """Store the step's new keys/values; return (keys, values, their spans) visible to the step."""

    def check_layout(self, layout: SequenceLayout, *, num_layers: int, num_heads: int,
                     weights_id: str | None = None) -> None:
        """Raise a one-line ``UsageError`` when the options cannot serve a model of ``num_layers`` x
        ``num_heads`` generating ``layout`` (a budget below what is always kept, a head map of
        another model: ``weights_id`` fingerprints the weights when known). The CLI calls it before any model is built, the engine before each
        generation. Default: nothing to check."""

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, scale: float, *,
                received: torch.Tensor | None = None) -> None:
        """Called once per ``update`` (before the next one) with the step's queries ``q: [B, H, Lq, D]``,
        the keys ``k: [B, H, Lk, D]`` that ``update`` returned and the spec the backend computes;
        scoring policies accumulate attention statistics here. ``received``: only for policies that
        set ``track_scores``, and only where the backend materialised the probabilities anyway:
        ``float32 [B, H, Lk]``, the attention each key received summed over the queries (None:
        compute it from ``q``, ``k`` and ``spec``). Default: nothing."""

    def update_static(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                      position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fixed-shape :meth:`update` of a one-token step of a token-causal trajectory after the
        prefill (it runs inside a compiled graph: no host reads, no Python state that changes per
        step). Store ``k, v: [rows, H, 1, D]`` at ``position: LongTensor[1]`` (on the cache's
        device); return the whole buffers ``[rows, H, capacity, D]`` and ``valid: BoolTensor``
        broadcastable to ``[rows, H, 1, capacity]``: the slots the query sees. Only for policies
        that set ``static_decoding``."""
        raise NotImplementedError(f"cache '{self.name}' has no fixed-shape decoding step")

    def static_buffers(self) -> list[torch.Tensor]:
        """The tensors :meth:`update_static` writes in place and returns: every slot of them (compiled
        decoding zeroes them before its first step and keeps them at fixed addresses for CUDA graphs)."""
        return []

    def observe_static(self, layer: int, probabilities: torch.Tensor) -> None:
        """Inside the compiled step, after :meth:`update_static`, for policies that set
        ``track_scores``: ``probabilities: float32 [B, H, 1, capacity]``, the step's attention over
        the returned buffers (0 at the slots it does not see). Default: nothing."""

    def static_step_begin(self, position: int) -> None:
        """Called on the host before each compiled step (the step that stores ``position``): Python
        state the graph specialises on may change here (one graph per value it reads, e.g. whether a
        buffered cache compacts this step). Default: nothing."""

    def static_step_done(self, position: int) -> None:
        """Called on the host after each compiled step (the step that stored ``position``), before
        :meth:`end_step`: bring host-side bookkeeping the graph cannot touch up to date. Default: nothing."""

    def update_static_scale(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                            start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The :meth:`update` of a next-scale step inside its compiled graph (no host state changes):
        store ``k, v: [rows, H, l, D]`` at slots ``start .. start + l - 1`` (the step's positions);
        return the keys and values of slots ``0 .. start + l - 1`` (positions in order). Only for
        policies that set ``static_scale_decoding``."""
        raise NotImplementedError(f"cache '{self.name}' has no compiled next-scale step")

    def static_scale_done(self, spans: Spans) -> None:
        """On the host after a compiled next-scale step that stored ``spans``: the bookkeeping
        :meth:`update` would have done. Default: nothing."""

    def end_step(self) -> None:
        """Called once after every layer of a step has been updated; evict here."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of key/value storage held now (reserved buffers count in full)."""
