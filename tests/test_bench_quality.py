"""``mvar-engine bench quality``: the image metrics against hand-computed cases, the row plan, one
small run on the shipped next-scale model (full agrees with itself; a covering budget agrees with
full exactly; a tight one does not), the outputs, and bad input refused before a model is built."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mvar_engine.apps.bench import quality as bq
from mvar_engine.apps.pipeline import Pipeline
from mvar_engine.core.errors import UsageError


def test_psnr_of_a_known_error_and_of_equal_images():
    a = torch.zeros(2, 3, 8, 8)
    assert bq.psnr(a + 0.1, a) == pytest.approx(20.0)  # mse 0.01
    assert bq.psnr(a, a) is None


def test_ssim_is_one_for_equal_images_and_the_luminance_term_for_flat_ones():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert bq.ssim(x, x) == pytest.approx(1.0)
    a, b, c1 = 0.2, 0.6, 0.01 ** 2  # flat images: no variance, so SSIM is (2ab + C1) / (a^2 + b^2 + C1)
    flat = bq.ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert flat == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    assert bq.ssim(x, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))) < 0.2


def test_the_row_plan_puts_full_first_and_crosses_budgets():
    config = bq.QualityConfig(model="digits-var", policies=("h2o", "scalekv:window=4", "ams"), budgets=(0.1, 0.2),
                              compare=("digits-mvar",))
    labels = [row.label for row in bq.plan_rows(config)]
    assert labels == ["full", "h2o@0.1", "h2o@0.2", "scalekv:window=4@0.1", "scalekv:window=4@0.2", "ams", "digits-mvar"]
    assert bq.parse_component("lines:anchors=2:lines=1", "--policies") == ("lines", {"anchors": 2, "lines": 1})
    with pytest.raises(UsageError, match="unknown cache policy 'nope'"):
        bq.plan_rows(bq.QualityConfig(policies=("nope",)))
    with pytest.raises(UsageError, match="scalekv:wndow=4"):
        bq.plan_rows(bq.QualityConfig(policies=("scalekv:wndow=4",)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_quality") / "quality.json"
    config = bq.QualityConfig(model="digits-var", policies=("h2o", "scalekv:window=4", "ams:calibration=auto"),
                              budgets=(0.2, 1.0), calibration_images=10,
                              compare=("digits-mvar",), images_per_label=1, output=str(out), table=False)
    with open("/dev/null", "w") as null:
        return out, bq.run_quality(config, out=null, log=null)


def test_full_agrees_with_itself_and_a_covering_budget_with_full(report):
    rows = {r["label"]: r for r in report[1]["results"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    full = rows["full"]
    assert full["equal_tokens"] == 1 and full["top1_agreement"] == 1 and full["kl"] < 1e-6 and full["psnr_db"] is None
    assert full["cache_ratio"] == 1 and full["ssim"] == pytest.approx(1.0)
    for label in ("h2o@1", "scalekv:window=4@1"):
        assert rows[label]["equal_tokens"] == 1 and rows[label]["top1_agreement"] == 1 and rows[label]["kl"] < 1e-6
    for label in ("h2o@0.2", "scalekv:window=4@0.2"):  # a tight budget changes the samples
        row = rows[label]
        assert row["equal_tokens"] < 1 and row["kl"] > 1e-3 and math.isfinite(row["psnr_db"]) and row["ssim"] < 1
        assert row["cache_ratio"] < 1
    assert rows["ams:calibration=auto"]["options"]["calibration"] == report[1]["scale_profile"]["path"]
    assert rows["ams:calibration=auto"]["cache_ratio"] < 1
    mvar = rows["digits-mvar"]
    assert mvar["components"]["trajectory"] == "markov" and mvar["cache_peak_bytes"] == 0
    assert "equal_tokens" not in mvar and 0 <= mvar["sample_accuracy"] <= 1


def test_the_reports_are_written(report):
    out, payload = report
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(payload["results"]))
    markdown = out.with_suffix(".md").read_text()
    assert "| scalekv:window=4@0.2 |" in markdown and "top-1 agree" in markdown
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, needle", [
    (["--policies", "scalekv", "--budgets", "0.1"], "fewer than the 16 window tokens"),
    (["--policies", "nope"], "unknown cache policy 'nope'"),
    (["--model", "digits-raster", "--policies", "scalekv"], "serves next-scale trajectories, not trajectory 'raster'"),
    (["--compare", "digits-var"], "--compare 'digits-var': give another shipped model"),
    (["--model", "digits-raster", "--policies", "lines:anchors=99"], "--cache-anchors 99: the image has 64 tokens"),
    (["--model", "digits-raster", "--policies", "lines:lines=9"], "the image has 8 lines"),
    (["--images-per-label", "0"], "--images-per-label"),
    (["--output", "q.txt"], "give a .json path"),
])
def test_bad_input_is_refused_before_a_model_is_built(argv, needle, refused):
    refused(["bench", "quality", *argv], needle)


def test_the_scale_profile_is_calibrated_on_every_class(tmp_path, monkeypatch):
    """The calibration generations cycle through the classes (not the first class n times) and use
    seed + 1, so they are not the compared images."""
    pipe = Pipeline.from_pretrained("digits-var", progress=False)
    seen = {}

    def spy(labels, per_label, cache=None, sampling=None):
        seen.update(labels=list(labels), per_label=per_label, seed=sampling.seed)
        return Pipeline.generate(pipe, labels, per_label, cache=cache, sampling=sampling)

    monkeypatch.setattr(pipe, "generate", spy)
    with open("/dev/null", "w") as null:
        record = bq.profile_scales(pipe, tmp_path / "p.json", bq.QualityConfig(calibration_images=12, seed=3), null)
    assert seen == {"labels": [*range(10), 0, 1], "per_label": 1, "seed": 4}
    assert record["images"] == 12 and (tmp_path / "p.json").is_file()
