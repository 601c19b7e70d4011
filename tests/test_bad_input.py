"""Issue 14: every bad input is one line on stderr and exit 2, checked before any model is built,
with nothing written (the ``refused`` fixture of conftest.py: the model builders are stubbed, so a
check that comes too late fails the test). Names and numbers are drawn by hypothesis."""

from __future__ import annotations

import os
import re
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
    (["--cfg", "inf"], "--cfg takes a finite number from 0 to 1e+30"),
    (["--cfg", "1e308"], "--cfg takes a finite number from 0 to 1e+30"),
    (["--cfg", "nan"], "--cfg takes a finite number from 0 to 1e+30"),
    (["--cfg=-inf"], "--cfg takes a finite number from 0 to 1e+30"),
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
    (["--cache", "window", "--cache-budget", "inf"], "finite number (got 'inf') (set by --cache-budget)"),
    (["--attention-kernel-size", "99999999999999999999"], "at most 63 bits"),
    (["--trajectory-order", "99999999999999999999"], "(set by --trajectory-order)"),
])
def test_bad_numbers_and_lists(argv, needle, refused, tmp_cwd):
    refused(RANDOM + argv, needle)  # the last of a repeated flag wins


@pytest.mark.parametrize("argv, needle", [
    (["--cache", "sink", "--cache-budget", "inf"], "option budget: Input should be a finite number"),
    (["--cache", "sink", "--cache-budget", "nan"], "(set by --cache-budget)"),
    (["--cache", "h2o", "--cache-budget", "inf"], "(set by --cache-budget)"),
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
    assert config.trajectory.name == "full" and config.model.options["checkpoint"] is not None
    assert Path(config.model.options["checkpoint"]).name == "var-digits.safetensors"


# -------------------------------------------------------- numbers of every flag (property-based)
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70),
                    st.sampled_from(["inf", "-inf", "nan", "1e999", "99999999999999999999999", "-0", "1.5"]))

GENERATE_RULES = {  # flag: is the value valid?  (an independent statement of the documented ranges)
    "--cfg": lambda v: isinstance(v, float) and 0 <= v <= 1e30,
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
                                          (["--model-adapter", ""], "--model is empty")])
def test_empty_config_and_model_family(argv, needle, refused):
    refused(RANDOM + argv, needle)


@pytest.mark.parametrize("command", [["bench", "attention"], ["bench", "train"], ["bench", "train", "--throughput"],
                                     ["evaluate"]])
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
            f"the same file as --checkpoint {name}")
    assert weights.read_bytes() == b"the weights"


