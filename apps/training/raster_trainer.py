"""Training a raster (next-token) GPT on a frozen tokenizer (``mvar-engine train --trajectory raster``).

Data: every training image is tokenized once up front with ONE scale of the tokenizer, its last
(the latent grid, e.g. 8x8 for the digits tokenizer): ``targets [N, h * w]`` row-major, the
tokenizer's nearest code of every latent cell. A multi-scale tokenizer therefore works as a plain
VQ tokenizer here (its schedule's earlier scales are unused), and so does a one-scale tokenizer
from ``train-tokenizer --patch-nums 8``.

Model and loss: a :class:`~mvar_engine.models.raster_gpt.RasterGPT` (LlamaGen's c2i GPT:
class prefix, RMSNorm, SwiGLU, 2-D RoPE) run through
:meth:`~mvar_engine.models.raster_adapter.RasterEngine.teacher_forced_logits` (one causal pass, the
attention backend ``sdpa`` by default) and trained with the mean token cross-entropy (LlamaGen's
loss). Labels become the null class with probability ``class_dropout`` (CFG training); the model
then has a null-class row (``class_dropout_prob > 0``). Initialisation as LlamaGen: normal(0, 0.02)
linears and embeddings, a zero output layer.

Everything else is the next-scale trainer's: deterministic sharded batches, AdamW with warm-up and
cosine/linear decay, gradient clipping, torchrun DDP, atomic ``checkpoint.pt`` with exact
``--resume``, ``metrics.jsonl``, ``config.json`` and ``model.safetensors`` whose ``mvar_engine``
metadata (:func:`weights_metadata`) lets ``mvar-engine --trajectory raster --checkpoint
model.safetensors --tokenizer TOKENIZER`` rebuild the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from ...core.errors import ConfigError, UsageError
from ...core.registry import get_registry
from ...models.checkpoint import load_into, read_state_dict, read_weights_metadata
from ...models.raster_adapter import RasterEngine
from ...models.raster_gpt import DERIVED_RASTER_BUFFERS, RasterGPT, RasterGPTConfig
from ..cli_helpers import architecture_error
from ..config import EngineConfig
from ..memory_fit import TRAINING_COPIES, refuse_unfitting
from ..pipeline import resolve_components
from .. import distributed as D
from .data_sources import MemoryData, TrainingData
from .training_data import open_token_data
from .common import (TransformerSettings, check_loop_settings, check_shard, drop_classes, step_batches,
                     training_record)
from .frozen_tokenizer import FrozenTokenizer, load_frozen_tokenizer, step_tokens, tokenize
from .job import TrainingJob, run_job
from .loop import Callback, TrainSummary
from .rundir import check_run_dir
from .stepper import check_precision, checkpoint_blocks

WEIGHTS_NAME = "model.safetensors"
KIND = "raster"
FORMAT = "mvar-engine/raster"


@dataclass
class RasterTrainSettings(TransformerSettings):
    """Everything ``train --trajectory raster`` takes (the CLI flags, one to one)."""

    tokenizer: str = "runs/tokenizer-raster/tokenizer.safetensors"
    trajectory: str = "raster"
    cls_token_num: int = 1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    steps: int = 3000
    grad_clip: float = 1.0
    output: str = "runs/raster"
    save_every: int = 250


# -- model -----------------------------------------------------------------------------------------
def raster_config(s: RasterTrainSettings, tok: FrozenTokenizer, num_classes: int) -> RasterGPTConfig:
    """The GPT's architecture: the flags plus the tokenizer's vocabulary and latent grid."""
    try:
        return RasterGPTConfig(depth=s.depth, width=s.embed_dim, heads=s.num_heads, num_classes=num_classes,
                               vocab_size=tok.vocab_size, grid=tok.latent_grid,
                               cls_token_num=s.cls_token_num, class_dropout_prob=s.class_dropout,
                               multiple_of=s.multiple_of, ffn_dim_multiplier=s.ffn_dim_multiplier)
    except ValidationError as error:
        raise architecture_error(error, "--depth, --embed-dim, --num-heads, --cls-token-num, --multiple-of") from None


def init_raster_weights(model: RasterGPT) -> None:
    """LlamaGen's initialisation on top of the model's normal(0, 0.02): a zero output layer (every
    token starts equally likely). Uses the global torch RNG only through the constructor."""
    with torch.no_grad():
        model.output.weight.zero_()


def architecture_of(config: RasterGPTConfig, tok: FrozenTokenizer) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint: the model config and the tokenizer file."""
    return {**config.model_dump(mode="json"), "resolution": tok.resolution, "tokenizer_sha256": tok.sha256}


def load_init(model: RasterGPT, path: str) -> None:
    """``--init-from``: raster weights of the same architecture (strict; one-line errors listing the
    missing, unexpected and mis-shaped keys, or naming another kind of weights)."""
    meta = read_weights_metadata(path) if Path(path).suffix == ".safetensors" else None
    kind = (meta or {}).get("kind")
    if kind is not None and kind != KIND:
        raise UsageError(f"--init-from {path} holds {kind} weights, not a raster GPT's; start a raster run from "
                         f"raster weights (a model.safetensors or checkpoint.pt of 'train --trajectory raster')")
    load_into(model, read_state_dict(path), source=f"--init-from {path}", strict=True, derived=DERIVED_RASTER_BUFFERS)


