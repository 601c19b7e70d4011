"""The ``mvar-engine`` command: configuration precedence, validation, exit codes, end-to-end runs."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from conftest import small_models
from mvar_engine.core.checkpoint import save_state_dict
from mvar_engine.core.cli import main, parse_generate_args
from mvar_engine.core.errors import ConfigError, UsageError


def test_defaults_follow_the_trajectory():
    config = parse_generate_args([])
    assert (config.trajectory.name, config.attention.name, config.cache.name, config.backend.name) == (
        "markov", "neighborhood", "none", "auto")
    config = parse_generate_args(["--trajectory", "full"])
    assert (config.attention.name, config.cache.name) == ("dense", "full")


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('trajectory = "markov"\n[attention]\nname = "neighborhood"\nkernel_size = 5\ndilation = 2\n'
                    '[sampling]\ncfg = 3.0\ntop_k = 10\n')
    config = parse_generate_args(["--config", str(path), "--cfg", "2", "--attention-kernel-size", "3"])
    assert config.sampling.cfg == 2.0 and config.sampling.top_k == 10
    assert config.attention.options == {"kernel_size": "3", "dilation": 2}
    # picking another pattern drops the file's options for the old one
    config = parse_generate_args(["--config", str(path), "--attention", "dense"])
    assert config.attention.name == "dense" and config.attention.options == {}


def test_json_config_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"trajectory": {"name": "markov", "order": 2}, "cache": "window", "labels": [3, 4]}))
    config = parse_generate_args(["--config", str(path)])
    assert config.trajectory.options == {"order": 2} and config.cache.name == "window" and config.labels == [3, 4]


@given(top_p=st.floats(1.01, 100), top_k=st.integers(-100, -1))
def test_validation_names_each_field(top_p, top_k):
    with pytest.raises(ConfigError) as info:
        parse_generate_args(["--top-p", str(top_p), "--top-k", str(top_k)])
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert any(line.startswith("sampling.top_p:") for line in lines)
    assert any(line.startswith("sampling.top_k:") for line in lines)


def test_bad_config_file_is_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("trajectory = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_generate_args(["--config", str(path)])


@pytest.mark.parametrize("argv,needle", [
    (["--cache", "windw"], "did you mean 'window'? available: full, h2o, none, sink, ssd, window"),
    (["--attention", "neighborhod"], "did you mean 'neighborhood'"),
    (["--attention-kernel-size", "0"], "option kernel_size: Input should be greater than or equal to 1"),
    (["--trajectory-order", "x"], "option order: Input should be a valid integer"),
    (["--cache", "full"], "makes no sense under trajectory 'markov'"),
    (["--dtype", "float8"], "dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--backend", "nope"], "unknown attention backend 'nope'"),
    (["--var-checkpoint", "x.pth"], "give both --var-checkpoint and --vae-checkpoint"),
])
def test_usage_errors_exit_2_with_one_line(argv, needle, capsys):
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mvar-engine: error: ") and needle in err[0], err


def test_debug_shows_the_traceback():
    with pytest.raises(UsageError):
        main(["--cache", "windw", "--debug"])


def test_unavailable_backend_is_refused_with_its_reason(capsys):
    assert main(["--backend", "xformers", "--random-weights", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "backend 'xformers' is unavailable" in err and ("CUDA" in err or "not installed" in err)


def test_plugins_json_lists_every_builtin(capsys):
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = {(c["kind"], c["name"]) for c in data["components"]}
    for kind, name in [("trajectory", "full"), ("trajectory", "markov"), ("attention", "dense"),
                       ("attention", "neighborhood"), ("cache", "none"), ("cache", "full"), ("cache", "window"),
                       ("backend", "reference"), ("backend", "sdpa"), ("backend", "natten"), ("backend", "xformers"),
                       ("backend", "flash-attn")]:
        assert (kind, name) in names
    by_name = {c["name"]: c for c in data["components"] if c["kind"] == "backend"}
    if not torch.cuda.is_available():
        for name in ("xformers", "flash-attn"):
            assert by_name[name]["available"] is False and by_name[name]["reason"]
    assert by_name["sdpa"]["provider"]["package"] == "mvar-engine"


def test_plugins_table(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["KIND", "NAME", "PROVIDER", "AVAILABLE"]
    assert "neighborhood" in out


@pytest.fixture
def checkpoints(tmp_path):
    patch_nums = (1, 2, 3, 4)
    model, tok = small_models(patch_nums, num_classes=4)
    var_path, vae_path = tmp_path / "var.pth", tmp_path / "vae.safetensors"
    torch.save({"trainer": {"var_wo_ddp": model.state_dict()}}, var_path)
    save_state_dict(tok.state_dict(), vae_path)
    return ["--var-checkpoint", str(var_path), "--vae-checkpoint", str(vae_path), "--patch-nums", "1,2,3,4"]


@pytest.mark.parametrize("combo", [["--trajectory", "markov", "--attention", "neighborhood", "--cache", "none",
                                    "--attention-kernel-size", "3"],
                                   ["--trajectory", "full", "--attention", "dense", "--cache", "full"]])
def test_main_commands_write_a_grid(tmp_path, checkpoints, combo, capsys):
    out = tmp_path / "grid.png"
    tokens = tmp_path / "tokens.pt"
    argv = combo + checkpoints + ["--labels", "0,3", "--samples-per-label", "3", "--output", str(out),
                                  "--save-tokens", str(tokens), "--per-image", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    image = Image.open(out)
    assert image.size == (3 * (8 + 2) + 2, 2 * (8 + 2) + 2)  # 3 columns, 2 rows of 8x8 images (4x4 latent, 2x upsampling), 2 px padding
    saved = torch.load(tokens)
    assert saved["labels"].tolist() == [0, 0, 0, 3, 3, 3]
    assert [saved[f"tokens.{s}"].shape[1] for s in range(4)] == [1, 4, 9, 16]
    assert len(list((tmp_path / "grid").glob("*.png"))) == 6
    assert "wrote" in capsys.readouterr().out


def test_same_seed_same_png(tmp_path, checkpoints):
    args = checkpoints + ["--labels", "1", "--samples-per-label", "2", "--no-progress", "--seed", "5"]
    assert main(args + ["--output", str(tmp_path / "a.png")]) == 0
    assert main(args + ["--output", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_label_out_of_range(checkpoints, capsys):
    assert main(checkpoints + ["--labels", "9", "--no-progress"]) == 2
    assert "this model has classes 0..3" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("natten") is None, reason="natten is not installed")
def test_forced_backend_that_cannot_run_a_step_is_one_line(tmp_path, checkpoints, capsys):
    argv = ["--trajectory", "full", "--attention", "dense", "--cache", "full", "--backend", "natten"] + checkpoints + [
        "--labels", "0", "--samples-per-label", "1", "--output", str(tmp_path / "x.png"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "natten" in err and "--backend" in err
    assert not (tmp_path / "x.png").exists()


def test_sdpa_options_are_flags(tmp_path, checkpoints, capsys):
    argv = ["--trajectory", "markov", "--attention-kernel-size", "3", "--backend", "sdpa", "--backend-tiled", "always",
            "--backend-tile", "2"] + checkpoints + ["--labels", "0", "--samples-per-label", "1", "--output",
                                                    str(tmp_path / "x.png"), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert main(argv[:-1] + ["--backend-tiled", "sometimes"]) == 2
    assert "tiled" in capsys.readouterr().err


def test_missing_default_weights_is_one_line(monkeypatch, tmp_path, capsys):
    from mvar_engine.core import default_models

    monkeypatch.setattr(default_models, "WEIGHTS_DIR", tmp_path)
    assert main(["--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no default weights for trajectory 'markov'" in err[0] and "--var-checkpoint" in err[0]


def test_raster_trajectory_generates_with_random_weights(tmp_path, capsys):
    out = tmp_path / "raster.png"
    argv = ["--trajectory", "raster", "--random-weights", "--depth", "1", "--patch-nums", "2", "--labels", "0,1",
            "--samples-per-label", "2", "--output", str(out), "--save-tokens", str(tmp_path / "t.pt"), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "raster/causal/full" in capsys.readouterr().out
    assert Image.open(out).size == (2 * (32 + 2) + 2, 2 * (32 + 2) + 2)  # 2x2 tokens, 16x upsampling
    assert torch.load(tmp_path / "t.pt")["tokens.0"].shape == (4, 4)


def test_random_raster_models_have_llamagen_b_and_vq16_sizes():
    from mvar_engine.core.config import EngineConfig
    from mvar_engine.core.pipeline import build_raster_models

    model, tokenizer = build_raster_models(EngineConfig(trajectory="raster", model={"random_weights": True}))
    c = model.config
    assert (c.depth, c.width, c.heads, tuple(c.grid)) == (12, 768, 12, (24, 24))
    assert model.vocab_size == tokenizer.vocab_size == 16384  # LlamaGen VQ-16's codebook
    assert tokenizer.config.ch == 128 and tokenizer.config.downsample == 16 and tokenizer.config.z_channels == 8


@pytest.mark.parametrize("argv, needle, shipped", [
    (["--attention", "neighborhood", "--random-weights"], "drop --attention", True),
    ([], "no default weights for trajectory 'raster'", False),
    (["--random-weights", "--patch-nums", "1,2"], "one grid side", True),
])
def test_raster_bad_input_is_one_line(argv, needle, shipped, capsys, monkeypatch, tmp_cwd):
    if not shipped:  # an installation without the raster weights
        from mvar_engine.core import default_models

        monkeypatch.setattr(default_models, "DEFAULT_TRANSFORMERS",
                            {k: v for k, v in default_models.DEFAULT_TRANSFORMERS.items() if k != "raster"})
    assert main(["--trajectory", "raster", "--no-progress"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
