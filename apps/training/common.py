"""Pieces both transformer trainers (next-scale ``train`` and raster ``train --trajectory raster``)
share: settings checks, class dropout, the DDP wrapper, the training summary of exported weights
and one-line architecture errors."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ...core.errors import UsageError
from ...models.checkpoint import check_finite
from .. import distributed as D
from ..cli_helpers import under_torchrun
from .batches import DROPOUT_STREAM, ShardedBatches
from .checkpointing import checkpoint_path, load_training_checkpoint, restore_training_state
from .rundir import fresh_start, remove_run_temps


@dataclass
class DataSettings:
    """The training data every trainer reads (``--data``, ``--split``, ``--max-images``) and how an
    image folder is streamed (``--workers``, ``--crop``, ``--hflip``, ``--on-bad-image``; see
    :mod:`.data_sources`). ``crop`` None: ``random`` for an image folder, ``center`` for codes."""

    data: str = "digits"
    split: Literal["train", "all"] = "train"
    max_images: int | None = None
    workers: int = 2
    crop: Literal["random", "center"] | None = None
    hflip: bool = False
    on_bad_image: Literal["skip", "fail"] = "skip"


@dataclass
class LoopSettings:
    """The step loop, optimiser and run directory every trainer shares (the transformers' defaults;
    a trainer redeclares the fields whose defaults differ)."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float = 2.0
    seed: int = 0
    output: str = "runs/var"
    save_every: int = 200
    log_every: int = 10
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    progress: bool = True
    grad_accum: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    betas: tuple[float, float] = (0.9, 0.95)
    base_lr: float | None = None

    @property
    def peak_lr(self) -> float:
        """The peak learning rate: ``lr``, or VAR's scaling ``base_lr x batch_size x grad_accum / 256``
        (``tlr = ac * tblr * bs / 256``) when ``base_lr`` is given."""
        if self.base_lr is None:
            return self.lr
        return self.base_lr * self.batch_size * self.grad_accum / 256


@dataclass
class TransformerSettings(DataSettings, LoopSettings):
    """What the VAR/MVAR and raster trainers share beside the loop: the frozen tokenizer, the
    trajectory and backend, the transformer's size, class dropout and a warm start."""

    tokenizer: str = "runs/tokenizer/tokenizer.safetensors"
    tokenizer_patch_nums: tuple[int, ...] | None = None
    resolution: int | None = None
    trajectory: str = "markov"
    backend: str = "sdpa"
    depth: int = 4
    embed_dim: int = 128
    num_heads: int = 4
    class_dropout: float = 0.1
    init_from: str | None = None
    label_smoothing: float = 0.0
    checkpoint_activations: bool = False
    shard: bool = False



NUMBER_RULES: dict[str, tuple[float, bool, float | None] | tuple[float, bool, float, bool]] = {
    # field: (lower bound, lower bound allowed, upper bound or None[, upper bound allowed: default no])
    "steps": (1, True, None), "batch_size": (1, True, None), "save_every": (1, True, None),
    "log_every": (1, True, None), "max_images": (1, True, None), "workers": (0, True, None),
    "lr": (0.0, False, None), "weight_decay": (0.0, True, None), "warmup_steps": (0, True, None),
    "grad_clip": (0.0, True, None), "class_dropout": (0.0, True, 1.0), "mlp_ratio": (0.0, False, None),
    "ffn_dim_multiplier": (0.0, False, None), "beta": (0.0, True, None), "l1_weight": (0.0, True, None),
    "mse_weight": (0.0, True, None), "vq_weight": (0.0, True, None), "share_quant_resi": (0, True, None),
    "seed": (-(2**63), True, 2**64), "quant_resi": (0.0, True, 1.0, True),
    "grad_accum": (1, True, None), "base_lr": (0.0, False, None), "label_smoothing": (0.0, True, 1.0),
    "adaln_gamma_init": (0.0, True, None),
}
"""The range of each numeric training setting (``--grad-clip 0`` is off, ``--warmup-steps 0`` none)."""


def _range_text(low: float, inclusive: bool, high: float | None, high_inclusive: bool = False) -> str:
    if high is not None and high_inclusive:
        return f"lie in [{low:g}, {high:g}]"
    if high is not None:
        return f"lie in [{low:g}, {high:g})" if high != 2**64 else "be an integer from -2**63 to 2**64 - 1"
    return f"be at least {low:g}" if inclusive else f"be greater than {low:g}"


