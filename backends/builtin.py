"""Hook implementations registering the built-in attention backends (entry point ``builtin-backends``).

Their ``auto`` order lives in one place, each backend's ``preference(spec, device)``; the records
carry no ``priority`` (a plugin's backend without ``preference`` ranks by its record's)."""

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
        AttentionBackendRecord(name="reference", factory=ReferenceBackend, options=ReferenceOptions,
                               description="materialised scores and mask in float64: the oracle (slow)"),
        AttentionBackendRecord(name="sdpa", factory=SdpaBackend, options=SdpaOptions,
                               description="torch scaled_dot_product_attention: any pattern via a boolean mask, "
                                           "neighbourhoods through a tiled halo path"),
        AttentionBackendRecord(name="flex", factory=FlexBackend, options=FlexOptions, availability=flex_availability,
                               description="compiled FlexAttention with a BlockMask from the pattern's mask_mod "
                                           "(tiled token order for neighbourhoods)"),
        AttentionBackendRecord(name="natten", factory=NattenBackend, availability=natten_availability,
                               description="natten.na2d for single-map neighbourhood attention (fused kernels on CUDA)"),
        AttentionBackendRecord(name="xformers", factory=XformersBackend, availability=xformers_availability,
                               description="xformers memory_efficient_attention with causal, block-diagonal and tensor biases (CUDA)"),
        AttentionBackendRecord(name="flash-attn", factory=FlashAttnBackend, availability=flash_attn_availability,
                               description="flash_attn_func for dense, causal and 1-D window attention (CUDA, fp16/bf16)"),
    ]
