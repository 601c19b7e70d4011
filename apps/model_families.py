"""The built-in model families, registered through the ``mvar_engine_model_adapters`` hook exactly as
a plugin registers its own (the ``builtin-models`` entry point): VAR/MVAR for next-scale
trajectories and the LlamaGen-style raster GPT for next-token ones."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from ..core.adapter import ModelAdapter, ModelFamily
from ..core.hookspecs import hookimpl
from ..core.records import ModelAdapterRecord
from ..models.raster_adapter import RasterAdapter
from ..models.var_adapter import VarAdapter
from .pipeline import build_models, build_raster_models


class BuiltinFamily(ModelFamily):
    """A built-in family: ``builder(settings) -> (model, tokenizer)`` and its ``adapter_type``."""

    builder: ClassVar[Callable[[Any], tuple[Any, Any]]]
    adapter_type: ClassVar[type[ModelAdapter]]

    def __init__(self, options: Any = None) -> None:
        self.options = options

    def build(self, settings):
        return type(self).builder(settings)

    def adapter(self, model, tokenizer) -> ModelAdapter:
        return self.adapter_type(model, tokenizer)


class VarFamily(BuiltinFamily):
    """VAR/MVAR transformers with their multi-scale tokenizer (VAR's and MVAR's released files, ours)."""

    name, family, adapter_type = "var", "next-scale", VarAdapter
    builder = staticmethod(build_models)


class RasterFamily(BuiltinFamily):
    """LlamaGen's c2i GPT (its key names) with a one-scale tokenizer."""

    name, family, adapter_type = "raster-gpt", "next-token", RasterAdapter
    builder = staticmethod(build_raster_models)


@hookimpl
def mvar_engine_model_adapters():
    return [
        ModelAdapterRecord(name="var", factory=VarFamily, family="next-scale",
                           description="VAR/MVAR next-scale transformer and multi-scale tokenizer"),
        ModelAdapterRecord(name="raster-gpt", factory=RasterFamily, family="next-token",
                           description="LlamaGen-style class-conditional raster GPT (next-token)"),
    ]
