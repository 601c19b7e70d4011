"""Training a VAR/MVAR transformer on a frozen tokenizer (``mvar-engine train``).

Data: every training image is tokenized once up front (``img_to_indices``; the targets
``[N, L]``) and turned into the teacher-forcing input (``indices_to_var_input``, ``[N, L - 1,
Cvae]``). Model input, attention and loss follow :mod:`.grouped_forward`: the components
(trajectory, attention pattern, backend ``sdpa`` by default, which has a backward pass on CPU and
CUDA) come from :func:`mvar_engine.apps.pipeline.resolve_components`, so the training mask is the
trajectory's (block-causal for ``full``, block-diagonal for ``markov``) with the pattern's
neighbourhood applied, as in :meth:`NextScaleEngine.teacher_forced_logits`.

Strategies: ``sequence`` trains every scale at once each step; ``parallel`` (``markov`` order 1
only) trains one group of scales per step in the ``--ratio`` cycle. Loss = the group's summed
token cross-entropy / L (VAR's 1/L per token), averaged over the batch. Labels become the null
class with probability ``class_dropout`` (CFG training).

Outputs in the run directory: ``checkpoint.pt`` (resume), ``model.safetensors`` (weights plus
``mvar_engine`` metadata, see :func:`weights_metadata`), ``metrics.jsonl`` and ``config.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import nn

from ...core.errors import ConfigError, UsageError
from ...core.layout import SequenceLayout
from ...core.registry import get_registry
from ...models.checkpoint import load_into, read_state_dict
from ...models.var import VAR, VARConfig
from ..cli_helpers import architecture_error
from ..config import EngineConfig
from ..memory_fit import TRAINING_COPIES, refuse_unfitting
from ..model_loading import DERIVED_VAR_BUFFERS, var_architecture
from ..pipeline import resolve_components
from .. import distributed as D
from .data_sources import MemoryData, TrainingData
from .training_data import open_token_data
from .common import (TransformerSettings, check_loop_settings, check_shard, drop_classes, step_batches,
                     training_record)
from .frozen_tokenizer import FrozenTokenizer, load_frozen_tokenizer, step_tokens, tokenize  # noqa: F401 (also imported from here)
from .grouped_forward import (VarTrainingModule, describe_group, group_cycle, parallel_groups, parse_ratio,
                              scales_isolated)
from .job import TrainingJob, run_job
from .loop import Callback, TrainSummary
from .rundir import check_run_dir
from .stepper import check_precision, checkpoint_blocks

WEIGHTS_NAME = "model.safetensors"
KIND = "var"


@dataclass
class VarTrainSettings(TransformerSettings):
    """Everything ``train`` takes (the CLI flags, one to one). ``trajectory_options`` and
    ``attention_options`` hold the components' own options (``--attention-kernel-size 5``)."""

    trajectory_options: dict[str, Any] = field(default_factory=dict)
    attention: str | None = None
    attention_options: dict[str, Any] = field(default_factory=dict)
    strategy: Literal["sequence", "parallel"] = "sequence"
    ratio: str | None = None
    parallel_split: int | None = None
    mlp_ratio: float = 4.0
    adaln_gamma_init: float = 1e-5
    finetune_from: str | None = None


# -- model -----------------------------------------------------------------------------------------
def var_config(s: VarTrainSettings, tok: FrozenTokenizer, num_classes: int) -> VARConfig:
    try:
        config = VARConfig(depth=s.depth, embed_dim=s.embed_dim, num_heads=s.num_heads, mlp_ratio=s.mlp_ratio,
                           num_classes=num_classes, vocab_size=tok.vocab_size,
                           z_channels=tok.model.config.z_channels, patch_nums=tok.patch_nums)
    except ValidationError as error:
        raise architecture_error(error, "--depth, --embed-dim, --num-heads") from None
    if config.width % config.heads:
        raise UsageError(f"--embed-dim {config.width} is not divisible by --num-heads {config.heads}")
    return config


