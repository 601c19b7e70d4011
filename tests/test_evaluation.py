"""``mvar-engine evaluate``: metric closed forms, the evaluation classifier, the command end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mvar_engine.models.checkpoint import save_state_dict
from mvar_engine.apps.cli import main
from mvar_engine.apps.data import load_digits_set
from mvar_engine.core.errors import UsageError
from mvar_engine.apps.evaluation import classifier as clf
from mvar_engine.apps.evaluation.evaluate import metric_row
from mvar_engine.apps.evaluation.metrics import (class_accuracy, frechet_distance, frechet_distance_from_moments,
                                                 kth_neighbour_radii, precision_recall)

RESOLUTION = 16  # the tiny test tokenizer's image size (4x4 latent, 4x upsampling)


# -- metrics ---------------------------------------------------------------------------------------
def test_fd_of_diagonal_gaussians_is_the_closed_form():
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 3.0, -2.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)  # 5 + (4 + 1 + 0)
    assert expected == pytest.approx(10.0)
    assert frechet_distance_from_moments(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(expected, abs=1e-10)
    # a common rotation changes neither the distance nor (here) the closed form
    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    fd = frechet_distance_from_moments(rotation @ mu_a, rotation @ np.diag(var_a) @ rotation.T,
                                       rotation @ mu_b, rotation @ np.diag(var_b) @ rotation.T)
    assert fd == pytest.approx(expected, abs=1e-9)


def test_fd_of_non_commuting_2x2_covariances():
    cov_a = np.array([[2.0, 0.5], [0.5, 1.0]])
    cov_b = np.array([[1.0, -0.3], [-0.3, 0.5]])
    assert not np.allclose(cov_a @ cov_b, cov_b @ cov_a)
    # for 2x2 with positive eigenvalues: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))
    product = cov_a @ cov_b
    trace_sqrt = math.sqrt(np.trace(product) + 2 * math.sqrt(np.linalg.det(product)))
    expected = 0.5 ** 2 + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    fd = frechet_distance_from_moments([0.0, 0.0], cov_a, [0.5, 0.0], cov_b)
    assert fd == pytest.approx(expected, abs=1e-10)


def test_fd_on_samples_shift_scale_and_self():
    x = np.random.default_rng(1).normal(size=(500, 6)) @ np.random.default_rng(2).normal(size=(6, 6)) + 3.0
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0, 0.0])
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-8)  # same covariance
    c = 0.5  # x * c: mean c mu, covariance c^2 S -> (1 - c)^2 (|mu|^2 + tr S)
    mu, cov = x.mean(0), np.cov(x, rowvar=False)
    assert frechet_distance(x, c * x) == pytest.approx((1 - c) ** 2 * (mu @ mu + np.trace(cov)), rel=1e-8)
    assert frechet_distance(torch.from_numpy(x).float(), torch.from_numpy(x + shift).float()) == pytest.approx(
        float(shift @ shift), rel=1e-4)  # tensors accepted
    with pytest.raises(ValueError):
        frechet_distance(x[:1], x)
    with pytest.raises(ValueError):
        frechet_distance(x, x[:, :3])


def test_precision_recall_by_hand():
    real = np.arange(10, dtype=float)[:, None]  # points 0..9: every 1st-neighbour radius is 1
    assert kth_neighbour_radii(real, k=1).tolist() == [1.0] * 10
    assert kth_neighbour_radii(real, k=2).tolist() == [2.0] + [1.0] * 8 + [2.0]
    fake = np.array([[0.5], [100.0]])  # one inside the real balls, one far; both fake radii are 99.5
    precision, recall = precision_recall(real, fake, k=1)
    assert (precision, recall) == (0.5, 1.0)
    collapsed = np.array([[4.0], [4.0], [4.1]])  # mode collapse: precise but covers little
    precision, recall = precision_recall(real, collapsed, k=1)
    assert precision == 1.0 and recall == pytest.approx(0.1)


def test_precision_recall_identical_and_disjoint_sets():
    x = np.random.default_rng(3).normal(size=(60, 4))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)
    with pytest.raises(ValueError):
        precision_recall(x, x[:3], k=3)  # a set needs more than k points


def test_class_accuracy():
    assert class_accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 0])) == 0.5
    assert class_accuracy([7], [7]) == 1.0
    with pytest.raises(ValueError):
        class_accuracy([1, 2], [1])


# -- classifier ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """Every test of this module caches classifiers in one temporary folder (never ~/.cache)."""
    path = tmp_path_factory.mktemp("mvar-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(clf.CACHE_ENV, str(path))
        yield path


@pytest.fixture(scope="module")
def digits():
    return load_digits_set(RESOLUTION, "train"), load_digits_set(RESOLUTION, "heldout")


@pytest.fixture(scope="module")
def trained(digits, cache_dir):
    """The classifier the evaluate command will use for the digits at 16px (seed 0), trained once."""
    model, info = clf.load_or_train(digits[0], seed=0)
    return model, info


def test_classifier_is_accurate_on_heldout_digits(trained, digits):
    model, info = trained
    train, heldout = digits
    assert info.trained and info.train_seconds < 60
    predictions = model.predict(heldout.images)
    assert predictions.dtype == torch.int64 and predictions.shape == (len(heldout),)
    assert class_accuracy(predictions, heldout.labels) >= 0.95
    features = model.features(heldout.images[:5])
    assert features.shape == (5, clf.FEATURE_DIM) and features.dtype == torch.float32
    # any resolution >= 8 goes through the same network
    assert model.predict(load_digits_set(8, "heldout").images).shape == (len(heldout),)


def test_classifier_cache_is_reused(trained, digits, cache_dir):
    model, info = trained
    path = clf.default_path(clf.training_key(digits[0], 0))
    assert path.parent == cache_dir and path.is_file() and info.path == str(path)
    again, info2 = clf.load_or_train(digits[0], seed=0)
    assert not info2.trained and info2.matches_data
    images = digits[1].images[:32]
    assert torch.equal(again.features(images), model.features(images))
    assert clf.training_key(digits[0], 1) != clf.training_key(digits[0], 0)


def test_training_is_deterministic_and_keeps_the_global_rng(digits):
    subset = digits[0].subset(torch.arange(0, 200))
    torch.manual_seed(123)
    a = clf.train_classifier(subset, seed=5, epochs=1)
    after = torch.rand(3)
    torch.manual_seed(123)
    b = clf.train_classifier(subset, seed=5, epochs=1)
    assert torch.equal(torch.rand(3), after)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    c = clf.train_classifier(subset, seed=6, epochs=1)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_explicit_classifier_path_is_written_then_loaded(tmp_path, digits):
    subset = digits[0].subset(torch.arange(0, 300))
    path = tmp_path / "sub" / "clf.safetensors"
    _, info = clf.load_or_train(subset, seed=0, path=path)
    assert info.trained and path.is_file() and not list(path.parent.glob("*.tmp"))
    _, info = clf.load_or_train(subset, seed=0, path=path)
    assert not info.trained and info.matches_data
    _, info = clf.load_or_train(subset, seed=1, path=path)  # used as given, flagged
    assert not info.trained and not info.matches_data
    path.write_bytes(b"not safetensors")
    with pytest.raises(UsageError, match="not a readable classifier file"):
        clf.load_or_train(subset, seed=0, path=path)


def test_real_images_score_as_real(trained, digits):
    model, _ = trained
    heldout = digits[1]
    row = metric_row(model, heldout.images, heldout.labels, model.features(heldout.images))
    assert row["fd"] == pytest.approx(0.0, abs=1e-6) and (row["precision"], row["recall"]) == (1.0, 1.0)
    assert row["accuracy"] >= 0.95 and len(row["per_class_accuracy"]) == 10
    noise = torch.rand(100, 3, RESOLUTION, RESOLUTION) * 2 - 1
    bad = metric_row(model, noise, torch.arange(10).repeat_interleave(10), model.features(heldout.images))
    assert bad["fd"] > 10 * row["fd"] + 1 and bad["accuracy"] < 0.5


# -- the command -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Random 10-class VAR + tokenizer making 16x16 images (scales 1, 2, 4; 4x upsampling)."""
    from mvar_engine.models.tokenizer import MultiScaleVQVAE, TokenizerConfig
    from mvar_engine.models.var import VAR, VARConfig

    patch_nums = (1, 2, 4)
    torch.manual_seed(0)
    model = VAR(VARConfig(depth=2, embed_dim=32, num_heads=2, num_classes=10, vocab_size=16, z_channels=8,
                          patch_nums=patch_nums))
    tokenizer = MultiScaleVQVAE(TokenizerConfig(vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1,
                                                using_sa=False, using_mid_sa=False, patch_nums=patch_nums))
    assert tokenizer.config.image_hw == (RESOLUTION, RESOLUTION)
    folder = tmp_path_factory.mktemp("ckpt")
    torch.save(model.state_dict(), folder / "var.pth")
    save_state_dict(tokenizer.state_dict(), folder / "vae.safetensors")
    return f"--var-checkpoint {folder / 'var.pth'} --vae-checkpoint {folder / 'vae.safetensors'} --patch-nums 1,2,4"


