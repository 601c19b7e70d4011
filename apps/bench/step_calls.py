"""What a generation step asks of the device, step by step: the aten calls it dispatches (what a
GPU launches, or would launch; nested calls of composite operators as the dispatcher sees them)
and the host syncs (a tensor's value read into Python, a data-dependent shape, a copy to the CPU).

Counted with a ``TorchDispatchMode`` (aten calls, syncing operators, boolean indexing, copies to
the CPU) and a ``TorchFunctionMode`` (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)`` and the
like, which read a value without dispatching on a CPU tensor), so a sync is found whatever device
the tensors live on. Usage::

    counter = StepCallCounter()
    with counter:
        engine.generate(labels, cache, ..., progress=counter.end_step)
    counter.steps[3].aten_total, counter.steps[3].syncs
"""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = frozenset({"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique",
                         "aten._unique2", "aten.unique_consecutive", "aten.repeat_interleave"})
"""Operators (overload packets) whose result needs a value or a data-dependent shape on the host.
``repeat_interleave`` counts only in its data-dependent form (a repeats tensor, no output size)."""

HOST_READS = frozenset({"tolist", "item", "__bool__", "__int__", "__index__", "__float__", "numpy"})
"""Tensor methods that read values into Python."""


@dataclass
class StepCalls:
    """One step's counts: ``aten`` by operator name, ``syncs`` by what synced."""

    aten: collections.Counter = field(default_factory=collections.Counter)
    syncs: collections.Counter = field(default_factory=collections.Counter)

    @property
    def aten_total(self) -> int:
        return sum(self.aten.values())


def _is_host(tensor: object) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu"


def _sync_reason(packet: str, args: tuple, kwargs: dict) -> str | None:
    """Why this dispatched call syncs with the host, or None."""
    if packet in SYNCING_OPS:
        if packet == "aten.repeat_interleave" and (not isinstance(args[0], torch.Tensor) or
                                                   kwargs.get("output_size") is not None):
            return None
        return packet
    if packet in ("aten.index", "aten.index_put", "aten.index_put_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
            return f"{packet} (boolean index)"
    if packet == "aten._to_copy" and args and not _is_host(args[0]):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cpu":
            return "copy to the CPU"
    if packet == "aten.copy_" and len(args) > 1 and _is_host(args[0]) and not _is_host(args[1]):
        return "copy to the CPU"
    return None


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: "StepCallCounter") -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.owner.counting:
            return func(*args, **kwargs)
        packet = str(func.overloadpacket)
        current = self.owner.current
        current.aten[str(func)] += 1
        reason = _sync_reason(f"aten.{packet}" if not packet.startswith("aten.") else packet, args, kwargs)
        if reason is not None:
            current.syncs[reason] += 1
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, owner: "StepCallCounter") -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and self.owner.counting:
            self.owner.current.syncs[f".{name}()"] += 1
        return func(*args, **(kwargs or {}))


class StepCallCounter:
    """A context manager counting per step; :meth:`end_step` closes a step (pass it as the engine's
    ``progress`` callback). ``steps[i]``: the :class:`StepCalls` of step ``i``; counting stops
    after ``limit`` steps (None: every step), the rest of the run only passes through."""

    def __init__(self, limit: int | None = None) -> None:
        self.steps: list[StepCalls] = []
        self.current = StepCalls()
        self.limit = limit
        self._modes = (_Function(self), _Dispatch(self))

    @property
    def counting(self) -> bool:
        return self.limit is None or len(self.steps) < self.limit

    def end_step(self, index: int | None = None) -> None:
        if self.counting:
            self.steps.append(self.current)
            self.current = StepCalls()

    def steady(self, first: int = 3) -> dict[str, float]:
        """Steps ``first`` onward: the mean aten calls a step (a buffered cache's compactions
        amortised), the most in one step, and the most host syncs in one step."""
        counted = self.steps[first:]
        if not counted:
            return {"aten_calls_per_step": float("nan"), "aten_calls_max_step": float("nan"),
                    "host_syncs_per_step": float("nan")}
        return {"aten_calls_per_step": statistics.fmean(s.aten_total for s in counted),
                "aten_calls_max_step": max(s.aten_total for s in counted),
                "host_syncs_per_step": max(sum(s.syncs.values()) for s in counted)}

    def __enter__(self) -> "StepCallCounter":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
