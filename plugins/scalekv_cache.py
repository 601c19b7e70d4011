"""``scalekv``: ScaleKV's selection rule (arXiv 2505.19602; code StargazerX0/ScaleKV, ``scale_kv.py``)
for next-scale models under ``full``, in bounded storage.

After each scale's attention, a layer holding more than ``budget - 1`` tokens keeps, per row and per
head: the ``window`` tokens at the centres of a ``g x g`` grid over the scale just computed
(``g = sqrt(window)``; the most recent ``window`` tokens where the map is smaller than the grid),
and the ``budget - 1 - window`` other tokens that those window queries score highest. The score of
a key is the sum over the window queries of their raw attention logits (``scale * q . k``, window
keys left out), max-pooled along the kept sequence (``kernel_size``), as in the code. ``budget``
counts like every budgeted cache's: a fraction of the sequence or a count; ``budget - 1`` tokens
are kept between steps. A layer is compressed right after its own attention (as the code's patched
attention does), from a transient copy when the scale does not fit beside the kept tokens, so the
storage of every layer is its budget for the scale just computed and only the layer being computed
holds a scale more.
Each row keeps its own tokens, the cond and uncond rows of a sample included (as the code does),
so the policy declares ``stand_in_spans``.

Budgets per (layer, scale): with ``calibration`` (a scale profile from ``mvar-engine
profile-scales``) each scale's drafter layers keep their whole history and the refiners share what
is left of an average of ``budget - 1`` (at least ``window + 1``; :meth:`ScaleProfile.budgets`), as
in the code's budget files; without one every layer keeps ``budget - 1``. The selectivity index
that classes the layers is this project's reading of the paper (the code ships budgets, not the
calibration; :mod:`~mvar_engine.plugins.scale_profile`). ``score`` picks what the window queries
sum: raw logits scaled by the model's attention scale (the code divides by ``sqrt(head_dim)``,
Infinity's scale) or softmax probabilities (the paper).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from ..core.attention import AttentionSpec
from ..core.cache import CachePolicy
from ..core.errors import UsageError, setting
from ..core.kv_store import BoundedKV
from ..core.layout import SequenceLayout, Spans, merge_spans, spans_to_positions
from .budget_cache import budget_tokens
from .scale_profile import load_scale_profile


class ScaleKVOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    budget: float = Field(0.2, gt=0, description="tokens a layer stores: a fraction of the sequence (<= 1) or a count "
                                                 "(> 1); budget - 1 are kept between scales")
    window: int = Field(16, ge=1, description="window queries (a square: the centres of a sqrt x sqrt grid over the "
                                              "newest scale), always kept")
    kernel_size: int = Field(5, ge=1, description="max-pooling width of the scores along the sequence (odd)")
    score: Literal["logits", "softmax"] = Field("logits", description="what the window queries sum: raw logits (the "
                                                                       "code) or attention probabilities (the paper)")
    calibration: str | None = Field(None, description="scale profile (mvar-engine profile-scales): drafter and "
                                                      "refiner budgets per (layer, scale) averaging budget - 1; none: "
                                                      "every layer keeps budget - 1")

    @field_validator("window")
    @classmethod
    def _square(cls, value: int) -> int:
        if math.isqrt(value) ** 2 != value:
            raise PydanticCustomError("square", f"give a square (1, 4, 9, 16, ...), got {value}")
        return value

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise PydanticCustomError("odd", f"give an odd width (the pooled score stays centred), got {value}")
        return value


def window_positions(height: int, width: int, window: int) -> list[int]:
    """Row-major indices, within an ``height x width`` map, of the window tokens: the centres of a
    ``g x g`` grid of equal patches (``g = sqrt(window)``: patch ``i`` of a side ``n`` spans
    ``i * (n // g)`` onwards, its centre ``(n // g - 1) // 2`` into it); the last ``window`` tokens
    where the map is smaller than the grid."""
    grid = math.isqrt(window)
    if height < grid or width < grid:
        return list(range(max(0, height * width - window), height * width))
    rows = [i * (height // grid) + (height // grid - 1) // 2 for i in range(grid)]
    cols = [j * (width // grid) + (width // grid - 1) // 2 for j in range(grid)]
    return [r * width + c for r in rows for c in cols]


class ScaleKVCache(CachePolicy):
    """The newest scale's window tokens plus the keys its window queries score highest."""

    name = "scalekv"
    families = ("next-scale",)
    stand_in_spans = True
    track_scores = False

    def __init__(self, options: ScaleKVOptions | None = None) -> None:
        self.options = options or ScaleKVOptions()
        self.layers: list[BoundedKV] = []
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []  # a scale that did not fit
        self.window: list[int] = []  # slots of the window tokens among the step's, for the step in progress
        self.grids: dict[tuple[int, int], tuple[int, int]] = {}  # a scale's span -> its (height, width)
        self.step = self.scale_index = 0
        self.profile = load_scale_profile(self.options.calibration) if self.options.calibration else None
        self.kept_after: list[list[int]] = []  # [scales][layers]: tokens a layer keeps after each scale

    def check_layout(self, layout: SequenceLayout, *, num_layers: int, num_heads: int,
                     weights_id: str | None = None) -> None:
        """The budget holds the window (and one more token); a profile was made on this model."""
        budget = budget_tokens(self.options.budget, layout.length)
        if budget - 1 < self.options.window:
            raise UsageError(f"{setting('cache_budget', f'{self.options.budget:g}')} gives {budget} tokens, fewer than "
                             f"the {self.options.window} window tokens (and one) always kept (raise "
                             f"{setting('cache_budget')} or lower {setting('cache_window')})")
        if self.profile is not None:
            self.profile.check_model(layout, num_layers, weights_id,
                                     source=f"{setting('cache_calibration', self.options.calibration)}")

    def budgets(self, layout: SequenceLayout, num_layers: int) -> list[list[int]]:
        """``[scales][layers]`` tokens kept after each scale: ``budget - 1`` everywhere, or the
        profile's drafter and refiner budgets at that average (refiners keep at least the window
        and one more)."""
        kept = budget_tokens(self.options.budget, layout.length) - 1
        if self.profile is None:
            return [[kept] * num_layers for _ in layout.scales]
        return self.profile.budgets(kept, self.options.window + 1)

    def begin(self, *, num_layers, batch, num_heads, head_dim, layout, device, dtype, guided=False):
        self.check_layout(layout, num_layers=num_layers, num_heads=num_heads)
        self.kept_after, self.scale_index = self.budgets(layout, num_layers), 0
        self.layers = [BoundedKV(batch, num_heads, min(layout.length, kept), head_dim, device, dtype)
                       for kept in self.kept_after[0]]
        self.pending = [None] * num_layers
        self.grids = {scale.span: (scale.height, scale.width) for scale in layout.scales}
        self.window = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, spans: Spans):
        """The kept keys, then the scale's: in the layer's storage where they fit, else in a transient
        copy that :meth:`observe` selects from right after the layer's attention (so between layers a
        layer holds its budget, never budget plus a scale)."""
        store = self.layers[layer]
        count = self.step = k.shape[2]
        if layer == 0:  # a step is one scale (its spans cover it): the window of its map
            height, width = self.grids.get((spans[0][0], spans[-1][1]), (1, count))
            self.window = window_positions(height, width, self.options.window)
        if store.filled + count <= store.capacity:
            k_all, v_all = store.append(k, v, spans)
        else:
            k_all = torch.cat([store.k[:, :, :store.filled], k.to(store.k.dtype)], dim=2)
            v_all = torch.cat([store.v[:, :, :store.filled], v.to(store.v.dtype)], dim=2)
            new = spans_to_positions(spans).to(store.positions.device, torch.int32).expand(*k.shape[:2], -1)
            self.pending[layer] = (k_all, v_all, torch.cat([store.positions[:, :, :store.filled], new], dim=2))
        return k_all, v_all, merge_spans(((0, k_all.shape[2] - count), *spans))  # stand-in: kept keys first

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, scale: float, *,
                received: torch.Tensor | None = None) -> None:
        """After the layer's attention: keep its budget for this scale, chosen by the window queries
        (the scale's tokens are the step's queries, in map order), in storage of that size."""
        kept = self.kept_after[min(self.scale_index, len(self.kept_after) - 1)][layer]
        store, pending, n = self.layers[layer], self.pending[layer], k.shape[2]
        self.pending[layer] = None
        if pending is None and n <= kept:
            return
        size = min(n, kept)
        index = self.selection(k, q[:, :, self.window], kept, scale) if n > kept else \
            torch.arange(n, device=k.device).expand(*k.shape[:2], -1)
        source = pending or (store.k[:, :, :n], store.v[:, :, :n], store.positions[:, :, :n])
        if store.capacity != size:  # a drafter's budget at one scale, a refiner's at the next
            store = self.layers[layer] = BoundedKV(*k.shape[:2], size, k.shape[-1], k.device, store.k.dtype)
        store.fill_from(*source, index)

    def end_step(self) -> None:
        self.scale_index += 1

    def selection(self, k: torch.Tensor, queries: torch.Tensor, kept: int, scale: float) -> torch.Tensor:
        """``[rows, heads, kept]`` indices into ``k: [rows, heads, n, D]`` (the kept keys, then the
        step's) in position order: the window's, then the rest the window ``queries`` score highest."""
        n, count = k.shape[2], len(self.window)
        window = torch.tensor(self.window, device=k.device) + (n - self.step)
        logits = torch.matmul(queries.float(), k.float().transpose(-1, -2)) * scale
        if self.options.score == "softmax":
            logits = torch.softmax(logits, dim=-1)
        logits[..., window] = float("-inf")
        scores = F.max_pool1d(logits.sum(dim=2), self.options.kernel_size, stride=1,
                              padding=self.options.kernel_size // 2)
        scores[..., window] = float("-inf")
        rest = scores.topk(min(kept - count, n - count), dim=-1).indices
        chosen = torch.cat([rest, window.expand(*rest.shape[:2], -1)], dim=-1)
        return chosen.sort(dim=-1).values

    def nbytes(self) -> int:
        return sum(store.nbytes() for store in self.layers)


__all__ = ["ScaleKVCache", "ScaleKVOptions", "window_positions"]