def test_evaluate_writes_every_row_and_the_real_reference(tmp_path, checkpoints, trained, capsys):
    out = tmp_path / "report" / "evaluation.json"
    argv = ["evaluate", "--common", checkpoints, "--samples-per-class", "3", "--output", str(out),
            "--compare", "var=--trajectory full --attention dense --cache full",
            "--compare", "mvar=--trajectory markov --attention neighborhood --cache none --attention-kernel-size 3"]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert set(report) == {"written_by", "complete", "pending", "evaluation", "machine", "config", "results"}
    assert report["complete"] is True and report["pending"] == [] and report["written_by"] == "mvar-engine evaluate"
    rows = {row["name"]: row for row in report["results"]}
    assert [row["name"] for row in report["results"]] == ["real", "var", "mvar"]
    assert rows["real"]["images"] == 364 and rows["real"]["accuracy"] >= 0.95
    assert (rows["var"]["trajectory"], rows["var"]["attention"], rows["var"]["cache"]) == ("full", "dense", "full")
    assert (rows["mvar"]["trajectory"], rows["mvar"]["cache"]) == ("markov", "none")
    for name in ("var", "mvar"):
        assert rows[name]["images"] == 30 and rows[name]["resolution"] == RESOLUTION and rows[name]["generate_s"] > 0
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1 and row["fd"] >= 0 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    # random weights make noise: far from the real data, unlike the real held-out split
    assert rows["var"]["fd"] > rows["real"]["fd"] and rows["mvar"]["fd"] > rows["real"]["fd"]
    assert report["evaluation"]["classifier"]["trained"] is False  # the module's cached classifier
    assert report["config"]["configurations"]["mvar"]["attention"]["options"] == {"kernel_size": "3"}
    assert report["config"]["configurations"]["var"]["sampling"]["seed"] == 0
    out_text = capsys.readouterr().out
    table = out_text.splitlines()
    assert table[0].split()[:2] == ["config", "images"] and [line.split()[0] for line in table[1:4]] == ["real", "var", "mvar"]
    assert f"wrote {out}" in out_text


