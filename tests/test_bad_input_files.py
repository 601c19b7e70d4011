"""Issue 14, files: config files, checkpoints and head maps that are wrong in any way are refused in
one line with exit 2, naming the file and the fix, before any model is built and with nothing
written (the ``refused`` fixture of conftest.py checks all of that)."""

from __future__ import annotations

import json
import warnings

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mvar_engine.models.default_models import default_checkpoints
from mvar_engine.plugins.head_map import classify, write_head_map

MVAR, MVAR_TOKENIZER = default_checkpoints("markov")
RASTER_GPT, RASTER_TOKENIZER = default_checkpoints("raster")
QUICK = ["--labels", "0", "--samples-per-label", "1", "--no-progress"]


def _copy_with(path, tmp, name, change):
    """A copy of the safetensors file ``path`` (metadata kept) with ``change(state)`` applied."""
    state = {k: v.clone() for k, v in load_file(str(path)).items()}
    change(state)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    save_file(state, str(tmp / name), metadata=metadata)
    return tmp / name


# --------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("content, needle", [
    (b"\xff\xfe[sampling]\n", "not UTF-8 text"),
    (b"[sampling\n", "not valid TOML"),
    (b"bogus = 1\n", "unknown setting 'bogus' (valid top-level settings: trajectory"),
    (b"[model]\nbogus = 1\n", "model adapter 'var' option bogus: unknown option (valid: checkpoint, tokenizer"),
    (b"[sampling]\ncfgg = 2\n", "valid sampling settings: cfg, top_k, top_p, seed"),
    (b"[cache]\nname = 'full'\nbogus = 1\n", "cache policy 'full' option bogus: unknown option"),
    (b"labels = '1,,2'\n", "--labels has an empty entry"),
])
def test_bad_config_files(content, needle, refused, tmp_cwd):
    (tmp_cwd / "run.toml").write_bytes(content)
    refused(["--trajectory", "full", "--config", "run.toml"], needle)


def test_a_config_directory(refused, tmp_cwd):
    (tmp_cwd / "conf.toml").mkdir()
    refused(["--config", "conf.toml"], "config file conf.toml: is a directory")


# ----------------------------------------------------------------------------------- checkpoints
def test_checkpoint_paths_that_are_directories_or_missing(refused, tmp_cwd):
    (tmp_cwd / "weights").mkdir()
    refused(["--var-checkpoint", "weights", "--vae-checkpoint", MVAR_TOKENIZER], "checkpoint weights is a directory")
    refused(["--var-checkpoint", "gone.pth", "--vae-checkpoint", MVAR_TOKENIZER], "gone.pth does not exist")


@pytest.mark.parametrize("content, needle", [(b"", "gpt.pth"), (b"not a checkpoint at all", "gpt.pth"),
                                             (bytes(range(256)) * 4, "gpt.pth")])
def test_files_that_are_no_checkpoint(content, needle, refused, tmp_cwd):
    (tmp_cwd / "gpt.pth").write_bytes(content)
    refused(["--var-checkpoint", "gpt.pth", "--vae-checkpoint", MVAR_TOKENIZER], needle)


def test_weights_given_in_the_wrong_slot(refused):
    refused(["--var-checkpoint", MVAR, "--vae-checkpoint", MVAR], "holds var weights (next-scale), not tokenizer weights")
    refused(["--var-checkpoint", MVAR_TOKENIZER, "--vae-checkpoint", MVAR_TOKENIZER], "holds tokenizer weights, not var")


def test_a_tokenizer_of_another_schedule(refused):
    refused(["--var-checkpoint", MVAR, "--vae-checkpoint", RASTER_TOKENIZER] + QUICK,
            "was trained on the schedule 8 but")


def test_a_checkpoint_holding_nan(refused, tmp_cwd, monkeypatch, no_model_built):
    """The weights are read and checked before the transformer is made (the file must be read to
    find a NaN, so this one check runs in the build, before any module exists)."""
    from mvar_engine.apps import model_families, model_loading

    def made(*args, **kwargs):
        raise no_model_built("the transformer was made before its weights were checked")

    monkeypatch.setattr(model_families.VarFamily, "builder", staticmethod(model_loading.build_var_plan))
    monkeypatch.setattr(model_loading, "VAR", made)

    def poison(state):
        name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)
        state[name].view(-1)[0] = float("nan")

    bad = _copy_with(MVAR, tmp_cwd, "nan.safetensors", poison)
    before = set(tmp_cwd.iterdir())
    refused(["--var-checkpoint", bad, "--vae-checkpoint", MVAR_TOKENIZER] + QUICK, "hold NaN or inf values")
    assert set(tmp_cwd.iterdir()) == before


@pytest.mark.parametrize("flag, value, needle", [("--depth", "3", "holds --depth 4"),
                                                 ("--patch-nums", "1,2", "holds --patch-nums 1,2,3,4,6,8")])
