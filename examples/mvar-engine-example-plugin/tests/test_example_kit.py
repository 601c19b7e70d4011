"""The example plugin tests itself with mvar-engine's conformance kit (``mvar_engine.testing``).

Run from the plugin's folder (``pip install -e .`` first, or as here: the module puts the
package's source folder on ``sys.path``)::

    python -m pytest tests
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the plugin's source, uninstalled

from mvar_engine import BudgetOptions, Causal, Dense, Masked, SequenceLayout, Visibility  # noqa: E402
from mvar_engine.testing import check_attention_pattern, check_cache_policy  # noqa: E402
from mvar_engine_example_plugin.plugin import (AxialOptions, AxialPattern, CausalLocalOptions,  # noqa: E402
                                               CausalLocalPattern, FirstRowCache, SinkScalesCache, SinkScalesOptions)


def test_first_row_cache_passes_the_kit():
    """A covering budget equals `full`, storage stays within the budget, traits are consistent
    (raster only: refused under a next-scale trajectory)."""
    check_cache_policy(lambda budget, layers, heads: FirstRowCache(BudgetOptions(budget=budget or 1.0)))


def test_sink_scales_cache_passes_the_kit():
    # sink 8 covers every scale of the kit's layouts: it must then equal `full`
    check_cache_policy(lambda budget, layers, heads: SinkScalesCache(SinkScalesOptions(sink=8, recent=1)), bounded=False)


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 5])
def test_causal_local_pattern_passes_the_kit(kernel_size):
    check_attention_pattern(CausalLocalPattern(CausalLocalOptions(kernel_size=kernel_size)))


@pytest.mark.parametrize("apply_from", [-2, 0])
def test_axial_pattern_passes_the_kit(apply_from):
    check_attention_pattern(AxialPattern(AxialOptions(apply_from=apply_from)))


def test_causal_local_specs():
    from mvar_engine.plugins.raster import RasterTrajectory

    layout = SequenceLayout(((1, 1), (4, 4)))  # class token at 0, token (r, c) at 1 + 4r + c
    visible = Visibility(RasterTrajectory())
    pattern = CausalLocalPattern(CausalLocalOptions(kernel_size=3))
    assert isinstance(pattern.spec(layout, ((0, 1),), ((0, 1),), visible), Causal)
    assert isinstance(pattern.spec(layout, ((2, 3),), ((0, 3),), visible), Causal)  # (0, 1) sees all before it
    spec = pattern.spec(layout, ((11, 12),), ((0, 12),), visible)  # (2, 2)
    assert isinstance(spec, Masked) and spec.structure == "causal-local"
    seen = [p for p in range(12) if spec.allowed[0, p]]
    assert seen == [0, 6, 7, 8, 10, 11]  # the class token, (1, 1..3), (2, 1..2)
    assert isinstance(CausalLocalPattern(CausalLocalOptions(kernel_size=9)).spec(layout, ((11, 12),), ((0, 12),),
                                                                                  visible), Causal)
    kept = ((0, 1), (6, 9), (10, 12))  # exactly the window: every key visible to the query
    assert isinstance(pattern.spec(layout, ((11, 12),), kept, visible), Causal)
    assert isinstance(pattern.spec(layout, ((0, 1),), ((0, 1),), visible), (Causal, Dense))