class RasterTrainingModule(nn.Module):
    """The DDP unit: ``forward(labels, tokens) -> (loss, token accuracy)`` through the engine's
    differentiable teacher-forcing path."""

    def __init__(self, model: RasterGPT, components, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing
        self.engine = RasterEngine(model, None, components.trajectory, components.cache, components.backends,
                                   pattern=components.pattern)

    def forward(self, labels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.engine.teacher_forced_logits(labels, tokens)  # [B, n, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), label_smoothing=self.label_smoothing)
        acc = (logits.detach().argmax(-1) == tokens).float().mean()
        return loss, acc


def build_components(s: RasterTrainSettings):
    """The raster trajectory (its family must be next-token) and the backend, through the registry."""

    try:
        config = EngineConfig(trajectory={"name": s.trajectory}, backend=s.backend)
    except ValidationError as error:
        raise ConfigError([f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in error.errors()]) from None
    components = resolve_components(config, get_registry())
    if components.trajectory.family != "next-token":
        raise UsageError(f"--trajectory {s.trajectory} is a {components.trajectory.family} trajectory; the raster "
                         f"trainer trains next-token models (use 'mvar-engine train' without --trajectory raster)")
    return components


# -- training ----------------------------------------------------------------------------------------
def train_raster(s: RasterTrainSettings, callbacks: tuple[Callback, ...] = ()) -> TrainSummary:
    """Train (or resume) a raster GPT per ``s``; see the module docstring. Under torchrun every rank
    calls this; files are written by rank 0."""
    check_loop_settings(s)
    run = check_run_dir(s.output, resume=s.resume, overwrite=s.overwrite, kind=KIND, weights_name=WEIGHTS_NAME,
                        inputs={"--tokenizer": s.tokenizer, "--init-from": s.init_from})
    tok = load_frozen_tokenizer(s.tokenizer, s.resolution, s.tokenizer_patch_nums)
    sized = raster_config(s, tok, num_classes=1)
    refuse_unfitting({"transformer": sized}, torch.device("cpu"), "--depth, --embed-dim, --num-heads, "
                     "--ffn-dim-multiplier", copies=TRAINING_COPIES)
    components = build_components(s)
    components.pattern.check_layout(sized.layout)
    check_precision(s.precision, D.worker_device(s.device))
    check_shard(s)
    data = open_token_data(s, tok, "raster", (tok.latent_grid,))
    info = D.setup(s.device)
    try:
        summary = _train(s, run, tok, components, info, data, callbacks)
        D.barrier()  # no rank tears the group down while another is still in a collective
        return summary
    finally:
        D.cleanup()


def _train(s: RasterTrainSettings, run: Path, tok: FrozenTokenizer, components, info: D.DistInfo,
           data: TrainingData, callbacks: tuple[Callback, ...]) -> TrainSummary:
    device = info.device
    patch_nums = (tok.latent_grid,)
    config = raster_config(s, tok, len(data.class_names))
    batches = step_batches(s, data.num_items, info)
    tok.model.to(device)
    if isinstance(data, MemoryData):  # the digits: tokenized once, up front
        data = data.with_tokens(tokenize(tok, data.images.images, device, patch_nums=patch_nums)[0], None)

    torch.manual_seed(s.seed)
    model = RasterGPT(config)
    init_raster_weights(model)
    if s.init_from:
        load_init(model, s.init_from)
    if s.checkpoint_activations:
        checkpoint_blocks(model.layers)
    module = RasterTrainingModule(model, components, label_smoothing=s.label_smoothing)
    null_class = config.num_classes

    def prepare(batch, step: int):
        targets, _ = step_tokens(tok, batch, device, patch_nums)
        labels = drop_classes(batch.labels, batches, step, s.class_dropout, null_class, batch.rows)
        return labels.to(device), targets

    def loss(wrapped, part, step: int):
        value, acc = wrapped(*part)
        return value, {"acc": float(acc)}

    job = TrainingJob(
        kind=KIND, command="train", weights_name=WEIGHTS_NAME, desc="train raster", model=model, module=module,
        architecture=architecture_of(config, tok), prepare=prepare, loss=loss,
        metadata=lambda step, metrics, seconds, world: weights_metadata(s, config, tok, components, data, step, metrics,
                                                                       seconds, world),
        shard_units=tuple(model.layers), settings_record={"grid": list(config.grid)}, postfix=("loss", "acc"))
    return run_job(s, job, data, batches, run, info, callbacks)


def weights_metadata(s: RasterTrainSettings, config: RasterGPTConfig, tok: FrozenTokenizer, components, data: TrainingData,
                     step: int, metrics: dict[str, Any], seconds: float, world_size: int) -> dict[str, Any]:
    """The ``mvar_engine`` metadata of a raster ``model.safetensors``: the architecture (every
    :class:`RasterGPTConfig` field), the token grid and the one-scale schedule it was trained on,
    classes, the trajectory, the tokenizer's identity and a training summary."""
    side = config.grid[0] if config.grid[0] == config.grid[1] else list(config.grid)
    return {
        "format": FORMAT,
        "version": 1,
        "kind": KIND,
        "family": "next-token",
        "architecture": config.model_dump(mode="json"),
        "grid": list(config.grid),
        "patch_nums": [side],
        "num_classes": config.num_classes,
        "vocab_size": config.vocab_size,
        "resolution": tok.resolution,
        "class_names": list(data.class_names),
        "trajectory": {"name": components.names["trajectory"], "options": {}},
        "cache": components.names["cache"],
        "tokenizer": {"path": str(tok.path), "sha256": tok.sha256, "patch_nums": [side], "grid": list(config.grid),
                      "file_patch_nums": list(tok.patch_nums),
                      "architecture": tok.architecture()},
        "data": {**data.describe(), "split": s.split},
        "training": training_record(s, step=step, metrics=metrics, seconds=seconds, world_size=world_size,
                                    objective="mean token cross-entropy"),
    }
