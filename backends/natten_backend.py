"""``natten``: ``natten.na2d`` for single-map neighbourhood specs (CPU runs natten's flex path)."""

from __future__ import annotations

import importlib.util

from ..core.attention import AttentionBackend, Neighborhood2D
from ..core.records import Availability, NoOptions


def natten_availability() -> Availability:
    if importlib.util.find_spec("natten") is None:
        return Availability.no("natten is not installed (pip install --no-build-isolation natten)")
    return Availability.yes()


class NattenBackend(AttentionBackend):
    """Neighbourhood attention over one map with NATTEN's fused kernels ([B, X, Y, heads, D] layout)."""

    name = "natten"

    def __init__(self, options: NoOptions | None = None) -> None:
        self.options = options or NoOptions()

    def supports(self, spec, *, device, dtype, head_dim):
        if not natten_availability().ok:
            return natten_availability().reason
        if not isinstance(spec, Neighborhood2D):
            return f"natten computes only single-map neighbourhood attention, not '{spec.kind}' (use --backend sdpa or auto)"
        if spec.kernel_size * spec.dilation > min(spec.height, spec.width):
            return (f"natten needs kernel_size * dilation <= map side ({spec.kernel_size} * {spec.dilation} > "
                    f"{min(spec.height, spec.width)}); use --backend sdpa")
        return None

    def attend(self, q, k, v, spec, *, scale):
        import natten

        b, h, n, d = q.shape

        def to_map(t):
            return t.transpose(1, 2).reshape(b, spec.height, spec.width, h, t.shape[-1])

        out = natten.na2d(to_map(q), to_map(k), to_map(v), kernel_size=spec.kernel_size, dilation=spec.dilation,
                          is_causal=spec.causal, scale=scale)
        return out.reshape(b, n, h, v.shape[-1]).transpose(1, 2)
