"""A LlamaGen-style class-conditional GPT for next-token (raster) image generation.

State-dict keys are LlamaGen's (``autoregressive/models/gpt.py``, model_type ``c2i``):
``tok_embeddings.weight``, ``cls_embedding.embedding_table.weight`` (``num_classes + 1`` rows with
the null class last when ``class_dropout_prob > 0``), ``layers.{i}.attention.wqkv.weight``,
``layers.{i}.attention.wo.weight``, ``layers.{i}.feed_forward.w1|w2|w3.weight``,
``layers.{i}.attention_norm.weight``, ``layers.{i}.ffn_norm.weight``, ``norm.weight``,
``output.weight``. LlamaGen keeps ``freqs_cis`` as a plain attribute (not in its checkpoints); here
it is a non-persistent buffer, so the state dict has exactly LlamaGen's keys.

Sequence: ``P = cls_token_num`` class-prefix positions ``0 .. P-1`` followed by the ``h x w`` image
tokens row-major at positions ``P + r * w + c``. Logits at position ``P - 1 + t`` predict image
token ``t``; the last image token is never an input. As a :class:`SequenceLayout` this is two
"scales": the prefix as a ``1 x P`` grid, then the ``h x w`` image grid (so positions, row and
column coordinates come from the usual layout helpers).

2-D RoPE (LlamaGen's ``precompute_freqs_cis_2d``, generalised to ``h != w``): the head dimension
``D`` is rotated in adjacent pairs ``(x[2i], x[2i+1])``; the first ``D/4`` pairs use the row index
with frequencies ``base^(-2j / (D/2))``, the last ``D/4`` pairs the column index with the same
frequencies. Prefix positions get ``cos = sin = 0`` exactly as LlamaGen (their rotated queries and
keys are zero vectors: a quirk the released checkpoints were trained with).

Attention is delegated to ``attend(layer, q, k, v, scale) -> out`` (``q, k, v: [B, H, l, D]``)
with q and k already rotated, so a KV cache stores rotated keys (as LlamaGen's static cache).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..core.errors import ArchitectureError, setting
from ..core.layout import SequenceLayout

AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

DERIVED_RASTER_BUFFERS = ("freqs_cis",)
"""Buffers recomputed from the config, never read from a file (LlamaGen's checkpoints lack them too)."""


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


class RasterGPTConfig(BaseModel):
    """Architecture of a LlamaGen c2i GPT (``GPT-B``: depth 12, width 768, 12 heads)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: int = Field(12, ge=0)
    width: int = Field(768, ge=1)
    heads: int = Field(12, ge=1)
    num_classes: int = Field(1000, ge=1)
    vocab_size: int = Field(16384, ge=2)
    grid: tuple[int, int] = (16, 16)
    cls_token_num: int = Field(1, ge=1, description="class-prefix length; LlamaGen c2i uses 1")
    class_dropout_prob: float = Field(0.1, ge=0, le=1, description="> 0: the embedding table has a null-class row")
    ffn_dim_multiplier: float | None = None
    multiple_of: int = Field(256, ge=1)
    ffn_hidden_dim: int | None = Field(None, ge=1, description="SwiGLU hidden width as a file holds it (None: "
                                       "LlamaGen's rule from width, ffn_dim_multiplier and multiple_of)")
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    @model_validator(mode="after")
    def _check(self) -> "RasterGPTConfig":
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")
        if (self.width // self.heads) % 4:
            raise ValueError(f"head_dim {self.width // self.heads} must be divisible by 4 for 2-D RoPE")
        if min(self.grid) < 1:
            raise ValueError(f"grid sides must be positive, got {self.grid}")
        return self

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def ffn_hidden(self) -> int:
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.width) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    def minimum_elements(self) -> int:
        """A lower bound on the parameter and buffer elements of :class:`RasterGPT` built from this
        config: its blocks' matrices, the token embedding, the output head and the RoPE table
        (``[P + h*w, head_dim // 2, 2]``), counted without building anything."""
        c, positions = self.width, self.cls_token_num + self.num_image_tokens
        return (self.depth * (4 * c * c + 3 * c * self.ffn_hidden) + 2 * c * self.vocab_size
                + positions * (self.head_dim // 2) * 2)

    @property
    def num_image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def layout(self) -> SequenceLayout:
        """Prefix as a ``1 x P`` grid, then the image grid."""
        return SequenceLayout(((1, self.cls_token_num), tuple(self.grid)))

    @classmethod
    def tiny(cls, **overrides) -> "RasterGPTConfig":
        values = dict(depth=2, width=32, heads=2, num_classes=5, vocab_size=16, grid=(3, 3), multiple_of=8)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def llamagen_b(cls, **overrides) -> "RasterGPTConfig":
        """LlamaGen GPT-B at 384px: 24 x 24 = 576 image tokens, 16384 codes."""
        values = dict(depth=12, width=768, heads=12, num_classes=1000, vocab_size=16384, grid=(24, 24))
        values.update(overrides)
        return cls(**values)


def precompute_freqs_cis_2d(grid: tuple[int, int], head_dim: int, base: float = 10000.0,
                            cls_token_num: int = 1) -> torch.Tensor:
    """``[P + h*w, head_dim // 2, 2]`` (cos, sin) per position and rotated pair; zeros on the prefix."""
    h, w = grid
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # [D/4]
    rows = torch.outer(torch.arange(h).float(), freqs)  # [h, D/4]
    cols = torch.outer(torch.arange(w).float(), freqs)  # [w, D/4]
    angles = torch.cat([rows[:, None, :].expand(h, w, -1), cols[None, :, :].expand(h, w, -1)], dim=-1)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(0, 1)  # [h*w, D/2, 2]
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])


RotaryTables = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(cos, sin, swap)`` of :func:`rotary_tables`."""


def rotary_tables(freqs: torch.Tensor) -> RotaryTables:
    """``freqs: [l, D/2, 2]`` (cos, sin per pair) -> ``(cos, sin, swap)``: ``cos, sin`` float32
    ``[l, D]``, cos repeated for both elements of a pair, sin negated for the first; ``swap``
    ``LongTensor[D]``, the index that exchanges the two elements of every pair (see :func:`rotate`)."""
    cos, sin = freqs[..., 0].float(), freqs[..., 1].float()
    swap = torch.arange(cos.shape[-1] * 2, device=freqs.device).view(-1, 2).flip(-1).flatten()
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2), swap


def rotate(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """``x: [..., l, D]`` rotated pairwise by :func:`rotary_tables` (``cos, sin: [l, D]``), in
    float32, cast back: pair ``(x0, x1)`` -> ``(x0 cos - x1 sin, x1 cos + x0 sin)``, bit for bit
    LlamaGen's complex product (``x1 * -sin`` is ``-(x1 * sin)`` exactly) in four whole-tensor
    operations (a gather of the swapped pairs, two products, a sum) instead of strided ones per
    element."""
    cos, sin, swap = (t.to(x.device) for t in tables)
    xf = x.float()
    return (xf * cos + xf.index_select(-1, swap) * sin).type_as(x)


def apply_rotary_emb(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``x: [B, H, l, D]``, ``freqs: [l, D/2, 2]`` -> rotated ``x`` (computed in float32, cast back)."""
    return rotate(x, rotary_tables(freqs))


FUSED_RMS_NORM = getattr(torch.ops.aten, "_fused_rms_norm", None)
"""torch's one-call RMSNorm, where this torch has it: on the CPU a composite of the same six
calls, bit for bit ``x * rsqrt(mean(x^2) + eps) * weight`` in float32 (checked by the tests); on
CUDA one fused kernel (one launch instead of six; its bits against the formula are not checked
on a CPU machine)."""


def rms_normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps)`` of a float32 ``x``."""
    if FUSED_RMS_NORM is not None:
        return FUSED_RMS_NORM(x, [x.shape[-1]], None, eps)[0]
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """LlamaGen's RMSNorm: normalised in float32, cast back to the input's dtype, times ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if FUSED_RMS_NORM is not None and x.dtype == self.weight.dtype == torch.float32:
            return FUSED_RMS_NORM(x, [x.shape[-1]], self.weight, self.eps)[0]  # the same bits in one call
        return rms_normalized(x.float(), self.eps).type_as(x) * self.weight


class Linear(nn.Linear):
    """``nn.Linear`` (no bias) whose inference calls on 2-D rows (no autograd, no autocast, not
    traced) multiply by a transposed view of the weight kept between calls: one aten call (``mm``)
    instead of two (``t``, ``mm``), the same bits, and less host time than ``F.linear``. The view
    is dropped when the module moves or changes dtype (``_apply``) or the parameter is replaced;
    in-place writes (``load_state_dict``, an optimizer step) reach it."""

    weight_t: torch.Tensor | None = None

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dim() != 2 or torch.compiler.is_compiling() \
                or torch.is_autocast_enabled(x.device.type):
            return F.linear(x, self.weight)
        weight_t = self.weight_t
        if weight_t is None or weight_t._base is not self.weight:
            weight_t = self.weight_t = self.weight.t()  # under no_grad: a plain view
        return torch.mm(x, weight_t)

    def _apply(self, fn, recurse=True):
        self.weight_t = None
        return super()._apply(fn, recurse)


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, width: int, null_class: bool) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(null_class), width)


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w1 = Linear(width, hidden)
        self.w3 = Linear(width, hidden)
        self.w2 = Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.width = heads, width // heads, width
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.wqkv = Linear(width, 3 * width)
        self.wo = Linear(width, width)

    def forward(self, x: torch.Tensor, shape: tuple[int, int], rope: RotaryTables,
                attend: Callable) -> torch.Tensor:
        """``x: [B * l, C]`` (token-major rows of ``shape = (B, l)``); ``rope``: :func:`rotary_tables`
        at the tokens' positions. q and k are rotated together (one elementwise pass, the same bits
        as one at a time)."""
        b, l = shape
        qkv = self.wqkv(x).view(b, l, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, l, D]
        q, k = rotate(qkv[:2], rope).unbind(0)
        o = attend(q, k, qkv[2], self.scale)  # [B, H, l, D]
        return self.wo(o.reshape(b, self.width) if l == 1 else o.transpose(1, 2).reshape(b * l, self.width))


