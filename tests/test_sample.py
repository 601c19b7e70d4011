"""Sampling at scale: per-image generators, the images' independence of batch size, process count
and interruption, ``mvar-engine sample`` (folder, npz, resume, torchrun) and its bad input."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import free_port, torchrun_env
from mvar_engine.apps.cli import main, parse_generate_args
from mvar_engine.apps.npz_images import read_npz_images, write_npz_images
from mvar_engine.apps.pipeline import Pipeline
from mvar_engine.apps.sampler.folder import first_difference
from mvar_engine.apps.seeding import image_generators, image_seed, numbered
from mvar_engine.core import sampling
from mvar_engine.core.sampling import sample_tokens


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- seeds and draws ------------------------------------------------------------------------------
def test_image_seeds_are_distinct_and_stable():
    seeds = {image_seed(0, c, i) for c in range(20) for i in range(50)}
    assert len(seeds) == 1000
    assert image_seed(0, 3, 7) == image_seed(2**64, 3, 7)  # read modulo 2**64, as manual_seed does
    assert image_seed(0, 3, 7) != image_seed(1, 3, 7) and image_seed(-1, 3, 7) == image_seed(2**64 - 1, 3, 7)
    assert image_seed(0, 3, 7) == 13624784435053799765  # the stream of every published sample folder: never change it


def test_numbered_continues_a_repeated_label():
    assert numbered([3, 5, 3], 2) == [(3, 0), (3, 1), (5, 0), (5, 1), (3, 2), (3, 3)]


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 6), l=st.integers(1, 9), vocab=st.integers(2, 40), top_k=st.integers(0, 45),
       top_p=st.sampled_from([0.0, 0.6, 0.95]), seed=st.integers(0, 99), chunk_rows=st.integers(1, 30))
def test_per_sample_generators_draw_each_sample_alone(b, l, vocab, top_k, top_p, seed, chunk_rows):
    """Row b drawn in a batch (filtered in chunks of any size) with generator g_b equals row b drawn
    alone with a fresh g_b."""
    logits = torch.randn(b, l, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    items = [(seed % 7, i) for i in range(b)]
    saved = sampling.SAMPLING_CHUNK_BYTES
    sampling.SAMPLING_CHUNK_BYTES = chunk_rows * 4 * vocab
    try:
        together = sample_tokens(logits, top_k=top_k, top_p=top_p, generator=image_generators(seed, items))
    finally:
        sampling.SAMPLING_CHUNK_BYTES = saved
    for row, item in enumerate(items):
        alone = sample_tokens(logits[row:row + 1], top_k=top_k, top_p=top_p, generator=image_generators(seed, [item]))
        assert torch.equal(together[row:row + 1], alone)


def test_a_generator_per_sample_must_match_the_batch():
    with pytest.raises(ValueError, match="2 generators for 3 samples"):
        sample_tokens(torch.zeros(3, 1, 4), top_k=0, generator=image_generators(0, [(0, 0), (0, 1)]))


@pytest.mark.parametrize("flags", [["--trajectory", "markov"], ["--trajectory", "full"],
                                   ["--trajectory", "raster", "--cache", "sink", "--cache-budget", "0.5"]],
                         ids=["mvar", "var", "raster-sink"])
def test_pipeline_images_do_not_depend_on_the_batch_size(flags):
    """The shipped models: the same items at batch 1, 7 and 16 give bit-identical tokens and images."""
    items = numbered([0, 4, 9], 3)
    results = []
    for batch in (1, 7, 16):
        pipe = Pipeline.from_config(parse_generate_args([*flags, "--batch-size", str(batch), "--no-progress"]))
        results.append(pipe.generate_items(items))
    for other in results[1:]:
        assert torch.equal(results[0].images, other.images)
        assert all(torch.equal(a, b) for a, b in zip(results[0].tokens, other.tokens))
    assert not torch.equal(results[0].images[0], results[0].images[1])  # two images of one class differ


def test_the_grid_is_the_sampler_s_first_images():
    """``generate`` (the grid) draws image i of label c exactly as ``sample`` does."""
    pipe = Pipeline.from_config(parse_generate_args(["--labels", "2,5", "--samples-per-label", "2", "--no-progress"]))
    grid = pipe.generate()
    assert torch.equal(grid.images, pipe.generate_items([(2, 0), (2, 1), (5, 0), (5, 1)]).images)


# -- the npz --------------------------------------------------------------------------------------
def test_npz_round_trip_fixed_bytes_and_numpy_compatibility(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    a = write_npz_images(tmp_path / "a.npz", iter(images), 5, 8, 6, np.arange(5))
    time.sleep(1.1)  # a zip entry's timestamp has 2 s resolution: equal bytes must not depend on the clock
    b = write_npz_images(tmp_path / "b.npz", iter(images), 5, 8, 6, np.arange(5))
    assert sha256(a) == sha256(b)
    with np.load(a) as loaded:
        assert np.array_equal(loaded["arr_0"], images) and loaded["labels"].tolist() == [0, 1, 2, 3, 4]
    np.savez(tmp_path / "numpy.npz", images)
    np.savez_compressed(tmp_path / "zipped.npz", images)
    for path in (a, tmp_path / "numpy.npz", tmp_path / "zipped.npz"):
        batch = read_npz_images(path, "X")
        assert np.array_equal(batch.images, images) and batch.resolution == (8, 6)
    assert isinstance(read_npz_images(a, "X").images, np.memmap)  # stored entries are mapped, not read


def test_first_difference_names_the_setting():
    assert first_difference({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == ("a.c", 2, 3)
    assert first_difference({"a": 1}, {"a": 1}) is None
    assert first_difference({"a": 1}, {"a": 1, "z": 0}) == ("z", None, 0)


# -- the command ----------------------------------------------------------------------------------
SAMPLE = ["sample", "--per-class", "3", "--labels", "1,4,7", "--no-progress"]


def run_sample(folder: Path, *flags) -> Path:
    assert main([*SAMPLE, "--output-dir", str(folder), *flags]) == 0
    return folder / "samples.npz"


def test_sample_writes_pngs_npz_and_a_record(tmp_path, capsys):
    npz = run_sample(tmp_path / "s", "--batch-size", "4")
    assert "wrote" in capsys.readouterr().out
    pngs = sorted(p.name for p in (tmp_path / "s" / "images").iterdir())
    assert pngs == [f"{c:05d}_{i:06d}.png" for c in (1, 4, 7) for i in range(3)]
    with np.load(npz) as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (9, 32, 32, 3)
        assert data["labels"].tolist() == [1, 1, 1, 4, 4, 4, 7, 7, 7]
    record = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert record["mvar_engine"] and record["npz"]["sha256"] == sha256(npz) and record["images"] == 9
    assert record["identity"]["labels"] == [1, 4, 7] and record["identity"]["per_class"] == 3
    assert record["identity"]["decode_chunk"] == 1 and record["identity"]["resize"] is None
    assert set(record["identity"]["model_files"]) == {"checkpoint", "tokenizer"}
    assert record["config"]["sampling"]["seed"] == 0 and record["runs"][0]["batch_size"] == 4


def test_npz_bytes_do_not_depend_on_batch_size_and_resume(tmp_path):
    reference = sha256(run_sample(tmp_path / "b1", "--batch-size", "1"))
    assert sha256(run_sample(tmp_path / "b16", "--batch-size", "16")) == reference
    # lose some images (as a killed run would), resume with another batch size: the same bytes
    for name in ("00001_000002.png", "00007_000000.png"):
        (tmp_path / "b16" / "images" / name).unlink()
    (tmp_path / "b16" / "images" / ".00004_000001.png.abcd1234.tmp").write_bytes(b"half a png")
    assert sha256(run_sample(tmp_path / "b16", "--batch-size", "5", "--resume")) == reference
    assert not list((tmp_path / "b16" / "images").glob("*.tmp"))
    runs = json.loads((tmp_path / "b16" / "samples.json").read_text())["runs"]
    assert [r["resumed"] for r in runs] == [False, True] and runs[1]["generated_by_rank0"] == 2


def test_decode_chunk_decodes_several_images_at_once(tmp_path):
    npz = run_sample(tmp_path / "d", "--decode-chunk", "4", "--batch-size", "5")
    reference = read_npz_images(run_sample(tmp_path / "one"), "x").images.astype(int)
    # the same tokens: the decoder's rounding may move a pixel by a level, never more
    assert np.abs(read_npz_images(npz, "x").images.astype(int) - reference).max() <= 1


def test_resize_sizes_every_image_and_is_part_of_the_identity(tmp_path):
    npz = run_sample(tmp_path / "r", "--resize", "24", "--batch-size", "4")
    assert read_npz_images(npz, "x").images.shape == (9, 24, 24, 3)
    assert sha256(run_sample(tmp_path / "r7", "--resize", "24", "--batch-size", "7")) == sha256(npz)
    with pytest.raises(Exception, match="resize=24, this run has resize=null"):
        main([*SAMPLE, "--output-dir", str(tmp_path / "r"), "--resume", "--debug"])


def test_two_torchrun_processes_write_the_same_npz_as_one(tmp_path):
    one = sha256(run_sample(tmp_path / "one", "--batch-size", "2"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "mvar_engine.apps.cli", *SAMPLE, "--batch-size", "3", "--output-dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-8000:]
    assert sha256(tmp_path / "two" / "samples.npz") == one
    runs = json.loads((tmp_path / "two" / "samples.json").read_text())["runs"]
    assert runs[0]["world_size"] == 2 and runs[0]["generated_by_rank0"] == 5  # items 0, 2, 4, 6, 8 of 9


def test_a_killed_run_resumed_gives_the_uninterrupted_npz(tmp_path):
    reference = sha256(run_sample(tmp_path / "whole", "--batch-size", "2"))
    folder = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mvar_engine.apps.cli", *SAMPLE, "--batch-size", "1", "--output-dir", str(folder)]
    proc = subprocess.Popen(cmd, env=torchrun_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((folder / "images").glob("*.png"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    made = len(list((folder / "images").glob("*.png")))
    assert proc.returncode == -signal.SIGKILL and 3 <= made < 9, (proc.returncode, made)
    assert not (folder / "samples.npz").exists()
    assert sha256(run_sample(folder, "--batch-size", "4", "--resume")) == reference


# -- bad input ------------------------------------------------------------------------------------
@pytest.fixture
def sampled(tmp_path) -> Path:
    """A sample folder of :data:`SAMPLE`'s settings (made before ``refused`` stops model builds)."""
    run_sample(tmp_path / "s")
    return tmp_path / "s"


