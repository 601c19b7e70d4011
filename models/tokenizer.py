"""Multi-scale residual VQ-VAE tokenizer of VAR (next-scale prediction).

``MultiScaleVQVAE`` is state-dict compatible with the released ``vae_ch160v4096z32.pth`` (default
``TokenizerConfig``) and reproduces the reference algorithms:

- ``quantize_to_indices`` = ``VectorQuantizer2.f_to_idxBl_or_fhat(to_fhat=False)``;
- ``indices_to_var_input`` = ``idxBl_to_var_input`` (teacher forcing);
- ``next_input`` = ``get_next_autoregressive_input`` without in-place updates;
- ``forward`` = VQ-VAE training step (straight-through estimator, commitment loss).

Notation: ``B`` batch, ``S`` number of scales, ``(h_s, w_s)`` the grid of scale ``s``, ``(H, W)`` the
last grid (the latent grid), ``C = z_channels``, ``V = vocab_size``. Token maps are flattened
row-major, so scale ``s`` has ``h_s * w_s`` tokens and ``L = sum_s h_s * w_s``.

Phi selection: scale ``si`` of ``S`` uses the phi whose tick is nearest to ``si / (S - 1)`` (``0`` when
``S == 1``), ticks ``linspace(1/(3K), 1 - 1/(3K), K)`` for ``K == 4`` phis and
``linspace(1/(2K), 1 - 1/(2K), K)`` otherwise, ties broken towards the lower index exactly as
``numpy.argmin`` on the float64 values does. For the 10-scale 256px schedule and ``K = 4`` this gives
``0,0,1,1,1,2,2,3,3,3``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from .vae_blocks import Decoder, Encoder, res_tower_elements

__all__ = [
    "ScaleSide",
    "TokenizerConfig",
    "MultiScaleVQVAE",
    "MultiScaleQuantizer",
    "Phi",
    "PhiShared",
    "PhiPartiallyShared",
    "PhiNonShared",
    "phi_ticks",
    "phi_index",
]

ScaleSide = Union[int, tuple[int, int]]
"""One scale of a schedule: ``n`` (an ``n x n`` map) or ``(h, w)``."""

_VAR_256_PATCH_NUMS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _as_hw(pn: ScaleSide) -> tuple[int, int]:
    if isinstance(pn, (int, np.integer)):
        return int(pn), int(pn)
    h, w = pn
    return int(h), int(w)


class TokenizerConfig(BaseModel):
    """Hyper-parameters of the multi-scale VQ-VAE; the defaults are the released 256px VAR tokenizer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(4096, ge=1)
    z_channels: int = Field(32, ge=1)
    ch: int = Field(160, ge=1)
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = Field(2, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    beta: float = 0.25
    quant_resi: float = 0.5
    share_quant_resi: int = Field(4, ge=0)
    using_znorm: bool = False
    using_sa: bool = True
    using_mid_sa: bool = True
    patch_nums: tuple[ScaleSide, ...] = _VAR_256_PATCH_NUMS

    @field_validator("ch_mult")
    @classmethod
    def _check_ch_mult(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(m < 1 for m in v):
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {v}")
        return v

    @field_validator("patch_nums")
    @classmethod
    def _check_patch_nums(cls, v: tuple[ScaleSide, ...]) -> tuple[ScaleSide, ...]:
        if not v:
            raise ValueError("patch_nums must name at least one scale")
        hws = [_as_hw(pn) for pn in v]
        if any(h < 1 or w < 1 for h, w in hws):
            raise ValueError(f"every scale side must be >= 1, got {v}")
        H, W = hws[-1]
        if any(h > H or w > W for h, w in hws):
            raise ValueError(f"no scale may exceed the last (latent) grid {H}x{W}, got {v}")
        return v

    @model_validator(mode="after")
    def _check_widths(self) -> TokenizerConfig:
        if any((self.ch * m) % 32 for m in self.ch_mult):
            raise ValueError(f"every width ch * m must be a multiple of 32 (GroupNorm(32)); "
                             f"ch={self.ch}, ch_mult={self.ch_mult}")
        return self

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each side: ``2 ** (len(ch_mult) - 1)``."""
        return 2 ** (len(self.ch_mult) - 1)

    def minimum_elements(self) -> int:
        """A lower bound on the parameter elements of :class:`MultiScaleVQVAE` built from this config:
        the codebook and the encoder's and decoder's resnet convs, counted without building anything."""
        return (self.vocab_size * self.z_channels + res_tower_elements(self.ch, self.ch_mult, self.num_res_blocks)
                + res_tower_elements(self.ch, self.ch_mult, self.num_res_blocks + 1))

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def scale_hws(self) -> list[tuple[int, int]]:
        """``[(h_s, w_s)]`` for every scale, small to large."""
        return [_as_hw(pn) for pn in self.patch_nums]

    @property
    def latent_hw(self) -> tuple[int, int]:
        """The last grid ``(H, W)``, which the encoder output must match."""
        return _as_hw(self.patch_nums[-1])

    @property
    def image_hw(self) -> tuple[int, int]:
        """Image size ``(H * downsample, W * downsample)`` in pixels that encodes to the latent grid."""
        H, W = self.latent_hw
        return H * self.downsample, W * self.downsample

    @property
    def token_count(self) -> int:
        """``L = sum_s h_s * w_s``."""
        return sum(h * w for h, w in self.scale_hws())



LLAMAGEN_VQ16_CODES = 16384
"""LlamaGen VQ-16's codebook: 16384 codes of 8 dimensions."""


def llamagen_vq16_sized(grid: ScaleSide) -> TokenizerConfig:
    """A one-scale tokenizer of LlamaGen VQ-16's size for raster models with random weights (timing):
    16384 codes of 8 dimensions, decoder width 128 x (1, 1, 2, 2, 4) with 3 res blocks per level and
    self-attention at the lowest resolution and in the middle, downsample 16, no phi (LlamaGen has
    none). VQ-16 itself feeds its decoder through an 8 -> 256 ``post_quant_conv``; here the decoder's
    first convolution reads the 8 code channels directly (LlamaGen's checkpoint format is not loaded)."""
    return TokenizerConfig(vocab_size=LLAMAGEN_VQ16_CODES, z_channels=8, ch=128, ch_mult=(1, 1, 2, 2, 4),
                           num_res_blocks=2, quant_resi=0.0, patch_nums=(grid,))

# --------------------------------------------------------------------------------------------------
# Phi (the residual-refinement conv applied to each scale's upsampled code map)
# --------------------------------------------------------------------------------------------------


def phi_ticks(k: int) -> np.ndarray:
    """Tick positions in ``[0, 1]`` of ``k`` phis (float64, computed exactly as the reference does)."""
    if k == 4:
        return np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k)
    return np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)