def test_a_stopped_evaluation_leaves_a_report_marked_partial(tmp_path, checkpoints, trained, capsys, monkeypatch):
    """SIGTERM (here: the interrupt it becomes) during the second configuration: the report on disk
    holds the rows done, ``complete: false`` and the configuration still pending."""
    import importlib

    evaluate = importlib.import_module("mvar_engine.apps.evaluation.evaluate")  # the package exports a function of that name
    original = evaluate.Evaluation.run_config

    def stopped_at_mvar(self, name, config):
        if name == "mvar":
            raise KeyboardInterrupt
        return original(self, name, config)

    monkeypatch.setattr(evaluate.Evaluation, "run_config", stopped_at_mvar)
    out = tmp_path / "evaluation.json"
    argv = ["evaluate", "--common", checkpoints, "--samples-per-class", "3", "--output", str(out),
            "--compare", "var=--trajectory full --attention dense --cache full",
            "--compare", "mvar=--trajectory markov --attention neighborhood --cache none"]
    assert main(argv) == 130
    report = json.loads(out.read_text())
    assert report["complete"] is False and report["pending"] == ["mvar"]
    assert [row["name"] for row in report["results"]] == ["real", "var"]


def test_compare_flags_win_over_the_evaluation_defaults(tmp_path, checkpoints, trained, capsys):
    out = tmp_path / "e.json"
    argv = ["evaluate", "--common", checkpoints, "--samples-per-class", "1", "--output", str(out), "--no-table",
            "--seed", "4", "--compare", "a=--trajectory full --seed 9 --batch-size 3 --top-k 1"]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    config = report["config"]["configurations"]["a"]
    assert config["sampling"]["seed"] == 9 and config["batch_size"] == 3 and config["sampling"]["top_k"] == 1
    assert [row["name"] for row in report["results"]] == ["real", "a"] and report["results"][1]["images"] == 10
    assert "config" not in capsys.readouterr().out.split("\n")[0]  # --no-table


