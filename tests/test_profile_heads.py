"""Head profiling for SSD: planted local and sink heads are classified correctly; the command writes
a head map and heat map that ``--cache ssd`` uses; thresholds and bad flags."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from mvar_engine.core.attention import Causal, Dense
from mvar_engine.apps.cli import main
from mvar_engine.plugins.head_map import auto_threshold, classify, load_head_map
from mvar_engine.apps.profile_heads import ProfilingCache


def planted_attention(grid, prefix, t, n_local_heads, n_sink_heads, sharpness=30.0):
    """One decode step's (q, k) for the query at position ``t`` over keys ``0 .. t``: keys are one-hot
    position codes; local heads' queries point at the query's 3x3 causal neighbourhood, sink heads'
    at the first image token."""
    h, w = grid
    n = t + 1
    k = torch.eye(n)[None, None].expand(1, n_local_heads + n_sink_heads, n, n).clone()
    qt = t - prefix
    local = torch.zeros(n)
    for p in range(prefix, n):
        u = p - prefix
        if abs(u // w - qt // w) <= 1 and abs(u % w - qt % w) <= 1:
            local[p] = sharpness
    sink = torch.zeros(n)
    sink[prefix] = sharpness
    q = torch.stack([local] * n_local_heads + [sink] * n_sink_heads)[None, :, None, :]
    return q, k


@given(h=st.integers(4, 7), w=st.integers(4, 7), prefix=st.sampled_from([1, 2]), local=st.integers(1, 3),
       sink=st.integers(1, 3), layers=st.integers(1, 2))
def test_planted_local_and_sink_heads_are_classified(h, w, prefix, local, sink, layers):
    cache = ProfilingCache((h, w), prefix, neighborhood=3)
    cache.share_sum = torch.zeros(layers, local + sink, dtype=torch.float64)
    cache.queries = torch.zeros(layers, local + sink, dtype=torch.float64)
    for t in range(prefix, prefix + h * w - 1):
        q, k = planted_attention((h, w), prefix, t, local, sink)
        for layer in range(layers):
            cache.observe(layer, q, k, Causal(), 1.0)
    scores = cache.scores()
    head_map = cache.head_map()
    assert all(s < 0.05 for row in scores for s in row[:local]), scores
    assert all(s > 0.5 for row in scores for s in row[local:]), scores
    assert head_map.classification == [["local"] * local + ["sink"] * sink] * layers


def test_prefix_attention_is_left_out_of_the_score():
    """A head that parks its mass on the class prefix and looks locally otherwise is a locality head."""
    grid, prefix = (4, 4), 1
    cache = ProfilingCache(grid, prefix)
    cache.share_sum, cache.queries = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    for t in range(prefix + 5, prefix + 15):
        q, k = planted_attention(grid, prefix, t, 1, 0)
        q[..., 0] = 40.0  # nearly all mass on the class token
        cache.observe(0, q, k, Dense(), 1.0)
    assert cache.scores()[0][0] < 0.05


def test_auto_threshold_splits_two_groups_not_at_an_outlier():
    assert auto_threshold([[0.1, 0.12, 0.8], [0.15, 0.7, 0.75]]) == pytest.approx((0.15 + 0.7) / 2)
    # widest gap would isolate the outlier 0.95; Otsu splits the two clusters
    assert auto_threshold([[0.1, 0.12, 0.14, 0.16], [0.5, 0.52, 0.55, 0.95]]) == pytest.approx((0.16 + 0.5) / 2)
    assert auto_threshold([[0.3, 0.3]]) == 0.5
    assert classify([[0.2, 0.9]], 0.5).classification == [["local", "sink"]]


TINY = ["--random-weights", "--depth", "2", "--patch-nums", "4", "--labels", "0,1", "--samples-per-label", "1",
        "--no-progress", "--seed", "0"]


def test_profile_heads_writes_a_head_map_that_ssd_uses(tmp_path, capsys):
    path = tmp_path / "heads.json"
    assert main(["profile-heads", *TINY, "--head-map", str(path), "--threshold", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "2 layers x 12 heads" in out
    head_map = load_head_map(path)
    data = json.loads(path.read_text())
    assert data["format"] == "mvar-engine/head-map/v1" and head_map.threshold == 0.4
    assert all(0.0 <= s <= 1.0 for row in head_map.scores for s in row)
    assert head_map.calibration["images"] == 2 and head_map.calibration["grid"] == [4, 4]
    png = Image.open(path.with_suffix(".png"))
    assert png.size[0] > 12 * 20 and png.size[1] > 2 * 20
    image = tmp_path / "ssd.png"
    assert main([*TINY, "--trajectory", "raster", "--cache", "ssd", "--cache-budget", "0.5", "--cache-head-map", str(path),
                 "--output", str(image)]) == 0
    assert image.is_file()


@pytest.mark.parametrize("flags, words", [(["--cache", "sink"], "drop --cache"), (["--threshold", "x"], "--threshold"),
                                          (["--trajectory", "markov"], "raster")])
def test_profile_heads_bad_flags_are_one_line(capsys, tmp_path, flags, words):
    assert main(["profile-heads", *TINY, "--head-map", str(tmp_path / "h.json"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
