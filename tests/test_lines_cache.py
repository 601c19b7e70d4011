"""``lines`` (after LineAR): prefix + anchors + the current and recent image lines + the middle
tokens the current line attended to most, scores restarting at every line."""

from __future__ import annotations

import pytest
import torch

from mvar_engine.core.layout import SequenceLayout
from mvar_engine.plugins.lines_cache import LinesCache, LinesOptions
from mvar_engine.testing import check_cache_policy


def test_the_kit_passes():
    check_cache_policy(lambda budget, layers, heads: LinesCache(LinesOptions(budget=float(budget or 1.0), anchors=0,
                                                                             lines=0)), max_examples=6)


def gain(position: int, step: int) -> float:
    """The attention a kept token gets at a step (distinct values, so no ties)."""
    return ((position * 37 + step * 11) % 101) / 101 + position * 1e-4


def simulate(layout: SequenceLayout, budget: int, anchors: int, lines: int) -> list[list[int]]:
    """The documented rule in plain Python: the kept positions after each one-token step."""
    prefix, width = layout.scales[0].numel, layout.grids[-1][1]
    kept = {p: 0.0 for p in range(prefix)}
    history = []
    for step, position in enumerate(range(prefix, layout.length), start=1):
        if len(kept) == budget:
            line = (position - prefix) // width
            start = prefix + max(0, line - lines) * width
            middle = [p for p in kept if prefix + anchors <= p < start]
            window = [p for p in kept if p >= max(prefix + anchors, start)]
            victim = min(middle, key=lambda p: kept[p]) if middle else min(window)
            del kept[victim]
        kept[position] = 0.0
        if position > prefix and (position - prefix) % width == 0:  # the finished line ranked this eviction
            kept = dict.fromkeys(kept, 0.0)
        for p in kept:
            kept[p] += gain(p, step)
        history.append(sorted(kept))
    return history


@pytest.mark.parametrize("budget, anchors, lines", [(9, 1, 1), (7, 2, 0), (12, 0, 2), (6, 1, 1)])
def test_the_kept_tokens_follow_the_rule(budget, anchors, lines):
    layout = SequenceLayout(((1, 1), (5, 4)))  # a class token, then 5 lines of 4 tokens
    cache = LinesCache(LinesOptions(budget=float(budget), anchors=anchors, lines=lines))
    cache.begin(num_layers=1, batch=1, num_heads=1, head_dim=2, layout=layout, device=torch.device("cpu"),
                dtype=torch.float32)
    cache.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), ((0, 1),))
    store, got = cache.layers[0], []
    for step, position in enumerate(range(1, layout.length), start=1):
        cache.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), ((position, position + 1),))
        held = store.positions[0, 0, :store.filled].tolist()
        store.add_scores(torch.tensor([[[gain(p, step) for p in held]]]))  # what observe would add
        got.append(sorted(held))
    assert got == simulate(layout, budget, anchors, lines)
    assert max(len(kept) for kept in got) == budget


@pytest.mark.parametrize("argv, needle", [
    (["--cache-anchors", "65"], "--cache-anchors 65: the image has 64 tokens (8x8); give at most 64"),
    (["--cache-lines", "8"], "--cache-lines 8: the image has 8 lines, so at most 7 can precede the current one"),
    (["--cache-budget", "5", "--cache-anchors", "4"], "gives 5 tokens, not more than the 1 class token(s) and 4 anchors"),
])
def test_bad_settings_are_one_line(argv, needle, refused):
    refused(["--trajectory", "raster", "--cache", "lines", *argv], needle)
