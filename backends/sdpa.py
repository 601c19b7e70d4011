"""``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask when needed."""

from __future__ import annotations

import torch.nn.functional as F

from ..core.attention import AttentionBackend
from ..core.records import NoOptions


class SdpaBackend(AttentionBackend):
    """Any spec, through its materialised boolean mask (PyTorch picks the fused kernel)."""

    name = "sdpa"

    def __init__(self, options: NoOptions | None = None) -> None:
        self.options = options or NoOptions()

    def supports(self, spec, *, device, dtype, head_dim):
        return None

    def attend(self, q, k, v, spec, *, scale):
        mask = spec.mask(q.shape[-2], k.shape[-2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