@pytest.mark.parametrize("compare,needle", [
    ("novalue", "expected NAME=FLAGS"),
    ("=--trajectory full", "expected NAME=FLAGS"),
    ("a=--cache windw", "unknown cache policy 'windw'"),
    ("a=--bogus", "unrecognized arguments: --bogus"),
    ('a=--trajectory "full', "cannot split the flags"),
    ("real=--trajectory full", "names the reference row"),
    ("a=--labels 1,2", "--labels is not allowed"),
])
def test_bad_compare_exits_2_with_one_line(compare, needle, tmp_path, capsys):
    assert main(["evaluate", "--compare", compare, "--output", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mvar-engine: error: ") and needle in err[0], err
    assert not (tmp_path / "x.json").exists()


def test_duplicate_names_and_bad_numbers_are_one_line(tmp_path, capsys):
    for argv, needle in [(["--compare", "a=--trajectory full", "--compare", "a=--trajectory markov"], "given twice"),
                         (["--samples-per-class", "0"], "--samples-per-class must be at least 1"),
                         (["--resolution", "4"], "--resolution must be at least 8")]:
        assert main(["evaluate", *argv, "--output", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_resolution_mismatch_is_one_line(tmp_path, checkpoints, capsys):
    argv = ["evaluate", "--common", checkpoints, "--resolution", "32", "--output", str(tmp_path / "x.json"),
            "--compare", "a=--trajectory full"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "configuration 'a': generates 16x16 images but the evaluation resolution is 32" in err[0], err


def test_class_count_mismatch_is_one_line(tmp_path, checkpoints, trained, capsys):
    from mvar_engine.models.var import VAR, VARConfig

    torch.manual_seed(0)
    model = VAR(VARConfig(depth=2, embed_dim=32, num_heads=2, num_classes=4, vocab_size=16, z_channels=8,
                          patch_nums=(1, 2, 4)))
    torch.save(model.state_dict(), tmp_path / "var4.pth")
    flags = checkpoints.replace(checkpoints.split()[1], str(tmp_path / "var4.pth"))
    argv = ["evaluate", "--common", flags, "--output", str(tmp_path / "x.json"), "--compare", "a=--trajectory full"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the model has 4 classes but the data (digits) has 10" in err[0], err


@pytest.fixture(scope="module")
def raster_checkpoints(tmp_path_factory):
    """A random 10-class LlamaGen-shaped raster GPT (4x4 token grid) saved as LlamaGen's files are
    (``{"model": ...}``), and a 16px tokenizer run with the one-scale schedule 4."""
    from mvar_engine.models.raster_gpt import RasterGPT, RasterGPTConfig
    from mvar_engine.models.tokenizer import MultiScaleVQVAE, TokenizerConfig

    torch.manual_seed(0)
    model = RasterGPT(RasterGPTConfig(depth=1, width=64, heads=1, num_classes=10, vocab_size=16, grid=(4, 4)))
    tokenizer = MultiScaleVQVAE(TokenizerConfig(vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1,
                                                using_sa=False, using_mid_sa=False, patch_nums=(4,)))
    folder = tmp_path_factory.mktemp("raster")
    torch.save({"model": model.state_dict()}, folder / "c2i.pt")
    save_state_dict(tokenizer.state_dict(), folder / "vq.safetensors")
    return f"--var-checkpoint {folder / 'c2i.pt'} --vae-checkpoint {folder / 'vq.safetensors'} --patch-nums 4 --num-heads 1"


def test_evaluate_compares_raster_cache_policies(tmp_path, raster_checkpoints, trained, capsys):
    out = tmp_path / "raster.json"
    argv = ["evaluate", "--common", raster_checkpoints, "--samples-per-class", "2", "--output", str(out),
            "--compare", "raster=--trajectory raster",
            "--compare", "raster-sink=--trajectory raster --cache sink --cache-budget 0.5",
            "--compare", "raster-none=--trajectory raster --cache none"]
    assert main(argv) == 0, capsys.readouterr().err
    rows = {row["name"]: row for row in json.loads(out.read_text())["results"]}
    assert list(rows) == ["real", "raster", "raster-sink", "raster-none"]
    assert [(rows[n]["trajectory"], rows[n]["attention"], rows[n]["cache"]) for n in list(rows)[1:]] == [
        ("raster", "causal", "full"), ("raster", "causal", "sink"), ("raster", "causal", "none")]
    for name in ("raster", "raster-sink", "raster-none"):
        assert rows[name]["images"] == 20 and rows[name]["resolution"] == RESOLUTION and 0 <= rows[name]["accuracy"] <= 1
    assert 0 < rows["raster-sink"]["cache_peak_mib"] < rows["raster"]["cache_peak_mib"]
    assert rows["raster-none"]["cache_peak_mib"] == 0
    # the same sampling seed and tokens: the full cache is exact, so it matches the recomputing oracle
    assert rows["raster"]["accuracy"] == rows["raster-none"]["accuracy"] and rows["raster"]["fd"] == pytest.approx(
        rows["raster-none"]["fd"], rel=1e-4)
    header = capsys.readouterr().out.splitlines()[0]
    assert "cache MiB" in header
