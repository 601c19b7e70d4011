"""Compiled one-token decoding steps (``--compile``), as gpt-fast's ``decode_one_token``.

Every one-token step of a ``token_causal`` trajectory after the prefill runs one graph,
``torch.compile(fullgraph=True, dynamic=False)``: the fed tokens and the position are tensor
inputs, the cache is written in place at the position (:meth:`CachePolicy.update_static`) and
attention covers the cache's whole fixed-capacity buffers under its mask of valid slots, so
every step has the same shapes and no host read: the graph compiles once (per batch shape) and
on CUDA it replays as a CUDA graph (``mode="reduce-overhead"``). The prefill, sampling and the
next input stay eager (per-sample generators cannot enter a graph).

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
from .attention import AttentionPattern
from .cache import CachePolicy
from .trajectory import Step, Trajectory

COMPILED_BACKENDS = ("auto", "sdpa")
"""Backend choices compiled decoding accepts (it attends with torch SDPA in the graph)."""


def cpu_compiler() -> str | None:
    """The C++ compiler inductor would use on the CPU (``$CXX``, else c++, g++ or clang++), or None."""
    candidates = [os.environ.get("CXX", "")] + ["c++", "g++", "clang++"]
    return next((found for name in candidates if name and (found := shutil.which(name))), None)


def compile_problem(*, trajectory: Trajectory, pattern: AttentionPattern, cache: CachePolicy, compiles_token_steps: bool,
                    backend: str, device: torch.device | None = None, names: dict[str, str] | None = None) -> str | None:
    """Why ``--compile`` cannot run this combination (one line naming the fix), or None (``device``
    None: the C++ compiler a CPU run needs is not checked)."""
    names = names or {}
    if trajectory.family != "next-token" or not trajectory.token_causal:
        return (f"--compile compiles one-token decoding steps; trajectory '{names.get('trajectory', trajectory.name)}' "
                f"has none (use --trajectory raster, or leave --compile off)")
    if not compiles_token_steps:
        return "--compile: this model family has no compiled decoding step (leave --compile off)"
    if not pattern.sees_every_visible_key:
        return (f"--compile: pattern '{names.get('attention', pattern.name)}' chooses keys per step, which a "
                f"fixed-shape step cannot (use --attention causal, or leave --compile off)")
    if not cache.static_decoding:
        return (f"--compile: cache '{names.get('cache', cache.name)}' keeps no fixed-shape storage with these options "
                f"(a --cache-buffer variant, or a policy without a device-side victim: drop --cache-buffer, use a "
                f"built-in cache, or leave --compile off)")
    if backend not in COMPILED_BACKENDS:
        return (f"--compile attends with torch SDPA inside the compiled step; --backend {backend} cannot be traced "
                f"(use --backend sdpa or auto, or leave --compile off)")
    if device is not None and device.type == "cpu" and cpu_compiler() is None:
        return "--compile on the CPU needs a C++ compiler (install g++ or set CXX), or leave --compile off"
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
        hidden = self.compiled(self.model.fed_tokens(state, step), self.position)
        self.cache.static_step_done(step.spans[0][0])
        return hidden
