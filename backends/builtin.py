"""Hook implementations registering the built-in attention backends (entry point ``builtin-backends``)."""

from __future__ import annotations

from ..core.hookspecs import hookimpl
from ..core.records import AttentionBackendRecord
from .cuda_only import FlashAttnBackend, XformersBackend, flash_attn_availability, xformers_availability
from .natten_backend import NattenBackend, natten_availability
from .reference import ReferenceBackend, ReferenceOptions
from .sdpa import SdpaBackend


@hookimpl
def mvar_engine_attention_backends():
    return [
        AttentionBackendRecord(name="reference", factory=ReferenceBackend, options=ReferenceOptions, priority=0,
                               description="materialised scores and mask in float64: the oracle (slow)"),
        AttentionBackendRecord(name="sdpa", factory=SdpaBackend, priority=50,
                               description="torch scaled_dot_product_attention, any pattern via a boolean mask"),
        AttentionBackendRecord(name="natten", factory=NattenBackend, availability=natten_availability, priority=20,
                               description="natten.na2d for single-map neighbourhood attention"),
        AttentionBackendRecord(name="xformers", factory=XformersBackend, availability=xformers_availability, priority=60,
                               description="xformers memory_efficient_attention with tensor attention bias (CUDA)"),
        AttentionBackendRecord(name="flash-attn", factory=FlashAttnBackend, availability=flash_attn_availability,
                               priority=70, description="flash_attn_func for dense attention (CUDA, fp16/bf16)"),
    ]
