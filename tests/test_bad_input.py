"""Issue 14: every bad input is one line on stderr and exit 2, checked before any model is built,
with nothing written. Each case must fail in well under a second (a case that reaches generation
means its check came too late)."""

from __future__ import annotations

import os
import time

import pytest

from mvar_engine.apps.cli import main

RANDOM = ["--random-weights", "--depth", "1", "--patch-nums", "1,2", "--labels", "0", "--samples-per-label", "1",
          "--no-progress"]
RASTER = ["--trajectory", "raster", "--random-weights", "--depth", "1", "--patch-nums", "2", "--labels", "0",
          "--samples-per-label", "1", "--no-progress"]


def _tree(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files}


def _fails_in_one_line(argv, needle, capsys, root):
    before = _tree(root)
    start = time.perf_counter()
    assert main(argv) == 2
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mvar-engine: error: ") and needle in err[0], err
    assert "Traceback" not in err[0]
    assert _tree(root) == before, "a bad input created files"
    assert elapsed < 2.0, f"took {elapsed:.1f} s: the check ran after the model was built"
    return err[0]


# ------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("argv, needle", [
    (["--cfg", "inf"], "--cfg takes a finite number >= 0"),
    (["--cfg", "nan"], "--cfg takes a finite number >= 0"),
    (["--cfg=-inf"], "--cfg takes a finite number >= 0"),
    (["--top-p", "nan"], "--top-p takes a finite number in [0, 1]"),
    (["--top-p", "inf"], "--top-p takes a finite number in [0, 1]"),
    (["--seed", "99999999999999999999999"], "--seed takes an integer from -2**63 to 2**64 - 1"),
    (["--seed", "-99999999999999999999999"], "--seed takes an integer from -2**63 to 2**64 - 1"),
    (["--top-k", "99999999999999999999"], "sampling.top_k: Input should be less than or equal to"),
    (["--batch-size", "99999999999999999999"], "batch_size: Input should be less than or equal to"),
    (["--samples-per-label", "99999999999999999999"], "samples_per_label: Input should be less than or equal to"),
    (["--labels", ""], "--labels is empty"),
    (["--labels", ","], "--labels has an empty entry"),
    (["--labels", "1,,2"], "--labels has an empty entry"),
    (["--labels=-1"], "every entry must be >= 0"),
    (["--patch-nums", ""], "--patch-nums is empty"),
    (["--patch-nums", "1,0"], "every entry must be >= 1"),
    (["--cache", "window", "--cache-budget", "inf"], "finite number (got 'inf') (flag --cache-budget)"),
    (["--attention-kernel-size", "99999999999999999999"], "at most 63 bits"),
    (["--trajectory-order", "99999999999999999999"], "(flag --trajectory-order)"),
])
def test_bad_numbers_and_lists(argv, needle, capsys, tmp_cwd):
    _fails_in_one_line(RANDOM + argv, needle, capsys, tmp_cwd)  # the last of a repeated flag wins


@pytest.mark.parametrize("argv, needle", [
    (["--cache", "sink", "--cache-budget", "inf"], "option budget: Input should be a finite number"),
    (["--cache", "sink", "--cache-budget", "nan"], "(flag --cache-budget)"),
    (["--cache", "h2o", "--cache-budget", "inf"], "(flag --cache-budget)"),
    (["--cache", "sink", "--cache-sink", "99999999999999999999"], "at most 63 bits"),
])
def test_bad_component_numbers(argv, needle, capsys, tmp_cwd):
    _fails_in_one_line(RASTER + argv, needle, capsys, tmp_cwd)


def test_a_config_file_with_inf_is_one_line(capsys, tmp_cwd):
    (tmp_cwd / "run.toml").write_text("[sampling]\ncfg = inf\n")
    _fails_in_one_line(RANDOM + ["--config", "run.toml"], "--cfg takes a finite number", capsys, tmp_cwd)


# ------------------------------------------------------------------------------------- output paths
def _layout(root):
    (root / "somedir").mkdir()
    (root / "somefile").write_text("x")


@pytest.mark.parametrize("flag, value, needle", [
    ("--output", "", "--output is empty"),
    ("--output", "somedir", "--output somedir: is a directory"),
    ("--output", "somefile/x.png", "is a file, not a directory"),
    ("--output", "somefile/deeper/x.png", "is a file, not a directory"),
    ("--output", "/proc/x.png", "cannot write under /proc"),
    ("--output", "/proc/new/x.png", "cannot write under /proc"),
    ("--output", "x.jpg", "must end in .png"),
    ("--output", "new/x.foo", "must end in .png"),
    ("--save-tokens", "", "--save-tokens is empty"),
    ("--save-tokens", "somedir", "--save-tokens somedir: is a directory"),
    ("--save-tokens", "somefile/t.pt", "is a file, not a directory"),
    ("--save-tokens", "/proc/t.pt", "cannot write under /proc"),
    ("--save-tokens", "t.txt", "must end in .pt or .safetensors"),
])
def test_bad_generate_output_paths(flag, value, needle, capsys, tmp_cwd):
    _layout(tmp_cwd)
    _fails_in_one_line(RANDOM + [flag, value], needle, capsys, tmp_cwd)


def test_per_image_into_a_file(capsys, tmp_cwd):
    _layout(tmp_cwd)
    _fails_in_one_line(RANDOM + ["--per-image", "--output", "somefile.png"], "--per-image writes its PNGs into somefile",
                       capsys, tmp_cwd)


@pytest.mark.parametrize("target, needle", [
    ("", "the path is empty"),
    ("somedir", "is a directory"),
    ("somefile/b.safetensors", "is a file, not a directory"),
    ("/proc/b.safetensors", "cannot write under /proc"),
    ("b.pth", "change the suffix"),
    ("src.safetensors", "the same file as SOURCE"),
])
def test_bad_export_targets(target, needle, capsys, tmp_cwd):
    import torch

    from mvar_engine.models.checkpoint import save_state_dict

    _layout(tmp_cwd)
    save_state_dict({"w": torch.zeros(2)}, tmp_cwd / "src.safetensors")
    _fails_in_one_line(["export-weights", "src.safetensors", target], needle, capsys, tmp_cwd)


@pytest.mark.parametrize("source, needle", [("missing.pt", "does not exist"), ("somedir", "is a directory"),
                                            ("", "the path is empty")])
def test_bad_export_sources(source, needle, capsys, tmp_cwd):
    _layout(tmp_cwd)
    _fails_in_one_line(["export-weights", source, "b.safetensors"], needle, capsys, tmp_cwd)


# ------------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize("device, needle", [
    ("tpu", "not a device name (available here: auto, cpu"),
    ("mps", "available here: auto, cpu"),
    ("cuda:7", "available here: auto, cpu"),
    ("meta", "available here: auto, cpu"),
    ("cpu:3", "use --device cpu"),
    ("", "not a device name"),
])
def test_unavailable_devices(device, needle, capsys, tmp_cwd):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7 or device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has the device")
    line = _fails_in_one_line(RANDOM + ["--device", device], needle, capsys, tmp_cwd)
    assert "--device" in line


def test_16_bit_autocast_on_cpu_fails_before_the_model(capsys, tmp_cwd):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA runs 16-bit autocast")
    _fails_in_one_line(RANDOM + ["--device", "cpu", "--dtype", "float16"], "CUDA only", capsys, tmp_cwd)
