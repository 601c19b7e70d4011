"""Convolutional encoder and decoder of the VAR multi-scale VQ-VAE.

The module tree (and therefore every state-dict key and shape) matches the released
``vae_ch160v4096z32.pth`` for ``ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=32``,
and the forward passes follow the reference implementation (itself the LDM ``vq-f16`` autoencoder):

- normalisation is ``GroupNorm(32, eps=1e-6)`` followed by SiLU;
- downsampling pads the right and bottom by one zero pixel, then a 3x3 stride-2 conv without padding;
- upsampling is nearest-neighbour 2x followed by a 3x3 conv;
- self-attention (single head, ``1/sqrt(C)`` scaling, fused ``qkv`` 1x1 conv) follows every res
  block of the lowest-resolution level (when ``using_sa``) and sits between the two mid blocks
  (when ``using_mid_sa``).

Layouts: images are ``[B, 3, H_px, W_px]``; latents are ``[B, z_channels, H_px / d, W_px / d]`` with
``d = 2 ** (len(ch_mult) - 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import banded_decode

__all__ = ["Encoder", "Decoder", "ResnetBlock", "AttnBlock", "Downsample2x", "Upsample2x"]


def _norm(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


class Downsample2x(nn.Module):
    """``[B, C, H, W] -> [B, C, H // 2, W // 2]``: zero-pad right/bottom by 1, then 3x3 conv stride 2, no padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample2x(nn.Module):
    """``[B, C, H, W] -> [B, C, 2H, 2W]``: nearest-neighbour 2x, then 3x3 conv (padding 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResnetBlock(nn.Module):
    """Pre-norm residual block ``[B, C_in, H, W] -> [B, C_out, H, W]``.

    ``out = shortcut(x) + conv2(drop(silu(norm2(conv1(silu(norm1(x)))))))``; the shortcut is a 1x1
    conv (``nin_shortcut``) only when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 num_groups: int = 32) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _norm(out_channels, num_groups)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut: nn.Module = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with residual, ``[B, C, H, W] -> [B, C, H, W]``.

    ``qkv`` is one 1x1 conv to ``3C`` channels split as ``(q, k, v)`` along channels; the logits are
    ``q^T k / sqrt(C)`` over the ``H*W`` positions (row-major), softmax over keys.
    """

    def __init__(self, channels: int, num_groups: int = 32) -> None:
        super().__init__()
        self.channels = channels
        self.norm = _norm(channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)  # each [B, C, HW]
        # logits[b, i, j] = <q_i, k_j> / sqrt(C); rows are queries.
        attn = torch.bmm(q.transpose(1, 2), k).mul(C ** -0.5).softmax(dim=2)  # [B, HW_q, HW_k]
        h = torch.bmm(v, attn.transpose(1, 2)).reshape(B, C, H, W)  # h[:, :, i] = sum_j attn[i, j] v_j
        return x + self.proj_out(h)


class _Level(nn.Module):
    """One resolution level: ``block`` (res blocks), ``attn`` (possibly empty) and an optional resampler.

    The resampler is registered by the owner as ``downsample`` (encoder) or ``upsample`` (decoder)
    so that the state-dict keys read ``down.{i}.downsample.conv.*`` / ``up.{i}.upsample.conv.*``.
    """

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run(self, h: Tensor) -> Tensor:
        """Res block ``i`` then (when present) attention ``i``, for every block of the level."""
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    """``block_1 -> attn_1 -> block_2`` at the lowest resolution (``attn_1`` is Identity if disabled)."""

    def __init__(self, channels: int, dropout: float, using_mid_sa: bool, num_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, num_groups)
        self.attn_1: nn.Module = AttnBlock(channels, num_groups) if using_mid_sa else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, num_groups)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _check_channels(ch: int, ch_mult: Sequence[int], num_res_blocks: int, num_groups: int) -> None:
    if len(ch_mult) < 1 or num_res_blocks < 1 or ch < 1:
        raise ValueError(f"need ch >= 1, a non-empty ch_mult and num_res_blocks >= 1, got "
                         f"ch={ch}, ch_mult={tuple(ch_mult)}, num_res_blocks={num_res_blocks}")
    bad = [ch * m for m in ch_mult if m < 1 or (ch * m) % num_groups]
    if ch % num_groups or bad:
        raise ValueError(f"every width ch * m must be a positive multiple of {num_groups} (GroupNorm groups); "
                         f"ch={ch}, ch_mult={tuple(ch_mult)}")


class Encoder(nn.Module):
    """Image ``[B, in_channels, H_px, W_px]`` -> latent ``[B, z_channels, H_px // d, W_px // d]``.

    ``d = 2 ** (len(ch_mult) - 1)`` (each downsampling floors odd sizes).

    Level ``i`` has ``num_res_blocks`` res blocks of width ``ch * ch_mult[i]`` (the first one maps from
    the previous width), then a ``Downsample2x`` except at the last level.
    """

    def __init__(
        self,
        *,
        ch: int = 160,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        in_channels: int = 3,
        z_channels: int = 32,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        _check_channels(ch, ch_mult, num_res_blocks, num_groups)
        n = len(ch_mult)
        self.downsample_ratio = 2 ** (n - 1)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks: list[nn.Module] = []
            attns: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout, num_groups))
                block_in = block_out
                if i_level == n - 1 and using_sa:
                    attns.append(AttnBlock(block_in, num_groups))
            level = _Level(blocks, attns)
            if i_level != n - 1:
                level.downsample = Downsample2x(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in, dropout, using_mid_sa, num_groups)
        self.norm_out = _norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``[B, z_channels, h, w]`` -> image ``[B, out_channels, h*d, w*d]`` (not clamped).

    ``up[i]`` mirrors encoder level ``i``: ``num_res_blocks + 1`` res blocks of width ``ch * ch_mult[i]``,
    then ``Upsample2x`` except at level 0; levels run from ``len(ch_mult) - 1`` down to 0.
    """

    def __init__(
        self,
        *,
        ch: int = 160,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        in_channels: int = 3,
        z_channels: int = 32,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        num_groups: int = 32,
    ) -> None:
        """``in_channels`` is the image channel count (the output here), named as in the reference."""
        super().__init__()
        _check_channels(ch, ch_mult, num_res_blocks, num_groups)
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in, dropout, using_mid_sa, num_groups)
        levels: list[nn.Module] = [nn.Identity()] * n
        for i_level in reversed(range(n)):
            block_out = ch * ch_mult[i_level]
            blocks: list[nn.Module] = []
            attns: list[nn.Module] = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout, num_groups))
                block_in = block_out
                if i_level == n - 1 and using_sa:
                    attns.append(AttnBlock(block_in, num_groups))
            level = _Level(blocks, attns)
            if i_level != 0:
                level.upsample = Upsample2x(block_in)
            levels[i_level] = level
        self.up = nn.ModuleList(levels)  # indexed by level, so keys run up.0 ... up.{n-1}
        self.norm_out = _norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """Without autograd, levels without attention whose maps are large run banded
        (:mod:`.banded_decode`: the same result with about half the peak memory)."""

        lean = not torch.is_grad_enabled()
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            if lean and len(level.attn) == 0 and banded_decode.worth_banding(h):
                h = banded_decode.run_level(level, h)
                continue
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        if lean and banded_decode.worth_banding(h):
            return banded_decode.norm_silu_conv(self.norm_out, self.conv_out, h)
        return self.conv_out(F.silu(self.norm_out(h)))


def res_tower_elements(ch: int, ch_mult: Sequence[int], blocks_per_level: int) -> int:
    """A lower bound on the weights of a VQ encoder's or decoder's resnet tower: the 3x3 convs of
    ``blocks_per_level`` blocks at each width ``w = ch * m`` that map ``w`` to ``w`` (all but the first
    block's first conv, which may change the width; biases, norms, up/down-sampling and attention
    left out), counted without building anything."""
    return sum((2 * blocks_per_level - 1) * 9 * (ch * m) ** 2 for m in ch_mult)

