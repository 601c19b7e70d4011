"""The embedded default models: what the bare command uses, and that they draw the asked-for digits."""

from __future__ import annotations

import pytest
from mvar_engine.apps.config import ComponentChoice, EngineConfig
from mvar_engine.apps.pipeline import Pipeline, recommended_choices, with_weights
from mvar_engine.models.default_models import (DEFAULT_TRANSFORMERS, WEIGHTS_DIR, default_checkpoints, tokenizer_file,
                                               weights_metadata)
from PIL import Image

SHIPPED = pytest.mark.skipif(default_checkpoints("markov") is None, reason="the default weights are not installed")


def test_every_default_transformer_ships_with_its_tokenizer_and_card():
    for trajectory, name in DEFAULT_TRANSFORMERS.items():
        assert default_checkpoints(trajectory) is not None, f"{name} is missing from {WEIGHTS_DIR}"
    assert (WEIGHTS_DIR / "MODEL_CARD.md").is_file()
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.glob("*.safetensors"))
    assert total < 16 * 2**20, "the shipped weights should stay a few MB"


@SHIPPED
@pytest.mark.parametrize("trajectory, kind, attention", [("markov", "neighborhood", "neighborhood"),
                                                          ("full", "dense", "dense")])
def test_defaults_carry_their_training_metadata(trajectory, kind, attention):
    var_path, _ = default_checkpoints(trajectory)
    meta = weights_metadata(var_path)
    assert meta["trajectory"]["name"] == trajectory and meta["attention"]["name"] == attention
    assert meta["class_names"] == [str(d) for d in range(10)]
    config = with_weights(EngineConfig(trajectory=trajectory))
    assert config.model.options["checkpoint"] == str(var_path)
    if kind == "neighborhood":  # the kernel the MVAR weights were trained with is applied
        assert config.attention.options == meta["attention"]["options"]


@pytest.mark.skipif(default_checkpoints("raster") is None, reason="the default raster weights are not installed")
def test_raster_default_carries_its_metadata_and_one_scale_tokenizer():
    gpt_path, tok_path = default_checkpoints("raster")
    assert tok_path.name == tokenizer_file("raster") != tokenizer_file("markov")
    meta, tok_meta = weights_metadata(gpt_path), weights_metadata(tok_path)
    assert (meta["kind"], meta["family"], meta["trajectory"]["name"]) == ("raster", "next-token", "raster")
    assert meta["grid"] == [8, 8] and tok_meta["patch_nums"] == [8] and meta["vocab_size"] == tok_meta["architecture"]["vocab_size"]
    assert meta["class_names"] == [str(d) for d in range(10)] and meta["architecture"]["class_dropout_prob"] > 0
    assert gpt_path.stat().st_size < 2.6 * 2**20  # float16, a few MB at most
    config = with_weights(EngineConfig(trajectory="raster"))
    assert config.model.options == {"checkpoint": str(gpt_path), "tokenizer": str(tok_path)}


def test_explicit_options_and_other_patterns_win_over_the_metadata():
    meta = {"trajectory": {"name": "markov"}, "attention": {"name": "neighborhood", "options": {"kernel_size": 5}}}
    plain = EngineConfig(trajectory="markov")
    assert recommended_choices(plain, meta).attention == ComponentChoice(name="neighborhood", options={"kernel_size": 5})
    mine = EngineConfig(trajectory="markov", attention={"name": "neighborhood", "options": {"kernel_size": 3}})
    assert recommended_choices(mine, meta).attention.options == {"kernel_size": 3}
    dense = EngineConfig(trajectory="markov", attention="dense")
    assert recommended_choices(dense, meta).attention == ComponentChoice(name="dense")
    full = EngineConfig(trajectory="full")
    assert recommended_choices(full, meta).attention is None
    assert recommended_choices(plain, None) is plain


@SHIPPED
def test_bare_command_writes_one_row_per_digit(tmp_path, capsys):
    from mvar_engine.apps.cli import main

    out = tmp_path / "grid.png"
    assert main(["--samples-per-label", "2", "--output", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    image = Image.open(out)
    assert image.size == (2 * (32 + 2) + 2, 10 * (32 + 2) + 2)


@SHIPPED
@pytest.mark.parametrize("trajectory", ["markov", "full", "raster"])
def test_shipped_models_draw_the_requested_digits(trajectory, tmp_path, monkeypatch):
    from mvar_engine.apps.data import load_digits_set
    from mvar_engine.apps.evaluation import load_or_train

    monkeypatch.setenv("MVAR_ENGINE_CACHE", str(tmp_path_factory_cache()))
    if default_checkpoints(trajectory) is None:
        pytest.skip(f"the default {trajectory} weights are not installed")
    classifier, _ = load_or_train(load_digits_set(32, "train"))
    pipe = Pipeline.from_config(EngineConfig(trajectory=trajectory, samples_per_label=10, progress=False))
    result = pipe.generate(labels=list(range(10)))
    predicted = classifier.predict(result.images * 2 - 1)
    accuracy = (predicted == result.labels).float().mean().item()
    assert accuracy >= 0.8, f"{trajectory}: only {accuracy:.2f} of the samples are classified as the asked-for digit"


_CACHE: list = []


def tmp_path_factory_cache():
    """One classifier cache directory for the whole module (the classifier trains once)."""
    import tempfile

    if not _CACHE:
        _CACHE.append(tempfile.mkdtemp(prefix="mvar-engine-classifier-"))
    return _CACHE[0]
