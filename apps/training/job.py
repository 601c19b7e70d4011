"""The one training loop every job runs (tokenizer, next-scale, raster): optimizer and schedule,
resume, settings record, data stream, optimizer steps (:mod:`.stepper`: micro-batches, precision,
clipping), skipped-image accounting, checkpoints and weights exports, metrics, signals and progress
(:func:`.loop.run_loop`). A trainer builds its model and describes itself as a :class:`TrainingJob`:
how a step's batch becomes tensors, the loss of a micro-batch, and its weights' metadata.

Each step's metrics carry ``data_wait_s`` (time blocked on the data stream: workers behind) and
``prepare_s`` (turning the batch into tensors: tokenizing images, rebuilding the next-scale input;
host time, so on CUDA it counts launches until something synchronises).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import distributed as D
from .checkpointing import checkpoint_path, export_weights, save_training_checkpoint, state_sha256
from .common import LoopSettings, start_or_resume, wrap_ddp
from .batches import ShardedBatches
from .data_sources import SkippedImages, StepBatch, TrainingData
from .loop import Callback, LoopResult, MetricsLog, TrainSummary, finish, run_loop
from .optim import LRSchedule, build_optimizer
from .rundir import METRICS_NAME, settings_dict, write_settings
from .sharding import full_model_state, shard_model
from .stepper import OptimizerStep, micro_batches

Tensors = tuple[torch.Tensor | None, ...]


@dataclass
class TrainingJob:
    """What a trainer contributes to :func:`run_job`.

    - ``prepare(batch, step)``: the step's tensors on the device, each with one row per image (the
      first must be a tensor), e.g. (labels after class dropout, teacher-forcing input, targets);
    - ``loss(wrapped, part, step)``: a micro-batch's mean loss and numbers (``part``: a slice of
      ``prepare``'s tensors; call ``wrapped``, the DDP unit, for the forward);
    - ``metadata(step, metrics, seconds, world_size)``: the exported weights' metadata;
    - ``labels(step)``: non-numeric metrics of the step (the parallel strategy's group);
    - ``derive(numbers)``: numbers computed from the step's averaged ones (PSNR from the MSE);
    - ``after_backward(step)``: e.g. drop the gradients of parameters the step cannot reach;
    - ``extra_state()`` / ``restore_extra(extra)``: trainer counters kept in the checkpoint;
    - ``shard_units``: the modules ``--shard`` makes FSDP2 units (the transformer blocks).
    """

    kind: str
    command: str
    weights_name: str
    desc: str
    model: nn.Module
    module: nn.Module
    architecture: dict[str, Any]
    prepare: Callable[[StepBatch, int], Tensors]
    loss: Callable[[nn.Module, Tensors, int], tuple[torch.Tensor, dict[str, float]]]
    metadata: Callable[[int, dict[str, Any], float, int], dict[str, Any]]
    labels: Callable[[int], dict[str, Any]] = lambda step: {}
    derive: Callable[[dict[str, float]], dict[str, float]] = lambda numbers: {}
    after_backward: Callable[[int], None] | None = None
    find_unused_parameters: bool = False
    shard_units: tuple[nn.Module, ...] = ()
    settings_record: dict[str, Any] = field(default_factory=dict)
    extra_state: Callable[[], dict[str, Any]] = lambda: {}
    restore_extra: Callable[[dict[str, Any]], None] = lambda extra: None
    postfix: tuple[str, ...] = ("loss",)


def run_job(s: LoopSettings, job: TrainingJob, data: TrainingData, batches: ShardedBatches, run: Path,
            info: D.DistInfo, callbacks: tuple[Callback, ...] = ()) -> TrainSummary:
    """Train ``job.model`` on ``data`` per ``s`` (``s`` also carries the data flags
    ``on_bad_image``, ``grad_accum``, ``precision``); every rank calls it, rank 0 writes."""
    device = info.device
    job.model.to(device).train()
    if getattr(s, "shard", False):  # the training module is the root unit: its forward gathers the rest
        shard_model(job.module, job.shard_units)
        wrapped = job.module
    else:
        wrapped = wrap_ddp(job.module, info, find_unused_parameters=job.find_unused_parameters)
    schedule = LRSchedule(total=s.steps, warmup=s.warmup_steps, kind=s.lr_schedule)
    optimizer, scheduler = build_optimizer(job.model, lr=s.peak_lr, weight_decay=s.weight_decay,
                                           betas=tuple(s.betas), schedule=schedule)
    stepper = OptimizerStep(job.model, wrapped, optimizer, scheduler, precision=s.precision, grad_clip=s.grad_clip,
                            device=device)
    metrics_log = MetricsLog(run / METRICS_NAME, enabled=info.is_main)
    start, elapsed, previous, extra = start_or_resume(run, s, kind=job.kind, architecture=job.architecture,
                                                      model=job.model, optimizer=optimizer, scheduler=scheduler,
                                                      metrics_log=metrics_log, info=info, weights_name=job.weights_name)
    if s.resume:
        job.restore_extra(extra)
        stepper.load_state_dict(extra.get("scaler") or {})
    settings = settings_dict(s)
    if info.is_main:
        run.mkdir(parents=True, exist_ok=True)
        write_settings(run, {"command": job.command, "world_size": info.world_size, **job.settings_record, **settings})
    skipped = SkippedImages(getattr(s, "on_bad_image", "skip"), start=int(extra.get("skipped_images", 0)))

    def step_fn(step: int) -> dict[str, Any]:
        started = time.perf_counter()
        batch = next(steps)
        waited = time.perf_counter()
        skipped.note(step, batch.skipped, len(batch.labels))
        tensors = job.prepare(batch, step)
        prepared = time.perf_counter()
        after = (lambda: job.after_backward(step)) if job.after_backward is not None else None
        numbers = stepper(micro_batches(tensors, s.grad_accum), lambda part: job.loss(wrapped, part, step),
                          after_backward=after)
        return {**numbers, **job.derive(numbers), **job.labels(step), "skipped_images": skipped.count,
                "data_wait_s": waited - started, "prepare_s": prepared - waited}

    def save_fn(step: int, metrics: dict[str, Any], seconds: float) -> None:
        metrics = metrics or previous
        total_skipped = skipped.flush(metrics_log)
        state = full_model_state(job.model)  # collective when sharded
        if info.is_main:
            export_weights(run / job.weights_name, state, job.metadata(step, metrics, seconds, info.world_size))
        save_training_checkpoint(run, kind=job.kind, step=step, model=job.model, optimizer=optimizer,
                                 scheduler=scheduler, architecture=job.architecture, config=settings,
                                 extra={"elapsed": seconds, "skipped_images": total_skipped,
                                        "scaler": stepper.state_dict(), **job.extra_state(),
                                        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}})

    with data.stream(batches, start, s.steps) as steps:
        result: LoopResult = run_loop(start_step=start, total_steps=s.steps, step_fn=step_fn, save_fn=save_fn,
                                      checkpoint=checkpoint_path(run), metrics_log=metrics_log, log_every=s.log_every,
                                      save_every=s.save_every, progress=s.progress, desc=job.desc,
                                      elapsed_before=elapsed, callbacks=callbacks, device=device, postfix=job.postfix)
    hashes = D.all_gather_object(state_sha256(job.model))
    finish(metrics_log, result, hashes)
    return TrainSummary(run, result.step, result.metrics or previous, result.seconds, run / job.weights_name, hashes)
