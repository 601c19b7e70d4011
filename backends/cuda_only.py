"""``xformers`` and ``flash-attn``: CUDA-only fused kernels, detected at run time.

Spec -> kernel mapping (bottom-right alignment throughout, as :mod:`mvar_engine.core.attention`):

- xformers: dense -> no bias; causal -> ``LowerTriangularFromBottomRightMask``; causal window1d ->
  ``LowerTriangularFromBottomRightLocalAttentionMask``; block-diagonal -> ``BlockDiagonalMask`` over
  the batch packed into one sequence; anything else -> an additive tensor bias from ``mask()``.
- flash-attn: dense, causal and window1d through ``flash_attn_func(causal=, window_size=)``.
"""

from __future__ import annotations

import importlib.util
from typing import ClassVar

import torch

from ..core.attention import AttentionBackend, BackendCapabilities, BlockDiagonal, Causal, SlidingWindow1D
from ..core.records import Availability, NoOptions


def _cuda_package_availability(module: str, extra: str) -> Availability:
    if importlib.util.find_spec(module) is None:
        return Availability.no(f"{module} is not installed (pip install 'mvar-engine[{extra}]'; needs a CUDA machine)")
    if not torch.cuda.is_available():
        return Availability.no(f"{module} needs a CUDA device and none is available")
    return Availability.yes()


def xformers_availability() -> Availability:
    return _cuda_package_availability("xformers", "xformers")


def flash_attn_availability() -> Availability:
    return _cuda_package_availability("flash_attn", "flash-attn")


class CudaPackageBackend(AttentionBackend):
    """A backend whose kernel comes from a CUDA-only package: no options, a fixed ``--backend auto``
    rank (``auto_preference``) and usable only where ``availability()`` says so."""

    auto_preference: ClassVar[int]

    def __init__(self, options: NoOptions | None = None) -> None:
        self.options = options or NoOptions()

    @staticmethod
    def availability() -> Availability:
        """Whether the package and a CUDA device are here."""
        raise NotImplementedError

    def preference(self, spec, device):
        return self.auto_preference

    def check(self, spec, *, device, dtype, head_dim):
        available = self.availability()
        return None if available.ok else available.reason


class XformersBackend(CudaPackageBackend):
    """``xformers.ops.memory_efficient_attention`` with its attention-bias types."""

    name = "xformers"
    capabilities = BackendCapabilities(
        kinds=None, devices=frozenset({"cuda"}), dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        backward=frozenset({"cuda"}))
    auto_preference = 60

    @staticmethod
    def availability() -> Availability:
        return xformers_availability()

    def attend(self, q, k, v, spec, *, scale):
        from xformers.ops import fmha, memory_efficient_attention

        batch, heads, lq, _ = q.shape
        lk = k.shape[-2]
        qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))  # [B, L, H, D]
        if isinstance(spec, BlockDiagonal):
            bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(list(spec.blocks) * batch)
            pack = lambda t: t.reshape(1, batch * t.shape[1], heads, t.shape[-1])  # noqa: E731
            out = memory_efficient_attention(pack(qx), pack(kx), pack(vx), attn_bias=bias, scale=scale)
            return out.view(batch, lq, heads, -1).transpose(1, 2)
        if isinstance(spec, Causal):
            bias = fmha.attn_bias.LowerTriangularFromBottomRightMask()
        elif isinstance(spec, SlidingWindow1D) and spec.right == 0:
            bias = fmha.attn_bias.LowerTriangularFromBottomRightLocalAttentionMask(spec.left + 1)
        else:
            bias = None
            mask = spec.mask(lq, lk, q.device)
            if mask is not None:
                padded = (lk + 7) // 8 * 8  # xformers wants the bias' last dim aligned to 8
                storage = torch.zeros(batch, heads, lq, padded, device=q.device, dtype=q.dtype)
                bias = storage[..., :lk]
                bias.masked_fill_(~mask, float("-inf"))
        out = memory_efficient_attention(qx, kx, vx, attn_bias=bias, scale=scale)
        return out.transpose(1, 2)


class FlashAttnBackend(CudaPackageBackend):
    """``flash_attn.flash_attn_func``: dense, causal and 1-D window specs (fp16/bf16, head_dim <= 256)."""

    name = "flash-attn"
    capabilities = BackendCapabilities(
        kinds=frozenset({"dense", "causal", "window1d"}), devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}), backward=frozenset({"cuda"}), max_head_dim=256)
    auto_preference = 70

    @staticmethod
    def availability() -> Availability:
        return flash_attn_availability()

    def attend(self, q, k, v, spec, *, scale):
        from flash_attn import flash_attn_func

        window = (-1, -1)
        causal = isinstance(spec, Causal)
        if isinstance(spec, SlidingWindow1D):
            window = (spec.left, spec.right)
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                              causal=causal, window_size=window)
        return out.transpose(1, 2)
