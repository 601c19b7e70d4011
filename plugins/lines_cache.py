"""``lines``: a raster cache kept in image lines, after LineAR (arXiv 2512.04857; its code is not
released, so this follows the paper's description), in bounded storage (:mod:`.budget_cache`).

Per (sample, head), within ``budget`` tokens a layer: the class prefix and the first ``anchors``
image tokens, always; the current image line and the ``lines`` lines before it (the recent window,
which shrinks, oldest first, when the budget cannot hold it); and, in the remaining slots, the
middle tokens that the current line's queries attended to most. Scores restart after the first
token of every line is stored (that step's eviction still ranks by the finished line), so a middle
token competes by the attention of the line being drawn ("inter-line attention"); a
one-token step into a full layer overwrites the least-attended middle token (the oldest window token
when no middle token is left). Under CFG both rows of a sample keep the same tokens, ranked by their
summed attention. Each (sample, head) keeps its own tokens: the policy declares ``stand_in_spans``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..core.errors import UsageError, setting
from ..core.kv_store import BoundedKV
from ..core.layout import SequenceLayout
from .budget_cache import BudgetedCache, BudgetOptions, budget_tokens


class LinesOptions(BudgetOptions):
    anchors: int = Field(4, ge=0, description="first image tokens always kept (LineAR's anchors)")
    lines: int = Field(1, ge=0, description="whole image lines kept before the current one (the recent window)")


class LinesCache(BudgetedCache):
    """Prefix + anchors + the current and the last ``lines`` image lines + the middle tokens the
    current line attends to most."""

    name = "lines"
    families = ("next-token",)
    headwise = stand_in_spans = True  # per (row pair, head) storage; the spans it returns only count its keys
    track_scores = True

    def __init__(self, options: LinesOptions | None = None) -> None:
        super().__init__(options or LinesOptions())
        self.width = self.protected = 0

    def check_layout(self, layout: SequenceLayout, *, num_layers: int, num_heads: int,
                     weights_id: str | None = None) -> None:
        """Beside the budget: the anchors and lines fit the image grid, and the budget holds the
        prefix, the anchors and one more token."""
        super().check_layout(layout, num_layers=num_layers, num_heads=num_heads)
        (height, width), prefix = layout.grids[-1], layout.scales[0].numel
        anchors, lines = self.options.anchors, self.options.lines
        if anchors > height * width:
            raise UsageError(f"{setting('cache_anchors', anchors)}: the image has {height * width} tokens "
                             f"({height}x{width}); give at most {height * width}")
        if lines >= height:
            raise UsageError(f"{setting('cache_lines', lines)}: the image has {height} lines, so at most "
                             f"{height - 1} can precede the current one")
        budget = budget_tokens(self.options.budget, layout.length)
        if budget <= prefix + anchors:
            raise UsageError(f"{setting('cache_budget', f'{self.options.budget:g}')} gives {budget} tokens, not more "
                             f"than the {prefix} class token(s) and {anchors} anchors always kept (raise "
                             f"{setting('cache_budget')} or lower {setting('cache_anchors')})")

    def begin(self, *, num_layers, batch, num_heads, head_dim, layout, device, dtype, guided=False):
        super().begin(num_layers=num_layers, batch=batch, num_heads=num_heads, head_dim=head_dim, layout=layout,
                      device=device, dtype=dtype, guided=guided)
        self.width = layout.grids[-1][1]
        self.protected = self.prefix + self.options.anchors

    def window_start(self, position: int) -> int:
        """The first position of the recent window of a step at ``position``: the start of the line
        ``lines`` before the current one (never before the image)."""
        line = (position - self.prefix) // self.width
        return self.prefix + max(0, line - self.options.lines) * self.width

    def update(self, layer, k, v, spans):
        """At the first token of every image line after the first, the eviction (if the layer is
        full) still ranks by the finished line's attention; then the layer's scores restart."""
        position = spans[0][0]
        out = super().update(layer, k, v, spans)
        store = self.layers[layer]
        if k.shape[2] == 1 and position > self.prefix and (position - self.prefix) % self.width == 0:
            if store.scores is not None:
                store.scores.zero_()
        return out

    def ranking(self, store: BoundedKV, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(middle, key)`` per (sample, head) over the filled slots: which slots are middle tokens
        (after the anchors, before the recent window of ``position``) and a key whose lowest value is
        evicted first: the attention for middle tokens, then the window's tokens oldest first, the
        protected ones never (``inf``)."""
        scores = self.pair_scores(store)
        positions = store.positions[:scores.shape[0], :, :store.filled]
        start = self.window_start(position)
        middle = (positions >= self.protected) & (positions < start)
        window = positions >= max(self.protected, start)
        above = scores.amax(dim=-1, keepdim=True) + 1  # every window key above every middle one (no host read)
        key = torch.where(middle, scores, torch.where(window, above + positions, float("inf")))
        return middle, key

    def victim(self, layer, store, position):
        """``[rows, heads]``: the least-attended middle slot, else the oldest window slot."""
        _, key = self.ranking(store, position)
        return self.unpair(key.argmin(dim=-1))

    def select(self, layer, store, retain):
        """``[rows, heads, retain]`` in position order: the ``retain`` slots with the highest keep
        priority (protected, then the recent window newest first, then the most attended middle)."""
        next_position = self.host_position_after(store)
        _, key = self.ranking(store, next_position)
        keep = key.topk(retain, dim=-1).indices  # the lowest keys are evicted: keep the highest
        return self.unpair(keep.sort(dim=-1).values)

    def host_position_after(self, store: BoundedKV) -> int:
        """The position of the next token: one after the newest kept (a host read, at compactions only)."""
        return int(store.positions[0, 0, :store.filled].max()) + 1


__all__ = ["LinesCache", "LinesOptions"]
