"""The built-in model families, registered through the ``mvar_engine_model_adapters`` hook exactly as
a plugin registers its own (the ``builtin-models`` entry point): VAR/MVAR for next-scale
trajectories and the LlamaGen-style raster GPT for next-token ones."""

from __future__ import annotations

from typing import Any

from ..core.adapter import ModelFamily
from ..core.hookspecs import hookimpl
from ..core.records import ModelAdapterRecord
from ..models.raster_adapter import RasterAdapter
from ..models.var_adapter import VarAdapter
from .pipeline import build_models, build_raster_models


class VarFamily(ModelFamily):
    """VAR/MVAR transformers with their multi-scale tokenizer (VAR's and MVAR's released files, ours)."""

    name = "var"
    family = "next-scale"

    def __init__(self, options: Any = None) -> None:
        self.options = options

    def build(self, settings):
        return build_models(settings, family=self.family)

    def adapter(self, model, tokenizer) -> VarAdapter:
        return VarAdapter(model, tokenizer)


class RasterFamily(ModelFamily):
    """LlamaGen's c2i GPT (its key names) with a one-scale tokenizer."""

    name = "raster-gpt"
    family = "next-token"

    def __init__(self, options: Any = None) -> None:
        self.options = options

    def build(self, settings):
        return build_raster_models(settings)

    def adapter(self, model, tokenizer) -> RasterAdapter:
        return RasterAdapter(model, tokenizer)


@hookimpl
def mvar_engine_model_adapters():
    return [
        ModelAdapterRecord(name="var", factory=VarFamily, family="next-scale",
                           description="VAR/MVAR next-scale transformer and multi-scale tokenizer"),
        ModelAdapterRecord(name="raster-gpt", factory=RasterFamily, family="next-token",
                           description="LlamaGen-style class-conditional raster GPT (next-token)"),
    ]