def test_resume_refuses_a_folder_of_another_configuration(tmp_path, sampled, refused):
    refused([*SAMPLE, "--output-dir", tmp_path / "s", "--resume", "--cfg", "2"],
            "was sampled with sampling.cfg=1.5, this run has sampling.cfg=2.0")
    refused([*SAMPLE, "--output-dir", tmp_path / "s", "--resume", "--trajectory", "full"], "trajectory.name")
    refused([*SAMPLE[:2], "4", *SAMPLE[3:], "--output-dir", tmp_path / "s", "--resume"], "per_class=3")
    refused([*SAMPLE, "--output-dir", tmp_path / "s"], "already holds samples (samples.json); pass --resume")


@pytest.mark.parametrize("case", ["per-class-0", "per-class-text", "output-dir-file", "not-empty", "npz-suffix",
                                  "refused-flag", "foreign-record", "bad-label", "resize-small",
                                  "decode-chunk-0"])
def test_sample_bad_input_is_one_line(case, tmp_cwd, refused):
    (tmp_cwd / "file.txt").write_text("x")
    (tmp_cwd / "other").mkdir()
    (tmp_cwd / "other" / "notes.txt").write_text("x")
    (tmp_cwd / "foreign").mkdir()
    (tmp_cwd / "foreign" / "samples.json").write_text('{"something": "else"}')
    flags, needle = {
        "per-class-0": (["--per-class", "0"], "--per-class 0: give at least 1"),
        "decode-chunk-0": (["--decode-chunk", "0"], "--decode-chunk 0: give at least 1"),
        "per-class-text": (["--per-class", "many"], "give a whole number"),
        "output-dir-file": (["--output-dir", "file.txt"], "is a file, not a folder"),
        "not-empty": (["--output-dir", "other"], "is not empty and holds no samples.json"),
        "npz-suffix": (["--npz", "out.zip"], "must end in .npz"),
        "refused-flag": (["--output", "x.png"], "--output does not apply here; sample writes into --output-dir"),
        "foreign-record": (["--output-dir", "foreign", "--resume"], "was not written by `mvar-engine sample`"),
        "bad-label": (["--labels", "12"], "this model has classes 0..9"),
        "resize-small": (["--resize", "4"], "--resize 4: give at least 8"),
    }[case]
    refused(["sample", *flags], needle)
