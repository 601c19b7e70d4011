"""Training the multi-scale VQ-VAE tokenizer (``mvar-engine train-tokenizer``).

Loss per step: ``l1_weight * |recon - x| + mse_weight * (recon - x)^2 + vq_weight * vq_loss``,
where ``(recon, vq_loss, usage) = MultiScaleVQVAE.forward(x)`` (straight-through estimator;
``vq_loss`` = codebook + ``beta`` x commitment, averaged over scales). Logged: loss, l1, mse,
vq, psnr (of the reconstruction, images in [-1, 1]) and usage (fraction of the vocabulary hit in
the batch). The codebook starts from data by default (``codebook_init="data"``): rows drawn from
the per-scale residuals of one batch under ideal quantisation, which keeps most codes alive from
the first step.

Outputs in the run directory: ``checkpoint.pt`` (resume), ``tokenizer.safetensors`` (weights with
``mvar_engine`` metadata: ``architecture`` = the TokenizerConfig fields, ``patch_nums``,
``resolution``, ``downsample``, ``class_names``, ``data`` and a ``training`` summary),
``metrics.jsonl`` and ``config.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from ...core.errors import UsageError
from ...models.tokenizer import MultiScaleVQVAE, TokenizerConfig, phi_index
from ..memory_fit import TRAINING_COPIES, refuse_unfitting
from .. import distributed as D
from .batches import CODEBOOK_STREAM, step_generator
from .common import DataSettings, LoopSettings, check_loop_settings, step_batches
from .data_sources import TrainingData
from .training_data import open_training_data
from .job import TrainingJob, run_job
from .loop import Callback, TrainSummary
from .rundir import check_run_dir
from .stepper import check_precision

WEIGHTS_NAME = "tokenizer.safetensors"
KIND = "tokenizer"


@dataclass
class TokenizerTrainSettings(DataSettings, LoopSettings):
    """Everything ``train-tokenizer`` takes (the CLI flags, one to one)."""

    resolution: int = 32
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    vocab_size: int = 512
    z_channels: int = 16
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    self_attention: bool = False
    beta: float = 0.25
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    codebook_init: Literal["data", "normal"] = "data"
    l1_weight: float = 1.0
    mse_weight: float = 0.0
    vq_weight: float = 1.0
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    output: str = "runs/tokenizer"


def check_schedule(patch_nums: tuple[int, ...], ch_mult: tuple[int, ...], resolution: int) -> int:
    """The encoder's downsampling factor ``2 ** (len(ch_mult) - 1)``; a schedule whose last scale is
    not the latent grid ``resolution / downsample`` is a one-line :class:`UsageError`."""
    down = 2 ** (len(ch_mult) - 1)
    last = patch_nums[-1]
    if resolution % down or resolution // down != last:
        latent = f"{resolution / down:g}x{resolution / down:g}"
        fixes = [f"--resolution {last * down}"]
        if resolution % down == 0:
            fixes.append(f"a schedule ending at {resolution // down}")
        raise UsageError(f"schedule {','.join(map(str, patch_nums))} (last scale {last}x{last}) does not divide the image "
                         f"size {resolution}: --ch-mult {','.join(map(str, ch_mult))} downsamples by {down}, giving a "
                         f"{latent} latent grid; use {' or '.join(fixes)}")
    return down


def tokenizer_config(s: TokenizerTrainSettings) -> TokenizerConfig:
    """The architecture the settings ask for (validation problems as one-line UsageErrors)."""
    if not s.patch_nums or any(p < 1 for p in s.patch_nums) or list(s.patch_nums) != sorted(s.patch_nums):
        raise UsageError(f"--patch-nums {','.join(map(str, s.patch_nums))}: give increasing positive map sides, "
                         f"e.g. 1,2,3,4,6,8")
    check_schedule(tuple(s.patch_nums), tuple(s.ch_mult), s.resolution)
    try:
        return TokenizerConfig(vocab_size=s.vocab_size, z_channels=s.z_channels, ch=s.ch, ch_mult=tuple(s.ch_mult),
                               num_res_blocks=s.num_res_blocks, beta=s.beta, quant_resi=s.quant_resi,
                               share_quant_resi=s.share_quant_resi, using_sa=s.self_attention,
                               using_mid_sa=s.self_attention, patch_nums=tuple(s.patch_nums))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "tokenizer"
        raise UsageError(f"tokenizer architecture: {where}: {first.get('msg')} (check --ch, --ch-mult, --vocab-size, "
                         f"--z-channels)") from None


def architecture_of(config: TokenizerConfig, resolution: int) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint."""
    return {**config.model_dump(mode="json"), "resolution": resolution}


