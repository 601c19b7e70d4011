"""``natten``: ``natten.na2d`` for single-map neighbourhood specs.

On CPU natten runs through its own (uncompiled) FlexAttention path: forward only, head_dim a power
of two in 8..512. On CUDA it uses its fused kernels (FNA), forward and backward.
"""

from __future__ import annotations

import importlib.util

import torch

from ..core.attention import AttentionBackend, BackendCapabilities, scores_bytes
from ..core.records import Availability, NoOptions


def natten_availability() -> Availability:
    if importlib.util.find_spec("natten") is None:
        return Availability.no("natten is not installed (pip install --no-build-isolation natten)")
    return Availability.yes()


class NattenBackend(AttentionBackend):
    """Neighbourhood attention over one map with NATTEN's kernels ([B, X, Y, heads, D] layout)."""

    name = "natten"
    capabilities = BackendCapabilities(
        kinds=frozenset({"neighborhood2d"}), devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}), backward=frozenset({"cuda"}),
        max_head_dim=512)

    def __init__(self, options: NoOptions | None = None) -> None:
        self.options = options or NoOptions()

    def preference(self, spec, device):
        # fused CUDA kernels beat every other neighbourhood path there; on CPU natten materialises
        # scores through uncompiled flex and is the slowest after the reference (bench attention)
        return 80 if device.type == "cuda" else 20

    def check(self, spec, *, device, dtype, head_dim):
        available = natten_availability()
        if not available.ok:
            return available.reason
        if spec.kernel_size < 2:
            return "natten needs kernel_size >= 2, got 1 (each query sees only itself); use --backend sdpa"
        if spec.kernel_size * spec.dilation > min(spec.height, spec.width):
            return (f"natten needs kernel_size * dilation <= map side ({spec.kernel_size} * {spec.dilation} > "
                    f"{min(spec.height, spec.width)}); use --backend sdpa, which defines it as the whole map")
        if device.type == "cpu" and (head_dim < 8 or head_dim & (head_dim - 1)):
            return f"natten on CPU (its flex path) needs a power-of-two head_dim in 8..512, got {head_dim}; use --backend sdpa"
        if device.type == "cuda" and head_dim % 8:
            return f"natten's CUDA kernels need head_dim divisible by 8, got {head_dim}; use --backend sdpa"
        return None

    def workspace_bytes(self, spec, *, batch, heads, q_len, kv_len, head_dim, dtype, device):
        if device.type == "cpu":  # natten's CPU path is eager flex: it materialises every score, in float32
            return scores_bytes(batch, heads, q_len, kv_len, 4, copies=3)
        return 0

    def attend(self, q, k, v, spec, *, scale):
        import natten

        b, h, n, d = q.shape

        def to_map(t):
            return t.transpose(1, 2).reshape(b, spec.height, spec.width, h, t.shape[-1])

        out = natten.na2d(to_map(q), to_map(k), to_map(v), kernel_size=spec.kernel_size, dilation=spec.dilation,
                          is_causal=spec.causal, scale=scale)
        return out.reshape(b, n, h, v.shape[-1]).transpose(1, 2)
