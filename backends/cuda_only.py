"""``xformers`` and ``flash-attn``: CUDA-only fused kernels, detected at run time."""

from __future__ import annotations

import importlib.util

import torch

from ..core.attention import AttentionBackend, Dense
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


class XformersBackend(AttentionBackend):
    """``xformers.ops.memory_efficient_attention``; masks become an additive tensor bias."""

    name = "xformers"

    def __init__(self, options: NoOptions | None = None) -> None:
        self.options = options or NoOptions()

    def supports(self, spec, *, device, dtype, head_dim):
        available = xformers_availability()
        if not available.ok:
            return available.reason
        if torch.device(device).type != "cuda":
            return "xformers runs on CUDA tensors only (use --device cuda or --backend sdpa)"
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"xformers does not support dtype {dtype}"
        return None

    def attend(self, q, k, v, spec, *, scale):
        from xformers.ops import memory_efficient_attention

        bias = None
        mask = spec.mask(q.shape[-2], k.shape[-2], q.device)
        if mask is not None:
            lq, lk = mask.shape
            padded = (lk + 7) // 8 * 8  # xformers wants the bias' last dim aligned to 8
            storage = torch.zeros(q.shape[0], q.shape[1], lq, padded, device=q.device, dtype=q.dtype)
            bias = storage[..., :lk]
            bias.masked_fill_(~mask, float("-inf"))
        out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale)
        return out.transpose(1, 2)


class FlashAttnBackend(AttentionBackend):
    """``flash_attn.flash_attn_func`` for dense attention (fp16/bf16, head_dim <= 256)."""

    name = "flash-attn"

    def __init__(self, options: NoOptions | None = None) -> None:
        self.options = options or NoOptions()

    def supports(self, spec, *, device, dtype, head_dim):
        available = flash_attn_availability()
        if not available.ok:
            return available.reason
        if torch.device(device).type != "cuda":
            return "flash-attn runs on CUDA tensors only (use --device cuda or --backend sdpa)"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn needs float16 or bfloat16, got {dtype} (use --dtype bfloat16 or --backend sdpa)"
        if head_dim > 256:
            return f"flash-attn supports head_dim <= 256, got {head_dim}"
        if not isinstance(spec, Dense):
            return f"flash-attn computes dense attention only here, not '{spec.kind}' (use --backend sdpa or auto)"
        return None

    def attend(self, q, k, v, spec, *, scale):
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)
