"""LlamaGen's VQ-16 image tokenizer (``VQ_16`` of ``tokenizer/tokenizer_image/vq_model.py``).

The module tree (and therefore every state-dict key, shape and dtype, in order) matches the released
``vq_ds16_c2i.pt`` (weights under ``checkpoint['model']``) for the default :class:`LlamaGenVQConfig`:
``encoder.*``, ``decoder.*``, ``quantize.codebook_used`` (LlamaGen's usage buffer, 65536 floats),
``quantize.embedding.weight`` (``[16384, 8]``), ``quant_conv.*`` (1x1, 256 -> 8) and
``post_quant_conv.*`` (1x1, 8 -> 256).

Forward passes follow the reference:

- ``GroupNorm(32, eps=1e-6)`` then swish (``x * sigmoid(x)``, computed as ``F.silu``);
- res blocks are pre-norm with a 1x1 ``nin_shortcut`` only where the width changes;
- downsampling zero-pads right and bottom by one pixel, then a 3x3 stride-2 conv without padding;
  upsampling is nearest 2x then a 3x3 conv;
- attention (single head, separate 1x1 ``q``, ``k``, ``v``, ``proj_out``, logits scaled by
  ``1/sqrt(C)``) follows every res block of the lowest-resolution level (``encoder.conv_blocks.{n-1}``,
  ``num_res_blocks`` of them; ``decoder.conv_blocks.0``, ``num_res_blocks + 1``) and sits between
  the two res blocks of ``mid`` (``mid.0``, ``mid.1`` = attention, ``mid.2``);
- the encoder runs ``conv_in``, its levels, ``mid``, ``norm_out`` + swish, ``conv_out``; the decoder
  ``conv_in``, ``mid``, its levels (widest first), ``norm_out`` + swish, ``conv_out`` (no clamp, no
  tanh: LlamaGen's samplers clamp when they save images);
- quantisation (``VectorQuantizer`` with ``l2_norm=True``): the latent ``quant_conv(encoder(x))``
  and the codebook are both ``F.normalize``-d, the code is ``argmin |z|^2 + |e|^2 - 2 z.e`` (the
  nearest by cosine similarity), ties to the lowest index;
- decoding (``decode_code`` / ``get_codebook_entry``): the *normalised* codebook rows of the tokens,
  reshaped to ``[B, codebook_dim, h, w]``, then ``decoder(post_quant_conv(.))``.

Layouts: images ``[B, 3, H, W]`` in ``[-1, 1]``; latents ``[B, codebook_dim, h, w]`` with
``(h, w) = (H / d, W / d)``, ``d = 2 ** (len(ch_mult) - 1)`` (16 for VQ-16: 24 x 24 tokens at 384px);
tokens ``LongTensor[B, h * w]`` row-major (token ``r * w + c`` is latent cell ``(r, c)``).

Not ported: the training losses (commitment, entropy) and the update of ``codebook_used`` in
training mode; :meth:`LlamaGenVQ.forward` returns the straight-through reconstruction and tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from . import banded_decode
from .vae_blocks import Downsample2x, ResnetBlock, Upsample2x, res_tower_elements

__all__ = [
    "LlamaGenVQConfig",
    "LlamaGenVQ",
    "LlamaGenEncoder",
    "LlamaGenDecoder",
    "LlamaGenQuantizer",
    "LlamaGenAttnBlock",
    "nearest_code",
    "infer_llamagen_vq_config",
    "is_llamagen_vq_state",
]

_GROUPS = 32
"""GroupNorm groups of every normalisation (LlamaGen's ``Normalize``); every width must divide."""


class LlamaGenVQConfig(BaseModel):
    """Hyper-parameters of LlamaGen's ``VQModel``; the defaults are ``VQ_16`` (``vq_ds16_c2i.pt``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    codebook_size: int = Field(16384, ge=1)
    codebook_dim: int = Field(8, ge=1)
    z_channels: int = Field(256, ge=1)
    ch: int = Field(128, ge=1)
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] | None = Field(None, description="None: the same as ch_mult")
    num_res_blocks: int = Field(2, ge=1, description="per encoder level; the decoder has one more")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    in_channels: int = Field(3, ge=1)
    out_channels: int = Field(3, ge=1)
    l2_norm: bool = Field(True, description="cosine-similarity codebook (LlamaGen's codebook_l2_norm)")
    usage_buffer: int = Field(65536, ge=0, description="length of quantize.codebook_used (0: no such buffer)")

    @model_validator(mode="after")
    def _check(self) -> "LlamaGenVQConfig":
        dec = self.dec_ch_mult
        if not self.ch_mult or len(dec) != len(self.ch_mult):
            raise ValueError(f"ch_mult {self.ch_mult} and decoder_ch_mult {dec} must be non-empty and of one length "
                             f"(the encoder's downsampling must match the decoder's upsampling)")
        bad = [m for m in self.ch_mult + dec if m < 1 or (self.ch * m) % _GROUPS]
        if self.ch % _GROUPS or bad:
            raise ValueError(f"every width ch * m must be a positive multiple of {_GROUPS} (GroupNorm groups); "
                             f"ch={self.ch}, ch_mult={self.ch_mult}, decoder_ch_mult={dec}")
        return self

    @property
    def dec_ch_mult(self) -> tuple[int, ...]:
        return self.ch_mult if self.decoder_ch_mult is None else self.decoder_ch_mult

    @property
    def downsample(self) -> int:
        """Pixels per token side: ``2 ** (len(ch_mult) - 1)`` (16 for VQ-16)."""
        return 2 ** (len(self.ch_mult) - 1)

    def minimum_elements(self) -> int:
        """A lower bound on the parameter elements of :class:`LlamaGenVQ` built from this config: the
        codebook and the encoder's and decoder's resnet convs, counted without building anything."""
        return (self.codebook_size * self.codebook_dim + res_tower_elements(self.ch, self.ch_mult, self.num_res_blocks)
                + res_tower_elements(self.ch, self.dec_ch_mult, self.num_res_blocks + 1))

    @property
    def vocab_size(self) -> int:
        return self.codebook_size

    @classmethod
    def vq_16(cls, **overrides: Any) -> "LlamaGenVQConfig":
        """LlamaGen ``VQ_16``: 16384 x 8 codes, ch 128, ch_mult (1, 1, 2, 2, 4), z_channels 256."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "LlamaGenVQConfig":
        """A small random-weight layout for tests: ch 32, ch_mult (1, 2), 64 x 4 codes, 2 px a token."""
        values: dict[str, Any] = dict(codebook_size=64, codebook_dim=4, z_channels=16, ch=32, ch_mult=(1, 2),
                                      num_res_blocks=1, usage_buffer=16)
        values.update(overrides)
        return cls(**values)


def _swish_norm(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    return F.silu(norm(x))


class LlamaGenAttnBlock(nn.Module):
    """Single-head spatial self-attention with residual, ``[B, C, H, W] -> [B, C, H, W]``.

    ``x + proj_out(attend(q, k, v))`` with ``q, k, v`` separate 1x1 convs of ``norm(x)``; logits
    ``<q_i, k_j> / sqrt(C)`` over the ``H*W`` positions (row-major), softmax over keys ``j``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_GROUPS, channels, eps=1e-6, affine=True)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, C, H * W)
        k = self.k(h).reshape(B, C, H * W)
        v = self.v(h).reshape(B, C, H * W)
        attn = torch.bmm(q.transpose(1, 2), k).mul(C ** -0.5).softmax(dim=2)  # [B, HW_q, HW_k]
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(B, C, H, W)  # out[:, :, i] = sum_j attn[i, j] v_j
        return x + self.proj_out(out)


class _Level(nn.Module):
    """One resolution level: ``res`` (res blocks), ``attn`` (empty, or one after each res block) and,
    registered by the owner, ``downsample`` (encoder) or ``upsample`` (decoder)."""

    def __init__(self, block_in: int, block_out: int, blocks: int, attention: bool, dropout: float) -> None:
        """``blocks`` res blocks from ``block_in`` to ``block_out`` channels, with an attention
        block after each when ``attention``."""
        super().__init__()
        res: list[nn.Module] = []
        attn: list[nn.Module] = []
        for i in range(blocks):  # built in this order, so a seeded initialisation stays the same
            res.append(ResnetBlock(block_in if i == 0 else block_out, block_out, dropout))
            if attention:
                attn.append(LlamaGenAttnBlock(block_out))
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)

    def run(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


def _mid(channels: int, dropout: float) -> nn.ModuleList:
    """``mid.0`` res block, ``mid.1`` attention, ``mid.2`` res block (run in order)."""
    return nn.ModuleList([ResnetBlock(channels, channels, dropout), LlamaGenAttnBlock(channels),
                          ResnetBlock(channels, channels, dropout)])


class LlamaGenEncoder(nn.Module):
    """Image ``[B, in_channels, H, W]`` -> ``[B, z_channels, H / d, W / d]``, ``d = 2 ** (len(ch_mult) - 1)``.

    Level ``i`` (``conv_blocks.{i}``): ``num_res_blocks`` res blocks to width ``ch * ch_mult[i]``
    (attention after each at the last level), then ``downsample`` except at the last level.
    """

    def __init__(self, *, in_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, dropout: float = 0.0, z_channels: int = 256) -> None:
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for i_level, mult in enumerate(ch_mult):
            level = _Level(block_in, ch * mult, num_res_blocks, i_level == n - 1, dropout)
            block_in = ch * mult
            if i_level != n - 1:
                level.downsample = Downsample2x(block_in)
            self.conv_blocks.append(level)
        self.mid = _mid(block_in, dropout)
        self.norm_out = nn.GroupNorm(_GROUPS, block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish_norm(self.norm_out, h))


class LlamaGenDecoder(nn.Module):
    """``[B, z_channels, h, w]`` -> image ``[B, out_channels, h * d, w * d]`` (not clamped).

    ``conv_blocks.{j}`` is level ``i = n - 1 - j`` (widest first): ``num_res_blocks + 1`` res blocks
    to width ``ch * ch_mult[i]`` (attention after each for ``j == 0``), then ``upsample`` except for
    ``j == n - 1``. Without autograd, levels without attention whose maps are large run banded
    (:mod:`.banded_decode`: the same result up to rounding, about half the peak memory).
    """

    def __init__(self, *, z_channels: int = 256, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, dropout: float = 0.0, out_channels: int = 3) -> None:
        super().__init__()
        n = len(ch_mult)
        self.dropout = dropout
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid(block_in, dropout)
        self.conv_blocks = nn.ModuleList()
        for i_level in reversed(range(n)):
            level = _Level(block_in, ch * ch_mult[i_level], num_res_blocks + 1, i_level == n - 1, dropout)
            block_in = ch * ch_mult[i_level]
            if i_level != 0:
                level.upsample = Upsample2x(block_in)
            self.conv_blocks.append(level)
        self.norm_out = nn.GroupNorm(_GROUPS, block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        lean = not torch.is_grad_enabled() and (not self.training or self.dropout == 0.0)
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            if lean and len(level.attn) == 0 and banded_decode.worth_banding(h):
                h = h.contiguous()
                for block in level.res:
                    h = banded_decode.resnet_block(block, h)  # h is ours: may be updated in place
                if hasattr(level, "upsample"):
                    h = banded_decode.upsample(level.upsample, h)
                continue
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        if lean and banded_decode.worth_banding(h):
            return banded_decode.norm_silu_conv(self.norm_out, self.conv_out, h)
        return self.conv_out(_swish_norm(self.norm_out, h))


def nearest_code(z: Tensor, codebook: Tensor, *, l2_norm: bool = True, max_elements: int = 2 ** 24) -> Tensor:
    """Index of the nearest codebook row for each row of ``z``: ``z [N, D]``, ``codebook [V, D]`` ->
    ``LongTensor[N]``.

    LlamaGen's rule: with ``l2_norm`` both sides are ``F.normalize``-d (so the nearest is the most
    cosine-similar), then ``argmin_j |z|^2 + |e_j|^2 - 2 z.e_j`` (first index on ties). Computed in
    float32 (autocast off), ``max_elements`` distances at a time.
    """
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"need z [N, D] and codebook [V, D], got {tuple(z.shape)} and {tuple(codebook.shape)}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.float()
        e = codebook.to(device=z.device, dtype=torch.float32)
        if l2_norm:
            z = F.normalize(z, p=2, dim=-1)
            e = F.normalize(e, p=2, dim=-1)
        e_sq = e.square().sum(dim=1)
        rows = max(1, max_elements // max(e.shape[0], 1))
        out = [(zc.square().sum(dim=1, keepdim=True) + e_sq - 2 * (zc @ e.T)).argmin(dim=1) for zc in z.split(rows)]
    return torch.cat(out) if out else z.new_zeros(0, dtype=torch.long)


class LlamaGenQuantizer(nn.Module):
    """LlamaGen's ``VectorQuantizer`` at inference: ``embedding`` ``[V, D]`` and the (unused here)
    ``codebook_used`` buffer that the released files carry."""

    def __init__(self, codebook_size: int, codebook_dim: int, *, l2_norm: bool = True, usage_buffer: int = 65536) -> None:
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        if usage_buffer:
            self.register_buffer("codebook_used", torch.zeros(usage_buffer))

    def lookup(self, z: Tensor) -> Tensor:
        """``z [B, D, h, w]`` -> nearest codes ``LongTensor[B, h * w]`` (row-major)."""
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(B * h * w, D)
        return nearest_code(flat, self.embedding.weight, l2_norm=self.l2_norm).view(B, h * w)

    def entries(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``tokens LongTensor[B, h * w]`` -> codebook rows (normalised when ``l2_norm``) ``[B, D, h, w]``."""
        h, w = grid
        z = self.embedding(tokens)  # [B, h*w, D]
        if self.l2_norm:  # normalising the gathered rows = gathering the normalised codebook's rows
            z = F.normalize(z, p=2, dim=-1)
        return z.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``z [B, D, h, w]`` -> (``z_q [B, D, h, w]`` with straight-through gradient to ``z``
        (normalised when ``l2_norm``), tokens ``LongTensor[B, h * w]``)."""
        B, D, h, w = z.shape
        tokens = self.lookup(z.detach())
        z_q = self.entries(tokens, (h, w)).to(z.dtype)
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=1)
        return z + (z_q - z).detach(), tokens


class LlamaGenVQ(nn.Module):
    """LlamaGen's ``VQModel``: ``encoder``, ``decoder``, ``quantize``, ``quant_conv``, ``post_quant_conv``."""

    def __init__(self, config: LlamaGenVQConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or LlamaGenVQConfig()
        self.encoder = LlamaGenEncoder(in_channels=config.in_channels, ch=config.ch, ch_mult=config.ch_mult,
                                       num_res_blocks=config.num_res_blocks, dropout=config.dropout,
                                       z_channels=config.z_channels)
        self.decoder = LlamaGenDecoder(z_channels=config.z_channels, ch=config.ch, ch_mult=config.dec_ch_mult,
                                       num_res_blocks=config.num_res_blocks, dropout=config.dropout,
                                       out_channels=config.out_channels)
        self.quantize = LlamaGenQuantizer(config.codebook_size, config.codebook_dim, l2_norm=config.l2_norm,
                                          usage_buffer=config.usage_buffer)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, kernel_size=1)

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` token grid of an ``height x width`` image (both must be multiples of ``downsample``)."""
        d = self.config.downsample
        if height % d or width % d or height < d or width < d:
            raise ValueError(f"image size {height}x{width} must be a positive multiple of {d} (pixels per token)")
        return height // d, width // d

    def _weight_like(self) -> Tensor:
        return self.quant_conv.weight

    def encode_latents(self, img: Tensor) -> Tensor:
        """``img [B, in_channels, H, W]`` in ``[-1, 1]`` -> ``quant_conv(encoder(img))`` ``[B, D, h, w]``
        (not normalised)."""
        if img.ndim != 4 or img.shape[1] != self.config.in_channels:
            raise ValueError(f"need images [B, {self.config.in_channels}, H, W], got {tuple(img.shape)}")
        self.token_grid(int(img.shape[2]), int(img.shape[3]))
        weight = self._weight_like()
        return self.quant_conv(self.encoder(img.to(device=weight.device, dtype=weight.dtype)))

    @torch.no_grad()
    def encode_to_tokens(self, img: Tensor) -> Tensor:
        """``img [B, in_channels, H, W]`` in ``[-1, 1]`` -> ``LongTensor[B, (H / d) * (W / d)]`` row-major."""
        return self.quantize.lookup(self.encode_latents(img))

    def decode_latents(self, z_q: Tensor) -> Tensor:
        """Quantised latents ``[B, D, h, w]`` -> images ``[B, out_channels, h * d, w * d]`` (not clamped)."""
        return self.decoder(self.post_quant_conv(z_q))

    def tokens_to_latents(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``tokens LongTensor[B, h * w]`` -> codebook entries ``[B, D, h, w]`` (normalised when ``l2_norm``)."""
        h, w = int(grid[0]), int(grid[1])
        if tokens.ndim != 2 or tokens.shape[1] != h * w or h < 1 or w < 1:
            raise ValueError(f"need tokens [B, {h * w}] for the grid {h}x{w}, got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{int(tokens.min())}, "
                             f"{int(tokens.max())}]")
        weight = self._weight_like()
        return self.quantize.entries(tokens.to(device=weight.device, dtype=torch.long), (h, w))

    @torch.no_grad()
    def decode_tokens(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``tokens LongTensor[B, h * w]`` (row-major over ``grid = (h, w)``) -> images
        ``[B, out_channels, h * d, w * d]``, nominally in ``[-1, 1]`` (not clamped, as the reference)."""
        return self.decode_latents(self.tokens_to_latents(tokens, grid))

    def forward(self, img: Tensor) -> tuple[Tensor, Tensor]:
        """``img [B, in_channels, H, W]`` -> (reconstruction ``[B, out_channels, H, W]`` through the
        straight-through quantiser, tokens ``LongTensor[B, h * w]``)."""
        z_q, tokens = self.quantize(self.encode_latents(img))
        return self.decode_latents(z_q), tokens

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], *, strict: bool = True, **overrides: Any) -> "LlamaGenVQ":
        """A model whose layout is read off ``state`` (see :func:`infer_llamagen_vq_config`), weights loaded."""
        model = cls(infer_llamagen_vq_config(state, **overrides))
        model.load_state_dict(dict(state), strict=strict)
        return model.eval()


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in (value.shape if hasattr(value, "shape") else value))


def _count(shapes: Mapping[str, Any], prefix: str) -> int:
    """``1 + max i`` over keys ``{prefix}{i}.*`` (0 when there are none)."""
    found = [int(k[len(prefix):].split(".", 1)[0]) for k in shapes
             if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()]
    return 1 + max(found, default=-1)


def infer_llamagen_vq_config(shapes: Mapping[str, Any], **overrides: Any) -> LlamaGenVQConfig:
    """The layout of a LlamaGen VQ state dict, from its keys and shapes (``torch.Size``, tuples or
    tensors). ``l2_norm`` and ``dropout`` are not recorded in a file: they keep their defaults unless
    overridden."""
    if not is_llamagen_vq_state(shapes):
        raise KeyError("not a LlamaGen VQ state dict: expected quantize.embedding.weight, quant_conv.weight, "
                       "post_quant_conv.weight, encoder.conv_blocks.* and decoder.conv_blocks.*")
    try:
        codebook_size, codebook_dim = _shape(shapes["quantize.embedding.weight"])
        ch, in_channels = _shape(shapes["encoder.conv_in.weight"])[:2]
        z_channels = _shape(shapes["encoder.conv_out.weight"])[0]
        out_channels = _shape(shapes["decoder.conv_out.weight"])[0]
        n_enc = _count(shapes, "encoder.conv_blocks.")
        n_dec = _count(shapes, "decoder.conv_blocks.")
        num_res_blocks = _count(shapes, "encoder.conv_blocks.0.res.")
        ch_mult = tuple(_shape(shapes[f"encoder.conv_blocks.{i}.res.0.conv1.weight"])[0] // ch for i in range(n_enc))
        dec_ch_mult = tuple(_shape(shapes[f"decoder.conv_blocks.{j}.res.0.conv1.weight"])[0] // ch
                            for j in reversed(range(n_dec)))
    except KeyError as error:
        raise KeyError(f"LlamaGen VQ state dict without {error.args[0]!r}") from None
    if _count(shapes, "decoder.conv_blocks.0.res.") != num_res_blocks + 1:
        raise KeyError(f"decoder levels have {_count(shapes, 'decoder.conv_blocks.0.res.')} res blocks, expected "
                       f"{num_res_blocks + 1} (one more than the encoder's {num_res_blocks})")
    usage = shapes.get("quantize.codebook_used")
    values: dict[str, Any] = dict(
        codebook_size=codebook_size, codebook_dim=codebook_dim, z_channels=z_channels, ch=ch, ch_mult=ch_mult,
        decoder_ch_mult=None if dec_ch_mult == ch_mult else dec_ch_mult, num_res_blocks=num_res_blocks,
        in_channels=in_channels, out_channels=out_channels, usage_buffer=_shape(usage)[0] if usage is not None else 0)
    values.update(overrides)
    return LlamaGenVQConfig(**values)


def is_llamagen_vq_state(keys: Iterable[str] | Mapping[str, Any]) -> bool:
    """Whether ``keys`` (or a state dict's keys) have LlamaGen's VQ layout: ``quantize.embedding.weight``,
    ``quant_conv.weight``, ``post_quant_conv.weight`` and ``encoder.conv_blocks.*`` / ``decoder.conv_blocks.*``
    (VAR's VQ-VAE has the first three but ``encoder.down.*``; a GPT file has none)."""
    keys = set(keys)
    required = {"quantize.embedding.weight", "quant_conv.weight", "post_quant_conv.weight"}
    return (required <= keys and any(k.startswith("encoder.conv_blocks.") for k in keys)
            and any(k.startswith("decoder.conv_blocks.") for k in keys))
