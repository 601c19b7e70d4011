"""The options of the built-in model families that load a transformer file and a tokenizer file
(VAR/MVAR, the LlamaGen-style raster GPT). Each field is a model setting: a CLI flag
(``--checkpoint``, ``--patch-nums``, ``--no-strict``), a key of a config file's ``[model]`` table and
of the Python API's ``model={...}``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..core.errors import setting
from .config import INT64_MAX, SEED_MAX, SEED_MIN, SettingsModel, not_empty_path, split_int_list


class CheckpointModelOptions(SettingsModel):
    """A transformer and its tokenizer: both files, or ``random_weights`` of a size (time and memory
    only); neither: the weights shipped for the run's trajectory (``digits-*``)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: Path | None = Field(None, description="the model's weights (.pth, .pt or .safetensors): VAR/MVAR, ours, "
                                                      "or LlamaGen's c2i_*.pt")
    tokenizer: Path | None = Field(None, description="the tokenizer's weights: VAR's multi-scale VQVAE, ours, or "
                                                     "LlamaGen's VQ-16 (vq_ds16_c2i.pt)")
    depth: int | None = Field(None, ge=1, le=INT64_MAX, description="transformer depth (read off the checkpoint when "
                                                                   "omitted)")
    patch_nums: tuple[int, ...] | None = Field(None, description="scale schedule, e.g. 1,2,3,4,5,6,8,10,13,16 (a raster "
                                               "model: one grid side, 16 at 256px, 24 at 384px)")
    num_classes: int | None = Field(None, ge=1, le=INT64_MAX, description="number of classes (random weights)")
    random_weights: bool = Field(False, description="a randomly initialised model (time and memory only)")
    init_seed: int = Field(0, ge=SEED_MIN, le=SEED_MAX, description="seed of the random weights' initialisation")
    strict: bool = Field(True, description="refuse checkpoints that do not match the model exactly")

    @field_validator("checkpoint", "tokenizer", mode="before")
    @classmethod
    def _no_empty_file(cls, value: Any, info) -> Any:
        return not_empty_path(value, setting(info.field_name))

    @field_validator("patch_nums", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_int_list(value, setting("patch_nums"), minimum=1)

    @model_validator(mode="after")
    def _random_or_files(self) -> "CheckpointModelOptions":
        files = [setting(name) for name in ("checkpoint", "tokenizer") if getattr(self, name) is not None]
        if self.random_weights and files:
            raise PydanticCustomError("random_and_files", f"{setting('random_weights')} builds a freshly initialised "
                                      f"model, so {' and '.join(files)} would be ignored (drop one or the other)")
        return self

    def size_settings(self) -> list[str]:
        """The size settings given (``--depth 16``), for messages."""
        return [setting(name, value if not isinstance(value, tuple) else ",".join(map(str, value)))
                for name in ("depth", "patch_nums", "num_classes", "num_heads")
                if (value := getattr(self, name, None))]


class VarOptions(CheckpointModelOptions):
    """VAR/MVAR: a next-scale transformer (heads = depth) and its multi-scale VQVAE."""


class RasterOptions(CheckpointModelOptions):
    """A LlamaGen-style raster GPT and its one-scale tokenizer."""

    num_heads: int | None = Field(None, ge=1, le=INT64_MAX, description="attention heads (LlamaGen's files do not "
                                  "store it: read off the table of released sizes when omitted)")
