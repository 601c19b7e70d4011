"""``scalekv``: ScaleKV's selection rule (arXiv 2505.19602; code StargazerX0/ScaleKV, ``scale_kv.py``)
for next-scale models under ``full``, in bounded storage.

After each scale's attention, a layer holding more than ``budget - 1`` tokens keeps, per row and per
head: the ``window`` tokens at the centres of a ``g x g`` grid over the scale just computed
(``g = sqrt(window)``; the most recent ``window`` tokens where the map is smaller than the grid),
and the ``budget - 1 - window`` other tokens that those window queries score highest. The score of
a key is the sum over the window queries of their raw attention logits (``scale * q . k``, window
keys left out), max-pooled along the kept sequence (``kernel_size``), as in the code. ``budget``
counts like every budgeted cache's: a fraction of the sequence or a count; ``budget - 1`` tokens
are kept between steps, and a scale of ``l`` tokens grows the buffers once to ``budget - 1 + l``.
Each row keeps its own tokens, the cond and uncond rows of a sample included (as the code does),
so the policy declares ``stand_in_spans``.

Where this differs from the paper: ScaleKV gives each (layer, scale) a drafter or refiner budget
from an offline attention-selectivity calibration; here every layer and scale has the same budget
(no calibration here). The logits are scaled by the model's own attention scale (the code divides
by ``sqrt(head_dim)``, Infinity's scale).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from ..core.attention import AttentionSpec
from ..core.cache import CachePolicy
from ..core.errors import UsageError, setting
from ..core.kv_store import BoundedKV
from ..core.layout import SequenceLayout, Spans, merge_spans
from .budget_cache import budget_tokens


class ScaleKVOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    budget: float = Field(0.2, gt=0, description="tokens a layer stores: a fraction of the sequence (<= 1) or a count "
                                                 "(> 1); budget - 1 are kept between scales")
    window: int = Field(16, ge=1, description="window queries (a square: the centres of a sqrt x sqrt grid over the "
                                              "newest scale), always kept")
    kernel_size: int = Field(5, ge=1, description="max-pooling width of the scores along the sequence (odd)")

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
        self.window_queries: list[torch.Tensor | None] = []
        self.window: list[int] = []  # slots of the window tokens among the step's, for the step in progress
        self.grids: dict[tuple[int, int], tuple[int, int]] = {}  # a scale's span -> its (height, width)
        self.scale = 1.0
        self.kept = self.step = 0

    def check_layout(self, layout: SequenceLayout, *, num_layers: int, num_heads: int,
                     weights_id: str | None = None) -> None:
        """The budget holds the window (and one more token)."""
        budget = budget_tokens(self.options.budget, layout.length)
        if budget - 1 < self.options.window:
            raise UsageError(f"{setting('cache_budget', f'{self.options.budget:g}')} gives {budget} tokens, fewer than "
                             f"the {self.options.window} window tokens (and one) always kept (raise "
                             f"{setting('cache_budget')} or lower {setting('cache_window')})")

    def begin(self, *, num_layers, batch, num_heads, head_dim, layout, device, dtype, guided=False):
        self.check_layout(layout, num_layers=num_layers, num_heads=num_heads)
        self.kept = budget_tokens(self.options.budget, layout.length) - 1
        capacity = min(layout.length, self.kept + 1)  # a larger scale grows the buffers once, as it arrives
        self.layers = [BoundedKV(batch, num_heads, capacity, head_dim, device, dtype) for _ in range(num_layers)]
        self.window_queries = [None] * num_layers
        self.grids = {scale.span: (scale.height, scale.width) for scale in layout.scales}
        self.window = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, spans: Spans):
        store = self.layers[layer]
        count = self.step = k.shape[2]
        if layer == 0:  # a step is one scale (its spans cover it): the window of its map
            height, width = self.grids.get((spans[0][0], spans[-1][1]), (1, count))
            self.window = window_positions(height, width, self.options.window)
        k_all, v_all = store.append(k, v, spans)
        return k_all, v_all, merge_spans(((0, store.filled - count), *spans))  # stand-in: kept keys first

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, scale: float, *,
                received: torch.Tensor | None = None) -> None:
        """Keep the step's window queries (the scale's tokens are the step's queries, in map order);
        the layer is compressed at ``end_step``, after every layer attended over it."""
        self.window_queries[layer] = q[:, :, self.window]
        self.scale = scale

    def end_step(self) -> None:
        for layer, store in enumerate(self.layers):
            queries = self.window_queries[layer]
            if queries is not None and store.filled > self.kept:
                store.keep(self.selection(store, queries))
            self.window_queries[layer] = None

    def selection(self, store: BoundedKV, queries: torch.Tensor) -> torch.Tensor:
        """``[rows, heads, kept]`` slots in position order: the window's, then the top-scored rest."""
        n, count = store.filled, len(self.window)
        window = torch.tensor(self.window, device=store.k.device) + (n - self.step)
        logits = torch.matmul(queries.float(), store.k[:, :, :n].float().transpose(-1, -2)) * self.scale
        logits[..., window] = float("-inf")
        scores = F.max_pool1d(logits.sum(dim=2), self.options.kernel_size, stride=1,
                              padding=self.options.kernel_size // 2)
        scores[..., window] = float("-inf")
        rest = scores.topk(min(self.kept - count, n - count), dim=-1).indices
        chosen = torch.cat([rest, window.expand(*rest.shape[:2], -1)], dim=-1)
        return chosen.sort(dim=-1).values

    def nbytes(self) -> int:
        return sum(store.nbytes() for store in self.layers)


__all__ = ["ScaleKVCache", "ScaleKVOptions", "window_positions"]
