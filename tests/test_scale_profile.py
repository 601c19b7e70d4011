"""Scale profiles for ``scalekv`` and ``ams``: the selectivity index and key similarity of planted
attention, drafter classes and budgets against hand-computed cases, the ``profile-scales`` command
on the shipped next-scale model, calibrated caches keeping what the profile says, and profiles of
another model refused in one line before any model is built."""

from __future__ import annotations

import json

import pytest
import torch

from mvar_engine.apps.cli import main
from mvar_engine.apps.pipeline import Pipeline
from mvar_engine.apps.profile_scales import ScaleProfilingCache
from mvar_engine.core.attention import Dense
from mvar_engine.core.layout import SequenceLayout
from mvar_engine.plugins.ams_cache import AmsCache, AmsOptions
from mvar_engine.plugins.scale_profile import ScaleProfile, drafter_classes, load_scale_profile, write_scale_profile
from mvar_engine.plugins.scalekv_cache import ScaleKVCache, ScaleKVOptions

LAYOUT = SequenceLayout.from_patch_nums((1, 2, 3, 4))  # scales of 1, 4, 9, 16 tokens


def profile(layers: int = 4, drafters=None, keeps_more=None, sizes=(1, 4, 9, 16)) -> ScaleProfile:
    drafters = drafters or [[False] * layers for _ in sizes]
    return ScaleProfile(layers=layers, scale_sizes=list(sizes), history_share=0.1,
                        drafters_per_scale=max(sum(row) for row in drafters), selectivity=[[0.5] * layers for _ in sizes],
                        drafters=drafters, key_similarity=[0.5] * layers, keeps_more=keeps_more or [False] * layers)


def test_budgets_follow_the_scalekv_rule_by_hand():
    """Average 6, refiners at least 3: while the history fits (1, then 5 tokens) every layer keeps
    it; at scale 2 (14 held) the drafter keeps all 14 and the refiners (24 - 14) // 3 = 3; at scale
    3 (30 held) the refiners stay at the floor 3 and the drafter gets 24 - 9 = 15."""
    drafters = [[False] * 4, [False] * 4, [False, True, False, False], [False, False, True, False]]
    assert profile(drafters=drafters).budgets(6, 3) == [[1] * 4, [5] * 4, [3, 14, 3, 3], [3, 3, 15, 3]]
    assert profile().budgets(6, 3) == [[1] * 4, [5] * 4, [6] * 4, [6] * 4]  # no drafters: uniform


def test_drafters_are_the_lowest_z_scores_and_alike_layers_have_none():
    assert drafter_classes([[0.9, 0.2, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0]], 2) == [[False, True, False, True], [False] * 4]


def test_the_selectivity_index_and_key_similarity_of_planted_attention():
    """Queries of zeros attend uniformly: at the last scale, over 12 keys, 1 of them its own, the index
    is the current mass 1/12 plus the top ceil(0.1 * 11) = 2 earlier keys' 2/12, so 0.25. The keys
    of scale 2 are (1, 0), scale 3's (1, 1): the cosine of their means is 1/sqrt(2)."""
    cache = ScaleProfilingCache(history_share=0.1)
    layout = SequenceLayout.from_patch_nums((1, 3, 1, 1))  # scale ends 1, 10, 11, 12
    cache.begin(num_layers=1, batch=1, num_heads=1, head_dim=2, layout=layout, device=torch.device("cpu"),
                dtype=torch.float32)
    k = torch.zeros(1, 1, 12, 2)
    k[..., 10, :] = torch.tensor([1.0, 0.0])
    k[..., 11, :] = torch.tensor([1.0, 1.0])
    cache.observe(0, torch.zeros(1, 1, 1, 2), k[:, :, :11], Dense(), 1.0)
    cache.observe(0, torch.zeros(1, 1, 1, 2), k, Dense(), 1.0)
    assert cache.selectivity_sum[3, 0] / cache.queries[3, 0] == pytest.approx(0.25)
    result = cache.profile(0)
    assert result.key_similarity[0] == pytest.approx(2 ** -0.5, abs=1e-6)  # scale 3's mean keys against scale 2's