@pytest.mark.parametrize("suffix,image_format", [(".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP"), (".png", "PNG")])
def test_the_grid_format_follows_the_suffix(suffix, image_format, tmp_cwd):
    from PIL import Image

    from mvar_engine.apps.cli import main

    out = tmp_cwd / f"grid{suffix}"
    assert main(["--labels", "0,1", "--samples-per-label", "1", "--no-progress", "--output", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == image_format and image.size[0] > 0


# ----------------------------------------------- config files that are not files; booleans; texts
def test_a_config_that_is_a_pipe_or_a_device_is_refused_without_reading_it(refused, tmp_cwd):
    """A named pipe would block the read forever and /dev/zero never ends: refused by their type."""
    os.mkfifo(tmp_cwd / "pipe")
    refused(RANDOM + ["--config", "pipe"], "config file pipe: is not a regular file")
    refused(RANDOM + ["--config", "/dev/zero"], "config file /dev/zero: is not a regular file")


def test_an_oversized_config_file_is_refused(refused, tmp_cwd):
    (tmp_cwd / "big.toml").write_text(" " * (2**20 + 1))
    refused(RANDOM + ["--config", "big.toml"], "more than a config file's 1 MiB")


@pytest.mark.parametrize("text, needle", [
    ("batch_size = true\n", "batch_size: true is a boolean; give an integer"),
    ("[sampling]\ntop_k = false\n", "sampling.top_k: false is a boolean; give an integer"),
    ("[sampling]\ncfg = true\n", "sampling.cfg: true is a boolean; give a number"),
    ("[model]\nnum_classes = true\n", "model adapter 'var' option num_classes: true is a boolean; give an integer"),
])
def test_a_boolean_where_a_number_is_due_is_refused(text, needle, refused, tmp_cwd):
    """pydantic's lax mode would read ``batch_size = true`` as 1."""
    (tmp_cwd / "run.toml").write_text(text)
    refused(RANDOM + ["--config", "run.toml"], needle)


@pytest.mark.parametrize("argv", [["--prompt", "a red bird"], ["--no-chat-format"]])
def test_text_options_for_a_class_conditional_model_are_refused(argv, refused, tmp_cwd):
    refused(["--labels", "0"] + argv, "(model 'janus' takes them: it generates next-token sequences (give --model janus")


@pytest.mark.parametrize("value", ["2", "-0.5", "1.0001"])
def test_quant_resi_outside_0_1_is_refused(value, refused, tmp_cwd):
    refused(["train-tokenizer", f"--quant-resi={value}", "--no-progress"], "--quant-resi must lie in [0, 1]")


def test_more_images_than_memory_holds_are_refused_before_any_allocation(refused, tmp_cwd):
    refused(["--labels", "0,1", "--samples-per-label", "99999999999", "--no-progress"],
            "199999999998 images of 32x32 need at least")


# ------------------------------------------- outputs: never a file the command did not write
def _mine(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"the user's own file")
    return path.read_bytes()


FOREIGN_OUTPUTS = [  # (argv, the existing file, the command named)
    (["--labels", "0", "--samples-per-label", "1", "--output", "mine.png"], "mine.png", "generate"),
    (["--labels", "0", "--samples-per-label", "1", "--output", "mine.jpg"], "mine.jpg", "generate"),
    (["--labels", "0", "--samples-per-label", "1", "--output", "g.png", "--save-tokens", "t.pt"], "t.pt", "generate"),
    (["--labels", "0", "--samples-per-label", "1", "--output", "g.png", "--save-tokens", "t.safetensors"],
     "t.safetensors", "generate"),
    (["--labels", "0", "--samples-per-label", "1", "--output", "g.png", "--per-image"], "g/0000_class0.png", "generate"),
    (["sample", "--per-class", "1", "--labels", "0", "--output-dir", "s", "--npz", "keep.npz"], "keep.npz", "sample"),
    (["bench", "attention", "--output", "ba.json"], "ba.json", "bench attention"),
    (["bench", "matrix", "--models", "tiny", "--output", "bm.json"], "bm.md", "bench matrix"),
    (["bench", "capacity", "--output", "bc.json"], "bc.png", "bench capacity"),
    (["evaluate", "--output", "e.json"], "e.json", "evaluate"),
    (["profile-heads", "--head-map", "hm.json"], "hm.png", "profile-heads"),
]


@pytest.mark.parametrize("argv, existing, command", FOREIGN_OUTPUTS)
def test_an_existing_file_the_command_did_not_write_is_refused_and_kept(argv, existing, command, refused, tmp_cwd):
    before = _mine(tmp_cwd / existing)
    refused(argv, f"{existing}: the file exists and was not written by `mvar-engine {command}` (pass --overwrite")
    assert (tmp_cwd / existing).read_bytes() == before


def test_export_weights_keeps_a_file_it_did_not_write(refused, tmp_cwd):
    from mvar_engine.models.default_models import WEIGHTS_DIR

    before = _mine(tmp_cwd / "mine.safetensors")
    refused(["export-weights", WEIGHTS_DIR / "mvar-digits.safetensors", "mine.safetensors"], "was not written by `mvar-engine export-weights`")
    assert (tmp_cwd / "mine.safetensors").read_bytes() == before


def test_a_command_replaces_its_own_outputs_and_overwrite_replaces_any(tmp_cwd, capsys):
    from mvar_engine.apps.cli import main
    from mvar_engine.apps.output_files import written_by

    argv = ["--labels", "0", "--samples-per-label", "1", "--no-progress", "--output", "g.webp", "--save-tokens",
            "t.safetensors"]
    assert main(argv) == 0 and main(argv) == 0, capsys.readouterr().err  # its own files: replaced
    assert written_by("g.webp") == written_by("t.safetensors") == "mvar-engine generate"
    assert main(["export-weights", "t.safetensors", "w.safetensors", "--dtype", "float32"]) == 0
    assert written_by("w.safetensors") == "mvar-engine export-weights"
    other = ["--labels", "0", "--samples-per-label", "1", "--no-progress", "--output", "g.webp", "--save-tokens",
             "w.safetensors"]
    assert main(other) == 2  # another command's file is not this one's to replace
    assert "not written by `mvar-engine generate`" in capsys.readouterr().err
    assert written_by("w.safetensors") == "mvar-engine export-weights"
    _mine(tmp_cwd / "mine.png")
    assert main(["--labels", "0", "--samples-per-label", "1", "--no-progress", "--output", "mine.png", "--overwrite"]) == 0
    assert written_by("mine.png") == "mvar-engine generate"


@pytest.mark.parametrize("name, companion, needle", [
    ("bm.json", "bm.md", "bm.md: is a directory"), ("hm.json", "hm.png", "hm.png: is a directory")])
def test_a_companion_output_that_cannot_be_written_is_refused_before_any_work(name, companion, needle, refused,
                                                                              tmp_cwd):
    (tmp_cwd / companion).mkdir()
    argv = (["bench", "matrix", "--models", "tiny", "--output", name] if name.startswith("bm")
            else ["profile-heads", "--head-map", name])
    refused(argv, needle)


def test_bench_cache_checks_its_head_map_companions_and_an_unwritable_output(refused, tmp_cwd):
    refused(["bench", "cache", "--output", "/proc/x.json"], "--output /proc/x.json: cannot write under /proc")
    (tmp_cwd / "bc.head_map.png").mkdir()
    refused(["bench", "cache", "--policies", "ssd", "--output", "bc.json"], "bc.head_map.png: is a directory")


# ----------------------------------------------------------- sample folders: links, damage, bad weights
def test_sample_refuses_an_images_folder_that_is_a_link(refused, tmp_cwd):
    (tmp_cwd / "elsewhere").mkdir()
    (tmp_cwd / "s").mkdir()
    (tmp_cwd / "s" / "images").symlink_to(tmp_cwd / "elsewhere")
    refused(["sample", "--per-class", "1", "--labels", "0", "--output-dir", "s"], "its images/ is a link or a file")
    assert not list((tmp_cwd / "elsewhere").iterdir())


def test_sample_resume_makes_a_damaged_png_again(tmp_cwd, capsys):
    from PIL import Image

    from mvar_engine.apps.cli import main

    argv = ["sample", "--per-class", "1", "--labels", "0,1", "--output-dir", "s", "--no-progress"]
    assert main(argv) == 0
    damaged = tmp_cwd / "s" / "images" / "00000_000000.png"
    whole = damaged.read_bytes()
    damaged.write_bytes(whole[:200])
    assert main(argv + ["--resume"]) == 0, capsys.readouterr().err
    assert "1 generated" in capsys.readouterr().out
    assert damaged.read_bytes() == whole
    Image.open(damaged).load()


def test_sample_with_nan_weights_writes_nothing(tmp_cwd, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from mvar_engine.apps.cli import main
    from mvar_engine.models.default_models import WEIGHTS_DIR

    source = WEIGHTS_DIR / "mvar-digits.safetensors"
    state = load_file(source)
    state["blocks.0.ada_lin.1.weight"] = state["blocks.0.ada_lin.1.weight"] * float("nan")
    with safe_open(str(source), "pt") as handle:
        save_file(state, str(tmp_cwd / "nan.safetensors"), metadata=handle.metadata())
    status = main(["sample", "--per-class", "1", "--labels", "0", "--output-dir", "s", "--no-progress",
                   "--var-checkpoint", "nan.safetensors", "--vae-checkpoint", str(WEIGHTS_DIR / "tokenizer-digits.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "hold NaN or inf values" in err[0], err
    assert not (tmp_cwd / "s").exists()


# ------------------------------------------------------------------- training: diverged runs
TRAIN_TINY = ["--steps", "3", "--batch-size", "4", "--max-images", "8", "--depth", "1", "--embed-dim", "32",
              "--num-heads", "2", "--no-progress"]


def test_a_non_finite_loss_stops_training_before_that_step_is_saved(tmp_cwd, capsys):
    from mvar_engine.apps.cli import main
    from mvar_engine.models.default_models import WEIGHTS_DIR

    status = main(["train", "--tokenizer", str(WEIGHTS_DIR / "tokenizer-digits.safetensors"), "--output", "run", "--lr", "1e30"]
                  + TRAIN_TINY)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1, (status, err)
    assert re.search(r"training diverged at step \d: the loss is nan", err[0]) and "no step was saved" in err[0], err
    assert not (tmp_cwd / "run" / "model.safetensors").exists() and not (tmp_cwd / "run" / "checkpoint.pt").exists()


def test_resume_from_a_checkpoint_with_nan_weights_is_refused_and_nothing_written(tmp_cwd, capsys):
    import torch

    from mvar_engine.apps.cli import main
    from mvar_engine.models.default_models import WEIGHTS_DIR

    argv = ["train", "--tokenizer", str(WEIGHTS_DIR / "tokenizer-digits.safetensors"), "--output", "run"] + TRAIN_TINY
    assert main(argv) == 0
    checkpoint = tmp_cwd / "run" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    key = next(k for k in state["model"] if k.endswith("weight"))
    state["model"][key] = state["model"][key] * float("nan")
    state["step"] = 1
    torch.save(state, checkpoint)
    files = {p.name: p.read_bytes() for p in (tmp_cwd / "run").iterdir()}
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.pt: 1 tensor(s) hold NaN or inf values" in err[0], err
    assert {p.name: p.read_bytes() for p in (tmp_cwd / "run").iterdir()} == files


def test_overwrite_never_deletes_another_kind_of_run_or_an_input(refused, tmp_cwd):
    import shutil

    import torch

    from mvar_engine.apps.training.checkpointing import CHECKPOINT_FORMAT
    from mvar_engine.models.default_models import WEIGHTS_DIR

    (tmp_cwd / "t").mkdir()
    shutil.copy(WEIGHTS_DIR / "tokenizer-digits.safetensors", tmp_cwd / "t" / "tokenizer.safetensors")
    torch.save({"format": CHECKPOINT_FORMAT, "kind": "tokenizer", "step": 1}, tmp_cwd / "t" / "checkpoint.pt")
    refused(["train", "--tokenizer", "t/tokenizer.safetensors", "--output", "t", "--overwrite"] + TRAIN_TINY,
            "--output t holds a tokenizer run; --overwrite replaces only a var run")
    torch.save({"format": CHECKPOINT_FORMAT, "kind": "var", "step": 1}, tmp_cwd / "t" / "checkpoint.pt")
    refused(["train", "--tokenizer", "t/tokenizer.safetensors", "--output", "t", "--overwrite", "--init-from",
             "t/checkpoint.pt"] + TRAIN_TINY, "would delete t/checkpoint.pt, which --init-from reads")


# ----------------------------------------------------------- environment, names, full disks
@pytest.mark.parametrize("env, needle", [
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR and MASTER_PORT not set"),
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x': not a whole number"),
    ({"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0"}, "WORLD_SIZE='two': not a whole number"),
    ({"RANK": "3", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "RANK=3 with WORLD_SIZE=2: a rank must be below the world size"),
])
def test_torchrun_variables_set_by_hand_are_one_line(env, needle, refused, tmp_cwd, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    refused(["sample", "--per-class", "1", "--labels", "0", "--output-dir", "s"], needle)


def test_an_output_name_longer_than_a_file_system_allows(refused, tmp_cwd):
    refused(["--labels", "0", "--output", "x" * 300 + ".png"], "a name in it is 304 bytes, more than the 255")


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_cwd, capsys, monkeypatch):
    import errno

    from PIL import Image

    from mvar_engine.apps.cli import main

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full)
    status = main(["--labels", "0", "--samples-per-label", "1", "--output", "out/g.png", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1, (status, err)
    assert err[0] == ("mvar-engine: error: out/g.png: cannot be written (No space left on device); the partial file "
                      "was removed and nothing else changed (free space, or choose another location)")
    assert [p.name for p in (tmp_cwd / "out").iterdir()] == []


@pytest.mark.parametrize("argv, needle", [
    (["--resize", "100000"], "--resize 100000: 100000x100000 images are more than the 89478485 pixels"),
    (["--resize", "9000", "--batch-size", "100000"], "--resize 9000 with --batch-size 100000:"),
])
def test_a_resize_beyond_the_machine_is_refused_before_any_allocation(argv, needle, refused, tmp_cwd):
    refused(["sample", "--per-class", "1", "--labels", "0", "--output-dir", "s"] + argv, needle)


def test_a_sample_job_beyond_memory_is_refused_before_anything_is_planned(refused, tmp_cwd):
    refused(["sample", "--per-class", "99999999999", "--labels", "0", "--output-dir", "s"],
            "--per-class 99999999999 x 1 classes: 99999999999 images; listing them alone needs")


@pytest.mark.parametrize("command", [["bench", "matrix"], ["bench", "cache"], ["bench", "capacity"]])
def test_a_report_output_that_is_a_folder_is_refused(command, refused, tmp_cwd):
    (tmp_cwd / "odir").mkdir()
    refused(command + ["--output", "odir"], "--output odir")


@pytest.mark.parametrize("argv, needle", [
    (["--labels", "0", "--output", "/dev/full"], "--output /dev/full: exists and is not a regular file"),
    (["sample", "--per-class", "1e12", "--output-dir", "s"], "--per-class '1e12': give a whole number"),
])
def test_device_outputs_and_float_counts_are_refused(argv, needle, refused, tmp_cwd):
    refused(argv, needle)