def phi_index(si: int, num_scales: int, k: int) -> int:
    """Index of the phi (out of ``k``) used at scale ``si`` of ``num_scales``: nearest tick to ``si/(S-1)``."""
    if not 0 <= si < num_scales:
        raise IndexError(f"scale index {si} out of range for {num_scales} scales")
    at = si / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(phi_ticks(k) - at)))


class Phi(nn.Conv2d):
    """``phi(h) = (1 - r) h + r conv3x3(h)`` on ``[B, C, H, W]`` with ``r = |quant_resi|``."""

    def __init__(self, channels: int, quant_resi: float) -> None:
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: Tensor) -> Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul(self.resi_ratio)


def _make_phi(channels: int, quant_resi: float) -> nn.Module:
    return Phi(channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()


class PhiShared(nn.Module):
    """One phi for every scale (``share_quant_resi == 1``); key ``qresi``."""

    def __init__(self, qresi: nn.Module) -> None:
        super().__init__()
        self.qresi = qresi

    def select(self, si: int, num_scales: int) -> nn.Module:
        if not 0 <= si < num_scales:
            raise IndexError(f"scale index {si} out of range for {num_scales} scales")
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """``K`` phis shared by nearest tick (``share_quant_resi == K >= 2``); keys ``qresi_ls.{k}``."""

    def __init__(self, qresi_ls: nn.ModuleList) -> None:
        super().__init__()
        self.qresi_ls = qresi_ls

    def select(self, si: int, num_scales: int) -> nn.Module:
        return self.qresi_ls[phi_index(si, num_scales, len(self.qresi_ls))]

    def extra_repr(self) -> str:
        return f"ticks={phi_ticks(len(self.qresi_ls)).tolist()}"


class PhiNonShared(nn.ModuleList):
    """One phi per scale of the configured schedule (``share_quant_resi == 0``); keys ``{k}``.

    With another number of scales the nearest-tick rule picks among the ``K`` phis.
    """

    def select(self, si: int, num_scales: int) -> nn.Module:
        return self[phi_index(si, num_scales, len(self))]

    def extra_repr(self) -> str:
        return f"ticks={phi_ticks(len(self)).tolist()}"


# --------------------------------------------------------------------------------------------------
# Quantizer container (the ``quantize.*`` keys)
# --------------------------------------------------------------------------------------------------


class MultiScaleQuantizer(nn.Module):
    """Holds the codebook ``embedding`` ``[V, C]``, the phis ``quant_resi`` and ``ema_vocab_hit_SV`` ``[S, V]``.

    The algorithms live in :class:`MultiScaleVQVAE`; this module only fixes the key layout
    (``quantize.ema_vocab_hit_SV``, ``quantize.quant_resi.*``, ``quantize.embedding.weight``).
    """

    def __init__(self, vocab_size: int, channels: int, num_scales: int, quant_resi: float,
                 share_quant_resi: int) -> None:
        super().__init__()
        self.vocab_size, self.channels = vocab_size, channels
        if share_quant_resi == 0:
            self.quant_resi: nn.Module = PhiNonShared([_make_phi(channels, quant_resi) for _ in range(num_scales)])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(_make_phi(channels, quant_resi))
        else:
            self.quant_resi = PhiPartiallyShared(
                nn.ModuleList([_make_phi(channels, quant_resi) for _ in range(share_quant_resi)]))
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(num_scales, vocab_size))
        self.embedding = nn.Embedding(vocab_size, channels)
        # Number of per-scale EMA updates so far (the reference counts scales, not steps).
        self.record_hit = 0

    def phi(self, si: int, num_scales: int) -> nn.Module:
        return self.quant_resi.select(si, num_scales)

    @torch.no_grad()
    def update_ema_hits(self, si: int, hit_V: Tensor) -> None:
        """EMA of per-scale code hit counts, with the reference schedule (copy, 0.9, then 0.99)."""
        row = self.ema_vocab_hit_SV[si]
        if self.record_hit == 0:
            row.copy_(hit_V)
        elif self.record_hit < 100:
            row.mul_(0.9).add_(hit_V.mul(0.1))
        else:
            row.mul_(0.99).add_(hit_V.mul(0.01))
        self.record_hit += 1


