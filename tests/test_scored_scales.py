"""``ScoredScalesCache``: a next-scale policy is one ``score`` method (issue 31); the kit checks it at
lossy shares, and what it keeps is what ``score`` ranks highest."""

from __future__ import annotations

import pytest
import torch

from mvar_engine import ScoredScalesCache, ScoredScalesOptions
from mvar_engine.core.backend_selection import selector_for
from mvar_engine.models.var_adapter import NextScaleEngine
from mvar_engine.plugins.caches import FullCache
from mvar_engine.plugins.patterns import DensePattern
from mvar_engine.plugins.trajectories import FullTrajectory
from mvar_engine.testing import check_cache_policy, tiny_next_scale_model


class NewScaleAttention(ScoredScalesCache):
    name = "new-scale-attention"

    def score(self, layer, store, received):
        return received


class Newest(ScoredScalesCache):
    """Ranks by position: keeps the newest earlier tokens (a window the test can predict)."""

    name = "newest"

    def score(self, layer, store, received):
        return self.pairs(store.positions[:, :, :store.filled].float())


class BatchSummed(NewScaleAttention):
    name = "batch-summed"

    def score(self, layer, store, received):
        return received.sum(0, keepdim=True).expand_as(received)


def test_the_kit_passes_at_lossy_shares():
    check_cache_policy(lambda budget, layers, heads: NewScaleAttention(ScoredScalesOptions(share=budget or 1.0)),
                       bounded=False, lossy=(0.0, 0.3, 0.7), max_examples=6)


def test_a_batch_coupled_score_fails_the_kit():
    with pytest.raises(AssertionError, match="keeps other positions for sample"):
        check_cache_policy(lambda budget, layers, heads: BatchSummed(ScoredScalesOptions(share=budget or 1.0)),
                           bounded=False, lossy=(0.3, 0.5), max_examples=6, shrink=False)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_it_keeps_the_prefix_the_newest_scale_and_the_top_share(cfg):
    patch_nums = (1, 2, 3, 4)
    model, tokenizer = tiny_next_scale_model(patch_nums)
    engine = NextScaleEngine(model, tokenizer, FullTrajectory(), DensePattern(), FullCache(), selector_for("sdpa"))
    cache = Newest(ScoredScalesOptions(share=0.5))
    with torch.no_grad():
        engine.generate(torch.tensor([1, 2]), cache, cfg=cfg, top_k=1, top_p=1.0)
    # the rule by hand: after each scale, position 0, the newest ceil(share * n) of the n earlier kept
    # tokens (this score ranks by position), then the whole scale
    kept, start = [0], 1
    for size in (4, 9, 16):
        earlier = kept[1:]
        kept = [0, *earlier[len(earlier) - -(-len(earlier) // 2):], *range(start, start + size)]
        start += size
    assert kept == [0, *range(8, 30)]
    store = cache.layers[0]
    assert store.filled == len(kept) and (store.kept_positions() == torch.tensor(kept)).all()