@torch.no_grad()
def init_codebook_from_data(tokenizer: MultiScaleVQVAE, images: torch.Tensor, generator: torch.Generator) -> None:
    """Codebook rows drawn from the per-scale residuals of ``images`` under ideal quantisation
    (each scale's area-downsampled residual taken as its own code), so that codes start where the
    encoder's latents and residuals actually are."""
    cfg = tokenizer.config
    f = tokenizer.encode(images).float()
    hws = cfg.scale_hws()
    S, HW, C = len(hws), hws[-1], f.shape[1]
    f_rest, pool = f.clone(), []
    for si, hw in enumerate(hws):
        z = f_rest if tuple(f_rest.shape[-2:]) == hw else F.interpolate(f_rest, size=hw, mode="area")
        pool.append(z.permute(0, 2, 3, 1).reshape(-1, C))
        f_rest = f_rest - tokenizer._contribution(si, S, z, HW)
    pool_t = torch.cat(pool)
    V = cfg.vocab_size
    rows = torch.randint(len(pool_t), (V,), generator=generator) if len(pool_t) < V else \
        torch.randperm(len(pool_t), generator=generator)[:V]
    noise = 0.01 * pool_t.std() * torch.randn(V, C, generator=generator)
    tokenizer.quantize.embedding.weight.copy_((pool_t[rows.to(pool_t.device)].cpu() + noise).to(
        tokenizer.quantize.embedding.weight))


