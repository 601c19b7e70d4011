"""The VAR transformer, key- and shape-compatible with the released ``var_d*.pth`` and MVAR files.

Token layout: a sequence of ``L = sum(h_s * w_s)`` tokens, scales concatenated in order, each map
row-major. Hidden states are ``[B, l, C]``; the class condition ``cond`` is ``[B, C]``. Attention
itself is delegated to an ``attend(layer, q, k, v) -> out`` callback (``q, k, v: [B, H, l, D]``,
``out: [B, H, l, D]``) so that the engine can insert the trajectory, pattern, cache and backend.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..core.errors import ArchitectureError, setting
from ..core.layout import SequenceLayout, normalize_grids

AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


class VARConfig(BaseModel):
    """Architecture of a VAR transformer; ``depth`` alone gives VAR's published sizes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: int = Field(16, ge=1)
    embed_dim: int | None = Field(None, ge=1, description="width C; default 64 * depth")
    num_heads: int | None = Field(None, ge=1, description="default depth (head_dim 64)")
    mlp_ratio: float = Field(4.0, gt=0)
    num_classes: int = Field(1000, ge=1)
    vocab_size: int = Field(4096, ge=2)
    z_channels: int = Field(32, ge=1, description="Cvae: the tokenizer's code dimension")
    patch_nums: tuple[int | tuple[int, int], ...] = PATCH_NUMS_256
    norm_eps: float = 1e-6
    attn_l2_norm: bool = True

    @property
    def width(self) -> int:
        return self.embed_dim or 64 * self.depth

    @property
    def heads(self) -> int:
        return self.num_heads or self.depth

    @property
    def layout(self) -> SequenceLayout:
        return SequenceLayout(normalize_grids(self.patch_nums))

    def minimum_elements(self) -> int:
        """A lower bound on the parameter and buffer elements of :class:`VAR` built from this config:
        its blocks' matrices, the position table, the ``[L, L]`` attention mask and the head, counted
        without building anything (so an absurd size is refused in microseconds)."""
        c, length = self.width, sum(h * w for h, w in normalize_grids(self.patch_nums))
        block = 4 * c * c + 2 * c * round(c * self.mlp_ratio) + 6 * c * c  # attention, FFN, AdaLN
        return self.depth * block + length * c + length * length + c * self.vocab_size


class SelfAttention(nn.Module):
    """VAR's attention projections: ``mat_qkv`` (no bias) plus learned q/v biases and a zero k bias;
    with ``attn_l2_norm`` q and k are L2-normalised and q is scaled by exp(clamp(scale_mul, log 100))."""

    def __init__(self, width: int, heads: int, attn_l2_norm: bool = True) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, width // heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def qkv(self, x: torch.Tensor, heads: tuple[int, int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x: [B, l, C]`` -> q, k, v each ``[B, H, l, D]`` (q already scaled for ``self.scale``);
        ``heads=(first, stop)``: only those heads, ``[B, stop - first, l, D]``.

        The three projections are computed one at a time from the rows of ``mat_qkv`` (the same
        product as one ``[3C, C]`` GEMM), and q, k are normalised in place when no graph is
        recorded, so that no ``[B, l, 3C]`` buffer outlives the call (at VAR-d16's last scale with
        batch 32 and CFG that buffer alone is 192 MiB)."""
        b, l, c = x.shape
        weight = self.mat_qkv.weight
        d = self.head_dim
        first, stop = heads or (0, self.heads)
        rows = slice(first * d, stop * d)

        def project(part: int, bias: torch.Tensor | None) -> torch.Tensor:
            out = F.linear(x, weight[part * c:(part + 1) * c][rows], None if bias is None else bias[rows])
            return out.view(b, l, stop - first, d).transpose(1, 2)

        q, k, v = project(0, self.q_bias), project(1, None), project(2, self.v_bias)
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11[:, first:stop].clamp_max(self.max_scale_mul).exp()
            if torch.is_grad_enabled():
                # the float32 scale would promote a 16-bit q under autocast: keep q in k and v's dtype
                q, k = F.normalize(q, dim=-1).mul(scale_mul).to(v.dtype), F.normalize(k, dim=-1)
            else:
                q = q.div_(q.norm(dim=-1, keepdim=True).clamp_min_(1e-12)).mul_(scale_mul)
                k = k.div_(k.norm(dim=-1, keepdim=True).clamp_min_(1e-12))
        return q, k, v

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """``o: [B, H, l, D]`` -> ``[B, l, C]`` through the output projection."""
        b, h, l, d = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, l, h * d))

    def head_groups(self, x: torch.Tensor) -> list[tuple[int, int]]:
        """Head ranges whose q, k and v together stay within :data:`QKV_CHUNK_BYTES` for ``x: [B, l, C]``."""
        per_head = 3 * x.shape[0] * x.shape[1] * self.head_dim * x.element_size()
        size = max(1, min(self.heads, QKV_CHUNK_BYTES // per_head))
        return [(first, min(first + size, self.heads)) for first in range(0, self.heads, size)]

    def attend_by_heads(self, x: torch.Tensor, attend: Callable, groups: list[tuple[int, int]]) -> torch.Tensor:
        """Attention of ``x: [B, l, C]`` one head group at a time (inference; ``attend`` must treat
        heads independently, as every uncached pattern does) -> ``[B, l, C]`` after the projection.
        Only one group's q, k and v exist at a time; outputs go to one token-major buffer."""
        b, l, c = x.shape
        o = None
        for first, stop in groups:
            q, k, v = self.qkv(x, (first, stop))
            part = attend(q, k, v, self.scale)  # [B, g, l, D]
            del q, k, v
            if o is None:
                o = part.new_empty(b, l, self.heads, self.head_dim)
            o[:, :, first:stop] = part.transpose(1, 2)
            del part
        del x
        return self.proj(o.view(b, l, c))


