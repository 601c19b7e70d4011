"""``mvar-engine fid``: torch-fidelity's Inception with random weights end to end on the shipped
models' samples (offline), the Fréchet formula against a closed form, torch-fidelity's own numbers
where it imports whole, and the bad inputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mvar_engine.apps.cli import main
from mvar_engine.apps.npz_images import read_npz_images, write_npz_images
from mvar_engine.apps.evaluation.metrics import frechet_distance_from_moments

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                                reason="torch-fidelity is not installed (pip install --no-deps torch-fidelity)")


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    from mvar_engine.apps.evaluation.inception import random_inception_weights

    return random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth")


@pytest.fixture(scope="module")
def batches(tmp_path_factory) -> dict[str, Path]:
    """npz batches of the shipped MVAR and VAR models (12 images each: 4 of classes 0, 3, 8), and
    MVAR's at another seed."""
    root = tmp_path_factory.mktemp("batches")
    made = {}
    for name, flags in {"mvar": [], "var": ["--trajectory", "full"], "mvar-seed1": ["--seed", "1"]}.items():
        assert main(["sample", "--per-class", "4", "--labels", "0,3,8", "--no-progress", "--output-dir",
                     str(root / name), *flags]) == 0
        made[name] = root / name / "samples.npz"
    return made


def fid(capsys, samples, ref, weights, *flags) -> dict:
    out = samples.parent / "fid.json"
    assert main(["fid", str(samples), "--ref", str(ref), "--inception-weights", str(weights), "--no-progress",
                 "--batch-size", "8", "--output", str(out), *flags]) == 0
    assert "FID" in capsys.readouterr().out
    return json.loads(out.read_text())


def test_fid_runs_offline_on_the_shipped_models_samples(batches, inception_weights, capsys):
    from mvar_engine.apps.evaluation.inception import inception_features, load_inception
    from mvar_engine.apps.evaluation.metrics import frechet_distance

    report = fid(capsys, batches["mvar"], batches["var"], inception_weights, "--prc")
    assert report["feature_extractor"]["library"] == "torch-fidelity"
    result = report["fid"]
    assert result["samples"] == result["reference"] == 12 and result["resolution"] == [32, 32]
    assert result["fid"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert result["isc_mean"] >= 1.0  # exp of a mean KL divergence
    # the command's number is the Fréchet distance of the extractor's pool features, computed here
    # directly (in other batch sizes: the features do not depend on them)
    cpu = torch.device("cpu")
    extractor, _ = load_inception(inception_weights, cpu)
    features = {name: inception_features(extractor, read_npz_images(batches[name], "x").images, size, cpu)[0]
                for name, size in (("mvar", 5), ("var", 12), ("mvar-seed1", 12))}
    assert result["fid"] == pytest.approx(frechet_distance(features["mvar"], features["var"]), rel=1e-6)
    assert frechet_distance(features["mvar"], features["mvar"]) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(features["mvar-seed1"], features["var"]) != pytest.approx(result["fid"], rel=1e-9)


@settings(max_examples=50, deadline=None)
@given(mu=st.lists(st.floats(-3, 3), min_size=2, max_size=2), entries=st.lists(st.floats(-2, 2), min_size=8, max_size=8))
def test_frechet_of_2x2_gaussians_is_the_closed_form(mu, entries):
    """For 2x2 covariances (commuting or not) tr sqrt(A B) = sqrt(tr(A B) + 2 sqrt(det(A B)))."""
    m_a, m_b = np.array(entries[:4]).reshape(2, 2), np.array(entries[4:]).reshape(2, 2)
    cov_a, cov_b = m_a @ m_a.T + 0.1 * np.eye(2), m_b @ m_b.T + 0.1 * np.eye(2)
    product = cov_a @ cov_b
    trace_sqrt = np.sqrt(np.trace(product) + 2 * np.sqrt(max(np.linalg.det(product), 0.0)))
    mean_b = np.array(mu)
    expected = mean_b @ mean_b + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    got = frechet_distance_from_moments(np.zeros(2), cov_a, mean_b, cov_b)
    assert got == pytest.approx(max(expected, 0.0), rel=1e-6, abs=1e-8)


def test_fid_equals_torch_fidelity_where_it_imports_whole(batches, inception_weights, capsys):
    """Where torchvision works (a CUDA torch with its torchvision, as the GPU suite runs), the FID
    equals ``torch_fidelity.calculate_metrics`` on the same images and weights."""
    try:
        import torch_fidelity
    except Exception as error:  # noqa: BLE001 - any import failure means the comparison cannot run here
        pytest.skip(f"torch_fidelity does not import whole here ({type(error).__name__}: {error})")

    class Images(torch.utils.data.Dataset):
        def __init__(self, path):
            self.images = read_npz_images(path, "x").images

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)

    theirs = torch_fidelity.calculate_metrics(input1=Images(batches["mvar"]), input2=Images(batches["var"]), fid=True,
                                              cuda=False, batch_size=8, feature_extractor="inception-v3-compat",
                                              feature_extractor_weights_path=str(inception_weights), cache=False,
                                              verbose=False)
    ours = fid(capsys, batches["mvar"], batches["var"], inception_weights)["fid"]["fid"]
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["no-weights", "weights-missing", "weights-garbage", "float-npz", "gray-npz",
                                  "other-resolution", "not-npz", "no-arr0", "samples-missing"])
