"""Head maps: which attention heads are spatial-locality heads and which are semantic-sink heads (SSD).

A head map is JSON (``format: mvar-engine/head-map/v1``) with ``layers`` x ``heads`` sparsity
``scores`` (the share of a head's attention mass on image tokens outside the query's k x k spatial
neighbourhood, averaged over calibration queries), the ``threshold`` and the resulting
``classification`` (``"sink"`` when score > threshold, else ``"local"``), plus free-form
``calibration`` details. ``mvar-engine profile-heads`` writes it with a PNG heat map beside it;
``--cache ssd --cache-head-map FILE`` reads it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..core.errors import UsageError
from ..core.files import read_json_model, save_marked_image, write_json_model

FORMAT = "mvar-engine/head-map/v1"
HeadKind = Literal["local", "sink"]


class HeadMap(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["mvar-engine/head-map/v1"] = FORMAT
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    neighborhood: int = Field(3, ge=1, description="side k of the spatial neighbourhood the scores use")
    threshold: float
    scores: list[list[float]]
    classification: list[list[HeadKind]]
    calibration: dict[str, Any] = Field(default_factory=dict)
    weights_id: str | None = Field(None, description="fingerprint of the weights profiled (models.checkpoint."
                                                     "weights_fingerprint); None: unknown (random weights, old maps)")

    @model_validator(mode="after")
    def _shapes(self) -> "HeadMap":
        for name in ("scores", "classification"):
            table = getattr(self, name)
            if len(table) != self.layers or any(len(row) != self.heads for row in table):
                raise ValueError(f"'{name}' must be {self.layers} layers x {self.heads} heads")
        bad = [(layer, head, score) for layer, row in enumerate(self.scores) for head, score in enumerate(row)
               if not (math.isfinite(score) and 0.0 <= score <= 1.0)]
        if bad:
            layer, head, score = bad[0]
            raise ValueError(f"{len(bad)} score(s) outside [0, 1] (layer {layer} head {head}: {score}); a score is a "
                             f"share of attention mass (profile again with `mvar-engine profile-heads`)")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold {self.threshold} is not a finite number")
        return self

    def sink_mask(self) -> list[list[bool]]:
        """``[layers][heads]``: True for semantic-sink heads."""
        return [[kind == "sink" for kind in row] for row in self.classification]

    def check_model(self, num_layers: int, num_heads: int) -> None:
        """One-line :class:`UsageError` when the map was made for another layer/head count."""
        if (self.layers, self.heads) != (num_layers, num_heads):
            raise UsageError(f"head map has {self.layers} layers x {self.heads} heads but the model has {num_layers} "
                             f"layers x {num_heads} heads (profile this model with `mvar-engine profile-heads`)")

    def check_weights(self, weights_id: str | None, source: str = "this run's weights") -> None:
        """One-line :class:`UsageError` when both this map and the run know their weights'
        fingerprint and the two differ (a map profiled on another model of the same shape)."""
        if self.weights_id and weights_id and self.weights_id != weights_id:
            raise UsageError(f"head map was profiled on other weights (fingerprint {self.weights_id[:12]}) than "
                             f"{source} ({weights_id[:12]}); profile this model with `mvar-engine profile-heads`")

    def counts(self) -> dict[str, int]:
        flat = [kind for row in self.classification for kind in row]
        return {"local": flat.count("local"), "sink": flat.count("sink")}


def auto_threshold(scores: list[list[float]]) -> float:
    """Otsu's split of the scores into two groups (the split maximising the between-group variance;
    the midpoint between the groups); with fewer than two distinct scores, 0.5. Unlike the widest
    gap, a single outlier does not decide the split."""
    flat = sorted(s for row in scores for s in row)
    n = len(flat)
    if n < 2 or flat[-1] - flat[0] <= 1e-9:
        return 0.5
    total = sum(flat)
    best, split, below = -1.0, 1, 0.0
    for i in range(1, n):
        below += flat[i - 1]
        if flat[i] - flat[i - 1] <= 1e-12:
            continue  # equal scores always fall on the same side
        w0, w1 = i / n, (n - i) / n
        between = w0 * w1 * (below / i - (total - below) / (n - i)) ** 2
        if between > best:
            best, split = between, i
    return (flat[split - 1] + flat[split]) / 2


def classify(scores: list[list[float]], threshold: float | None = None, *, neighborhood: int = 3,
             calibration: dict[str, Any] | None = None, weights_id: str | None = None) -> HeadMap:
    """A head map from ``scores [layers][heads]``: sink when score > ``threshold`` (None: :func:`auto_threshold`)."""
    tau = auto_threshold(scores) if threshold is None else float(threshold)
    return HeadMap(layers=len(scores), heads=len(scores[0]) if scores else 0, neighborhood=neighborhood,
                   threshold=tau, scores=[[float(s) for s in row] for row in scores],
                   classification=[["sink" if s > tau else "local" for s in row] for row in scores],
                   calibration=calibration or {}, weights_id=weights_id)


def load_head_map(path: str | Path) -> HeadMap:
    """Read a head map; a missing, unreadable or malformed file is a one-line :class:`UsageError`."""
    return read_json_model(path, HeadMap, "head map", "write one with `mvar-engine profile-heads`")


def write_head_map(head_map: HeadMap, path: str | Path) -> Path:
    """Write the JSON atomically."""
    return write_json_model(head_map, path)


def heatmap_image(head_map: HeadMap, cell: int = 28):
    """A PIL image: one cell per (layer row, head column), white (score 0) to red (score 1), sink
    heads outlined in black, layer and head indices on the margins."""
    from PIL import Image, ImageDraw

    margin = 34
    caption = f"layer x head, sparsity (tau {head_map.threshold:.3f}; outlined: sink)"
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(margin + cell * head_map.heads + 4, int(probe.textlength(caption)) + 8)
    height = margin + cell * head_map.layers + 18
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for h in range(head_map.heads):
        draw.text((margin + h * cell + cell // 3, 4), str(h), fill="black")
    for layer, (row, kinds) in enumerate(zip(head_map.scores, head_map.classification)):
        y = margin + layer * cell
        draw.text((4, y + cell // 3), str(layer), fill="black")
        for h, (score, kind) in enumerate(zip(row, kinds)):
            x = margin + h * cell
            level = int(round(255 * (1 - min(max(score, 0.0), 1.0))))
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(255, level, level),
                           outline="black" if kind == "sink" else (200, 200, 200), width=3 if kind == "sink" else 1)
    draw.text((4, height - 14), caption, fill="black")
    return image


def write_heatmap(head_map: HeadMap, path: str | Path) -> Path:
    """Write :func:`heatmap_image` as PNG atomically."""
    return save_marked_image(heatmap_image(head_map), path, format="PNG")


__all__ = ["FORMAT", "HeadMap", "auto_threshold", "classify", "heatmap_image", "load_head_map", "write_head_map",
           "write_heatmap"]
