"""``window --cache-shape neighborhood``: a raster token window that keeps the tokens nearest the new
one on the image grid. Hand-computed evictions (host and compiled forms agree), the conformance
kit, and bad settings refused in one line."""

from __future__ import annotations

import pytest
import torch

from mvar_engine.core.kv_store import BoundedKV
from mvar_engine.plugins.budget_cache import BudgetOptions, NeighborhoodWindowCache
from mvar_engine.plugins.caches import WindowOptions, make_window
from mvar_engine.testing import check_cache_policy


def cache_holding(positions: list[int], width: int = 4, prefix: int = 1) -> tuple[NeighborhoodWindowCache, BoundedKV]:
    cache = NeighborhoodWindowCache(BudgetOptions(budget=len(positions)))
    cache.prefix, cache.width, cache._positions = prefix, width, [list(positions)]
    store = BoundedKV(1, 1, len(positions), 1, torch.device("cpu"), torch.float32)
    store.positions[0, 0] = torch.tensor(positions, dtype=torch.int32)
    store.filled = len(positions)
    return cache, store


@pytest.mark.parametrize("kept, incoming, evicted", [
    # a 4-wide grid after one class token; image cells (row, column) of positions 2..6: (0,1), (0,2),
    # (0,3), (1,0), (1,1). The token at (1,3) is 3 columns from (1,0), farther than anything above
    ([0, 2, 3, 4, 5, 6], 8, 5),
    # at (1,2): (0,0) and (1,0) are both 2 away; the older, (0,0), goes (the recent window's choice too)
    ([0, 1, 2, 3, 4, 5], 7, 1),
    # at (2,0): row 0 is 2 rows up, and of (0,1), (0,2) the first goes before (1,3), 3 columns away
    ([0, 2, 3, 6, 7, 8], 9, 8),
])
def test_the_victim_is_the_farthest_on_the_grid(kept, incoming, evicted):
    cache, store = cache_holding(kept)
    slot = cache.victim(0, store, incoming)
    assert kept[slot] == evicted
    assert int(cache.static_victim(0, store, torch.tensor([incoming]))) == slot


def test_a_compaction_keeps_the_nearest_of_the_next_token():
    """Positions 1..7 are cells (0,0) .. (0,3), (1,0) .. (1,2); the next token, position 8, is (1,3).
    Kept: the class token, (0,2), (0,3) and (1,2) at distance 1, then of (0,1) and (1,1) at distance
    2 the newer; the recent window would keep 4..7 instead."""
    cache, store = cache_holding([0, 1, 2, 3, 4, 5, 6, 7])
    assert [cache._positions[0][slot] for slot in cache.select(0, store, 5)] == [0, 3, 4, 6, 7]


def test_the_kit_passes():
    check_cache_policy(lambda budget, layers, heads: make_window(WindowOptions(budget=float(budget or 1.0),
                                                                               shape="neighborhood")),
                       max_examples=6)


@pytest.mark.parametrize("argv, needle", [
    (["--trajectory", "full", "--cache", "window", "--cache-budget", "0.5", "--cache-shape", "neighborhood"],
     "serves next-token trajectories"),
    (["--trajectory", "raster", "--cache", "window", "--cache-shape", "neighborhood"], "give --cache-budget too"),
    (["--trajectory", "raster", "--cache", "window", "--cache-budget", "0.2", "--cache-shape", "square"],
     "--cache-shape"),
])
def test_bad_settings_are_one_line(argv, needle, refused):
    refused(argv, needle)
