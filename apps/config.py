"""Configuration models: engine (components), sampling, model and output.

Precedence: built-in defaults < config file (TOML or JSON) < command-line flags. A component is
given as a name or a table ``{name = "...", option = value, ...}``; options of a component only
apply to that component (a flag that picks another name drops the file's options for that kind).
"""

from __future__ import annotations

import json
import math
import sys
import stat
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

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


class SettingsModel(BaseModel):
    """A settings table: ``true``/``false`` is refused where a number or a name is due (pydantic's
    lax mode would read ``batch_size = true`` as 1)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, value: Any, info) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and bool not in (typing.get_args(annotation) or (annotation,)):
            raise PydanticCustomError("not_a_bool", f"{str(value).lower()} is a boolean; give {_describe_type(annotation)}")
        return value


def _describe_type(annotation: Any) -> str:
    """What a settings field holds, in words (``int | None`` -> "an integer")."""
    kinds = [kind for kind in typing.get_args(annotation) or (annotation,) if kind is not type(None)]
    words = {int: "an integer", float: "a number", str: "a name"}
    return words.get(kinds[0], "a value of its type") if len(kinds) == 1 else "a value of its type"


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


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""The seeds ``torch.Generator.manual_seed`` accepts."""

INT64_MAX = 2**63 - 1
"""The largest count torch takes (larger ones overflow in C++)."""


CFG_MAX = 1e30
"""The largest guidance scale: guided logits ``cond + t * (cond - uncond)`` stay finite in float32
(a logit gap up to 3e8); beyond it they overflow and the draw's probabilities are NaN."""


def _finite_number(value: Any, flag: str, allowed: str) -> Any:
    """``value`` unless it is (or spells) inf or nan: then a one-line error naming ``flag``."""
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        return value  # pydantic reports the non-number
    if number is not None and not math.isfinite(number):
        raise PydanticCustomError("finite_number", f"{flag} takes {allowed}")
    return value


def not_empty_path(value: Any, flag: str) -> Any:
    """``value`` unless it is an empty (or blank) path, which ``Path`` would turn into ``.``."""
    if isinstance(value, str) and not value.strip():
        raise PydanticCustomError("empty_path", f"{flag} is empty: give a path")
    return value


def split_int_list(value: Any, flag: str, *, minimum: int | None = None) -> Any:
    """``"1, 2,3"`` -> ``[1, 2, 3]``; empty lists, holes (``1,,2``) and (with ``minimum``) smaller
    values are one-line errors naming ``flag``."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if not value.strip():
            raise PydanticCustomError("empty_list", f"{flag} is empty: give at least one comma-separated integer")
        if any(not p for p in parts):
            raise PydanticCustomError("list_hole", f"{flag} has an empty entry between commas (e.g. 1,2,3)")
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise PydanticCustomError("list_int", f"{flag} takes comma-separated integers") from None
    if isinstance(value, (list, tuple)):
        if not value:
            raise PydanticCustomError("empty_list", f"{flag}: give at least one integer (got an empty list)")
        small = [v for v in value if isinstance(v, int) and not isinstance(v, bool) and minimum is not None and v < minimum]
        if small:
            raise PydanticCustomError("list_min", f"{flag} entries {small} are out of range: every entry must be >= {minimum}")
    return value


class SamplingConfig(SettingsModel):
    """VAR's sampling: CFG ramp, top-k, top-p; ``top_k = 1`` is greedy."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cfg: float = Field(1.5, ge=0, le=CFG_MAX,
                       description="classifier-free guidance strength (VAR ramps it linearly over scales)")
    top_k: int = Field(900, ge=0, le=INT64_MAX, description="keep the k most likely tokens (0: off; 1: greedy)")
    top_p: float = Field(0.96, ge=0, le=1, description="nucleus mass kept (0 or 1: off)")
    seed: int = Field(0, ge=SEED_MIN, le=SEED_MAX, description="seed of the torch.Generator (same seed, same images)")

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_range(cls, value: Any) -> Any:
        try:
            number = int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
        except ValueError:
            return value  # pydantic reports the non-integer
        if number is not None and not SEED_MIN <= number <= SEED_MAX:
            raise PydanticCustomError("seed_range", "--seed takes an integer from -2**63 to 2**64 - 1 "
                                                    "(what torch.Generator accepts)")
        return value

    @field_validator("cfg", "top_p", mode="before")
    @classmethod
    def _finite(cls, value: Any, info) -> Any:
        if info.field_name == "top_p":
            return _finite_number(value, "--top-p", "a finite number in [0, 1]")
        value = _finite_number(value, "--cfg", f"a finite number from 0 to {CFG_MAX:g}")
        try:
            too_large = not isinstance(value, bool) and float(value) > CFG_MAX
        except (TypeError, ValueError):
            too_large = False  # pydantic reports the non-number
        if too_large:
            raise PydanticCustomError("cfg_range", f"--cfg takes a finite number from 0 to {CFG_MAX:g} "
                                                   "(larger scales overflow float32 logits)")
        return value


DEPRECATED_MODEL_KEYS = {"var_checkpoint": "checkpoint", "vae_checkpoint": "tokenizer", "adapter": "name"}
"""Model settings renamed in 0.x (old key -> new key): read for one more release, with a warning."""


