"""Does a model fit? A check before any build, so that a size flag with an absurd value (``--depth
1e18``, ``--patch-nums 1,100000``, ``--vocab-size 1e12``) is a one-line usage error in microseconds
instead of an overflow inside torch, an out-of-memory kill or an hour-long module construction.

The sizes come from each architecture config's ``minimum_elements()`` (a lower bound on its float32
parameters and buffers: the large matrices only), so a refusal is never wrong: a model whose lower
bound exceeds the free memory cannot be built. Training multiplies it by the copies an AdamW step
keeps (weights, gradients, two moments)."""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from ..core.errors import UsageError

FLOAT32_BYTES = 4
TRAINING_COPIES = 4
"""Weights, gradients and AdamW's two moments: the float32 copies a training step holds."""


def available_bytes(device: torch.device) -> int | None:
    """Free memory now: CUDA ``mem_get_info``; on Linux ``MemAvailable`` from /proc/meminfo; None when
    it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def total_memory(device: torch.device) -> int | None:
    """All the memory of ``device``: a CUDA device's, else the machine's physical RAM; None when it
    cannot be told."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def format_bytes(count: float) -> str:
    """``3.2 GiB``-style text (B, KiB, ..., EiB; larger stays in EiB)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    for unit in units:
        if count < 1024 or unit == units[-1]:
            return f"{count:.3g} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


def refuse_unfitting(parts: Mapping[str, Any], device: torch.device, flags: str, *, copies: int = 1,
                     available: int | None = None) -> None:
    """A :class:`UsageError` when the float32 weights of ``parts`` (name -> an architecture config with
    ``minimum_elements()``), times ``copies``, exceed the free memory of the CPU (where modules are
    built) or of ``device``. ``flags`` names the settings that chose the sizes, for the message;
    ``available`` overrides the measured free bytes (tests)."""
    sizes = {name: config.minimum_elements() * FLOAT32_BYTES * copies for name, config in parts.items()}
    need = sum(sizes.values())
    places = [torch.device("cpu")] + ([device] if device.type != "cpu" else [])
    for place in places:
        free = available if available is not None else available_bytes(place)
        if free is None or need <= free:
            continue
        what = "weights" if copies == 1 else "weights, gradients and optimizer state"
        detail = ", ".join(f"{name} {format_bytes(size)}" for name, size in sizes.items())
        raise UsageError(f"{flags}: the model needs at least {format_bytes(need)} of float32 {what} ({detail}), "
                         f"more than the {format_bytes(free)} free on {place} (choose smaller sizes)")
