"""Exact banded inference for the decoder's high-resolution levels (no autograd).

At 512px the decoder's last level holds ``[B, 160, 512, 512]`` maps (160 MiB per image in float32);
a plain res block keeps four of them alive (input, normalised input, SiLU, convolution output, plus
the convolution's own reorders), which made decoding one image the peak of a whole MVAR generation.
Here every 3x3 convolution runs over horizontal bands of rows with a one-row halo, GroupNorm uses
statistics of the whole map (a reduction, nothing map-sized is allocated), and outputs are written
into one preallocated map, so a res block keeps its input and one map (``x`` is updated in place when
the channel count stays), plus band-sized temporaries. The result equals the plain forward up to
floating-point rounding (GroupNorm statistics are reduced in a different order).

Layouts: maps are ``[B, C, H, W]``; a band is the rows ``[r0, r1)`` of every image and channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BAND_BYTES = 16 * 2**20
"""Most bytes of one band-sized temporary (``B x C x rows x W`` floats)."""

BANDED_MAP_BYTES = 32 * 2**20
"""Levels whose input map is at least this large run banded (smaller maps run the plain forward)."""


def worth_banding(x: Tensor) -> bool:
    return x.numel() * x.element_size() >= BANDED_MAP_BYTES


def bands(x: Tensor, channels: int | None = None) -> list[tuple[int, int]]:
    """Row ranges covering ``x``'s height, each within :data:`BAND_BYTES` for ``channels`` channels."""
    b, c, h, w = x.shape
    per_row = b * (channels or c) * w * x.element_size()
    rows = max(1, min(h, BAND_BYTES // max(per_row, 1)))
    return [(r0, min(r0 + rows, h)) for r0 in range(0, h, rows)]


def group_stats(x: Tensor, norm: nn.GroupNorm) -> tuple[Tensor, Tensor]:
    """``(mean, rstd)`` of ``x: [B, C, H, W]`` per image and group, each ``[B, G, 1, 1, 1]``."""
    b, c = x.shape[:2]
    var, mean = torch.var_mean(x.view(b, norm.num_groups, -1), dim=-1, unbiased=False)
    shape = (b, norm.num_groups, 1, 1, 1)
    return mean.view(shape), torch.rsqrt(var + norm.eps).view(shape)


def _activated(x: Tensor, r0: int, r1: int, norm: nn.GroupNorm, stats: tuple[Tensor, Tensor]) -> Tensor:
    """``silu(norm(x))`` on rows ``[r0 - 1, r1 + 1)``, zero rows past the map's edges (the 3x3
    convolution's padding): ``[B, C, r1 - r0 + 2, W]``."""
    b, c, h, w = x.shape
    lo, hi = max(r0 - 1, 0), min(r1 + 1, h)
    mean, rstd = stats
    band = x[:, :, lo:hi].reshape(b, norm.num_groups, c // norm.num_groups, hi - lo, w)
    band = (band - mean).mul_(rstd).view(b, c, hi - lo, w)
    if norm.affine:
        band = band.mul_(norm.weight.view(1, c, 1, 1)).add_(norm.bias.view(1, c, 1, 1))
    band = F.silu(band, inplace=True)
    return F.pad(band, (0, 0, r0 - lo == 0 and 1 or 0, (r1 + 1) - hi))


def _conv_rows(conv: nn.Conv2d, band: Tensor) -> Tensor:
    """A 3x3, stride-1 convolution over a band that already carries its vertical halo."""
    return F.conv2d(band, conv.weight, conv.bias, stride=1, padding=(0, conv.padding[1]))


def resnet_block(block: nn.Module, x: Tensor) -> Tensor:
    """:class:`~.vae_blocks.ResnetBlock` on ``x`` (given up by the caller: updated in place when the
    width stays); the plain block's result."""
    b, c_in, h, w = x.shape
    c_out = block.conv1.out_channels
    hidden = x.new_empty(b, c_out, h, w)
    stats = group_stats(x, block.norm1)
    for r0, r1 in bands(x, max(c_in, c_out)):
        hidden[:, :, r0:r1] = _conv_rows(block.conv1, _activated(x, r0, r1, block.norm1, stats))
    stats = group_stats(hidden, block.norm2)
    same = isinstance(block.nin_shortcut, nn.Identity)
    out = x if same else x.new_empty(b, c_out, h, w)
    for r0, r1 in bands(hidden):
        residual = _conv_rows(block.conv2, _activated(hidden, r0, r1, block.norm2, stats))
        if same:
            out[:, :, r0:r1] += residual
        else:
            out[:, :, r0:r1] = block.nin_shortcut(x[:, :, r0:r1]) + residual
    return out


def upsample(module: nn.Module, x: Tensor) -> Tensor:
    """:class:`~.vae_blocks.Upsample2x` (nearest 2x, then 3x3 conv) band by band of output rows."""
    b, c, h, w = x.shape
    conv = module.conv
    out = x.new_empty(b, conv.out_channels, 2 * h, 2 * w)
    for r0, r1 in bands(out):
        lo, hi = max(r0 - 1, 0), min(r1 + 1, 2 * h)  # upsampled rows the outputs read
        source = x[:, :, lo // 2:(hi + 1) // 2]
        up = F.interpolate(source, scale_factor=2.0, mode="nearest")[:, :, lo - 2 * (lo // 2):][:, :, :hi - lo]
        up = F.pad(up, (0, 0, 1 if lo == r0 else 0, 1 if hi == r1 else 0))
        out[:, :, r0:r1] = _conv_rows(conv, up)
    return out


def norm_silu_conv(norm: nn.GroupNorm, conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(silu(norm(x)))`` (the decoder's output head) band by band."""
    x = x.contiguous()
    b, c, h, w = x.shape
    out = x.new_empty(b, conv.out_channels, h, w)
    stats = group_stats(x, norm)
    for r0, r1 in bands(x):
        out[:, :, r0:r1] = _conv_rows(conv, _activated(x, r0, r1, norm, stats))
    return out


def run_level(level: nn.Module, x: Tensor) -> Tensor:
    """A decoder level without attention (its res blocks, then its upsampling if any), banded.
    ``x`` may have any strides (a plain convolution may return channels-last maps for a batch)."""
    x = x.contiguous()
    for block in level.block:
        x = resnet_block(block, x)
    if hasattr(level, "upsample"):
        x = upsample(level.upsample, x)
    return x


__all__ = ["BAND_BYTES", "BANDED_MAP_BYTES", "bands", "group_stats", "norm_silu_conv", "resnet_block", "run_level",
           "upsample", "worth_banding"]
