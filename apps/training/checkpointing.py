"""Training checkpoints (for ``--resume``) and inference weights (``.safetensors`` with metadata).

Two files per run directory:

``<run>/checkpoint.pt``
    Everything needed to continue bit-for-bit: ``model`` (state dict), ``optimizer``, ``scheduler``,
    ``step`` (optimizer steps completed), ``rng`` (one entry per rank: torch CPU, numpy, Python
    ``random`` and CUDA generator states), ``architecture`` (the model's shape-defining config),
    ``config`` (the run's settings as JSON) and ``extra`` (trainer-specific counters). Written by
    rank 0 through :func:`mvar_engine.models.checkpoint.atomic_write` (temporary file, then
    ``os.replace``): a reader never sees a partial file under the final name and a failed or
    interrupted write leaves the previous checkpoint intact. Only tensors and plain Python values
    are stored, so it loads with ``torch.load(weights_only=True)``; ``--init-from`` and
    ``read_state_dict`` read its ``model`` entry.

``<run>/tokenizer.safetensors`` / ``<run>/model.safetensors``
    The inference weights, a flat state dict, with ``metadata={"mvar_engine": json.dumps({...})}``
    describing the architecture, schedule, resolution, classes, components and a training summary
    (see the trainers). :func:`read_weights_metadata` returns that dict.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...core.errors import CheckpointError
from ...models.checkpoint import METADATA_KEY, atomic_write, save_state_dict
from .. import distributed as D
from .sharding import full_model_state, full_optimizer_state, is_sharded, load_full_state

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "mvar-engine/training-checkpoint"
CHECKPOINT_VERSION = 1


# -- random number generators -----------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only where this process has CUDA)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- architecture comparison -----------------------------------------------------------------------
def architecture_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: A in the checkpoint, B now"`` for every key whose JSON value differs (sorted)."""
    def norm(v: Any) -> str:
        return json.dumps(v, sort_keys=True, default=str)

    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "absent"), current.get(key, "absent")
        if norm(a) != norm(b):
            out.append(f"{key}: {norm(a)} in the checkpoint, {norm(b)} now")
    return out


# -- training checkpoints ---------------------------------------------------------------------------
def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def save_training_checkpoint(run_dir: str | Path, *, kind: str, step: int, model: nn.Module,
                             optimizer: torch.optim.Optimizer, scheduler: Any, architecture: dict[str, Any],
                             config: dict[str, Any], extra: dict[str, Any] | None = None) -> Path | None:
    """Write ``<run_dir>/checkpoint.pt`` atomically; returns its path on rank 0, None elsewhere.

    Collective under torchrun: every rank must call it (each contributes its RNG state and, when
    sharded, its shards; rank 0 writes; all ranks leave together). ``model`` is the bare module (not
    the DDP wrapper), possibly sharded by ``--shard`` (:mod:`.sharding`).
    """
    rng_per_rank = D.all_gather_object(capture_rng())
    model_state, optimizer_state = full_model_state(model), full_optimizer_state(model, optimizer)  # collective
    path = None
    if D.is_main():
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "kind": kind,
            "step": int(step),
            "model": model_state,
            "optimizer": optimizer_state,
            "sharded": is_sharded(model),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_per_rank,
            "world_size": D.world_size(),
            "architecture": architecture,
            "config": json.dumps(config, sort_keys=True, default=str),
            "extra": extra or {},
        }
        path = atomic_write(checkpoint_path(run_dir), lambda tmp: torch.save(payload, tmp))
    D.barrier()
    return path


def load_training_checkpoint(run_dir: str | Path, *, kind: str, architecture: dict[str, Any]) -> dict[str, Any]:
    """Read and validate ``<run_dir>/checkpoint.pt`` for ``--resume`` (one-line ``CheckpointError`` if
    it is missing, unreadable, of another kind, or of another architecture)."""
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path} (start without --resume, or point --output at "
                              f"the run directory to continue)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = " ".join(str(error).split())[:160]
        raise CheckpointError(f"--resume: {path} is not a readable training checkpoint ({type(error).__name__}: "
                              f"{reason}); delete it or choose another --output") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"--resume: {path} is not an mvar-engine training checkpoint (choose another --output)")
    if ckpt.get("kind") != kind:
        raise CheckpointError(f"--resume: {path} is a {ckpt.get('kind')} checkpoint, not a {kind} one "
                              f"(choose the {kind} run's --output)")
    diffs = architecture_differences(ckpt.get("architecture", {}), architecture)
    if diffs:
        raise CheckpointError(f"--resume: {path} has another architecture ({'; '.join(diffs)}); "
                              f"use the run's original flags or a new --output")
    return ckpt


def restore_training_state(ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: Any) -> int:
    """Load model, optimizer, scheduler and this rank's RNG state; returns the step to continue from.

    A checkpoint written with another world size restores rank 0's RNG state on every rank (the
    trainers draw their batches and dropout from per-step seeded generators, so only the global
    generators, which they do not consume, are affected)."""
    if bool(ckpt.get("sharded", False)) != is_sharded(model):
        saved = "with" if ckpt.get("sharded") else "without"
        raise CheckpointError(f"--resume: the checkpoint was saved {saved} --shard, whose optimizer state has another "
                              f"layout; resume {saved} --shard")
    load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    rngs = ckpt.get("rng") or []
    if rngs:
        r = D.rank()
        restore_rng(rngs[r] if len(rngs) == D.world_size() else rngs[0])
    return int(ckpt["step"])


# -- inference weights ------------------------------------------------------------------------------
def export_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """``safetensors.torch.save_file`` to a temporary file, then ``os.replace`` onto ``path``; the
    metadata dict is stored as JSON under the ``mvar_engine`` key. Call on rank 0 only."""
    return save_state_dict(state_dict, path, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True, default=str)})


def state_sha256(module: nn.Module) -> str:
    """Hex SHA-256 over a module's state dict (names, dtypes, shapes and bytes, in key order);
    equal on two ranks exactly when their weights and buffers are bit-identical."""
    h = hashlib.sha256()
    for key, value in full_model_state(module, everywhere=True).items():
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{t.dtype}:{tuple(value.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
