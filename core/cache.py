"""KV-cache policies: which past keys and values a step may use (:class:`CachePolicy`).

Tensors: ``k, v: [B, H, l, D]`` for the ``l`` new tokens of one step at one layer; positions are
:data:`~mvar_engine.core.layout.Spans` into the flattened sequence.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from .attention import AttentionSpec
from .errors import setting
from .layout import SequenceLayout, Spans


class CachePolicy(ABC):
    """Which past keys and values each step of a generation attends to, in storage the policy owns.

    Life cycle of one generation (the engine drives it; the policy is reused across generations):

    1. ``check_layout(layout, num_layers=, num_heads=)`` before anything is built: refuse options
       that cannot serve this model (a budget below what is always kept) with a one-line reason;
    2. ``begin(num_layers=, batch=, num_heads=, head_dim=, layout=, device=, dtype=, guided=)``:
       allocate or reset storage (``guided``: rows ``i`` and ``i + batch // 2`` are the cond and
       uncond rows of one sample under CFG; the budgeted built-ins keep the same positions in both);
    3. per step, per layer: ``update(layer, k, v, spans)`` stores the step's new keys and values and
       returns those the step attends to (kept history first, then the new tokens) with their spans;
       then, after the layer's attention, ``observe(layer, q, k, spec, scale, received=)`` with the
       step's queries, the keys ``update`` returned and the attention spec the backend computed
       (scoring policies accumulate statistics there; a policy may also evict from that layer's
       storage there, as ScaleKV compresses a layer right after its attention: the engine reads
       nothing ``update`` returned after ``observe``); the returned tensors may be views of the
       policy's buffers, never modified by the engine;
    4. ``end_step()`` after the last layer of a step (the eviction point of step-level policies);
    5. ``nbytes()`` at any time: the bytes of storage held, reserved buffers in full.

    A policy must keep each sample's positions a function of that sample alone (its rows' keys,
    queries and scores), never of the other samples of the batch: the same image at any batch size.
    Scores summed over the batch break it (the conformance kit checks it).

    Traits, declared on the class and checked before a generation:

    - ``families``: the trajectory families it serves (``("next-scale", "next-token")``);
    - ``stand_in_spans``: the kept positions may differ between rows or between heads, so the spans
      ``update`` returns cannot name them; they stand in for the kept keys by their count (every
      kept key precedes the new tokens). It needs a trajectory that ``sees_all_history`` and a pattern
      that ``sees_every_visible_key`` (:meth:`incompatibility`). False: every row and head keeps the
      same positions and the returned spans are exact (the kit checks each against the keys);
    - ``stores_history``: ``False`` (``none``) keeps nothing: the engine then recomputes whatever
      history the trajectory requires, which makes it the exact oracle of cached runs;
    - ``track_scores``: the storage keeps a float32 score per slot (scoring policies);
    - ``static_decoding``: implements :meth:`update_static` and :meth:`static_buffers`, the
      fixed-shape form compiled raster decoding runs;
    - ``static_scale_decoding``: implements :meth:`update_static_scale` and
      :meth:`static_scale_done` (compiled next-scale steps: every earlier scale kept in position
      order, slot = position).
    """

    name: ClassVar[str] = "cache"
    stores_history: ClassVar[bool] = True
    families: ClassVar[tuple[str, ...]] = ("next-scale",)
    stand_in_spans: ClassVar[bool] = False
    track_scores: ClassVar[bool] = False
    static_decoding: ClassVar[bool] = False
    static_scale_decoding: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("headwise") is True and "stand_in_spans" not in cls.__dict__:
            cls.stand_in_spans = True  # the trait's former name (docs/plugins.md, "Changes")

    def incompatibility(self, name: str, trajectory: Any, pattern: Any) -> str | None:
        """Why this policy (chosen as ``name``) cannot serve ``trajectory`` with ``pattern``, in one
        line, or None. Override to word a policy's own reason; the default refuses
        ``stand_in_spans`` where a kept key could be hidden from a query."""
        if not self.stand_in_spans:
            return None
        hidden = [why for ok, why in (
            (getattr(trajectory, "sees_all_history", False), f"trajectory '{trajectory.name}' hides some earlier keys"),
            (getattr(pattern, "sees_every_visible_key", False), f"attention '{pattern.name}' hides some visible keys"))
            if not ok]
        if not hidden:
            return None
        return (f"cache '{name}' keeps positions that differ per row or per head (the spans it returns only count "
                f"its keys), which needs every kept key visible to every query, but {' and '.join(hidden)} "
                f"(next-scale: {setting('trajectory', 'full')} {setting('attention', 'dense')}; raster: "
                f"{setting('attention', 'causal')})")

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
        """Called once per ``update``, after that layer's attention and before the next ``update``, with
        the step's queries ``q: [B, H, Lq, D]``, the keys ``k: [B, H, Lk, D]`` that ``update``
        returned and the spec the backend computed; scoring policies accumulate attention
        statistics here, and a policy may evict from the layer's storage (nothing ``update``
        returned is read after it). ``received``: only for policies that
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
