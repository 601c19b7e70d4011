"""``scalekv`` (ScaleKV's selection rule): the window of grid centres, the top pooled scores of the
rest, per row and head, in bounded storage."""

from __future__ import annotations

import pytest
import torch

from mvar_engine.core.kv_store import BoundedKV
from mvar_engine.plugins.scalekv_cache import ScaleKVCache, ScaleKVOptions, window_positions
from mvar_engine.testing import check_cache_policy


def test_the_kit_passes():
    check_cache_policy(lambda budget, layers, heads: ScaleKVCache(ScaleKVOptions(budget=float(budget or 1.0),
                                                                                  window=1)), max_examples=6)


def test_the_window_is_the_centres_of_a_4x4_grid_on_a_16x16_map():
    # patches of 4 x 4 tokens, centres 1 into each: rows and columns 1, 5, 9, 13 (ScaleKV's rule)
    expected = [r * 16 + c for r in (1, 5, 9, 13) for c in (1, 5, 9, 13)]
    assert window_positions(16, 16, 16) == expected == [17, 21, 25, 29, 81, 85, 89, 93, 145, 149, 153, 157,
                                                        209, 213, 217, 221]
    assert window_positions(13, 13, 16) == [r * 13 + c for r in (1, 4, 7, 10) for c in (1, 4, 7, 10)]
    assert window_positions(3, 3, 16) == list(range(9))  # a map smaller than the grid: its newest tokens
    assert window_positions(8, 8, 1) == [3 * 8 + 3]       # one patch: its centre


def selection_of(logits: list[float], kernel_size: int, window_slot: int, step: int, kept: int) -> list[int]:
    """The slots kept from keys whose logits against one window query (D = 1, query 1, scale 1) are
    ``logits``; the step stored the last ``step`` slots, its window is ``window_slot``."""
    n = len(logits)
    cache = ScaleKVCache(ScaleKVOptions(budget=kept + 1, window=1, kernel_size=kernel_size))
    store = BoundedKV(1, 1, n, 1, torch.device("cpu"), torch.float32)
    store.append(torch.tensor(logits)[None, None, :, None], torch.zeros(1, 1, n, 1), ((0, n),))
    cache.window, cache.step, cache.kept, cache.scale = [window_slot - (n - step)], step, kept, 1.0
    return cache.selection(store, torch.ones(1, 1, 1, 1))[0, 0].tolist()


def test_it_keeps_the_window_and_the_top_scores():
    logits = [0.1, 0.7, 0.9, 0.0, 0.3, 2.0, 0.5, 0.2]  # slot 5 (the window) would win, but it is kept apart
    assert selection_of(logits, 1, window_slot=5, step=4, kept=3) == [1, 2, 5]
    assert selection_of(logits, 1, window_slot=5, step=4, kept=5) == [1, 2, 4, 5, 6]


def test_the_scores_are_max_pooled_along_the_sequence():
    """With a width of 3 a key next to a strong one ranks with it: 0.9 at slot 2 lifts slots 1..3
    above slot 6's 0.5."""
    logits = [0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0]
    kept = selection_of(logits, 3, window_slot=9, step=2, kept=4)
    assert kept[-1] == 9 and set(kept[:3]) == {1, 2, 3}  # the plateau of 0.9, not slot 6


@pytest.mark.parametrize("argv, needle", [
    (["--cache-budget", "10"], "--cache-budget 10 gives 10 tokens, fewer than the 16 window tokens (and one)"),
    (["--cache-window", "15"], "give a square (1, 4, 9, 16, ...), got 15"),
    (["--cache-kernel-size", "4"], "give an odd width"),
    (["--cache-buffer", "2"], "unrecognized arguments: --cache-buffer 2"),  # a budgeted cache's option, not this one's
])
def test_bad_settings_are_one_line(argv, needle, refused):
    refused(["--trajectory", "full", "--cache", "scalekv", *argv], needle)