# --------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------


def _fp32_region(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Disable autocast on ``device`` (quantisation must run in the tensors' own precision)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # device type without autocast support
        return contextlib.nullcontext()


def _area(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """Area (average-pool) resize ``[B, C, H, W] -> [B, C, h, w]``; identity when the size already matches."""
    return x if tuple(x.shape[-2:]) == hw else F.interpolate(x, size=hw, mode="area")


class MultiScaleVQVAE(nn.Module):
    """VAR's multi-scale residual VQ-VAE: ``encoder -> quant_conv -> quantize -> post_quant_conv -> decoder``.

    Images are ``[B, 3, H_px, W_px]`` in ``[-1, 1]``; latents ``[B, C, H, W]``; per-scale indices are
    ``LongTensor[B, h_s * w_s]`` (row-major). Every method taking ``patch_nums`` uses the configured
    schedule when it is ``None``.
    """

    def __init__(self, config: TokenizerConfig | None = None) -> None:
        super().__init__()
        cfg = TokenizerConfig() if config is None else config
        self.config = cfg
        dd: dict[str, Any] = dict(
            ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, dropout=cfg.dropout,
            in_channels=3, z_channels=cfg.z_channels, using_sa=cfg.using_sa, using_mid_sa=cfg.using_mid_sa,
        )
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quantize = MultiScaleQuantizer(
            vocab_size=cfg.vocab_size, channels=cfg.z_channels, num_scales=cfg.num_scales,
            quant_resi=cfg.quant_resi, share_quant_resi=cfg.share_quant_resi,
        )
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=3, stride=1, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=3, stride=1, padding=1)

    # ----------------------------------------------------------------------------- helpers

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def z_channels(self) -> int:
        return self.config.z_channels

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def _hws(self, patch_nums: Sequence[ScaleSide] | None) -> list[tuple[int, int]]:
        if patch_nums is None:
            return self.config.scale_hws()
        hws = [_as_hw(pn) for pn in patch_nums]
        if not hws:
            raise ValueError("patch_nums must name at least one scale")
        return hws

    def phi(self, si: int, num_scales: int | None = None) -> nn.Module:
        """The phi applied to scale ``si`` when the schedule has ``num_scales`` (default: configured) scales."""
        return self.quantize.phi(si, self.config.num_scales if num_scales is None else num_scales)

    def embed(self, idx: Tensor, hw: tuple[int, int]) -> Tensor:
        """Code map of one scale: ``LongTensor[B, h*w]`` (or ``[B, h, w]``) -> ``Tensor[B, C, h, w]``."""
        B = idx.shape[0]
        h, w = hw
        if idx.numel() != B * h * w:
            raise ValueError(f"indices of shape {tuple(idx.shape)} do not fit a {h}x{w} scale")
        return self.quantize.embedding(idx.reshape(B, h * w)).transpose(1, 2).reshape(B, self.z_channels, h, w)

    def _contribution(self, si: int, num_scales: int, codes: Tensor, HW: tuple[int, int]) -> Tensor:
        """``phi_si(bicubic(codes -> (H, W)))``; no resize at the last scale. ``[B,C,h,w] -> [B,C,H,W]``."""
        if si != num_scales - 1:
            codes = F.interpolate(codes, size=HW, mode="bicubic")
        # Contiguous NCHW before the conv, as in the reference quantiser (conv rounding depends on layout).
        return self.phi(si, num_scales)(codes.contiguous())

    def _nearest(self, z_NC: Tensor, chunk_elems: int = 1 << 24) -> Tensor:
        """Nearest code of each row of ``z_NC`` ``[N, C]`` -> ``LongTensor[N]`` (L2, or cosine with znorm).

        Distances are computed in float32 as ``|z|^2 + |e|^2 - 2 z.e`` like the reference, in row
        chunks of about ``chunk_elems`` distance entries.
        """
        e = self.quantize.embedding.weight.detach().float()
        z_NC = z_NC.detach().float()
        rows = max(1, chunk_elems // max(1, e.shape[0]))
        out = []
        if self.config.using_znorm:
            e_n = F.normalize(e, dim=1)
            for z in z_NC.split(rows):
                out.append((F.normalize(z, dim=1) @ e_n.T).argmax(dim=1))
        else:
            e_sq = e.square().sum(dim=1)
            for z in z_NC.split(rows):
                d = z.square().sum(dim=1, keepdim=True) + e_sq
                out.append(torch.addmm(d, z, e.T, beta=1.0, alpha=-2.0).argmin(dim=1))
        return torch.cat(out) if out else z_NC.new_zeros(0, dtype=torch.long)

    def _check_latent(self, f: Tensor, hws: list[tuple[int, int]]) -> tuple[int, int]:
        HW = (int(f.shape[-2]), int(f.shape[-1]))
        if hws[-1] != HW:
            raise ValueError(f"the last scale {hws[-1]} must equal the latent grid {HW}")
        return HW

    # ----------------------------------------------------------------------------- image <-> latent

    def encode(self, img: Tensor) -> Tensor:
        """``[B, 3, H_px, W_px]`` in ``[-1, 1]`` -> continuous latent ``f`` ``[B, C, H, W]``."""
        return self.quant_conv(self.encoder(img))

    def fhat_to_img(self, f_hat: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> image ``[B, 3, H*d, W*d]`` clamped to ``[-1, 1]``."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    # ----------------------------------------------------------------------------- quantisation

    @torch.no_grad()
    def quantize_to_indices(self, f: Tensor, patch_nums: Sequence[ScaleSide] | None = None) -> list[Tensor]:
        """Greedy multi-scale residual quantisation of ``f`` ``[B, C, H, W]`` -> ``[LongTensor[B, h_s*w_s]]``.

        At scale ``s``: area-downsample the residual to ``(h_s, w_s)``, take the nearest code per cell,
        add ``phi_s(bicubic-upsample(code map))`` to ``f_hat`` and subtract it from the residual.
        """
        hws = self._hws(patch_nums)
        HW = self._check_latent(f, hws)
        S, B = len(hws), f.shape[0]
        with _fp32_region(f.device):
            f_rest = f.detach().clone()
            out: list[Tensor] = []
            for si, hw in enumerate(hws):
                z_NC = _area(f_rest, hw).permute(0, 2, 3, 1).reshape(-1, f.shape[1])
                idx = self._nearest(z_NC).reshape(B, hw[0] * hw[1])
                f_rest = f_rest - self._contribution(si, S, self.embed(idx, hw), HW)
                out.append(idx)
        return out

    @torch.no_grad()
    def img_to_indices(self, img: Tensor, patch_nums: Sequence[ScaleSide] | None = None) -> list[Tensor]:
        """``[B, 3, H_px, W_px]`` -> per-scale indices ``[LongTensor[B, h_s*w_s]]``."""
        return self.quantize_to_indices(self.encode(img), patch_nums)

    def scale_contributions(self, indices: Sequence[Tensor],
                            patch_nums: Sequence[ScaleSide] | None = None) -> list[Tensor]:
        """``phi_s(bicubic-upsample(embed(idx_s)))`` ``[B, C, H, W]`` for each given scale (a prefix is allowed).

        Their running sum is the partial ``f_hat``; the sum over all scales is ``f_hat``.
        """
        hws = self._hws(patch_nums)
        if not 1 <= len(indices) <= len(hws):
            raise ValueError(f"got indices for {len(indices)} scales, the schedule has {len(hws)}")
        S = len(hws)
        return [self._contribution(si, S, self.embed(idx, hws[si]), hws[-1]) for si, idx in enumerate(indices)]

    def indices_to_fhat(self, indices: Sequence[Tensor], patch_nums: Sequence[ScaleSide] | None = None) -> Tensor:
        """Sum of :meth:`scale_contributions` -> ``f_hat`` ``[B, C, H, W]`` (partial when given a prefix)."""
        contribs = self.scale_contributions(indices, patch_nums)
        f_hat = torch.zeros_like(contribs[0])
        for c in contribs:
            f_hat = f_hat + c
        return f_hat

    def next_input(self, si: int, f_hat: Tensor, codes: Tensor,
                   patch_nums: Sequence[ScaleSide] | None = None) -> tuple[Tensor, Tensor]:
        """Inference step after sampling scale ``si`` (``get_next_autoregressive_input``, non-mutating).

        ``f_hat`` ``[B, C, H, W]``, ``codes`` ``[B, C, h_si, w_si]`` (the sampled code embeddings).
        Returns ``(f_hat + phi_si(upsample(codes)), next_map)`` where ``next_map`` is the new ``f_hat``
        area-downsampled to scale ``si + 1``'s grid ``[B, C, h_{si+1}, w_{si+1}]``, or the new
        ``f_hat`` itself at the last scale.
        """
        hws = self._hws(patch_nums)
        HW = self._check_latent(f_hat, hws)
        S = len(hws)
        if not 0 <= si < S:
            raise IndexError(f"scale index {si} out of range for {S} scales")
        if tuple(codes.shape[-2:]) != hws[si]:
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not match scale {si} grid {hws[si]}")
        f_new = f_hat + self._contribution(si, S, codes, HW)
        return f_new, (f_new if si == S - 1 else _area(f_new, hws[si + 1]))

    def indices_to_var_input(self, indices: Sequence[Tensor],
                             patch_nums: Sequence[ScaleSide] | None = None) -> Tensor | None:
        """Teacher-forcing input of VAR (``idxBl_to_var_input``): ``[B, L - h_0*w_0, C]`` or ``None`` if ``S == 1``.

        For ``s = 1 .. S-1`` the partial ``f_hat`` of scales ``< s`` is area-downsampled to
        ``(h_s, w_s)`` and flattened row-major; the blocks are concatenated along tokens. Only the
        first ``S - 1`` index tensors are used (passing all ``S`` is fine).
        """
        hws = self._hws(patch_nums)
        S = len(hws)
        if len(indices) < S - 1:
            raise ValueError(f"need indices for at least {S - 1} scales, got {len(indices)}")
        if S == 1:
            return None
        idx0 = indices[0]
        f_hat = torch.zeros(idx0.shape[0], self.z_channels, *hws[-1], device=idx0.device,
                            dtype=self.quantize.embedding.weight.dtype)
        blocks: list[Tensor] = []
        for si in range(S - 1):
            f_hat, nxt = self.next_input(si, f_hat, self.embed(indices[si], hws[si]), hws)
            blocks.append(nxt.flatten(2).transpose(1, 2))
        return torch.cat(blocks, dim=1)

    def indices_to_img(self, indices: Sequence[Tensor], patch_nums: Sequence[ScaleSide] | None = None) -> Tensor:
        """Per-scale indices -> image ``[B, 3, H*d, W*d]`` in ``[-1, 1]``."""
        return self.fhat_to_img(self.indices_to_fhat(indices, patch_nums))

    # ----------------------------------------------------------------------------- training

    def forward(self, img: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tokenizer training step: ``img`` ``[B, 3, H_px, W_px]`` -> ``(recon, vq_loss, usage)``.

        ``recon`` ``[B, 3, H_px, W_px]`` is the (unclamped) decoder output of the straight-through
        ``f_hat``; ``vq_loss`` is ``mean_s [beta * mse(f_hat_s.detach(), f) + mse(f_hat_s, f.detach())]``
        with ``f_hat_s`` the partial sum after scale ``s``; ``usage`` (0-dim, no grad) is the fraction
        of the vocabulary hit at least once in this batch over all scales. In training mode the
        per-scale ``ema_vocab_hit_SV`` is updated (hit counts all-reduced when torch.distributed is
        initialised).
        """
        f = self.encode(img)
        hws = self.config.scale_hws()
        HW = self._check_latent(f, hws)
        S, (B, C) = len(hws), f.shape[:2]
        V = self.vocab_size
        with _fp32_region(f.device):
            f32 = f.float()
            f_no_grad = f32.detach()
            f_rest = f_no_grad.clone()
            f_hat = torch.zeros_like(f_no_grad)
            vocab_hit_V = torch.zeros(V, dtype=torch.float32, device=f.device)
            vq_loss = f32.new_zeros(())
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            for si, hw in enumerate(hws):
                z_NC = _area(f_rest, hw).permute(0, 2, 3, 1).reshape(-1, C)
                idx = self._nearest(z_NC)
                hit_V = idx.bincount(minlength=V).float()
                if self.training and distributed:
                    torch.distributed.all_reduce(hit_V)
                h = self._contribution(si, S, self.embed(idx.reshape(B, -1), hw), HW)
                f_hat = f_hat + h
                f_rest = f_rest - h.detach()
                if self.training:
                    self.quantize.update_ema_hits(si, hit_V)
                vocab_hit_V += hit_V
                vq_loss = vq_loss + self.config.beta * F.mse_loss(f_hat.detach(), f32) + F.mse_loss(f_hat, f_no_grad)
            vq_loss = vq_loss / S
            f_hat_st = (f_hat.detach() - f_no_grad) + f32  # value f_hat, gradient to the encoder
        recon = self.decoder(self.post_quant_conv(f_hat_st.to(f.dtype)))
        usage = (vocab_hit_V > 0).float().mean()
        return recon, vq_loss, usage

    # ----------------------------------------------------------------------------- loading

    def load_state_dict(  # type: ignore[override]
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """As ``nn.Module.load_state_dict``, but an ``ema_vocab_hit_SV`` with another scale count keeps ours."""
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and tuple(state_dict[key].shape) != tuple(self.quantize.ema_vocab_hit_SV.shape):
            state_dict = dict(state_dict)
            state_dict[key] = self.quantize.ema_vocab_hit_SV.detach().clone()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
