"""The frozen tokenizer both transformer trainers train on: loading it (with its schedule and
resolution) and turning the training images into token targets once, up front.

``train`` for next-scale models uses the tokenizer's own schedule; ``train --trajectory raster``
uses one scale of it (its last: the latent grid), see :func:`tokenize`'s ``patch_nums``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import ValidationError

from ...core.errors import CheckpointError, UsageError
from ...core.files import not_a_file_reason
from ...models.checkpoint import load_into, read_state_dict, read_weights_metadata
from ...models.tokenizer import MultiScaleVQVAE, TokenizerConfig
from ..model_loading import infer_tokenizer_config
from ...core.files import file_sha256


@dataclass
class FrozenTokenizer:
    """The loaded tokenizer, its schedule, resolution (from metadata or flags) and file identity."""

    model: MultiScaleVQVAE
    patch_nums: tuple[int, ...]
    resolution: int
    path: Path
    sha256: str
    metadata: dict[str, Any] | None

    @property
    def latent_grid(self) -> tuple[int, int]:
        """The last scale's ``(h, w)``: the latent grid, the token grid of a raster model."""
        return tuple(self.model.config.scale_hws()[-1])  # type: ignore[return-value]


def load_frozen_tokenizer(path: str | Path, resolution: int | None, patch_nums: tuple[int, ...] | None) -> FrozenTokenizer:
    """A tokenizer for training: from our ``tokenizer.safetensors`` (architecture, schedule and
    resolution from its metadata; ``resolution`` must agree) or any state dict plus
    ``patch_nums`` (architecture inferred; resolution = last scale x downsample)."""
    path = Path(path)
    reason = not_a_file_reason(path)
    if reason is not None:
        hint = (f"give the tokenizer file in it, e.g. {path / 'tokenizer.safetensors'}" if path.is_dir()
                else "train one with 'mvar-engine train-tokenizer'")
        raise CheckpointError(f"--tokenizer {path} {reason} ({hint})")
    meta = read_weights_metadata(path) if path.suffix == ".safetensors" else None
    state = read_state_dict(path)
    if meta and meta.get("kind") == "tokenizer":
        try:
            config = TokenizerConfig(**meta["architecture"])
        except (ValidationError, KeyError, TypeError) as error:
            raise CheckpointError(f"--tokenizer {path}: unusable architecture metadata ({type(error).__name__}); "
                                  f"re-export it with train-tokenizer") from None
        if patch_nums is not None and tuple(patch_nums) != tuple(config.patch_nums):
            raise UsageError(f"--tokenizer-patch-nums {','.join(map(str, patch_nums))} differs from the schedule "
                             f"{','.join(map(str, config.patch_nums))} in {path}'s metadata (drop the flag)")
        file_resolution = int(meta.get("resolution", config.image_hw[0]))
    else:
        if meta and meta.get("kind"):
            raise UsageError(f"--tokenizer {path} holds {meta['kind']} weights, not a tokenizer (give the "
                             f"tokenizer.safetensors of a train-tokenizer run)")
        if patch_nums is None:
            raise UsageError(f"--tokenizer {path} carries no mvar_engine metadata: give its scale schedule with "
                             f"--tokenizer-patch-nums (e.g. 1,2,3,4,5,6,8,10,13,16)")
        try:
            config = infer_tokenizer_config(state, patch_nums)
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"--tokenizer {path}: {error.args[0] if error.args else error}") from None
        file_resolution = config.image_hw[0]
    if resolution is not None and resolution != file_resolution:
        raise UsageError(f"--resolution {resolution} does not match the tokenizer {path}, trained at {file_resolution} "
                         f"pixels (use --resolution {file_resolution} or drop the flag)")
    model = MultiScaleVQVAE(config)
    load_into(model, state, source=str(path), strict=True, derived=("quantize.ema_vocab_hit_SV",))
    model.eval().requires_grad_(False)
    return FrozenTokenizer(model, tuple(int(p) for p in config.patch_nums), file_resolution, path, file_sha256(path), meta)


@torch.no_grad()
def tokenize(tokenizer: MultiScaleVQVAE, images: torch.Tensor, device: torch.device, chunk: int = 256,
             patch_nums: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``images [N, 3, R, R]`` -> (targets ``LongTensor[N, L]``, var_input ``[N, L - l_0, Cvae]`` or None),
    both on CPU, computed in chunks on ``device``. ``patch_nums``: quantise with this schedule
    instead of the tokenizer's (``(8,)``: one 8x8 scale, the raster targets; no var_input then)."""
    targets, inputs = [], []
    for part in images.split(chunk):
        idx = tokenizer.img_to_indices(part.to(device), patch_nums)
        targets.append(torch.cat(idx, dim=1).cpu())
        var_input = tokenizer.indices_to_var_input(idx, patch_nums)
        if var_input is not None:
            inputs.append(var_input.float().cpu())
    return torch.cat(targets), (torch.cat(inputs) if inputs else None)


@torch.no_grad()
def step_tokens(tokenizer: MultiScaleVQVAE, batch, device: torch.device,
                patch_nums: Sequence | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A :class:`~.data_sources.StepBatch` -> (targets ``LongTensor[b, L]``, var_input ``[b, L - l_0,
    Cvae]`` float32 or None) on ``device``: the images encoded, or the cached tokens with their
    teacher-forcing input rebuilt. ``patch_nums``: None (the tokenizer's schedule) or one scale."""
    if batch.targets is None:
        indices = tokenizer.img_to_indices(batch.images.to(device), patch_nums)
    else:
        targets = batch.targets.to(device)
        if batch.var_input is not None:
            return targets, batch.var_input.to(device)
        if patch_nums is not None and len(patch_nums) == 1:
            indices = [targets]
        else:
            indices = list(targets.split([h * w for h, w in tokenizer.config.scale_hws()], dim=1))
    var_input = tokenizer.indices_to_var_input(indices, patch_nums)
    return torch.cat(indices, dim=1), (var_input.float() if var_input is not None else None)
