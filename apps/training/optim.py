"""Optimiser and learning-rate schedule shared by the trainers.

AdamW over two parameter groups (VAR's choice): matrices get ``weight_decay``; biases, norms,
gains, embeddings and positional tables (1-D tensors and the names in :data:`NO_DECAY_NAMES`) get
none. The LR multiplier is a pure function of the step (:class:`LRSchedule`), wrapped in a
``LambdaLR`` whose step counter is saved with the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn

from .sharding import total_norm

ScheduleName = Literal["cosine", "linear", "constant"]
NO_DECAY_NAMES = ("pos_start", "pos_1LC", "class_emb", "lvl_embed", "scale_mul", "embedding")


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the base LR at optimizer step ``step`` (0-based, the step about to run):
    linear warm-up from ``1/warmup`` to 1 over ``warmup`` steps, then ``cosine`` or ``linear``
    decay to ``final_ratio`` at ``total`` steps, or ``constant``."""

    total: int
    warmup: int = 0
    kind: ScheduleName = "cosine"
    final_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total - self.warmup)
        t = min(1.0, max(0.0, (step - self.warmup) / span))
        if self.kind == "linear":
            shape = 1.0 - t
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * t))
        return self.final_ratio + (1.0 - self.final_ratio) * shape


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices and everything else (see the module docstring)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(tag in name for tag in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
                    schedule: LRSchedule) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW plus a LambdaLR driven by ``schedule`` (step once per optimizer step)."""
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)
    # A plain function (not the dataclass) so that LambdaLR saves only its step counter: a resumed
    # run with a longer --steps then follows the new schedule instead of the checkpoint's.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))
    return optimizer, scheduler


def clip_gradients(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (<= 0: no clipping); returns the norm before
    (sharded gradients included: the norm is over the whole model)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # clip_grad_norm_'s own two halves
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(total_norm(norm))