def test_sizes_beside_a_checkpoint_must_agree(flag, value, needle, refused):
    line = refused(["--var-checkpoint", MVAR, "--vae-checkpoint", MVAR_TOKENIZER, flag, value] + QUICK, needle)
    assert "--no-strict" in line


def test_a_random_schedule_beyond_its_latent_grid(refused):
    refused(["--random-weights", "--depth", "1", "--patch-nums", "3,2,1"], "no scale may exceed the last")


# ------------------------------------------------------------------------------------- head maps
def _raster_shape():
    from mvar_engine.apps.cli import parse_generate_args
    from mvar_engine.apps.pipeline import check_model_facts, resolve_components, with_weights

    config = with_weights(parse_generate_args(["--trajectory", "raster", "--cache", "full"]))
    facts = check_model_facts(config, resolve_components(config))
    return facts.num_layers, facts.num_heads, facts.weights_id


SSD = ["--trajectory", "raster", "--cache", "ssd", "--cache-budget", "0.5"] + QUICK


@pytest.mark.parametrize("score", [float("nan"), float("inf"), -0.5, 1.5])
def test_head_maps_with_bad_scores(score, refused, tmp_cwd):
    layers, heads, weights_id = _raster_shape()
    scores = [[0.2] * heads for _ in range(layers)]
    head_map = classify(scores, 0.5, weights_id=weights_id).model_dump()
    head_map["scores"][0][0] = score
    (tmp_cwd / "map.json").write_text(json.dumps(head_map))
    refused(SSD + ["--cache-head-map", "map.json"], "1 score(s) outside [0, 1] (layer 0 head 0")


def test_head_maps_of_another_model(refused, tmp_cwd):
    layers, heads, weights_id = _raster_shape()
    scores = [[0.2] * heads for _ in range(layers)]
    write_head_map(classify(scores, 0.5, weights_id="0" * 64), tmp_cwd / "other.json")
    refused(SSD + ["--cache-head-map", "other.json"], "profiled on other weights")
    write_head_map(classify([[0.2] * heads for _ in range(layers + 1)], 0.5), tmp_cwd / "deeper.json")
    refused(SSD + ["--cache-head-map", "deeper.json"], f"{layers + 1}")
    (tmp_cwd / "maps").mkdir()
    refused(SSD + ["--cache-head-map", "maps"], "head map maps is a directory")


def test_a_matching_head_map_is_accepted(no_model_built, tmp_cwd):
    from mvar_engine.apps.cli import main

    layers, heads, weights_id = _raster_shape()
    write_head_map(classify([[0.2] * heads for _ in range(layers)], 0.5, weights_id=weights_id), tmp_cwd / "map.json")
    with pytest.raises(no_model_built):
        main(SSD + ["--cache-head-map", "map.json"])


# ------------------------------------------------------------------------- layouts and the cache
@pytest.mark.parametrize("argv, needle", [
    (["--attention-apply-from", "99"], "the schedule has 6 scales, so give -6 .. 5"),
    (["--attention-apply-from=-99"], "the schedule has 6 scales"),
    (["--trajectory", "raster", "--cache", "sink", "--cache-sink", "100", "--cache-budget", "32"],
     "--cache-sink 100: with the 1 class token(s) it fills the whole budget"),
])
def test_layouts_that_do_not_fit(argv, needle, refused):
    refused(argv + QUICK, needle)


def test_a_dilated_window_larger_than_a_scale(refused):
    refused(["--random-weights", "--depth", "1", "--patch-nums", "1,2,4,8", "--attention-dilation", "5",
             "--attention-kernel-size", "7"], "spans 35 tokens but scale 2 is 4x4")


# ---------------------------------------------------------------------------------------- noise
def _noisy_checks(monkeypatch):
    from mvar_engine.apps import cli

    real = cli.check_generate_inputs

    def noisy(config, registry=None):
        warnings.warn("torch would say something here", UserWarning)
        real(config, registry)

    monkeypatch.setattr(cli, "check_generate_inputs", noisy)


def test_warnings_are_held_back_when_the_input_is_refused(refused, monkeypatch):
    """A warning raised while checking (torch's, say) must not add a line before the error (pytest
    captures warnings, so the test records what the CLI lets out)."""
    _noisy_checks(monkeypatch)
    with warnings.catch_warnings(record=True) as let_out:
        warnings.simplefilter("always")
        refused(["--labels", "0", "--device", "tpu"], "--device")
    assert not let_out


def test_warnings_are_shown_after_a_run_that_succeeds(monkeypatch, tmp_cwd):
    from mvar_engine.apps.cli import main

    _noisy_checks(monkeypatch)
    with warnings.catch_warnings(record=True) as let_out:
        warnings.simplefilter("always")
        assert main(["--labels", "0", "--samples-per-label", "1", "--no-progress", "--output", "ok.png"]) == 0
    assert "torch would say something here" in [str(w.message) for w in let_out]
    assert (tmp_cwd / "ok.png").is_file()


def test_top_k_and_top_p_document_zero(capsys):
    from mvar_engine.apps.cli import main

    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "1 = greedy, 0 = off" in text and "0 or 1 = off" in text
