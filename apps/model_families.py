"""The built-in model families, registered through the ``mvar_engine_model_adapters`` hook exactly as
a plugin registers its own (the ``builtin-models`` entry point): VAR/MVAR for next-scale
trajectories and the LlamaGen-style raster GPT for next-token ones."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch

from ..core.adapter import ModelAdapter, ModelFacts, ModelFamily
from ..core.hookspecs import hookimpl
from ..core.records import ModelAdapterRecord
from ..models.raster_adapter import RasterAdapter
from ..models.var_adapter import VarAdapter
from .model_loading import ModelPlan, build_raster_plan, build_var_plan, plan_raster_models, plan_var_models
from .model_options import RasterOptions, VarOptions


class BuiltinFamily(ModelFamily):
    """A built-in family: ``planner(options) -> ModelPlan`` (every check, nothing built),
    ``builder(plan) -> (model, tokenizer)`` and its ``adapter_type``. Weights stay float32 (the
    engine autocasts); the pipeline moves them to the device."""

    planner: ClassVar[Callable[[Any], ModelPlan]]
    builder: ClassVar[Callable[[ModelPlan], tuple[Any, Any]]]
    adapter_type: ClassVar[type[ModelAdapter]]

    def build(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
        return type(self).builder(type(self).planner(self.options))

    def inspect(self) -> ModelFacts:
        return type(self).planner(self.options).facts()

    def adapter(self, model, tokenizer) -> ModelAdapter:
        return self.adapter_type(model, tokenizer)

    def compiles_token_steps(self) -> bool:
        return self.adapter_type.compiles_token_steps

    def compiles_scale_steps(self) -> bool:
        return self.adapter_type.compiles_scale_steps


class VarFamily(BuiltinFamily):
    """VAR/MVAR transformers with their multi-scale tokenizer (VAR's and MVAR's released files, ours)."""

    name, family, adapter_type = "var", "next-scale", VarAdapter
    planner, builder = staticmethod(plan_var_models), staticmethod(build_var_plan)


class RasterFamily(BuiltinFamily):
    """LlamaGen's c2i GPT (its key names) with a one-scale tokenizer."""

    name, family, adapter_type = "raster-gpt", "next-token", RasterAdapter
    planner, builder = staticmethod(plan_raster_models), staticmethod(build_raster_plan)


@hookimpl
def mvar_engine_model_adapters():
    return [
        ModelAdapterRecord(name="var", factory=VarFamily, family="next-scale", options=VarOptions,
                           description="VAR/MVAR next-scale transformer and multi-scale tokenizer"),
        ModelAdapterRecord(name="raster-gpt", factory=RasterFamily, family="next-token", options=RasterOptions,
                           description="LlamaGen-style class-conditional raster GPT (next-token)"),
    ]