def init_var_weights(model: VAR, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02) -> None:
    """VAR's initialisation: truncated-normal linears (std sqrt(1/3C)), residual projections scaled
    by 1/sqrt(2 depth), AdaLN gates near zero, a small head. Uses the global torch RNG."""
    c, depth = model.config.width, max(1, model.config.depth)
    std = math.sqrt(1 / c / 3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
        for block in model.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            lin = block.ada_lin[-1]
            lin.weight[2 * c:].mul_(init_adaln)
            lin.weight[:2 * c].mul_(init_adaln_gamma)
        model.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        model.head.weight.mul_(init_head)


ARCHITECTURE_FLAGS = {"depth": "--depth", "width": "--embed-dim", "heads": "--num-heads", "mlp_ratio": "--mlp-ratio"}
"""The model's size as flags, in the order a fix names them."""


def check_finetune_source(path: str, config: VARConfig) -> None:
    """``--finetune-from``: an official VAR or MVAR checkpoint in any of their layouts (a flat state
    dict, ``['trainer']['var_wo_ddp']``, ``['mvar_wo_ddp']``, DDP prefixes) or our weights, whose
    architecture is this model's: another family or size is a one-line error naming the flags
    that would match it, before any model is built."""
    found = var_architecture(path, patch_nums=config.patch_nums)
    sizes = [(flag, getattr(found, name), getattr(config, name)) for name, flag in ARCHITECTURE_FLAGS.items()]
    if any(held != ours for _, held, ours in sizes):
        held = " ".join(f"{flag} {value:g}" for flag, value, _ in sizes)
        ours = " ".join(f"{flag} {value:g}" for flag, _, value in sizes)
        raise UsageError(f"--finetune-from {path} is a VAR of {held}, the model here has {ours}: give {held}")
    if found.num_classes != config.num_classes:
        raise UsageError(f"--finetune-from {path} has {found.num_classes} classes, --data has {config.num_classes} "
                         f"(fine-tune on data with its classes)")
    if (found.vocab_size, found.z_channels) != (config.vocab_size, config.z_channels):
        raise UsageError(f"--finetune-from {path} predicts {found.vocab_size} codes of {found.z_channels} channels, "
                         f"--tokenizer has {config.vocab_size} of {config.z_channels} (give the tokenizer it was "
                         f"trained with)")


def architecture_of(config: VARConfig, tok: FrozenTokenizer) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint: the model config and the tokenizer file."""
    return {**config.model_dump(mode="json"), "resolution": tok.resolution, "tokenizer_sha256": tok.sha256}


def build_components(s: VarTrainSettings):
    """Trajectory, pattern and backend selector through the registry (one-line errors); the
    attention pattern defaults to the trajectory's (markov -> neighborhood, full -> dense)."""

    attention = s.attention
    if attention is None:
        factory = get_registry().get("trajectory", s.trajectory).record.factory
        attention = getattr(factory, "default_attention", "dense")
    try:
        config = EngineConfig(trajectory={"name": s.trajectory, "options": dict(s.trajectory_options)},
                              attention={"name": attention, "options": dict(s.attention_options)}, backend=s.backend)
    except ValidationError as error:
        raise ConfigError([f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in error.errors()]) from None
    return resolve_components(config)


def plan_groups(s: VarTrainSettings, components, layout: SequenceLayout) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """(groups, cycle): one group of every scale for ``sequence``; MVAR's grouping for ``parallel``
    (default split: the pattern's ``first_scale(layout)``, e.g. the neighbourhood's first windowed
    scale; patterns without one, like ``dense``: the last two scales alone)."""
    num_scales = layout.num_scales
    if s.strategy == "sequence":
        if s.ratio is not None or s.parallel_split is not None:
            raise UsageError("--ratio and --parallel-split apply to --strategy parallel only (drop them or add "
                             "--strategy parallel)")
        return [tuple(range(num_scales))], (0,)
    names = components.names
    if not scales_isolated(components.trajectory, num_scales):
        raise UsageError(f"--strategy parallel needs each scale to see only itself, but trajectory '{names['trajectory']}'"
                         f"{' with these options' if s.trajectory_options else ''} lets a scale attend to earlier scales, "
                         f"which a scale trained alone would not have; use --trajectory markov (order 1) or "
                         f"--strategy sequence")
    if num_scales < 2:
        raise UsageError("--strategy parallel needs a schedule of at least two scales (use --strategy sequence)")
    split = s.parallel_split
    if split is None:
        first = getattr(components.pattern, "first_scale", None)
        split = first(layout) if callable(first) else num_scales - 2
        split = min(max(1, split), num_scales - 1)
    groups = parallel_groups(num_scales, split)
    return groups, group_cycle(parse_ratio(s.ratio, groups))


# -- training ----------------------------------------------------------------------------------------
def train_var(s: VarTrainSettings, callbacks: tuple[Callback, ...] = ()) -> TrainSummary:
    """Train (or resume) a VAR/MVAR transformer per ``s``; see the module docstring. Under torchrun
    every rank calls this; files are written by rank 0."""
    check_loop_settings(s)
    if s.init_from and s.finetune_from:
        raise UsageError("--init-from and --finetune-from both name starting weights (give one)")
    run = check_run_dir(s.output, resume=s.resume, overwrite=s.overwrite, kind=KIND, weights_name=WEIGHTS_NAME,
                        inputs={"--tokenizer": s.tokenizer, "--init-from": s.init_from,
                                "--finetune-from": s.finetune_from})
    tok = load_frozen_tokenizer(s.tokenizer, s.resolution, s.tokenizer_patch_nums)
    if not tok.multi_scale:
        raise UsageError(f"--tokenizer {s.tokenizer} is LlamaGen's VQ, one scale: next-scale models need a multi-scale "
                         f"tokenizer (train a raster GPT on it with --trajectory raster)")
    refuse_unfitting({"transformer": var_config(s, tok, num_classes=1)}, torch.device("cpu"),
                     "--depth, --embed-dim, --num-heads, --mlp-ratio", copies=TRAINING_COPIES)
    components = build_components(s)
    layout = SequenceLayout.from_patch_nums(tok.patch_nums)
    components.pattern.check_layout(layout)  # e.g. --attention-apply-from names one of the tokenizer's scales
    groups, cycle = plan_groups(s, components, layout)
    check_precision(s.precision, D.worker_device(s.device))
    check_shard(s)
    data = open_token_data(s, tok, "next-scale", tok.patch_nums)
    if s.finetune_from:
        check_finetune_source(s.finetune_from, var_config(s, tok, len(data.class_names)))
    info = D.setup(s.device)
    try:
        summary = _train(s, run, tok, components, groups, cycle, info, data, callbacks)
        D.barrier()  # no rank tears the group down while another is still in a collective
        return summary
    finally:
        D.cleanup()


def _train(s: VarTrainSettings, run: Path, tok: FrozenTokenizer, components, groups: list[tuple[int, ...]],
           cycle: tuple[int, ...], info: D.DistInfo, data: TrainingData, callbacks: tuple[Callback, ...]) -> TrainSummary:
    device = info.device
    config = var_config(s, tok, len(data.class_names))
    batches = step_batches(s, data.num_items, info)
    tok.model.to(device)
    if isinstance(data, MemoryData):  # the digits: tokenized once, up front
        data = data.with_tokens(*tokenize(tok, data.images.images, device))

    torch.manual_seed(s.seed)
    model = VAR(config)
    init_var_weights(model, init_adaln_gamma=s.adaln_gamma_init)
    for flag, source in (("--init-from", s.init_from), ("--finetune-from", s.finetune_from)):
        if source:
            load_into(model, read_state_dict(source), source=f"{flag} {source}", strict=True, derived=DERIVED_VAR_BUFFERS)
    if s.checkpoint_activations:
        checkpoint_blocks(model.blocks)
    module = VarTrainingModule(model, components.trajectory, components.pattern, components.backends,
                               label_smoothing=s.label_smoothing)
    null_class = config.num_classes
    unused = {g: module.unused_parameters(groups[g]) for g in set(cycle)}

    def prepare(batch, step: int):
        targets, var_input = step_tokens(tok, batch, device)
        labels = drop_classes(batch.labels, batches, step, s.class_dropout, null_class, batch.rows)
        return labels.to(device), var_input, targets

    def loss(wrapped, part, step: int):
        labels, var_input, targets = part
        value, ce, acc = wrapped(labels, var_input, targets, groups[cycle[step % len(cycle)]])
        return value, {"ce": float(ce), "acc": float(acc)}

    def drop_unreachable(step: int) -> None:
        for p in unused[cycle[step % len(cycle)]]:
            p.grad = None

    job = TrainingJob(
        kind=KIND, command="train", weights_name=WEIGHTS_NAME, desc="train", model=model, module=module,
        architecture=architecture_of(config, tok), prepare=prepare, loss=loss, after_backward=drop_unreachable,
        labels=lambda step: {"group": describe_group(groups[cycle[step % len(cycle)]])},
        metadata=lambda step, metrics, seconds, world: weights_metadata(s, config, tok, components, data, groups, cycle,
                                                                       step, metrics, seconds, world),
        # Groups that leave out scale 0 (or every later scale) do not reach pos_start (word_embed).
        find_unused_parameters=s.strategy == "parallel" or config.layout.num_scales == 1,
        shard_units=tuple(model.blocks), postfix=("loss", "acc"),
        settings_record={"groups": [list(g) for g in groups], "cycle": list(cycle)})
    return run_job(s, job, data, batches, run, info, callbacks)


def weights_metadata(s: VarTrainSettings, config: VARConfig, tok: FrozenTokenizer, components, data: TrainingData,
                     groups: list[tuple[int, ...]], cycle: tuple[int, ...], step: int, metrics: dict[str, Any],
                     seconds: float, world_size: int) -> dict[str, Any]:
    """The ``mvar_engine`` metadata of ``model.safetensors``: everything needed to rebuild and run
    the model (architecture, schedule, classes, components and their options, tokenizer identity)
    plus a training summary."""
    def choice(kind: str, component) -> dict[str, Any]:
        options = getattr(component, "options", None)
        dumped = options.model_dump(mode="json") if hasattr(options, "model_dump") else {}
        return {"name": components.names[kind], "options": dumped}

    return {
        "format": "mvar-engine/var",
        "version": 1,
        "kind": KIND,
        "architecture": config.model_dump(mode="json"),
        "patch_nums": list(config.patch_nums),
        "num_classes": config.num_classes,
        "vocab_size": config.vocab_size,
        "z_channels": config.z_channels,
        "resolution": tok.resolution,
        "class_names": list(data.class_names),
        "trajectory": choice("trajectory", components.trajectory),
        "attention": choice("attention", components.pattern),
        "cache": components.names["cache"],
        "tokenizer": {"path": str(tok.path), "sha256": tok.sha256,
                      "architecture": tok.architecture()},
        "data": {**data.describe(), "split": s.split},
        "training": training_record(s, step=step, metrics=metrics, seconds=seconds, world_size=world_size,
                                    strategy=s.strategy, groups=[list(g) for g in groups],
                                    ratio=[cycle.count(g) for g in range(len(groups))]),
    }