class ModelChoice(BaseModel):
    """Which model: a family ``name`` (``mvar-engine plugins --kind model``; None: the first family
    serving the trajectory whose options accept ``options``) and its options, validated against
    that family's own options model when the run resolves (``checkpoint``, ``tokenizer``,
    ``patch_nums``, ``model_dir``, ``prompt``...). Without files, the weights shipped for the
    trajectory run (``digits-*``)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_table(cls, value: Any) -> Any:
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_unset=True)
        if not isinstance(value, dict):
            return value
        value = dict(value)
        for old, new in DEPRECATED_MODEL_KEYS.items():
            if old in value:
                warnings.warn(f"model setting {old!r} is deprecated and goes in the next release; use {new!r}",
                              FutureWarning, stacklevel=2)
                if new in value:
                    raise PydanticCustomError("renamed_twice", f"{old} and {new} name the same setting: give {new} only")
                value[new] = value.pop(old)
        choice = _as_choice_dict(value) or {}
        name = choice.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise PydanticCustomError("empty_name", "the model's name is empty: give a model family "
                                                    "(`mvar-engine plugins --kind model` lists them)")
        return choice


class OutputConfig(SettingsModel):
    model_config = ConfigDict(extra="forbid")

    output: Path = Field(Path("outputs/samples.png"), description="image grid written here (one row per label): .png, .jpg, .jpeg or .webp")
    per_image: bool = Field(False, description="also write one PNG per image next to the grid")
    save_tokens: Path | None = Field(None, description="write the per-scale token indices here (.pt or .safetensors)")
    overwrite: bool = Field(False, description="replace existing output files this command did not write")

    @field_validator("output", "save_tokens", mode="before")
    @classmethod
    def _no_empty_path(cls, value: Any, info) -> Any:
        return not_empty_path(value, f"--{info.field_name.replace('_', '-')}")


class EngineConfig(SettingsModel):
    """Everything one generation run needs. ``attention``/``cache`` None: the trajectory's default
    (markov -> neighborhood/none, full -> dense/full)."""

    model_config = ConfigDict(extra="forbid")

    trajectory: ComponentChoice = ComponentChoice(name="markov")
    attention: ComponentChoice | None = None
    cache: ComponentChoice | None = None
    backend: ComponentChoice = ComponentChoice(name="auto")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="autocast dtype (16-bit on CUDA; bfloat16 also on a CPU with native bf16)")
    labels: list[int] | None = Field(None, description="class labels, one grid row each (default: up to 10 classes)")
    samples_per_label: int = Field(8, ge=1, le=INT64_MAX)
    batch_size: int = Field(16, ge=1, le=INT64_MAX, description="images per forward pass")
    compile: bool = Field(False, description="compile the decoding steps: raster one-token steps, next-scale steps "
                                             "one graph per scale (torch.compile; CUDA graphs on CUDA)")
    progress: bool = True
    sampling: SamplingConfig = SamplingConfig()
    model: ModelChoice = ModelChoice()
    output: OutputConfig = OutputConfig()

    @field_validator("labels", mode="before")
    @classmethod
    def _split_labels(cls, value: Any) -> Any:
        return None if value is None else split_int_list(value, "--labels", minimum=0)


CONFIG_MAX_BYTES = 2**20
"""The largest config file read (a settings file is a few hundred bytes)."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file as a dict: ``.toml`` or ``.json``; errors are one line naming the file."""
    path = Path(path)
    try:  # a pipe would block and a device (/dev/zero) never ends: regular files of a bounded size only
        status = path.stat()
    except OSError as error:
        raise ConfigError([f"config file {path}: {error.strerror or error}"]) from None
    if stat.S_ISREG(status.st_mode) and status.st_size > CONFIG_MAX_BYTES:
        raise ConfigError([f"config file {path}: {status.st_size} bytes, more than a config file's "
                           f"{CONFIG_MAX_BYTES // 2**20} MiB (give the .toml or .json settings file)"])
    if not stat.S_ISREG(status.st_mode) and not stat.S_ISDIR(status.st_mode):
        raise ConfigError([f"config file {path}: is not a regular file (a pipe, socket or device); "
                           f"give a .toml or .json file"])
    try:
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise ConfigError([f"config file {path}: is a directory (give a .toml or .json file)"]) from None
    except OSError as error:
        raise ConfigError([f"config file {path}: {error.strerror or error}"]) from None
    except UnicodeDecodeError as error:
        raise ConfigError([f"config file {path}: not UTF-8 text (byte {error.start}: {error.reason}); save it as "
                           f"UTF-8 .toml or .json"]) from None
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
        if key in COMPONENT_KINDS or key == "model":
            old_choice = _as_choice_dict(old)
            new_choice = _as_choice_dict(value)
            old_name = old_choice.get("name") if old_choice else None
            if key == "model" and old_choice and old_name is None:  # a model table naming no family: its options stay
                old_name = new_choice.get("name") if new_choice else None
            if old_choice and new_choice and new_choice.get("name", old_name) == old_name:
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
        unknown = [".".join(map(str, p["loc"])) for p in error.errors() if p["type"] == "extra_forbidden"]
        if unknown:  # name the settings that do exist where the unknown key sits
            where = unknown[0].split(".")
            valid = ", ".join(settings_at(where[:-1])) or "none"
            raise ConfigError([f"unknown setting {unknown[0]!r} (valid {'.'.join(where[:-1]) or 'top-level'} "
                               f"settings: {valid})"]) from None
        raise ConfigError(format_validation_error(error)) from None


def settings_at(path: Sequence[str]) -> list[str]:
    """The setting names of the config table at ``path`` (``[]``: the top level, ``["model"]``: the
    model table; a component table holds ``name`` and ``options``)."""
    model: Any = EngineConfig
    for part in path:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        annotation = field.annotation
        candidates = [a for a in (getattr(annotation, "__args__", None) or (annotation,))
                      if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)
