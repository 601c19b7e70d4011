"""``--shard``: FSDP2 (``torch.distributed.fsdp.fully_shard``) for models whose parameters, gradients
and optimizer state do not fit one device (VAR-d24, d30 with AdamW): each transformer block is its
own unit, then the training module around the model, so a rank holds 1/W of every parameter, gradient and AdamW moment
and gathers one block's weights at a time. Without ``--shard`` under torchrun, DDP replicates the
model (:func:`.common.wrap_ddp`).

Checkpoints stay whole: :func:`full_model_state` and :func:`full_optimizer_state` gather the full
state (``torch.distributed.checkpoint.state_dict``; collective, every rank calls them) onto rank 0,
which writes the same ``checkpoint.pt`` and weights file as an unsharded run; :func:`load_full_state`
scatters them back. The optimizer state of a sharded run is keyed by parameter name (DCP's full
layout), an unsharded one's by parameter index (``Optimizer.state_dict``), so a run resumes with
the ``--shard`` setting it was saved with.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


def shard_model(model: nn.Module, units: Iterable[nn.Module]) -> None:
    """FSDP2 over ``units`` (the blocks), then ``model``, the root unit (the rest: embeddings, head),
    whose forward must be the one called: it gathers the root's parameters. In place; the model
    must already be on its device and hold its starting weights."""
    for unit in units:
        fully_shard(unit)
    fully_shard(model)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_model_state(model: nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU: on rank 0 only (others get ``{}``) unless ``everywhere``.
    Collective for a sharded model; an unsharded one returns its own tensors."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state (rank 0; collective when sharded, see the module docstring)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict[str, Any],
                    optimizer_state: dict[str, Any] | None) -> None:
    """Inverse of :func:`full_model_state` / :func:`full_optimizer_state` (every rank passes the
    whole states it read from the checkpoint)."""
    if not is_sharded(model):
        model.load_state_dict(model_state)
        if optimizer is not None and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        return
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def total_norm(value: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (FSDP2's ``clip_grad_norm_`` returns a DTensor)."""
    return value.full_tensor() if isinstance(value, DTensor) else value
