"""Compiled decoding steps (the ``compile`` setting): one-token steps as gpt-fast's ``decode_one_token``, and
next-scale steps one graph per scale.

Every one-token step of a ``token_causal`` trajectory after the prefill runs one graph,
``torch.compile(fullgraph=True, dynamic=False)``: the fed tokens and the position are tensor
inputs, the cache is written in place at the position (:meth:`CachePolicy.update_static`) and
attention covers the cache's whole fixed-capacity buffers under its mask of valid slots, so
every step has the same shapes and no host read: the graph compiles once (per batch shape) and
on CUDA it replays as a CUDA graph (``mode="reduce-overhead"``). The prefill, sampling and the
next input stay eager (per-sample generators cannot enter a graph).

A next-scale step (:class:`CompiledScaleSteps`) runs its scale's tokens through one graph per
scale, ``fullgraph=True`` with that scale's static shapes: over a cache that keeps every earlier
scale in position order (``full``: the step's keys and values are written at their positions and it
attends to every slot before its end) or over its own tokens alone (``none`` where a scale sees only
itself: ``markov``); the pattern's mask of the step is built once per scale on the host and enters
the graph as an input. Each scale is compiled once: a second generation of the same shapes reuses
every graph.

Attention in the graph is torch's ``scaled_dot_product_attention`` with a boolean mask, the
kernel ``torch.compile`` traces on every device; a run that names another backend is refused.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

import torch
import torch.nn.functional as F

from .adapter import GenerationState, ModelAdapter
from .attention import AttentionPattern, AttentionSpec
from .cache import CachePolicy
from .errors import setting
from .layout import Spans
from .trajectory import Step, Trajectory

COMPILED_BACKENDS = ("auto", "sdpa")
"""Backend choices compiled decoding accepts (it attends with torch SDPA in the graph)."""


def cpu_compiler() -> str | None:
    """The C++ compiler inductor would use on the CPU (``$CXX``, else c++, g++ or clang++), or None."""
    candidates = [os.environ.get("CXX", "")] + ["c++", "g++", "clang++"]
    return next((found for name in candidates if name and (found := shutil.which(name))), None)


C, SDPA = setting("compile"), setting("backend", "sdpa")
CACHE_FULL, CACHE_NONE = setting("cache", "full"), setting("cache", "none")
MARKOV, RASTER, CAUSAL = setting("trajectory", "markov"), setting("trajectory", "raster"), setting("attention", "causal")
"""The settings :func:`compile_problem` names (:func:`~mvar_engine.core.errors.setting`)."""


def compile_problem(*, trajectory: Trajectory, pattern: AttentionPattern, cache: CachePolicy, compiles_token_steps: bool,
                    backend: str, device: torch.device | None = None, names: dict[str, str] | None = None,
                    compiles_scale_steps: bool = False) -> str | None:
    """Why compiled decoding cannot run this combination (one line naming the fix), or None (``device``
    None: the C++ compiler a CPU run needs is not checked)."""
    names = names or {}
    cache_name = names.get("cache", cache.name)
    if trajectory.family == "next-scale":
        if not compiles_scale_steps:
            return f"{C}: this model family has no compiled next-scale step (leave {C} off)"
        if cache.stores_history and not cache.static_scale_decoding:
            return (f"{C}: cache '{cache_name}' does not keep every earlier scale in place, which a "
                    f"per-scale graph needs (use {CACHE_FULL}, or {CACHE_NONE} under {MARKOV}, or leave "
                    f"{C} off)")
        if not cache.stores_history and len(trajectory.history(1)) > 1:
            return (f"{C}: without a cache every step of trajectory "
                    f"'{names.get('trajectory', trajectory.name)}' recomputes earlier scales (use {CACHE_FULL}, or "
                    f"leave {C} off)")
    elif not trajectory.token_causal:
        return (f"{C} compiles one-token decoding steps; trajectory '{names.get('trajectory', trajectory.name)}' "
                f"has none (use {RASTER}, or leave {C} off)")
    else:
        if not compiles_token_steps:
            return f"{C}: this model family has no compiled decoding step (leave {C} off)"
        if not pattern.sees_every_visible_key:
            return (f"{C}: pattern '{names.get('attention', pattern.name)}' chooses keys per step, which a "
                    f"fixed-shape step cannot (use {CAUSAL}, or leave {C} off)")
        if not cache.static_decoding:
            return (f"{C}: cache '{cache_name}' keeps no fixed-shape storage (a policy without a device-side "
                    f"victim, static_victim: use a built-in cache, or leave {C} off)")
    if backend not in COMPILED_BACKENDS:
        return (f"{C} attends with torch SDPA inside the compiled step; {setting('backend', backend)} cannot be traced "
                f"(use {SDPA} or auto, or leave {C} off)")
    if device is not None and device.type == "cpu" and cpu_compiler() is None:
        return f"{C} on the CPU needs a C++ compiler (install g++ or set CXX), or leave {C} off"
    return None


class CompiledTokenStep:
    """The compiled graph of one token per row (``tokens: LongTensor[rows, 1]`` fed at ``position:
    LongTensor[1]``, on ``device``) through ``model.run_token`` over ``cache``'s static storage:
    :meth:`begin` once a generation, then :meth:`run` for every step it :meth:`serves`."""

    def __init__(self, model: ModelAdapter, cache: CachePolicy, device: torch.device,
                 autocast: Callable[[], object]) -> None:
        self.model, self.cache, self.device, self.autocast = model, cache, device, autocast
        mode = "reduce-overhead" if device.type == "cuda" else None
        self.compiled = torch.compile(self._step, fullgraph=True, dynamic=False, mode=mode)

    def _step(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        cache = self.cache

        def attend(layer, q, k, v, scale):
            k_all, v_all, valid = cache.update_static(layer, k, v, position)
            k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
            if not cache.track_scores:
                return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=valid, scale=scale)
            # a scoring cache needs the probabilities, which SDPA does not return: one query, so
            # materialising them costs a [rows, H, 1, capacity] tensor
            with torch.autocast(q.device.type, enabled=False):
                logits = (q.float() @ k_all.float().transpose(-1, -2)) * scale
                probabilities = logits.masked_fill(~valid, float("-inf")).softmax(dim=-1)
            cache.observe_static(layer, probabilities)
            return probabilities.to(q.dtype) @ v_all

        with self.autocast():
            return self.model.run_token(tokens, position, attend)

    def begin(self) -> None:
        """Before a generation's first compiled step (after ``cache.begin``): the cache's buffers are
        zeroed (a masked slot must hold a number: a NaN there still poisons ``softmax @ V``) and, on
        CUDA, keep their addresses for CUDA graphs (they are written in place)."""
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        for buffer in self.cache.static_buffers():
            buffer.zero_()
            if self.device.type == "cuda":
                torch._dynamo.mark_static_address(buffer)

    @staticmethod
    def serves(step: Step) -> bool:
        """One token after the prefill: the steps this graph runs."""
        return step.index > 0 and len(step.spans) == 1 and step.spans[0][1] - step.spans[0][0] == 1

    def run(self, state: GenerationState, step: Step) -> torch.Tensor:
        """Hidden states ``[rows, 1, C]`` of ``step`` (:meth:`serves`), valid until the next call."""
        self.position.fill_(step.spans[0][0])
        self.cache.static_step_begin(step.spans[0][0])
        hidden = self.compiled(self.model.fed_tokens(state, step), self.position)
        self.cache.static_step_done(step.spans[0][0])
        return hidden


class CompiledScaleSteps:
    """One compiled graph per next-scale step: ``model.run_scale`` over ``model.scale_inputs`` of the
    step, its keys and values written into ``cache``'s storage (``update_static_scale``) or, for a
    cache that keeps nothing, its own; the attention mask of the step (``spec_for(step, key_spans)``,
    built once per scale) is a graph input. :meth:`begin` once a generation, then :meth:`run` for
    every step it :meth:`serves`."""

    def __init__(self, model: ModelAdapter, cache: CachePolicy, device: torch.device,
                 autocast: Callable[[], object], spec_for: Callable[[Step, Spans], AttentionSpec]) -> None:
        self.model, self.cache, self.device, self.autocast, self.spec_for = model, cache, device, autocast, spec_for
        mode = "reduce-overhead" if device.type == "cuda" else None
        self.compiled = torch.compile(self._step, fullgraph=True, dynamic=False, mode=mode)
        self.masks: dict[int, torch.Tensor | None] = {}
        # every scale is a graph of its own shapes, entries of the same code: room for all of them
        # (the setting is ``recompile_limit`` from torch 2.7, ``cache_size_limit`` before)
        self.limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        self.recompile_limit = max(getattr(torch._dynamo.config, self.limit_name), model.layout.num_scales + 1)

    def _step(self, index: int, start: int, inputs: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> torch.Tensor:
        cache = self.cache

        def attend(layer, q, k, v, scale):
            if cache.stores_history:
                k, v = cache.update_static_scale(layer, k, v, start)
                k, v = k.to(q.dtype), v.to(q.dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

        with self.autocast():
            return self.model.run_scale(index, inputs, attend)

    def begin(self) -> None:
        """Before a generation's first step: on CUDA the cache's buffers keep their addresses (they
        are written in place inside the graphs)."""
        if self.device.type == "cuda":
            for buffer in self.cache.static_buffers():
                torch._dynamo.mark_static_address(buffer)

    def serves(self, step: Step) -> bool:
        """Every step of a next-scale trajectory over one span (each scale is one)."""
        return len(step.spans) == 1

    def mask(self, step: Step) -> torch.Tensor | None:
        """The step's ``BoolTensor[l, keys]`` (None: every key), built on its first use."""
        if step.index not in self.masks:
            (start, end), = step.spans
            keys = ((0, end),) if self.cache.stores_history else step.spans
            self.masks[step.index] = self.spec_for(step, keys).mask(end - start, keys[-1][1] - keys[0][0], self.device)
        return self.masks[step.index]

    def run(self, state: GenerationState, step: Step) -> torch.Tensor:
        """Hidden states ``[rows, l, C]`` of ``step`` (:meth:`serves`)."""
        start = step.spans[0][0]
        with torch._dynamo.config.patch(**{self.limit_name: self.recompile_limit}):
            hidden = self.compiled(step.index, start, self.model.scale_inputs(state, step), self.mask(step))
        if self.cache.stores_history:
            self.cache.static_scale_done(step.spans)
        return hidden
