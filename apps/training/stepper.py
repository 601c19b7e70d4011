"""One optimizer step, as every trainer takes it: the rank's batch in ``grad_accum`` micro-batches,
each forward under the run's precision, gradients accumulated (DDP synchronises only the last
micro-batch's backward), then unscale, clip, optimizer and schedule.

Precision (``--precision``): ``fp32``; ``bf16`` (autocast to bfloat16: CUDA, or a CPU with native
bf16); ``fp16`` (autocast to float16 with a dynamic gradient scaler: CUDA only). Parameters,
gradients and the optimizer state stay float32 (autocast's master weights), so checkpoints and
exported weights are float32 whatever the precision.

Accumulation is exact: a micro-batch's loss is a mean over its rows, weighted by its share of the
step's rows, so ``--batch-size 8 --grad-accum 4`` takes the same optimizer step as
``--batch-size 32`` (same 32 images: the step's items are drawn for ``batch_size x grad_accum``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from ...core.errors import UsageError
from ..cpu_features import native_bf16
from .optim import clip_gradients

Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LossFn = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]
"""``loss_fn(micro_batch) -> (loss, numbers)``: the mean loss over the micro-batch's rows (a
differentiable scalar) and detached per-row means to log (accuracy, ...)."""


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision this device cannot train in, naming why and the fix (one line)."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"--precision {precision}: choose fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError(f"--precision fp16 trains on CUDA only (float16 autocast with a gradient scaler); on "
                         f"{device.type} use --precision bf16 where the CPU has native bfloat16, or fp32")
    if precision == "bf16" and device.type == "cpu":
        supported, why = native_bf16()
        if not supported:
            raise UsageError(f"--precision bf16 on this CPU: {why}; use --precision fp32")


def autocast(precision: Precision, device: torch.device):
    """The forward's autocast context (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def micro_batches(tensors: Sequence[torch.Tensor | None], parts: int) -> list[tuple[torch.Tensor | None, ...]]:
    """The rows of ``tensors`` (each ``[b, ...]`` or None) cut into ``parts`` consecutive slices
    (``torch.tensor_split``: sizes differ by at most one); empty slices are dropped."""
    rows = next(t for t in tensors if t is not None).shape[0]
    cuts = [torch.tensor_split(t, parts) if t is not None else (None,) * parts for t in tensors]
    sizes = [len(c) for c in torch.tensor_split(torch.arange(rows), parts)]
    return [tuple(c[i] for c in cuts) for i in range(parts) if sizes[i] > 0]


class OptimizerStep:
    """Runs optimizer steps of ``model`` (``wrapped``: the DDP unit around it, or the module itself)."""

    def __init__(self, model: nn.Module, wrapped: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *,
                 precision: Precision, grad_clip: float, device: torch.device) -> None:
        self.model, self.wrapped, self.optimizer, self.scheduler = model, wrapped, optimizer, scheduler
        self.precision, self.grad_clip, self.device = precision, grad_clip, device
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def __call__(self, parts: Sequence[tuple], loss_fn: LossFn, *,
                 after_backward: Callable[[], None] | None = None) -> dict[str, float]:
        """One step over ``parts`` (micro-batches whose first tensor has one row per image); returns
        the step's loss and numbers (row-weighted means), its learning rate and gradient norm."""
        lr = self.optimizer.param_groups[0]["lr"]
        rows = [part[0].shape[0] for part in parts]
        total = sum(rows)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for i, (part, n) in enumerate(zip(parts, rows)):
            with self.gradient_sync(i == len(parts) - 1):
                with autocast(self.precision, self.device):
                    loss, numbers = loss_fn(part)
                self.scaler.scale(loss.float() * (n / total)).backward()
            for key, value in {"loss": float(loss.detach()), **numbers}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * n / total
        if after_backward is not None:
            after_backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {**sums, "lr": lr, "grad_norm": grad_norm}

    def gradient_sync(self, last: bool):
        """Ranks exchange gradients on the last micro-batch only: DDP's ``no_sync`` before it, FSDP2's
        ``set_requires_gradient_sync``."""
        if hasattr(self.wrapped, "set_requires_gradient_sync"):
            self.wrapped.set_requires_gradient_sync(last)
            return nullcontext()
        if last or not hasattr(self.wrapped, "no_sync"):
            return nullcontext()
        return self.wrapped.no_sync()

    def state_dict(self) -> dict[str, Any]:
        """The gradient scaler's state (fp16), saved with the checkpoint."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)


def checkpoint_blocks(blocks: nn.ModuleList) -> None:
    """Activation checkpointing (``--checkpoint-activations``): each block's forward, while gradients
    are on, stores only its inputs and recomputes its activations in backward (non-reentrant
    ``torch.utils.checkpoint``, RNG state preserved). The blocks' parameters and state-dict keys
    are unchanged; inference (no grad) runs the plain forward."""
    for block in blocks:
        block.forward = _Recomputed(block.forward)


class _Recomputed:
    def __init__(self, forward: Callable) -> None:
        self.forward = forward

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.forward, *args, use_reentrant=False, **kwargs)
        return self.forward(*args, **kwargs)
