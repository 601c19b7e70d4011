"""Scale profiles: what a next-scale model's layers attend to at each scale, for ``scalekv`` and ``ams``.

A scale profile is JSON (``format: mvar-engine/scale-profile/v1``), written by ``mvar-engine
profile-scales`` from calibration generations with the full cache, read by ``--cache scalekv
--cache-calibration FILE`` and ``--cache ams --cache-calibration FILE``:

- ``selectivity [scales][layers]``: ScaleKV's attention-selectivity index as implemented here (the
  paper's code ships no calibration): over the queries of scale ``s``, averaged over rows, heads and
  queries, the attention mass on scale ``s``'s own tokens plus the mass on the top
  ``history_share`` of the earlier tokens. High: a small cache holds what the layer attends to
  (a refiner); low: attention spread over the history (a drafter). Scale 0 has no history (0).
- ``drafters [scales][layers]``: per scale, the ``drafters_per_scale`` layers of lowest z-scored
  selectivity (ScaleKV: drafters keep a large budget, refiners a small one).
- ``key_similarity [layers]``: AMS-KV's inter-scale key similarity, the cosine of the mean keys of
  consecutive scales (from scale 2 on), averaged over rows, heads and scales; ``keeps_more``
  marks the layers below Otsu's split (:func:`~.head_map.auto_threshold`), which keep more scales.

:meth:`ScaleProfile.budgets` turns the classes into tokens kept after each scale at an average.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..core.errors import UsageError
from ..core.files import read_json_model, write_json_model
from ..core.layout import SequenceLayout

FORMAT = "mvar-engine/scale-profile/v1"


class ScaleProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    format: Literal["mvar-engine/scale-profile/v1"] = FORMAT
    layers: int = Field(ge=1)
    scale_sizes: list[int] = Field(min_length=1, description="tokens of every scale of the profiled schedule")
    history_share: float = Field(gt=0, le=1, description="share of the earlier tokens the selectivity index counts")
    drafters_per_scale: int = Field(ge=0)
    selectivity: list[list[float]]
    drafters: list[list[bool]]
    key_similarity: list[float]
    keeps_more: list[bool]
    calibration: dict[str, Any] = Field(default_factory=dict)
    weights_id: str | None = None

    @model_validator(mode="after")
    def _shapes(self) -> "ScaleProfile":
        scales = len(self.scale_sizes)
        for name in ("selectivity", "drafters"):
            table = getattr(self, name)
            if len(table) != scales or any(len(row) != self.layers for row in table):
                raise ValueError(f"'{name}' must be {scales} scales x {self.layers} layers")
        for name in ("key_similarity", "keeps_more"):
            if len(getattr(self, name)) != self.layers:
                raise ValueError(f"'{name}' must hold one value per layer ({self.layers})")
        if self.drafters_per_scale > self.layers:
            raise ValueError(f"drafters_per_scale {self.drafters_per_scale} exceeds the {self.layers} layers")
        return self

    def check_model(self, layout: SequenceLayout, num_layers: int, weights_id: str | None = None,
                    source: str = "scale profile") -> None:
        """One-line :class:`UsageError` when the profile was made on another depth, schedule or weights."""
        sizes = [scale.numel for scale in layout.scales]
        redo = "(profile this model with `mvar-engine profile-scales`)"
        if self.layers != num_layers:
            raise UsageError(f"{source} has {self.layers} layers but the model has {num_layers} {redo}")
        if self.scale_sizes != sizes:
            raise UsageError(f"{source} was made on scales of {self.scale_sizes} tokens but this schedule has {sizes} "
                             f"{redo}")
        if self.weights_id and weights_id and self.weights_id != weights_id:
            raise UsageError(f"{source} was profiled on other weights (fingerprint {self.weights_id[:12]}) than this "
                             f"run's ({weights_id[:12]}) {redo}")

    def budgets(self, average: int, floor: int) -> list[list[int]]:
        """``[scales][layers]`` tokens each layer keeps after each scale, ``average`` of them on average
        over the layers (the ScaleKV rule): while the history fits, all of it; past that, drafters
        keep their whole history and refiners share the rest equally, refiners at least ``floor``
        (drafters then give up what it takes)."""
        out, held = [], 0
        for size, drafters in zip(self.scale_sizes, self.drafters):
            held += size
            count = sum(drafters)
            if held <= average or count in (0, self.layers):
                out.append([min(held, average)] * self.layers)
                continue
            refiner = max(floor, (self.layers * average - count * held) // (self.layers - count))
            drafter = min(held, max(refiner, (self.layers * average - (self.layers - count) * refiner) // count))
            out.append([drafter if d else min(refiner, held) for d in drafters])
        return out


def drafter_classes(selectivity: list[list[float]], count: int) -> list[list[bool]]:
    """Per scale, the ``count`` layers of lowest z-scored selectivity (ties: the earlier layer); no
    drafters at a scale where every layer scores alike to 1e-6 (nothing to tell them apart: scale 0,
    and scale 1 whose history is the class token alone)."""
    out = []
    for row in selectivity:
        mean = sum(row) / len(row)
        spread = math.sqrt(sum((x - mean) ** 2 for x in row) / len(row))
        if spread <= 1e-6 * max(1.0, abs(mean)):
            out.append([False] * len(row))
            continue
        z = [(x - mean) / spread for x in row]
        chosen = set(sorted(range(len(row)), key=lambda i: (z[i], i))[:count])
        out.append([i in chosen for i in range(len(row))])
    return out


def load_scale_profile(path: str | Path) -> ScaleProfile:
    """Read a profile; a missing, unreadable or malformed file is a one-line :class:`UsageError`."""
    return read_json_model(path, ScaleProfile, "scale profile", "write one with `mvar-engine profile-scales`")


def write_scale_profile(profile: ScaleProfile, path: str | Path) -> Path:
    """Write the JSON atomically."""
    return write_json_model(profile, path)


__all__ = ["FORMAT", "ScaleProfile", "drafter_classes", "load_scale_profile", "write_scale_profile"]
