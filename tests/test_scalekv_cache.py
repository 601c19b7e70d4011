"""``scalekv`` (ScaleKV's selection rule): the window of grid centres, the top pooled scores of the
rest, per row and head, in bounded storage."""

from __future__ import annotations

import pytest
import torch

from mvar_engine.apps.pipeline import Pipeline
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
    cache.window, cache.step = [window_slot - (n - step)], step
    return cache.selection(torch.tensor(logits)[None, None, :, None], torch.ones(1, 1, 1, 1), kept, 1.0)[0, 0].tolist()


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


@pytest.mark.parametrize("score, kept", [("logits", [1, 2]), ("softmax", [0, 2])])
def test_the_score_is_the_code_logits_or_the_paper_probabilities(score, kept):
    """Two window queries over keys (4, -4) and (0, 1), then the window token: summed logits rank the
    second key first (0 against 1), summed softmax probabilities the first (0.965 + 0.005 against
    0.018 + 0.728)."""
    k = torch.tensor([[4.0, -4.0], [0.0, 1.0], [0.0, 0.0]])
    cache = ScaleKVCache(ScaleKVOptions(budget=3, window=1, kernel_size=1, score=score))
    cache.window, cache.step = [0], 1
    assert cache.selection(k[None, None], torch.eye(2)[None, None], 2, 1.0)[0, 0].tolist() == kept


def test_a_layer_is_compressed_right_after_its_attention_and_stores_only_its_budget():
    """On the shipped VAR digits model (130 tokens, 4 layers) at budget 26: while layer 0 attends to
    the last scale (64 tokens) beside its 25 kept ones, every other layer already holds (or still
    holds) just its 25; each layer's storage is 25 slots, never 25 + a scale."""
    pipe = Pipeline.from_pretrained("digits-var", progress=False)
    held = []

    class Watching(ScaleKVCache):
        def observe(self, layer, q, k, spec, scale, *, received=None):
            super().observe(layer, q, k, spec, scale, received=received)
            held.append((k.shape[2], [store.filled for store in self.layers]))

    cache = Watching(ScaleKVOptions(budget=26, window=4))
    pipe.generate([3], 1, cache=cache)
    assert [store.capacity for store in cache.layers] == [25] * 4
    assert held[-4] == (25 + 64, [25, 25, 25, 25])  # the last scale, layer 0: compressed already
    assert all(max(filled) <= 25 for _, filled in held)
