"""Process-group set-up for training and sampling under ``torchrun`` (or as one plain process).

``torchrun --nproc_per_node N -m mvar_engine.apps.cli train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``) in every worker. :func:`setup` reads them and
initialises the default process group: ``nccl`` when the worker trains on CUDA, ``gloo`` on CPU.
Without those variables everything runs single-process and every helper here degrades to the
trivial answer (rank 0 of 1, barriers are no-ops), so trainers call them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..core.errors import UsageError
from .cli_helpers import under_torchrun
from .pipeline import resolve_device


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_rank() -> int:
    """The rank torchrun gave this process (``RANK``; 0 without torchrun), valid before
    :func:`setup` and after :func:`cleanup`."""
    return int(os.environ.get("RANK", "0")) if under_torchrun() else 0


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files, logs and draws the progress bar."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op single-process)."""
    if initialized():
        dist.barrier()


def worker_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; ``cuda`` under torchrun means
    the worker's own GPU. Asking for CUDA without one is a one-line :class:`UsageError`."""
    device = resolve_device(name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    return device


RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT")
"""What ``init_process_group``'s ``env://`` rendezvous reads beside the ranks (torchrun sets them)."""


def check_torchrun_environment() -> None:
    """The torchrun variables, read before any process group: whole numbers with ``0 <= RANK <
    WORLD_SIZE`` and ``LOCAL_RANK >= 0``, and the rendezvous address set; else a one-line
    :class:`UsageError` (set by hand, they would crash inside torch.distributed or hang)."""
    how = "launch with torchrun, or unset RANK, WORLD_SIZE and LOCAL_RANK to run one process"
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = os.environ[name]
        if not text.strip().isdigit():
            raise UsageError(f"{name}={text!r}: not a whole number ({how})")
        values[name] = int(text)
    if not values["RANK"] < values["WORLD_SIZE"]:
        raise UsageError(f"RANK={values['RANK']} with WORLD_SIZE={values['WORLD_SIZE']}: a rank must be below the "
                         f"world size ({how})")
    missing = [name for name in RENDEZVOUS_VARS if not os.environ.get(name, "").strip()]
    if missing:
        raise UsageError(f"{' and '.join(missing)} not set: the processes cannot meet ({how})")


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the process group when launched by torchrun and pick this worker's device.

    Contract: idempotent (an already initialised group is reused); single-process runs return
    ``DistInfo(0, 1, 0, device)`` without touching ``torch.distributed``.
    """
    if not under_torchrun():
        return DistInfo(device=worker_device(device))
    check_torchrun_environment()
    local_rank = int(os.environ["LOCAL_RANK"])
    dev = worker_device(device, local_rank)
    if not initialized():
        if not dist.is_available():  # pragma: no cover - every supported build has it
            raise UsageError("this PyTorch build has no torch.distributed; run without torchrun")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank(), world_size(), local_rank, dev)


def cleanup() -> None:
    """Destroy the process group (if this process initialised one)."""
    if initialized():
        dist.destroy_process_group()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` single-process)."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself single-process)."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when ``flag`` is True on at least one (an all-reduce of one number)."""
    if not initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device or torch.device("cpu"))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Average of a dict of floats over ranks (same keys on every rank); the dict itself single-process."""
    if not initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device or torch.device("cpu"))
    dist.all_reduce(t)
    t /= world_size()
    return dict(zip(keys, t.tolist()))