def check_loop_settings(s: Any) -> None:
    """Every numeric field of the settings dataclass ``s``: finite, in its :data:`NUMBER_RULES` range,
    and at least one loss weight on; the first problem is a one-line :class:`UsageError` naming the flag."""
    for item in fields(s):
        value = getattr(s, item.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        flag = f"--{item.name.replace('_', '-')}"
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
        if item.name not in NUMBER_RULES:
            continue
        low, inclusive, high, *closed = NUMBER_RULES[item.name]
        high_inclusive = bool(closed and closed[0])
        above = high is not None and (value > high if high_inclusive else value >= high)
        if value < low or (value == low and not inclusive) or above:
            raise UsageError(f"{flag} must {_range_text(low, inclusive, high, high_inclusive)}, got {value:g}")
    betas = getattr(s, "betas", (0.9, 0.95))
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise UsageError(f"--betas must be two numbers in [0, 1), e.g. 0.9,0.95, got {','.join(map(str, betas))}")
    weights = [getattr(s, name) for name in ("l1_weight", "mse_weight", "vq_weight") if hasattr(s, name)]
    if weights and not any(weights):
        raise UsageError("--l1-weight, --mse-weight and --vq-weight are all 0: nothing would be trained "
                         "(give one a positive weight)")


def check_shard(s: Any) -> None:
    """``--shard`` (FSDP2) shards over torchrun's processes: refused in a single process."""
    if getattr(s, "shard", False) and not under_torchrun():
        raise UsageError("--shard splits the model over torchrun's processes; launch with torchrun --nproc_per_node N "
                         "(N >= 2), or drop --shard")


def step_batches(s: LoopSettings, num_items: int, info: D.DistInfo) -> ShardedBatches:
    """The items of every optimizer step: ``batch_size x grad_accum`` per step, each rank its shard
    (one-line errors naming the flags when they do not fit the ranks or the data)."""
    if s.batch_size % info.world_size:
        raise UsageError(f"--batch-size {s.batch_size} is not divisible by the {info.world_size} processes "
                         f"(torchrun --nproc_per_node); use a multiple of {info.world_size}")
    per_step = s.batch_size * s.grad_accum
    if num_items < per_step:
        what = f"--batch-size {s.batch_size} x --grad-accum {s.grad_accum}" if s.grad_accum > 1 else f"--batch-size {s.batch_size}"
        raise UsageError(f"{what} exceeds the {num_items} training images (lower it or use more data)")
    return ShardedBatches(num_items, per_step, s.seed, info.rank, info.world_size)


def drop_classes(labels: torch.Tensor, batches: ShardedBatches, step: int, probability: float,
                 null_class: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``labels`` with each replaced by ``null_class`` with ``probability`` (CFG training); the draws
    are private to (seed, step), so they do not depend on the world size or on a resume. ``rows``:
    the labels' positions in the rank's local batch when some of its images were skipped."""
    if probability <= 0:
        return labels
    drop = batches.uniform(step, stream=DROPOUT_STREAM) < probability
    if rows is not None and len(rows) != len(drop):
        drop = drop[rows]
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def wrap_ddp(module: nn.Module, info: D.DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` itself in one process; under torchrun, DDP around it (gloo on CPU, nccl on CUDA)."""
    if not info.distributed:
        return module
    device = info.device
    return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                               find_unused_parameters=find_unused_parameters)


def training_record(s: Any, *, step: int, metrics: dict[str, Any], seconds: float, world_size: int,
                    **extra: Any) -> dict[str, Any]:
    """The ``training`` entry of exported weights' metadata: the run's optimisation settings, how far
    it got, its last logged numbers (``final_loss``, ``final``) and ``extra`` trainer-specific keys."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
    return {"steps": step, "total_steps": s.steps, **extra,
            "batch_size": s.batch_size, "grad_accum": s.grad_accum, "lr": s.peak_lr, "base_lr": s.base_lr,
            "betas": list(s.betas), "precision": s.precision, "weight_decay": s.weight_decay,
            "label_smoothing": s.label_smoothing, "finetune_from": getattr(s, "finetune_from", None),
            "warmup_steps": s.warmup_steps, "lr_schedule": s.lr_schedule, "grad_clip": s.grad_clip,
            "class_dropout": s.class_dropout, "init_from": s.init_from, "backend": s.backend,
            "seed": s.seed, "world_size": world_size, "seconds": round(seconds, 2),
            "final_loss": numbers.get("loss"), "final": numbers,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def start_or_resume(run: Path, settings: LoopSettings, *, kind: str, architecture: dict[str, Any], model: nn.Module,
                    optimizer, scheduler, metrics_log, info: D.DistInfo, weights_name: str
                    ) -> tuple[int, float, dict[str, Any], dict[str, Any]]:
    """``--resume``: restore model, optimiser and schedule from the run's checkpoint and cut the
    metrics log after its step; else clear the run for a fresh start (main process). Returns
    ``(first step, elapsed seconds, previous metrics, the checkpoint's extra record)``."""
    if info.is_main:
        remove_run_temps(run, weights_name)
    if settings.resume:
        ckpt = load_training_checkpoint(run, kind=kind, architecture=architecture)
        parameters = {name for name, _ in model.named_parameters()}  # buffers may hold -inf masks by design
        check_finite({key: value for key, value in ckpt["model"].items() if key in parameters},
                     f"--resume: {checkpoint_path(run)}")
        start = restore_training_state(ckpt, model, optimizer, scheduler)
        metrics_log.truncate_after(start)
        extra = ckpt["extra"]
        return start, float(extra.get("elapsed", 0.0)), dict(extra.get("metrics", {})), extra
    if info.is_main:
        fresh_start(run, weights_name)
    return 0, 0.0, {}, {}