def test_fid_bad_input_is_one_line(case, tmp_cwd, refused):
    rng = np.random.default_rng(0)
    write_npz_images(tmp_cwd / "a.npz", iter(rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)), 4, 16, 16)
    write_npz_images(tmp_cwd / "big.npz", iter(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)), 4, 32, 32)
    np.savez(tmp_cwd / "float.npz", rng.random((4, 16, 16, 3)))
    np.savez(tmp_cwd / "gray.npz", rng.integers(0, 256, (4, 16, 16), dtype=np.uint8))
    np.savez(tmp_cwd / "noarr.npz", images=np.zeros((4, 16, 16, 3), np.uint8))
    (tmp_cwd / "text.npz").write_text("not a zip")
    (tmp_cwd / "garbage.pth").write_bytes(b"\x00" * 64)
    weights = ["--inception-weights", "garbage.pth"]
    argv, needle = {
        "no-weights": (["a.npz", "--ref", "a.npz"], "fid needs --inception-weights PATH: the Inception-v3 weights as a "
                                                     "local file"),
        "weights-missing": (["a.npz", "--ref", "a.npz", "--inception-weights", "none.pth"], "does not exist"),
        "weights-garbage": (["a.npz", "--ref", "a.npz", *weights], "not torch-fidelity's Inception-v3 state dict"),
        "float-npz": (["float.npz", "--ref", "a.npz", *weights], "'arr_0' is float64; an image batch is uint8"),
        "gray-npz": (["gray.npz", "--ref", "a.npz", *weights], "has shape [4, 16, 16]; an image batch is [N, H, W, 3]"),
        "other-resolution": (["a.npz", "--ref", "big.npz", *weights], "its images are 32x32 but a.npz's are 16x16"),
        "not-npz": (["text.npz", "--ref", "a.npz", *weights], "not an .npz file"),
        "no-arr0": (["noarr.npz", "--ref", "a.npz", *weights], "has no 'arr_0' array"),
        "samples-missing": (["none.npz", "--ref", "a.npz", *weights], "does not exist"),
    }[case]
    refused(["fid", *argv, "--output", "fid.json"], needle)


class _WritesMarker:
    """Unpickling it calls ``Path.touch`` on the marker: what a hostile ``.pth`` could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_hostile_inception_weights_run_no_code(refused, tmp_path):
    """The weights file is unpickled ``weights_only``: a pickle that would run code is refused in one
    line and nothing of it runs (torch-fidelity's own loader unpickles in full)."""
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"weight": _WritesMarker(marker)}, evil)
    samples = tmp_path / "s.npz"
    write_npz_images(samples, np.zeros((4, 8, 8, 3), dtype=np.uint8), 4, 8, 8)
    refused(["fid", samples, "--ref", samples, "--inception-weights", evil, "--output", "fid.json"],
            "not torch-fidelity's Inception-v3 state dict")
    assert not marker.exists()
