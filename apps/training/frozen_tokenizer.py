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
from ...models.llamagen_vq import LlamaGenVQ, infer_llamagen_vq_config, is_llamagen_vq_state
from ...models.tokenizer import MultiScaleVQVAE, TokenizerConfig
from ..model_loading import infer_tokenizer_config
from ...core.files import file_sha256


@dataclass
class FrozenTokenizer:
    """The loaded tokenizer, its schedule, resolution (from metadata or flags) and file identity:
    a multi-scale VQ-VAE (ours, VAR's) or LlamaGen's VQ (one scale: its token grid, raster models
    only). The trainers encode through :meth:`encode` and :meth:`teacher_input`, never the model."""

    model: MultiScaleVQVAE | LlamaGenVQ
    patch_nums: tuple[int, ...]
    resolution: int
    path: Path
    sha256: str
    metadata: dict[str, Any] | None

    @property
    def multi_scale(self) -> bool:
        return isinstance(self.model, MultiScaleVQVAE)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size if self.multi_scale else self.model.vocab_size

    @property
    def latent_grid(self) -> tuple[int, int]:
        """The last scale's ``(h, w)``: the latent grid, the token grid of a raster model."""
        if not self.multi_scale:
            return self.model.token_grid(self.resolution, self.resolution)
        return tuple(self.model.config.scale_hws()[-1])  # type: ignore[return-value]

    def architecture(self) -> dict[str, Any]:
        """The tokenizer's config (``family``: ``multi-scale`` or ``llamagen-vq``) for metadata."""
        return {"family": "multi-scale" if self.multi_scale else "llamagen-vq",
                **self.model.config.model_dump(mode="json")}

    def encode(self, images: torch.Tensor, patch_nums: Sequence | None = None) -> list[torch.Tensor]:
        """``images [B, 3, R, R]`` -> per-scale ``LongTensor[B, h_s * w_s]`` (``patch_nums``: None for
        the tokenizer's schedule, or one scale, the latent grid, quantised alone)."""
        if self.multi_scale:
            return self.model.img_to_indices(images, patch_nums)
        return [self.model.encode_to_tokens(images)]

    def teacher_input(self, indices: Sequence[torch.Tensor], patch_nums: Sequence | None = None) -> torch.Tensor | None:
        """VAR's teacher-forcing input ``[B, L - l_0, Cvae]`` float32, or None for one scale."""
        if not self.multi_scale or (patch_nums is not None and len(patch_nums) == 1):
            return None
        var_input = self.model.indices_to_var_input(indices, patch_nums)
        return var_input.float() if var_input is not None else None

    def split_scales(self, targets: torch.Tensor, patch_nums: Sequence | None = None) -> list[torch.Tensor]:
        """``targets [B, L]`` -> per-scale indices (the inverse of concatenating :meth:`encode`'s)."""
        if not self.multi_scale or (patch_nums is not None and len(patch_nums) == 1):
            return [targets]
        return list(targets.split([h * w for h, w in self.model.config.scale_hws()], dim=1))


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
    elif not meta and is_llamagen_vq_state(state):
        return load_llamagen_vq(path, state, resolution, patch_nums)
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


def load_llamagen_vq(path: Path, state: dict[str, torch.Tensor], resolution: int | None,
                     patch_nums: tuple[int, ...] | None) -> FrozenTokenizer:
    """LlamaGen's VQ (``vq_ds16_c2i.pt``) as a one-scale tokenizer at ``resolution`` (which the file
    does not record: required), its token grid the only scale."""
    if patch_nums is not None:
        raise UsageError(f"--tokenizer {path} is LlamaGen's VQ, a one-scale tokenizer: drop --tokenizer-patch-nums "
                         f"(the grid follows --resolution)")
    try:
        config = infer_llamagen_vq_config(state)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"--tokenizer {path}: {error.args[0] if error.args else error}") from None
    if resolution is None:
        raise UsageError(f"--tokenizer {path} is LlamaGen's VQ, which does not record its image size: give "
                         f"--resolution (256 or 384 for VQ-16: a 16x16 or 24x24 grid)")
    model = LlamaGenVQ(config)
    try:
        grid = model.token_grid(resolution, resolution)
    except ValueError as error:
        raise UsageError(f"--resolution {resolution}: {error}") from None
    load_into(model, state, source=str(path), strict=True, derived=())
    model.eval().requires_grad_(False)
    return FrozenTokenizer(model, (grid[0],), resolution, path, file_sha256(path), None)


@torch.no_grad()
def tokenize(tok: FrozenTokenizer, images: torch.Tensor, device: torch.device, chunk: int = 256,
             patch_nums: Sequence | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``images [N, 3, R, R]`` -> (targets ``LongTensor[N, L]``, var_input ``[N, L - l_0, Cvae]`` or None),
    both on CPU, computed in chunks on ``device``. ``patch_nums``: quantise with this schedule
    instead of the tokenizer's (``(8,)``: one 8x8 scale, the raster targets; no var_input then)."""
    targets, inputs = [], []
    for part in images.split(chunk):
        idx = tok.encode(part.to(device), patch_nums)
        targets.append(torch.cat(idx, dim=1).cpu())
        var_input = tok.teacher_input(idx, patch_nums)
        if var_input is not None:
            inputs.append(var_input.cpu())
    return torch.cat(targets), (torch.cat(inputs) if inputs else None)


@torch.no_grad()
def step_tokens(tok: FrozenTokenizer, batch, device: torch.device,
                patch_nums: Sequence | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A :class:`~.data_sources.StepBatch` -> (targets ``LongTensor[b, L]``, var_input ``[b, L - l_0,
    Cvae]`` float32 or None) on ``device``: the images encoded, or the cached tokens with their
    teacher-forcing input rebuilt. ``patch_nums``: None (the tokenizer's schedule) or one scale."""
    if batch.targets is None:
        indices = tok.encode(batch.images.to(device), patch_nums)
    else:
        targets = batch.targets.to(device)
        if batch.var_input is not None:
            return targets, batch.var_input.to(device)
        indices = tok.split_scales(targets, patch_nums)
    return torch.cat(indices, dim=1), tok.teacher_input(indices, patch_nums)