class TransformerBlock(nn.Module):
    def __init__(self, config: RasterGPTConfig) -> None:
        super().__init__()
        self.attention = Attention(config.width, config.heads)
        self.feed_forward = FeedForward(config.width, config.ffn_hidden)
        self.attention_norm = RMSNorm(config.width, config.norm_eps)
        self.ffn_norm = RMSNorm(config.width, config.norm_eps)

    def forward(self, x: torch.Tensor, shape: tuple[int, int], rope: RotaryTables,
                attend: Callable) -> torch.Tensor:
        """``x: [B * l, C]`` token-major rows of ``shape = (B, l)`` (2-D, so each linear layer is one
        matrix product: the same bits as on ``[B, l, C]``, fewer operations a step)."""
        h = x + self.attention(self.attention_norm(x), shape, rope, attend)
        return h + self.feed_forward(self.ffn_norm(h))


class RasterGPT(nn.Module):
    """LlamaGen's c2i ``Transformer`` (inference), attention delegated to the engine."""

    def __init__(self, config: RasterGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.layout = config.layout
        self.num_classes, self.vocab_size = config.num_classes, config.vocab_size
        self.cls_token_num = config.cls_token_num
        self.has_null_class = config.class_dropout_prob > 0
        self.cls_embedding = LabelEmbedder(config.num_classes, config.width, self.has_null_class)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.width)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.depth))
        self.norm = RMSNorm(config.width, config.norm_eps)
        self.output = Linear(config.width, config.vocab_size)
        self.register_buffer("freqs_cis", precompute_freqs_cis_2d(config.grid, config.head_dim, config.rope_base,
                                                                  config.cls_token_num), persistent=False)
        rope_cos, rope_sin, rope_swap = rotary_tables(self.freqs_cis)  # [P + h*w, D], built once (a step indexes)
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)
        self.register_buffer("rope_swap", rope_swap, persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def null_class(self) -> int:
        """The label of the unconditional row (the last row of the class table)."""
        if not self.has_null_class:
            raise ValueError("this model has no null class (class_dropout_prob = 0): classifier-free guidance is unavailable")
        return self.num_classes

    # -- embeddings ------------------------------------------------------------------------------
    def embed(self, labels: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings ``[B, l, C]``: the class prefix (``labels: LongTensor[B]``, ``P`` rows, each
        the class embedding) when labels are given, followed by ``tokens: LongTensor[B, n]``."""
        parts = []
        if labels is not None:
            parts.append(self.cls_embedding.embedding_table(labels)[:, None, :].expand(-1, self.cls_token_num, -1))
        if tokens is not None:
            parts.append(self.tok_embeddings(tokens))
        if not parts:
            raise ValueError("embed needs labels, tokens or both")
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    # -- transformer -----------------------------------------------------------------------------
    def backbone(self, x: torch.Tensor, positions: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        """Every block on ``x: [B, l, C]`` at sequence ``positions: LongTensor[l]``; q and k are rotated
        at their positions before ``attend(layer, q, k, v, scale)``."""
        positions = positions.to(self.rope_cos.device)
        rope = (self.rope_cos[positions].float(), self.rope_sin[positions].float(), self.rope_swap)
        b, l, width = x.shape
        rows = x.reshape(b * l, width)
        for layer, block in enumerate(self.layers):
            rows = block(rows, (b, l), rope, lambda q, k, v, scale, layer=layer: attend(layer, q, k, v, scale))
        return rows.view(b, l, width)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: [B, l, C]`` -> float32 logits ``[B, l, V]``."""
        b, l, width = hidden.shape
        return self.output(self.norm(hidden.reshape(b * l, width))).float().view(b, l, -1)


LLAMAGEN_GPT_HEADS: dict[tuple[int, int], tuple[str, int]] = {
    (12, 768): ("GPT-B", 12), (24, 1024): ("GPT-L", 16), (36, 1280): ("GPT-XL", 20), (48, 1536): ("GPT-XXL", 24),
    (48, 2560): ("GPT-XXXL", 40), (24, 3200): ("GPT-3B", 32), (22, 2048): ("GPT-1B", 32), (32, 4096): ("GPT-7B", 32),
}
"""LlamaGen's released GPT sizes, ``(n_layer, dim) -> (name, n_head)``: the files do not store the
head count (GPT-3B's head_dim is 100, not 64)."""


def llamagen_heads(depth: int, width: int) -> int | None:
    """The head count of LlamaGen's released GPT of ``depth`` layers and ``width``, or None."""
    found = LLAMAGEN_GPT_HEADS.get((depth, width))
    return found[1] if found else None


def infer_raster_config(state_dict: dict[str, torch.Tensor], **overrides) -> RasterGPTConfig:
    """Architecture read off a LlamaGen c2i state dict (give ``grid`` for the resolution: it is not
    in the checkpoint). The head count is ``overrides["heads"]``, else :data:`LLAMAGEN_GPT_HEADS`'s
    entry for (depth, width); a size outside the table without ``heads`` is a ``ValueError``."""
    required = ("tok_embeddings.weight", "cls_embedding.embedding_table.weight", "output.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise KeyError(f"not a LlamaGen c2i state dict: missing {', '.join(missing)}")
    depth = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("layers.")), default=-1)
    vocab, width = (int(n) for n in state_dict["tok_embeddings.weight"].shape)
    heads = overrides.pop("heads", None) or llamagen_heads(overrides.get("depth") or depth, width)
    if heads is None:
        raise ArchitectureError(f"{depth} layers of width {width} is none of LlamaGen's released GPT sizes "
                         f"({', '.join(name for name, _ in LLAMAGEN_GPT_HEADS.values())}), and the file does not "
                         f"store its head count: give it with {setting('num_heads')}")
    if width % heads:
        raise ArchitectureError(f"width {width} is not divisible by {heads} heads: give a {setting('num_heads')} that "
                                f"divides it")
    values: dict = dict(depth=depth, width=width, heads=heads, vocab_size=vocab,
                        num_classes=int(state_dict["cls_embedding.embedding_table.weight"].shape[0]) - 1)
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = RasterGPTConfig(**values)
    w1 = state_dict.get("layers.0.feed_forward.w1.weight")
    if w1 is not None and w1.shape[0] != config.ffn_hidden:  # another multiple_of / ffn_dim_multiplier
        config = config.model_copy(update={"ffn_hidden_dim": int(w1.shape[0])})
    return config