QKV_CHUNK_BYTES = 48 * 2**20
"""Inference with head-independent attention (no KV cache): most bytes of q, k and v alive at once;
larger maps are projected and attended a group of heads at a time (:meth:`SelfAttention.attend_by_heads`).
At VAR-d16's last 512px scale with batch 8 and CFG, q, k and v of all heads are 192 MiB."""

FFN_CHUNK_BYTES = 32 * 2**20
"""Inference only: bytes of one chunk of FFN hidden activations (``tokens x 4C``; fc1's output and
GELU's exist together, so twice this is alive). Without it the two ``[tokens, 4C]`` tensors set a
block's peak (512 MiB at VAR-d16's last scale with batch 32 and CFG)."""


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

    def forward(self, x: torch.Tensor, *, overwrite_input: bool = False) -> torch.Tensor:
        """``x: [..., C]`` -> ``[..., C]``; without autograd, in chunks of tokens (each token is
        independent) so that at most :data:`FFN_CHUNK_BYTES` of hidden activations exist.
        ``overwrite_input``: the caller gives up ``x``; chunked outputs are written over its rows
        (when dtype and width allow) instead of into a new buffer."""
        width = x.shape[-1]
        tokens = x.numel() // width
        per_chunk = max(1, FFN_CHUNK_BYTES // (self.fc1.out_features * x.element_size()))
        if torch.is_grad_enabled() or tokens <= per_chunk:
            return self._mlp(x)
        flat = x.reshape(tokens, width)
        first = self._mlp(flat[:per_chunk])  # its dtype is the output's (autocast may change it)
        reuse = overwrite_input and x.is_contiguous() and first.dtype == x.dtype and first.shape[-1] == width
        out = flat if reuse else first.new_empty(tokens, self.fc2.out_features)
        out[:per_chunk] = first
        for start in range(per_chunk, tokens, per_chunk):
            out[start:start + per_chunk] = self._mlp(flat[start:start + per_chunk])
        return out.view(*x.shape[:-1], self.fc2.out_features)


class AdaLNSelfAttn(nn.Module):
    """``x += attn(ln(x) * (1 + scale1) + shift1) * gamma1``; same for the FFN with the second set."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, norm_eps: float, attn_l2_norm: bool) -> None:
        super().__init__()
        self.width = width
        self.attn = SelfAttention(width, heads, attn_l2_norm)
        self.ffn = FFN(width, round(width * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attend: Callable, heads_independent: bool = False
                ) -> torch.Tensor:
        """``x: [B, l, C]``, ``cond: [B, C]``; ``attend(q, k, v, scale)`` computes attention of
        ``[B, H, l, D]`` tensors. ``heads_independent``: ``attend`` may be called on any subset of the
        heads (no KV cache sees them), so inference may run large maps a head group at a time."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond).view(-1, 1, 6, self.width).unbind(2)
        # no locals hold the normalised input or q/k/v beyond their use (inference peak memory)
        groups = self.attn.head_groups(x) if heads_independent and not torch.is_grad_enabled() else []
        if len(groups) > 1:
            x = x + self.attn.attend_by_heads(self.ln_wo_grad(x).mul(scale1.add(1)).add(shift1), attend,
                                              groups).mul(gamma1)
        else:
            x = x + self.attn.out(attend(*self.attn.qkv(self.ln_wo_grad(x).mul(scale1.add(1)).add(shift1)),
                                         self.attn.scale)).mul(gamma1)
        return x + self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add(shift2), overwrite_input=True).mul(gamma2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int, norm_eps: float) -> None:
        super().__init__()
        self.width = width
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.width).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add(shift)


