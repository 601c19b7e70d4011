"""Issue 14, training: bad numbers, data folders and run directories are refused in one line with
exit 2 before any model is built (the ``refused`` fixture of conftest.py); SIGTERM exits 143; a
resumed run removes the temp files an interrupted save left."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import cli_text, number_meaning

NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70),
                    st.sampled_from(["inf", "-inf", "nan", "1e999", "-0", "0", "1", "0.5", "2.5"]))

TRAIN_RULES = {  # flag: (integer flag?, is the value valid?)  the documented ranges, stated independently
    "--lr": (False, lambda v: v > 0),
    "--weight-decay": (False, lambda v: v >= 0),
    "--grad-clip": (False, lambda v: v >= 0),
    "--class-dropout": (False, lambda v: 0 <= v < 1),
    "--mlp-ratio": (False, lambda v: v > 0),
    "--warmup-steps": (True, lambda v: v >= 0),
    "--steps": (True, lambda v: v >= 1),
    "--batch-size": (True, lambda v: v >= 1),
    "--save-every": (True, lambda v: v >= 1),
    "--log-every": (True, lambda v: v >= 1),
    "--seed": (True, lambda v: -(2**63) <= v < 2**64),
}
TOKENIZER_RULES = {
    "--beta": (False, lambda v: v >= 0),
    "--l1-weight": (False, lambda v: v >= 0),
    "--vq-weight": (False, lambda v: v >= 0),
    "--lr": (False, lambda v: v > 0),
    "--steps": (True, lambda v: v >= 1),
}


@pytest.mark.parametrize("flag", sorted(TRAIN_RULES))
@given(value=NUMBERS)
def test_every_train_number_is_checked_first(flag, value, refused):
    """Invalid: refused naming the flag. Valid: the run goes on to its next check (the missing
    tokenizer), so the range check let it through."""
    integer, valid = TRAIN_RULES[flag]
    text = cli_text(value)
    number = number_meaning(text, integer=integer)
    line = refused(["train", f"{flag}={text}"])
    if number is not None and valid(number):
        assert "--tokenizer" in line and "does not exist" in line, line
    else:
        assert flag in line, line


@pytest.mark.parametrize("flag", sorted(TOKENIZER_RULES))
@given(value=st.sampled_from(["inf", "-inf", "nan", "-1", "-0.5", "1e999"]))
def test_tokenizer_training_numbers(flag, value, refused):
    integer, valid = TOKENIZER_RULES[flag]
    number = number_meaning(value, integer=integer)
    assert number is None or not valid(number)
    refused(["train-tokenizer", f"{flag}={value}"], flag)


def test_raster_training_numbers(refused):
    refused(["train", "--trajectory", "raster", "--grad-clip", "-1"], "--grad-clip must be at least 0")
    refused(["train", "--trajectory", "raster", "--lr", "nan"], "--lr must be a finite number")


def test_all_loss_weights_off(refused):
    refused(["train-tokenizer", "--l1-weight", "0", "--mse-weight", "0", "--vq-weight", "0"], "nothing would be trained")


@pytest.mark.parametrize("flag", ["--patch-nums", "--tokenizer-patch-nums"])
@pytest.mark.parametrize("value", ["1,,2", ",", "", "1,x"])
def test_holes_in_training_lists(flag, value, refused):
    command = "train-tokenizer" if flag == "--patch-nums" else "train"
    refused([command, flag, value], flag)


# ------------------------------------------------------------------------------------------- data
def _png(path, size=(8, 8)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)


def test_an_empty_class_folder(refused, tmp_cwd):
    _png(tmp_cwd / "data" / "cat" / "a.png")
    (tmp_cwd / "data" / "dog").mkdir()
    refused(["train-tokenizer", "--data", "data", "--resolution", "16", "--patch-nums", "1,2,4"], "class folder 'dog' holds no images")


def stopped_at_bad_image(capsys, argv, needle: str) -> None:
    """``--on-bad-image fail``: the run stops at the step that meets the file, exit 2, one line naming it."""
    from mvar_engine.apps.cli import main

    capsys.readouterr()
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("mvar-engine: error: ") and needle in err[0], err
    assert "(step 1; --on-bad-image skip trains on without it)" in err[0]


TOKENIZER_ON_TWO = ["train-tokenizer", "--data", "data", "--resolution", "16", "--patch-nums", "1,2,4", "--split", "all",
                    "--batch-size", "2", "--steps", "1", "--workers", "0", "--no-progress", "--on-bad-image", "fail"]


def test_an_image_beyond_the_decompression_bomb_limit(capsys, tmp_cwd, monkeypatch):
    from PIL import Image

    _png(tmp_cwd / "data" / "cat" / "a.png", (8, 8))
    _png(tmp_cwd / "data" / "dog" / "huge.png", (64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 2 - 1)  # 64x64 is more than twice the limit
    stopped_at_bad_image(capsys, TOKENIZER_ON_TWO, "huge.png is too large to decode safely")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)  # above the limit: pillow only warns
    stopped_at_bad_image(capsys, TOKENIZER_ON_TWO + ["--overwrite"], "huge.png is too large to decode safely")


@pytest.mark.parametrize("data, needle", [("", "--data is empty"), ("  ", "--data is empty"),
                                          ("missing", "not a folder"), ("nothing", "no images found")])
def test_bad_data_folders(data, needle, refused, tmp_cwd):
    (tmp_cwd / "nothing").mkdir()
    refused(["train-tokenizer", "--data", data], needle)


def test_an_unreadable_image(capsys, tmp_cwd):
    _png(tmp_cwd / "data" / "cat" / "a.png")
    (tmp_cwd / "data" / "cat" / "b.png").write_bytes(b"not a png")
    stopped_at_bad_image(capsys, TOKENIZER_ON_TWO, "cannot read image data/cat/b.png")


# -------------------------------------------------------------------------- signals and temp files
def test_sigterm_exits_143_and_sigint_130(tmp_path):
    from mvar_engine.apps.training.loop import TrainingInterrupted

    assert TrainingInterrupted(3, tmp_path, "SIGTERM").exit_status == 128 + signal.SIGTERM == 143
    assert TrainingInterrupted(3, tmp_path, "SIGINT").exit_status == 130
    assert TrainingInterrupted(3, tmp_path).exit_status == 130  # a rank stopped by another rank's signal
    assert "by SIGTERM" in str(TrainingInterrupted(3, tmp_path, "SIGTERM"))


def test_a_sigterm_during_training_is_exit_143(monkeypatch, tmp_cwd, capsys):
    """The whole path: a SIGTERM arrives mid-run, the loop saves and the command exits 143."""
    from mvar_engine.apps.cli import main
    from mvar_engine.apps.training import job

    real = job.run_loop

    def signalled(*, step_fn, **kwargs):
        def step(i):
            if i == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets the flag
            return step_fn(i)

        return real(step_fn=step, **kwargs)

    monkeypatch.setattr(job, "run_loop", signalled)
    status = main(["train-tokenizer", "--steps", "5", "--batch-size", "2", "--max-images", "4", "--resolution", "16",
                   "--patch-nums", "1,2,4", "--save-every", "100", "--no-progress", "--output", "run"])
    assert status == 143, capsys.readouterr().err
    assert "interrupted by SIGTERM after step 2" in capsys.readouterr().err


def test_resume_removes_the_temp_files_of_interrupted_saves(tmp_cwd, capsys):
    from mvar_engine.apps.cli import main

    argv = ["train-tokenizer", "--steps", "1", "--batch-size", "2", "--max-images", "4", "--resolution", "16",
            "--patch-nums", "1,2,4", "--no-progress", "--output", "run"]
    assert main(argv) == 0
    orphans = [tmp_cwd / "run" / ".checkpoint.pt.a1b2c3d4.tmp", tmp_cwd / "run" / ".metrics.jsonl.zz_99xyz.tmp"]
    unrelated = tmp_cwd / "run" / ".notes.txt.abcdefgh.tmp"  # not a file this run writes: kept
    for path in orphans + [unrelated]:
        path.write_bytes(b"partial")
    assert main(argv[:2] + ["2"] + argv[3:] + ["--resume"]) == 0
    assert not any(path.exists() for path in orphans) and unrelated.exists()


@pytest.mark.parametrize("output, needle", [("", "--output is empty"), ("somefile/run", "somefile is a file"),
                                            ("/proc/run", "cannot write under /proc")])
def test_bad_run_directories(output, needle, refused, tmp_cwd):
    (tmp_cwd / "somefile").write_text("x")
    refused(["train-tokenizer", "--output", output], needle)


# ------------------------------------------------------------------------------- codes (issue 29)
WEIGHTS = Path(__import__("mvar_engine").__file__).parent / "models" / "weights"


@pytest.fixture(scope="module")
def codes_folders(tmp_path_factory):
    """An image folder, its next-scale codes with twins (shipped tokenizer) and codes without twins."""
    from mvar_engine.apps.training.cache_codes import CacheCodesSettings, cache_codes

    root = tmp_path_factory.mktemp("codes")
    for c in ("cat", "dog"):
        for i in range(4):
            _png(root / "images" / c / f"{i}.png", (20 + 3 * i, 17))
    tok = str(WEIGHTS / "tokenizer-digits.safetensors")
    for name, twin in (("codes", True), ("single", False)):
        cache_codes(CacheCodesSettings(data=str(root / "images"), tokenizer=tok, output=str(root / name),
                                       flip_twin=twin, workers=0, progress=False))
    return root


TRAIN_FROM = ["train", "--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--batch-size", "2", "--steps", "1"]


@pytest.mark.parametrize("extra, needle", [
    (["--trajectory", "full", "--tokenizer", "{w}/tokenizer-raster-digits.safetensors"], "were made by another tokenizer"),
    (["--trajectory", "raster"], "this trainer needs raster codes"),
    (["--crop", "random"], "were cut with a center crop"),
    (["--workers", "-1"], "--workers must be at least 0"),
])
def test_training_from_unfit_codes(extra, needle, codes_folders, refused):
    extra = [e.format(w=WEIGHTS) for e in extra]
    tok = ["--tokenizer", str(WEIGHTS / "tokenizer-digits.safetensors")]
    refused(TRAIN_FROM + tok + ["--data", codes_folders / "codes"] + extra, needle)


def test_codes_without_twins_refuse_hflip_and_the_tokenizer_trainer_refuses_codes(codes_folders, refused):
    tok = ["--tokenizer", str(WEIGHTS / "tokenizer-digits.safetensors")]
    refused(TRAIN_FROM + tok + ["--data", codes_folders / "single", "--hflip"], "have no flipped twin")
    refused(["train-tokenizer", "--data", codes_folders / "codes"], "train-tokenizer trains on images")
    refused(TRAIN_FROM + tok + ["--hflip"], "--crop and --hflip apply to an image folder")


def test_unfinished_or_unreadable_codes_folders(codes_folders, refused, tmp_cwd):
    import shutil

    tok = ["--tokenizer", str(WEIGHTS / "tokenizer-digits.safetensors")]
    shutil.copytree(codes_folders / "codes", "unfinished")
    Path("unfinished/manifest.json").unlink()
    shutil.copytree(codes_folders / "codes", "broken")
    Path("broken/manifest.json").write_text("{not json")
    refused(TRAIN_FROM + tok + ["--data", "unfinished"], "cache-codes has not finished there")
    refused(TRAIN_FROM + tok + ["--data", "broken"], "is unreadable")


def test_cache_codes_bad_input(codes_folders, refused, tmp_cwd):
    import shutil

    images = codes_folders / "images"
    tok = ["--tokenizer", str(WEIGHTS / "tokenizer-digits.safetensors")]
    base = ["cache-codes", "--data", images, *tok, "--no-progress", "--workers", "0"]
    Path("busy").mkdir()
    Path("busy/notes.txt").write_text("mine")
    shutil.copytree(codes_folders / "codes", "done")
    refused(base + ["--output", "busy"], "is not empty and holds no codes")
    refused(base + ["--output", images / "codes"], "lies inside --data")
    refused(base + ["--output", "fresh", "--resume"], "holds no unfinished codes job")
    refused(base + ["--output", "done"], "already holds codes; pass --resume")
    refused(base + ["--output", "done", "--resume", "--batch-size", "7"], "was started with other settings or data")
    refused(base + ["--output", "new", "--batch-size", "0"], "--batch-size must be at least 1")
    refused(base + ["--output", "new", "--shard-size", "0"], "--shard-size must be at least 1")
    refused(["cache-codes", "--data", codes_folders / "codes", *tok, "--output", "new"], "holds codes; cache-codes reads")
    refused(["cache-codes", "--data", "nowhere", *tok, "--output", "new"], "not a folder")
