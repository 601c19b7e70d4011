"""Issue 29, data: image folders stream through DataLoader workers (memory independent of the
dataset, a corrupt image skipped, counted and named, exact resume), ``cache-codes`` writes codes
that train exactly as the images they came from, and an interrupted ``cache-codes --resume`` gives
the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import os
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

import mvar_engine
from mvar_engine.apps.data import list_image_folder
from mvar_engine.apps.training.batches import ShardedBatches
from mvar_engine.apps.training.data_sources import FolderData
from mvar_engine.apps.training.image_stream import var_augment

WEIGHTS = Path(mvar_engine.__file__).parent / "models" / "weights"
TOKENIZER = WEIGHTS / "tokenizer-digits.safetensors"  # 32 px, scales 1,2,3,4,6,8
RASTER_TOKENIZER = WEIGHTS / "tokenizer-raster-digits.safetensors"  # 32 px, one 8x8 scale
PEAK_RSS = """
import resource, sys
from mvar_engine.apps.cli import main
status = main(sys.argv[1:])
print(json.dumps({"status": status, "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
""".replace("import resource", "import json, resource")


def write_folder(root: Path, n: int, classes: int = 4, seed: int = 0) -> list[Path]:
    """``n`` random PNGs of varied sizes (24..71 px a side) in ``classes`` class folders; the files in
    the listing's order."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = rng.integers(24, 72, 2)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return list(list_image_folder(root).files)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_cli(args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mvar_engine.apps.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


# -- augmentation and the stream ------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(w=st.integers(8, 70), h=st.integers(8, 70), resolution=st.sampled_from([8, 16]))
def test_var_augment_centre_crop_and_flip(w, h, resolution):
    """Any size gives [3, R, R] in [-1, 1]; the flip mirrors the crop; a random crop is a pure
    function of its generator's seed."""
    from PIL import Image

    im = Image.fromarray(np.random.default_rng(w * 100 + h).integers(0, 255, (h, w, 3), dtype=np.uint8))
    plain = var_augment(im, resolution, "center", False)
    assert plain.shape == (3, resolution, resolution) and plain.min() >= -1 and plain.max() <= 1
    assert torch.equal(var_augment(im, resolution, "center", True), plain.flip(-1))
    crops = [var_augment(im, resolution, "random", False, torch.Generator().manual_seed(s)) for s in (1, 1)]
    assert torch.equal(*crops)


def test_folder_stream_is_a_function_of_the_step(tmp_path):
    """Workers or not, from step 0 or resumed at step 3, a step's batch is the same pixels (random
    crops and flips included); over an epoch on 2 ranks every image comes exactly once."""
    write_folder(tmp_path / "data", 40)
    data = FolderData(tmp_path / "data", 16, "all", None, crop="random", hflip=True, workers=0, seed=5)
    batches = ShardedBatches(data.num_items, 8, seed=5)
    with data.stream(batches, 0, 6) as steps:
        whole = [b.images for b in steps]
    data.workers = 2
    with data.stream(batches, 3, 6) as steps:
        resumed = [b.images for b in steps]
    assert all(torch.equal(a, b) for a, b in zip(whole[3:], resumed)) and len(resumed) == 3
    seen = []
    for rank in (0, 1):
        sharded = ShardedBatches(data.num_items, 8, seed=5, rank=rank, world_size=2)
        with data.stream(sharded, 0, sharded.steps_per_epoch) as steps:
            for step, batch in enumerate(steps):
                assert torch.equal(batch.images, whole[step][rank * 4:(rank + 1) * 4]) if step < 5 else True
        seen += [int(data.items[i]) for step in range(sharded.steps_per_epoch) for i in sharded.indices(step)]
    assert sorted(seen) == list(range(40))


# -- acceptance: memory, the corrupt file ---------------------------------------------------------
def test_memory_does_not_grow_with_the_dataset_and_a_corrupt_image_is_skipped(tmp_path):
    """2,048 images (one corrupt) and 8,192 images, 2 workers each: the peak RSS of the training
    process and of its workers stays within 5 %; the corrupt file is skipped, counted and named.
    (Reading the 8,192 images into memory, as before streaming, costs ~400 MB more.)"""
    small = write_folder(tmp_path / "small", 2048)
    write_folder(tmp_path / "big", 8192, seed=1)
    first = int(ShardedBatches(2048, 32, seed=0).global_indices(0)[0])
    bad = small[first]  # in step 1's batch
    bad.write_bytes(b"not an image")
    peaks = {}
    for name in ("small", "big"):
        args = ["train-tokenizer", "--data", name, "--split", "all", "--resolution", "32", "--steps", "4",
                "--batch-size", "32", "--workers", "2", "--save-every", "2", "--log-every", "1", "--no-progress",
                "--output", f"run-{name}"]
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        peaks[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        if name == "small":
            assert f"skipped at step 1: --data: cannot read image small/{bad.relative_to(tmp_path / 'small')}" in proc.stderr
    assert peaks["big"]["self"] <= 1.05 * peaks["small"]["self"], peaks
    assert peaks["big"]["workers"] <= 1.05 * peaks["small"]["workers"], peaks
    records = metrics(tmp_path / "run-small")
    assert [r["skipped_images"] for r in records if "loss" in r] == [1, 1, 1, 1]
    named = [r for r in records if r.get("event") == "skipped_image"]
    assert [(r["step"], Path(r["file"]).name) for r in named] == [(1, bad.name)]
    assert all(r["skipped_images"] == 0 for r in metrics(tmp_path / "run-big") if "loss" in r)


# -- acceptance: codes ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_folder(root / "data", 96, classes=3)
    return root


def first_loss(run: Path) -> float:
    return next(r["loss"] for r in metrics(run) if r.get("step") == 1 and "loss" in r)


@pytest.mark.parametrize("trajectory, tokenizer, target", [("markov", TOKENIZER, "next-scale"),
                                                          ("raster", RASTER_TOKENIZER, "raster")])
def test_training_from_codes_equals_training_from_the_images(image_folder, tmp_path, trajectory, tokenizer, target):
    """cache-codes, then one step from the codes (flipped twins picked as the images are flipped)
    has the loss of one step from the images with the centre crop and the same flips."""
    codes = tmp_path / "codes"
    proc = run_cli(["cache-codes", "--data", image_folder / "data", "--tokenizer", tokenizer, "--target", target,
                    "--output", codes, "--shard-size", "40", "--batch-size", "16", "--workers", "1", "--no-progress"],
                   tmp_path)
    assert proc.returncode == 0 and "wrote 96 images'" in proc.stdout, proc.stderr[-3000:]
    model = ["--depth", "1", "--embed-dim", "32", "--num-heads", "2"]
    losses = []
    for name, data in (("from-codes", codes), ("from-images", image_folder / "data")):
        from mvar_engine.apps.cli import main

        assert main(["train", "--trajectory", trajectory, "--tokenizer", str(tokenizer), "--data", str(data),
                     "--crop", "center", "--hflip", "--split", "all", *model, "--steps", "1", "--batch-size", "32",
                     "--workers", "0", "--class-dropout", "0.3", "--log-every", "1", "--no-progress",
                     "--output", str(tmp_path / name)]) == 0
        losses.append(first_loss(tmp_path / name))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-6), losses


def test_interrupted_cache_codes_resumes_to_the_same_bytes(image_folder, tmp_path):
    """SIGKILL after the first shard, then --resume: every shard and the manifest's checksums equal
    an uninterrupted run's."""
    base = ["cache-codes", "--data", image_folder / "data", "--tokenizer", TOKENIZER, "--shard-size", "16",
            "--batch-size", "8", "--workers", "1", "--no-progress"]
    assert run_cli(base + ["--output", "whole"], tmp_path).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "mvar_engine.apps.cli", *map(str, base), "--output", "cut"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "cut" / "codes-00000.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "manifest.json").exists(), "the job finished before it was killed"
    resumed = run_cli(base + ["--output", "cut", "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole, cut = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("whole", "cut"))
    assert whole["shards"] == cut["shards"] and len(whole["shards"]) == 6
    for shard in whole["shards"]:
        assert (tmp_path / "whole" / shard["file"]).read_bytes() == (tmp_path / "cut" / shard["file"]).read_bytes()
    assert not list((tmp_path / "cut").glob(".*.tmp")), "a temp file of the killed job was left behind"


def test_sigkill_mid_training_with_workers_then_resume_is_exact(image_folder, tmp_path):
    """SIGKILL at a random step of a run streaming a folder through 2 workers, then --resume: the
    final weights' hash equals an uninterrupted run's (float32)."""
    args = ["train", "--tokenizer", TOKENIZER, "--data", image_folder / "data", "--split", "all", "--hflip",
            "--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--steps", "8", "--batch-size", "16",
            "--workers", "2", "--save-every", "1", "--log-every", "1", "--no-progress"]
    assert run_cli(args + ["--output", "whole"], tmp_path).returncode == 0
    kill_after = int(np.random.default_rng().integers(1, 7))
    proc = subprocess.Popen([sys.executable, "-m", "mvar_engine.apps.cli", *map(str, args), "--output", "cut"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log, saved = tmp_path / "cut" / "metrics.jsonl", tmp_path / "cut" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # a step is logged just before it is saved:
        logged = sum('"loss"' in line for line in log.read_text().splitlines()) if log.exists() else 0
        if saved.exists() and logged >= kill_after:  # kill once something can be resumed
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run_cli(args + ["--output", "cut", "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ends = [[r for r in metrics(tmp_path / d) if r.get("event") == "end"][-1] for d in ("whole", "cut")]
    assert ends[0]["state_sha256"] == ends[1]["state_sha256"], kill_after


SEEN_BY_WORKERS = """
import os, sys
import torch
from mvar_engine.apps.training import image_stream

read = image_stream.FolderItems.__getitem__


def logged(self, request):  # one line per image a DataLoader worker reads, per rank
    if torch.utils.data.get_worker_info() is None:  # the main process (the codebook's first batch)
        return read(self, request)
    with open(os.path.join(os.environ["SEEN_DIR"], f"rank{os.environ['RANK']}-{os.getpid()}.txt"), "a") as f:
        f.write(f"{request.step} {request.item}\\n")
    return read(self, request)


image_stream.FolderItems.__getitem__ = logged
from mvar_engine.apps.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_torchrun_two_ranks_read_every_image_once_per_epoch(tmp_path):
    """torchrun, 2 CPU processes (gloo), a worker each: over an epoch's steps the two ranks' workers
    read every image of the folder exactly once (48 images, global batch 16: 3 steps an epoch)."""
    from conftest import free_port, torchrun_env

    write_folder(tmp_path / "data", 48, classes=3)
    (tmp_path / "seen").mkdir()
    (tmp_path / "seen_by_workers.py").write_text(SEEN_BY_WORKERS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "seen_by_workers.py", "train-tokenizer", "--data", "data", "--split", "all", "--resolution", "16",
           "--patch-nums", "1,2,4", "--ch", "32", "--ch-mult", "1,2,2", "--steps", "6", "--batch-size", "16",
           "--workers", "1", "--hflip", "--no-progress", "--output", "run"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**torchrun_env(), "SEEN_DIR": str(tmp_path / "seen")},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    reads = {0: [], 1: []}
    for log in (tmp_path / "seen").iterdir():
        reads[int(log.name[4])] += [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    for epoch in (0, 1):
        items = [item for rank in (0, 1) for step, item in reads[rank] if 3 * epoch <= step < 3 * epoch + 3]
        assert sorted(items) == list(range(48)), epoch
    assert set(i for s, i in reads[0] if s < 3).isdisjoint(i for s, i in reads[1] if s < 3)  # disjoint shards


def test_cache_codes_under_torchrun_equals_one_process(image_folder, tmp_path):
    """2 ranks encode alternate shards through their own workers; the shards, the skipped list and the
    manifest's checksums equal a single process's."""
    from conftest import free_port, torchrun_env

    base = ["cache-codes", "--data", str(image_folder / "data"), "--tokenizer", str(TOKENIZER), "--shard-size", "20",
            "--batch-size", "8", "--workers", "1", "--no-progress"]
    assert run_cli(base + ["--output", "one"], tmp_path).returncode == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "mvar_engine.apps.cli", *base, "--output", "two"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=torchrun_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    one, two = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert one["shards"] == two["shards"] and len(one["shards"]) == 5 and one["skipped"] == two["skipped"] == []
    assert proc.stdout.count("wrote 96 images'") == 1  # rank 0 reports


def test_llamagen_vq_codes_train_a_raster_gpt_as_its_images(image_folder, tmp_path):
    """LlamaGen's VQ (a tiny random one in the released file's layout, ``{'model': ...}``) is a
    one-scale tokenizer: cache-codes --target raster at --resolution, then one raster step from the
    codes equals one from the images; next-scale uses of it are refused."""
    from mvar_engine.apps.cli import main
    from mvar_engine.models.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig

    torch.manual_seed(0)
    vq = tmp_path / "vq_tiny.pt"
    torch.save({"model": LlamaGenVQ(LlamaGenVQConfig.tiny()).state_dict()}, vq)
    proc = run_cli(["cache-codes", "--data", image_folder / "data", "--tokenizer", vq, "--target", "raster",
                    "--resolution", "16", "--output", "codes", "--workers", "0", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "codes" / "manifest.json").read_text())
    assert manifest["scale_hws"] == [[8, 8]] and manifest["vocab_size"] == 64
    losses = []
    for name, data in (("from-codes", tmp_path / "codes"), ("from-images", image_folder / "data")):
        assert main(["train", "--trajectory", "raster", "--tokenizer", str(vq), "--resolution", "16", "--data",
                     str(data), "--crop", "center", "--hflip", "--split", "all", "--depth", "1", "--embed-dim", "32",
                     "--num-heads", "2", "--steps", "2", "--batch-size", "16", "--workers", "0", "--log-every", "1",
                     "--no-progress", "--output", str(tmp_path / name)]) == 0
        losses.append([r["loss"] for r in metrics(tmp_path / name) if "loss" in r])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[0][0] != losses[0][1]
    meta = json.loads(__import__("safetensors").safe_open(str(tmp_path / "from-codes" / "model.safetensors"), "pt")
                      .metadata()["mvar_engine"])
    assert meta["grid"] == [8, 8] and meta["tokenizer"]["architecture"]["family"] == "llamagen-vq"
    refused = run_cli(["cache-codes", "--data", image_folder / "data", "--tokenizer", vq, "--resolution", "16",
                       "--output", "x"], tmp_path)
    assert refused.returncode == 2 and "give --target raster" in refused.stderr