class TokenizerTrainingModule(nn.Module):
    """``forward(images) -> (loss, l1, mse, vq, usage)`` (the last four detached); DDP wraps this."""

    def __init__(self, tokenizer: MultiScaleVQVAE, l1_weight: float, mse_weight: float, vq_weight: float) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.l1_weight, self.mse_weight, self.vq_weight = l1_weight, mse_weight, vq_weight

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        recon, vq_loss, usage = self.tokenizer(images)
        l1 = (recon - images).abs().mean()
        mse = (recon - images).square().mean()
        loss = self.l1_weight * l1 + self.mse_weight * mse + self.vq_weight * vq_loss
        return loss, l1.detach(), mse.detach(), vq_loss.detach(), usage

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters of phis that no scale of the schedule selects (e.g. 3 scales, 4 phis)."""
        quant = self.tokenizer.quantize
        phis = getattr(quant.quant_resi, "qresi_ls", None)
        if phis is None:
            return []
        S = self.tokenizer.config.num_scales
        used = {phi_index(si, S, len(phis)) for si in range(S)}
        return [p for k, phi in enumerate(phis) if k not in used for p in phi.parameters()]


def train_tokenizer(s: TokenizerTrainSettings, callbacks: tuple[Callback, ...] = ()) -> TrainSummary:
    """Train (or resume) a tokenizer per ``s``; see the module docstring. Under torchrun every
    rank calls this; files are written by rank 0."""
    config = tokenizer_config(s)
    check_loop_settings(s)
    refuse_unfitting({"tokenizer": config}, torch.device("cpu"), "--vocab-size, --z-channels, --ch, --ch-mult",
                     copies=TRAINING_COPIES)
    run = check_run_dir(s.output, resume=s.resume, overwrite=s.overwrite, kind=KIND, weights_name=WEIGHTS_NAME,
                        inputs={})
    check_precision(s.precision, D.worker_device(s.device))
    data = open_training_data(s.data, s.resolution, s.split, s.max_images, crop=s.crop, hflip=s.hflip,
                              workers=s.workers, seed=s.seed)
    if data.kind != "images":
        raise UsageError(f"--data {s.data} holds codes; train-tokenizer trains on images (give the image folder the "
                         f"codes were made from)")
    info = D.setup(s.device)
    try:
        summary = _train(s, config, run, info, data, callbacks)
        D.barrier()  # no rank tears the group down while another is still in a collective
        return summary
    finally:
        D.cleanup()


def _train(s: TokenizerTrainSettings, config: TokenizerConfig, run: Path, info: D.DistInfo, data: TrainingData,
           callbacks: tuple[Callback, ...]) -> TrainSummary:
    device = info.device
    batches = step_batches(s, data.num_items, info)
    torch.manual_seed(s.seed)
    tokenizer = MultiScaleVQVAE(config)
    if s.codebook_init == "data" and not s.resume:
        init_codebook_from_data(tokenizer, data.global_images(batches, 0),
                                step_generator(s.seed, 0, 0, stream=CODEBOOK_STREAM))
    module = TokenizerTrainingModule(tokenizer, s.l1_weight, s.mse_weight, s.vq_weight)
    unused = module.unused_parameters()

    def loss(wrapped, part, step: int):
        value, l1, mse, vq, usage = wrapped(part[0])
        return value, {"l1": float(l1), "mse": float(mse), "vq": float(vq), "usage": float(usage)}

    def drop_unreachable(step: int) -> None:
        for p in unused:
            p.grad = None

    def restore(extra: dict[str, Any]) -> None:
        tokenizer.quantize.record_hit = int(extra.get("record_hit", 0))

    job = TrainingJob(
        kind=KIND, command="train-tokenizer", weights_name=WEIGHTS_NAME, desc="train-tokenizer", model=tokenizer,
        module=module, architecture=architecture_of(config, s.resolution),
        prepare=lambda batch, step: (batch.images.to(device, non_blocking=True),), loss=loss,
        derive=lambda numbers: {"psnr": 10 * math.log10(4.0 / max(numbers["mse"], 1e-12))},
        after_backward=drop_unreachable, find_unused_parameters=bool(unused),
        metadata=lambda step, metrics, seconds, world: weights_metadata(s, config, data, step, metrics, seconds, world),
        extra_state=lambda: {"record_hit": tokenizer.quantize.record_hit}, restore_extra=restore,
        postfix=("loss", "psnr", "usage"))
    return run_job(s, job, data, batches, run, info, callbacks)


def weights_metadata(s: TokenizerTrainSettings, config: TokenizerConfig, data: TrainingData, step: int,
                     metrics: dict[str, Any], seconds: float, world_size: int) -> dict[str, Any]:
    """The ``mvar_engine`` metadata of ``tokenizer.safetensors``."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
    return {
        "format": "mvar-engine/tokenizer",
        "version": 1,
        "kind": KIND,
        "architecture": config.model_dump(mode="json"),
        "patch_nums": list(config.patch_nums),
        "resolution": s.resolution,
        "downsample": config.downsample,
        "class_names": list(data.class_names),
        "data": {**data.describe(), "split": s.split},
        "training": {"steps": step, "total_steps": s.steps, "batch_size": s.batch_size, "lr": s.lr,
                     "seed": s.seed, "world_size": world_size, "seconds": round(seconds, 2),
                     "loss_weights": {"l1": s.l1_weight, "mse": s.mse_weight, "vq": s.vq_weight},
                     "codebook_init": s.codebook_init, "final": numbers,
                     "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
