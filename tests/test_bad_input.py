"""Issue 14: every bad input is one line on stderr and exit 2, checked before any model is built,
with nothing written (the ``refused`` fixture of conftest.py: the model builders are stubbed, so a
check that comes too late fails the test). Names and numbers are drawn by hypothesis."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import cli_text, number_meaning

RANDOM = ["--random-weights", "--depth", "1", "--patch-nums", "1,2", "--labels", "0", "--samples-per-label", "1",
          "--no-progress"]
RASTER = ["--trajectory", "raster", "--random-weights", "--depth", "1", "--patch-nums", "2", "--labels", "0",
          "--samples-per-label", "1", "--no-progress"]


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
def test_bad_numbers_and_lists(argv, needle, refused, tmp_cwd):
    refused(RANDOM + argv, needle)  # the last of a repeated flag wins


@pytest.mark.parametrize("argv, needle", [
    (["--cache", "sink", "--cache-budget", "inf"], "option budget: Input should be a finite number"),
    (["--cache", "sink", "--cache-budget", "nan"], "(flag --cache-budget)"),
    (["--cache", "h2o", "--cache-budget", "inf"], "(flag --cache-budget)"),
    (["--cache", "sink", "--cache-sink", "99999999999999999999"], "at most 63 bits"),
])
def test_bad_component_numbers(argv, needle, refused, tmp_cwd):
    refused(RASTER + argv, needle)


def test_a_config_file_with_inf_is_one_line(refused, tmp_cwd):
    (tmp_cwd / "run.toml").write_text("[sampling]\ncfg = inf\n")
    refused(RANDOM + ["--config", "run.toml"], "--cfg takes a finite number")


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
    ("--output", "x.gif", "must end in .png or .jpg or .jpeg or .webp"),
    ("--output", "new/x.foo", "must end in .png or .jpg or .jpeg or .webp"),
    ("--save-tokens", "", "--save-tokens is empty"),
    ("--save-tokens", "somedir", "--save-tokens somedir: is a directory"),
    ("--save-tokens", "somefile/t.pt", "is a file, not a directory"),
    ("--save-tokens", "/proc/t.pt", "cannot write under /proc"),
    ("--save-tokens", "t.txt", "must end in .pt or .safetensors"),
])
def test_bad_generate_output_paths(flag, value, needle, refused, tmp_cwd):
    _layout(tmp_cwd)
    refused(RANDOM + [flag, value], needle)


def test_per_image_into_a_file(refused, tmp_cwd):
    _layout(tmp_cwd)
    refused(RANDOM + ["--per-image", "--output", "somefile.png"], "--per-image writes its PNGs into somefile")


@pytest.mark.parametrize("target, needle", [
    ("", "the path is empty"),
    ("somedir", "is a directory"),
    ("somefile/b.safetensors", "is a file, not a directory"),
    ("/proc/b.safetensors", "cannot write under /proc"),
    ("b.pth", "change the suffix"),
    ("src.safetensors", "the same file as SOURCE"),
])
def test_bad_export_targets(target, needle, refused, tmp_cwd):
    import torch

    from mvar_engine.models.checkpoint import save_state_dict

    _layout(tmp_cwd)
    save_state_dict({"w": torch.zeros(2)}, tmp_cwd / "src.safetensors")
    refused(["export-weights", "src.safetensors", target], needle)


@pytest.mark.parametrize("source, needle", [("missing.pt", "does not exist"), ("somedir", "is a directory"),
                                            ("", "the path is empty")])
def test_bad_export_sources(source, needle, refused, tmp_cwd):
    _layout(tmp_cwd)
    refused(["export-weights", source, "b.safetensors"], needle)


# ------------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize("device, needle", [
    ("tpu", "not a device name (available here: auto, cpu"),
    ("mps", "available here: auto, cpu"),
    ("cuda:7", "available here: auto, cpu"),
    ("meta", "available here: auto, cpu"),
    ("cpu:3", "use --device cpu"),
    ("", "not a device name"),
])
def test_unavailable_devices(device, needle, refused, tmp_cwd):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7 or device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has the device")
    line = refused(RANDOM + ["--device", device], needle)
    assert "--device" in line


def test_16_bit_autocast_on_cpu_fails_before_the_model(refused, tmp_cwd):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA runs 16-bit autocast")
    refused(RANDOM + ["--device", "cpu", "--dtype", "float16"], "CUDA only")


def test_bf16_on_a_cpu_without_native_bf16_is_refused_with_the_reason(refused, monkeypatch):
    monkeypatch.setenv("MVAR_ENGINE_CPU_BF16", "0")
    refused(RANDOM + ["--device", "cpu", "--dtype", "bfloat16"], "needs native bf16 and MVAR_ENGINE_CPU_BF16=0")


# ---------------------------------------------------------------------- names (property-based)

BLANK = st.text(alphabet=" \t", max_size=3)
NAME_KINDS = ("trajectory", "attention", "cache", "backend")


@pytest.mark.parametrize("kind", NAME_KINDS)
@given(blank=BLANK)
def test_an_empty_component_name_is_refused(kind, blank, refused):
    refused(RANDOM + [f"--{kind}", blank], f"--{kind} is empty: give a {kind} name")


@pytest.mark.parametrize("kind", NAME_KINDS)
@given(name=st.text(alphabet=string.ascii_letters + string.digits + "_-.", min_size=1, max_size=12))
def test_an_unknown_component_name_is_one_line(kind, name, refused):
    from mvar_engine.core.registry import get_registry, normalize_name

    known = {normalize_name(c.record.name) for c in get_registry().components(kind)} | {"auto"}
    if normalize_name(name) in known or name.startswith("-"):
        return  # a real name (argparse reads a leading '-' as a flag)
    refused(RANDOM + [f"--{kind}", name], "unknown ")


def test_empty_names_in_a_config_file(refused, tmp_cwd):
    (tmp_cwd / "run.toml").write_text('trajectory = ""\n')
    refused(RANDOM + ["--config", "run.toml"], "the config file's trajectory is empty")


@pytest.mark.parametrize("spelling", ["FULL", "Full", " full "])
def test_names_ignore_case_for_the_default_weights(spelling, no_model_built):
    from mvar_engine.apps.cli import parse_generate_args
    from mvar_engine.apps.pipeline import with_weights

    config = with_weights(parse_generate_args(["--trajectory", spelling]))
    assert config.trajectory.name == "full" and config.model.var_checkpoint is not None
    assert Path(config.model.var_checkpoint).name == "var-digits.safetensors"


# -------------------------------------------------------- numbers of every flag (property-based)
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70),
                    st.sampled_from(["inf", "-inf", "nan", "1e999", "99999999999999999999999", "-0", "1.5"]))

GENERATE_RULES = {  # flag: is the value valid?  (an independent statement of the documented ranges)
    "--cfg": lambda v: isinstance(v, float) and v >= 0,
    "--top-p": lambda v: isinstance(v, float) and 0 <= v <= 1,
    "--top-k": lambda v: isinstance(v, int) and 0 <= v < 2**63,
    "--seed": lambda v: isinstance(v, int) and -(2**63) <= v < 2**64,
    "--samples-per-label": lambda v: isinstance(v, int) and 1 <= v < 2**63,
    "--batch-size": lambda v: isinstance(v, int) and 1 <= v < 2**63,
}


@pytest.mark.parametrize("flag", sorted(GENERATE_RULES))
@given(value=NUMBERS)
def test_every_generate_number_is_checked_before_the_model(flag, value, refused, no_model_built):
    """Each value is either refused in one line or valid by the documented range and reaches the
    model build; inf and nan never get there."""
    from mvar_engine.apps.cli import main

    text = cli_text(value)
    number = number_meaning(text)
    if isinstance(number, int) and flag in ("--cfg", "--top-p"):
        number = float(number)
    if number is not None and GENERATE_RULES[flag](number):
        with pytest.raises(no_model_built):
            main(RANDOM + [f"{flag}={text}"])
    else:
        refused(RANDOM + [f"{flag}={text}"])


COMPONENT_NUMBERS = [  # (argv prefix, option flag, integer option?): component options of every kind
    (RANDOM, "--attention-kernel-size", True), (RANDOM, "--attention-apply-from", True),
    (RANDOM, "--attention-dilation", True), (RANDOM + ["--trajectory", "markov"], "--trajectory-order", True),
    (RASTER + ["--cache", "window"], "--cache-budget", False), (RASTER + ["--cache", "sink"], "--cache-sink", True),
    (RASTER + ["--cache", "h2o"], "--cache-budget", False), (RASTER + ["--cache", "sink"], "--cache-budget", False),
]


@pytest.mark.parametrize("prefix, flag, integer", COMPONENT_NUMBERS)
@given(value=st.sampled_from(["inf", "-inf", "nan", "1e999", "99999999999999999999999", "-99999999999999999999999"]))
def test_component_options_refuse_inf_nan_and_overflow(prefix, flag, integer, value, refused, no_model_built):
    """inf/nan always, and integers beyond int64 for integer options (a float budget of 1e23 tokens
    keeps everything, which is valid)."""
    from mvar_engine.apps.cli import main

    if not integer and value.lstrip("-").isdigit():
        if value.startswith("-"):
            refused(prefix + [f"{flag}={value}"], flag)
        else:
            with pytest.raises(no_model_built):
                main(prefix + [f"{flag}={value}"])
        return
    refused(prefix + [f"{flag}={value}"], flag)


@pytest.mark.parametrize("argv, needle", [(["--config", ""], "--config is empty"),
                                          (["--config", "  "], "--config is empty"),
                                          (["--model-adapter", ""], "--model-adapter is empty")])
def test_empty_config_and_model_family(argv, needle, refused):
    refused(RANDOM + argv, needle)


@pytest.mark.parametrize("command", [["bench", "attention"], ["bench", "train"], ["evaluate"]])
@pytest.mark.parametrize("output, needle", [("odir", "--output odir: is a directory"),
                                            ("/proc/e.json", "cannot write under /proc"), ("", "the path is empty")])
def test_report_outputs_are_checked_first(command, output, needle, refused, tmp_cwd):
    (tmp_cwd / "odir").mkdir()
    refused(command + ["--output", output], needle)


@pytest.mark.parametrize("output_flag,name,through_link", [
    ("--save-tokens", "m.safetensors", False), ("--output", "m.png", False), ("--save-tokens", "t.safetensors", True)])
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(output_flag, name, through_link, refused, tmp_cwd):
    """``--save-tokens m.safetensors --var-checkpoint m.safetensors`` replaced the model with the
    tokens; an output naming an input file (itself or through a link) is refused, bytes untouched."""
    weights = tmp_cwd / name
    weights.write_bytes(b"the weights")
    output = name
    if through_link:
        (tmp_cwd / "link.safetensors").symlink_to(weights)
        output = "link.safetensors"
    refused(["--trajectory", "raster", "--var-checkpoint", name, output_flag, output],
            f"the same file as --var-checkpoint {name}")
    assert weights.read_bytes() == b"the weights"


@pytest.mark.parametrize("suffix,image_format", [(".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP"), (".png", "PNG")])
def test_the_grid_format_follows_the_suffix(suffix, image_format, tmp_cwd):
    from PIL import Image

    from mvar_engine.apps.cli import main

    out = tmp_cwd / f"grid{suffix}"
    assert main(["--labels", "0,1", "--samples-per-label", "1", "--no-progress", "--output", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == image_format and image.size[0] > 0