class VAR(nn.Module):
    """VAR's transformer (without the tokenizer). Parameter and buffer names follow the released
    checkpoints exactly; the mask buffers ``lvl_1L`` and ``attn_bias_for_masking`` are kept for key
    compatibility but never read (the engine builds masks from the trajectory and pattern)."""

    def __init__(self, config: VARConfig) -> None:
        super().__init__()
        self.config = config
        self.layout = config.layout
        c, layout = config.width, self.layout
        self.num_classes, self.vocab_size, self.z_channels = config.num_classes, config.vocab_size, config.z_channels
        self.first_l = layout.scales[0].numel
        init_std = math.sqrt(1 / c / 3)

        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, c))
        self.pos_1LC = nn.Parameter(torch.empty(1, layout.length, c))
        scale_ids = torch.cat([torch.full((sc.numel,), sc.index) for sc in layout.scales])
        self.register_buffer("lvl_1L", scale_ids.view(1, -1).clone())
        block_causal = scale_ids[:, None] >= scale_ids[None, :]
        self.register_buffer("attn_bias_for_masking", torch.where(block_causal, 0.0, -torch.inf).view(1, 1, *block_causal.shape))
        self.word_embed = nn.Linear(config.z_channels, c)
        self.class_emb = nn.Embedding(config.num_classes + 1, c)
        self.lvl_embed = nn.Embedding(layout.num_scales, c)
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(c, config.heads, config.mlp_ratio, config.norm_eps, config.attn_l2_norm) for _ in range(config.depth)
        )
        self.head_nm = AdaLNBeforeHead(c, config.norm_eps)
        self.head = nn.Linear(c, config.vocab_size)
        for p in (self.pos_start, self.pos_1LC, self.class_emb.weight, self.lvl_embed.weight):
            nn.init.trunc_normal_(p.data, mean=0, std=init_std)

    # -- embeddings ------------------------------------------------------------------------------
    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels: LongTensor[B]`` (``num_classes`` is the null class) -> ``cond: [B, C]``."""
        return self.class_emb(labels)

    def embed_scale(self, scale: int, cond: torch.Tensor, var_input: torch.Tensor | None) -> torch.Tensor:
        """Input tokens of one scale, ``[B, l_s, C]``.

        Scale 0: ``cond + pos_start``; scale s > 0: ``word_embed(var_input)`` with
        ``var_input: [B, l_s, Cvae]`` (the area-downsampled f_hat); both plus level and position.
        """
        sc = self.layout.scales[scale]
        if scale == 0:
            x = cond.unsqueeze(1).expand(-1, self.first_l, -1) + self.pos_start
        else:
            x = self.word_embed(var_input.to(self.word_embed.weight.dtype))
        return x + self.lvl_embed.weight[scale] + self.pos_1LC[:, sc.begin:sc.end]

    def embed_scales(self, scales: Sequence[int], cond: torch.Tensor, var_inputs: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Several scales' input tokens concatenated in order: ``[B, sum l_s, C]``."""
        return torch.cat([self.embed_scale(s, cond, x) for s, x in zip(scales, var_inputs)], dim=1)

    # -- transformer -----------------------------------------------------------------------------
    def backbone(self, x: torch.Tensor, cond: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        """Run every block on ``x: [B, l, C]``; ``attend(layer, q, k, v, scale)`` computes attention.
        An ``attend`` with a true ``heads_independent`` attribute may be called per head group."""
        independent = bool(getattr(attend, "heads_independent", False))
        for layer, block in enumerate(self.blocks):
            x = block(x, cond, lambda q, k, v, scale, layer=layer: attend(layer, q, k, v, scale), independent)
        return x

    def logits(self, hidden: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``hidden: [B, l, C]`` -> logits ``[B, l, V]`` in float32 (AdaLN head as VAR)."""
        return self.head(self.head_nm(hidden.float(), cond.float())).float()


def infer_var_config(state_dict: dict[str, torch.Tensor], **overrides) -> VARConfig:
    """Architecture read off a VAR state dict: depth from ``blocks.N``, width and Cvae from
    ``word_embed``, heads from ``scale_mul_1H11``, classes from ``class_emb``, vocabulary from
    ``head``, the schedule from ``pos_1LC`` (the 256px or 512px VAR schedule) unless given."""
    required = ("word_embed.weight", "class_emb.weight", "head.weight", "pos_1LC")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise KeyError(f"not a VAR state dict: missing {', '.join(missing)}")
    depth = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    width, z_channels = state_dict["word_embed.weight"].shape
    values: dict = {
        "depth": depth,
        "embed_dim": int(width),
        "z_channels": int(z_channels),
        "num_classes": int(state_dict["class_emb.weight"].shape[0]) - 1,
        "vocab_size": int(state_dict["head.weight"].shape[0]),
        "attn_l2_norm": "blocks.0.attn.scale_mul_1H11" in state_dict or depth == 0,
    }
    if "blocks.0.attn.scale_mul_1H11" in state_dict:
        values["num_heads"] = int(state_dict["blocks.0.attn.scale_mul_1H11"].shape[1])
    else:
        values["num_heads"] = max(1, int(width) // 64)
    if "blocks.0.ffn.fc1.weight" in state_dict:
        values["mlp_ratio"] = state_dict["blocks.0.ffn.fc1.weight"].shape[0] / int(width)
    if "patch_nums" not in overrides:
        length = state_dict["pos_1LC"].shape[1]
        for schedule in (PATCH_NUMS_256, PATCH_NUMS_512):
            if sum(p * p for p in schedule) == length:
                values["patch_nums"] = schedule
                break
        else:
            raise ArchitectureError(f"pos_1LC has {length} positions, which matches neither VAR schedule (680 or "
                                    f"2240): give the scale schedule explicitly ({setting('patch_nums')})")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return VARConfig(**values)
