"""Configuration models: engine (components), sampling, model and output.

Precedence: built-in defaults < config file (TOML or JSON) < command-line flags. A component is
given as a name or a table ``{name = "...", option = value, ...}``; options of a component only
apply to that component (a flag that picks another name drops the file's options for that kind).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..core.errors import ConfigError
from ..core.registry import format_validation_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMPONENT_KINDS = ("trajectory", "attention", "cache", "backend")


def _as_choice_dict(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return {"name": value, "options": {}}
    if isinstance(value, dict):
        options = dict(value.get("options", {}))
        options.update({k: v for k, v in value.items() if k not in ("name", "options")})
        out = {"options": options}
        if "name" in value:
            out["name"] = value["name"]
        return out
    return None


class ComponentChoice(BaseModel):
    """A component by name plus its options (validated later against the component's own model)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_shorthand(cls, value: Any) -> Any:
        choice = _as_choice_dict(value)
        return choice if choice is not None and "name" in choice else value


class SamplingConfig(BaseModel):
    """VAR's sampling: CFG ramp, top-k, top-p; ``top_k = 1`` is greedy."""

    model_config = ConfigDict(extra="forbid")

    cfg: float = Field(1.5, ge=0, description="classifier-free guidance strength (VAR ramps it linearly over scales)")
    top_k: int = Field(900, ge=0, description="keep the k most likely tokens (0: off; 1: greedy)")
    top_p: float = Field(0.96, ge=0, le=1, description="nucleus mass kept (0 or 1: off)")
    seed: int = Field(0, description="seed of the torch.Generator (same seed, same images)")


class ModelConfig(BaseModel):
    """Which weights to run. Without checkpoints the embedded default model is used; with
    ``random_weights`` a freshly initialised model of the given size (timing and memory only)."""

    model_config = ConfigDict(extra="forbid")

    var_checkpoint: Path | None = None
    vae_checkpoint: Path | None = None
    depth: int | None = Field(None, ge=1, description="transformer depth (inferred from a checkpoint when omitted)")
    patch_nums: tuple[int, ...] | None = Field(None, description="scale schedule, e.g. 1,2,3,4,5,6,8,10,13,16")
    num_classes: int | None = Field(None, ge=1)
    random_weights: bool = False
    strict: bool = True
    adapter: str | None = Field(None, description="model family (see 'mvar-engine plugins --kind model'); default: "
                                                 "the first installed one that serves the trajectory's family")

    @field_validator("patch_nums", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(int(p) for p in value.replace(" ", "").split(",") if p)
        return value


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output: Path = Field(Path("outputs/samples.png"), description="PNG grid written here (one row per label)")
    per_image: bool = Field(False, description="also write one PNG per image next to the grid")
    save_tokens: Path | None = Field(None, description="write the per-scale token indices here (.pt or .safetensors)")


class EngineConfig(BaseModel):
    """Everything one generation run needs. ``attention``/``cache`` None: the trajectory's default
    (markov -> neighborhood/none, full -> dense/full)."""

    model_config = ConfigDict(extra="forbid")

    trajectory: ComponentChoice = ComponentChoice(name="markov")
    attention: ComponentChoice | None = None
    cache: ComponentChoice | None = None
    backend: ComponentChoice = ComponentChoice(name="auto")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="autocast dtype (CUDA only for 16-bit)")
    labels: list[int] | None = Field(None, description="class labels, one grid row each (default: up to 10 classes)")
    samples_per_label: int = Field(8, ge=1)
    batch_size: int = Field(16, ge=1, description="images per forward pass")
    progress: bool = True
    sampling: SamplingConfig = SamplingConfig()
    model: ModelConfig = ModelConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("labels", mode="before")
    @classmethod
    def _split_labels(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [int(p) for p in value.replace(" ", "").split(",") if p]
        return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file as a dict: ``.toml`` or ``.json``; errors are one line naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError([f"config file {path}: {error.strerror or error}"]) from None
    try:
        data = tomllib.loads(text) if path.suffix != ".json" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ConfigError([f"config file {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({error})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"config file {path}: the top level must be a table/object"])
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge of plain dicts; component entries whose name changes are replaced whole."""
    out = dict(base)
    for key, value in override.items():
        old = out.get(key)
        if key in COMPONENT_KINDS:
            old_choice = _as_choice_dict(old)
            new_choice = _as_choice_dict(value)
            if old_choice and new_choice and new_choice.get("name", old_choice.get("name")) == old_choice.get("name"):
                merged = {**old_choice, **new_choice}
                merged["options"] = {**old_choice.get("options", {}), **new_choice.get("options", {})}
                out[key] = merged
            else:
                out[key] = value
        elif isinstance(old, dict) and isinstance(value, dict):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


def build_config(file_data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> EngineConfig:
    """Validate defaults < file < overrides; problems raise ``ConfigError`` (one line each)."""
    data = merge(file_data or {}, overrides or {})
    try:
        return EngineConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None
