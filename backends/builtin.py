"""Hook implementations registering the built-in attention backends (entry point ``builtin-backends``)."""

from __future__ import annotations

from ..core.hookspecs import hookimpl
from ..core.records import AttentionBackendRecord
from .cuda_only import FlashAttnBackend, XformersBackend, flash_attn_availability, xformers_availability
from .flex import FlexBackend, FlexOptions, flex_availability
from .natten_backend import NattenBackend, natten_availability
from .reference import ReferenceBackend, ReferenceOptions
from .sdpa import SdpaBackend, SdpaOptions


@hookimpl
def mvar_engine_attention_backends():
    return [
        AttentionBackendRecord(name="reference", factory=ReferenceBackend, options=ReferenceOptions, priority=0,
                               description="materialised scores and mask in float64: the oracle (slow)"),
        AttentionBackendRecord(name="sdpa", factory=SdpaBackend, options=SdpaOptions, priority=50,
                               description="torch scaled_dot_product_attention: any pattern via a boolean mask, "
                                           "neighbourhoods through a tiled halo path"),
        AttentionBackendRecord(name="flex", factory=FlexBackend, options=FlexOptions, availability=flex_availability,
                               priority=40, description="compiled FlexAttention with a BlockMask from the pattern's "
                                                        "mask_mod (tiled token order for neighbourhoods)"),
        AttentionBackendRecord(name="natten", factory=NattenBackend, availability=natten_availability, priority=20,
                               description="natten.na2d for single-map neighbourhood attention (fused kernels on CUDA)"),
        AttentionBackendRecord(name="xformers", factory=XformersBackend, availability=xformers_availability, priority=60,
                               description="xformers memory_efficient_attention with causal, block-diagonal and tensor biases (CUDA)"),
        AttentionBackendRecord(name="flash-attn", factory=FlashAttnBackend, availability=flash_attn_availability,
                               priority=70, description="flash_attn_func for dense, causal and 1-D window attention (CUDA, fp16/bf16)"),
    ]