@pytest.fixture(scope="module")
def digits_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "scales.json"
    assert main(["profile-scales", "--samples-per-label", "1", "--no-progress", "--scale-profile", str(path),
                 "--window", "4"]) == 0
    return path


def test_profile_scales_writes_a_profile_of_the_shipped_model(digits_profile):
    result = load_scale_profile(digits_profile)
    assert json.loads(digits_profile.read_text())["format"] == "mvar-engine/scale-profile/v1"
    assert result.layers == 4 and result.scale_sizes == [1, 4, 9, 16, 36, 64] and result.drafters_per_scale == 1
    assert result.selectivity[0] == [0.0] * 4 and not any(result.drafters[0] + result.drafters[1])
    assert all(sum(row) == 1 for row in result.drafters[2:]) and all(0 < x <= 1 for row in result.selectivity[1:]
                                                                     for x in row)
    assert result.calibration["images"] == 10 and len(result.calibration["budgets"]) == 6
    assert result.weights_id is not None


def test_calibrated_caches_keep_what_the_profile_says(digits_profile):
    pipe = Pipeline.from_pretrained("digits-var", progress=False)
    scalekv = ScaleKVCache(ScaleKVOptions(budget=0.2, window=4, calibration=str(digits_profile)))
    pipe.generate([1, 2], 1, cache=scalekv)
    budgets = load_scale_profile(digits_profile).budgets(25, 5)  # round(0.2 * 130) - 1 on average, window + 1 least
    assert [store.filled for store in scalekv.layers] == budgets[-1]
    assert budgets[-1] != [budgets[-1][0]] * 4  # the drafter keeps more than the refiners
    plain = AmsCache(AmsOptions())
    ams = AmsCache(AmsOptions(calibration=str(digits_profile)))
    pipe.generate([1, 2], 1, cache=ams)
    pipe.generate([1, 2], 1, cache=plain)
    more = load_scale_profile(digits_profile).keeps_more
    assert ams.local == [2 if flag else 1 for flag in more]
    for layer, flag in enumerate(more):
        assert len(ams.layers[layer].segments) == len(plain.layers[layer].segments) + int(flag)


@pytest.mark.parametrize("change, needle", [
    ({"layers": 3}, "has 3 layers but the model has 4"),
    ({"scale_sizes": [1, 4, 9, 16, 25, 75]}, "was made on scales of [1, 4, 9, 16, 25, 75] tokens"),
    ({"weights_id": "0" * 64}, "was profiled on other weights"),
])
@pytest.mark.parametrize("cache", ["scalekv", "ams"])
def test_a_profile_of_another_model_is_refused(change, needle, cache, tmp_path, refused, digits_profile):
    data = load_scale_profile(digits_profile).model_dump()
    if "layers" in change:
        data.update(layers=3, **{k: [row[:3] for row in data[k]] for k in ("selectivity", "drafters")},
                    key_similarity=data["key_similarity"][:3], keeps_more=data["keeps_more"][:3])
    else:
        data.update(change)
    bad = write_scale_profile(ScaleProfile.model_validate(data), tmp_path / "other.json")
    window = ["--cache-window", "4"] if cache == "scalekv" else []
    line = refused(["--trajectory", "full", "--cache", cache, *window, "--cache-calibration", bad], needle)
    assert "--cache-calibration" in line and "mvar-engine profile-scales" in line


@pytest.mark.parametrize("flags, needle", [
    (["--trajectory", "raster"], "profile-scales profiles next-scale models, not trajectory 'raster'"),
    (["--cache", "full"], "drop --cache"),
    (["--drafters", "9"], "--drafters 9: the model has 4 layers"),
    (["--average-budget", "0.1"], "keeps no more than the 16 window tokens"),
])
def test_profile_scales_bad_flags_are_one_line(flags, needle, refused):
    refused(["profile-scales", "--scale-profile", "p.json", *flags], needle)
