"""Issue 30, one way to say which model: ``--model NAME --checkpoint FILE --tokenizer FILE`` (the model
detected from the file when ``--model`` and ``--trajectory`` are omitted) gives the old flags'
tokens; the old flags keep working with a one-line deprecation note."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

import mvar_engine
from mvar_engine.apps.cli import main, parse_generate_args

WEIGHTS = Path(mvar_engine.__file__).parent / "models" / "weights"


@pytest.fixture(scope="module")
def llamagen_pair(tmp_path_factory):
    from mvar_engine.models.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig
    from mvar_engine.models.raster_gpt import RasterGPT, RasterGPTConfig

    folder = tmp_path_factory.mktemp("llamagen")
    torch.manual_seed(0)
    gpt = RasterGPT(RasterGPTConfig.tiny(vocab_size=64, grid=(4, 4), num_classes=5))
    torch.save({"model": gpt.state_dict(), "args": argparse.Namespace(gpt_model="GPT-tiny")}, folder / "c2i.pt")
    torch.save({"model": LlamaGenVQ(LlamaGenVQConfig.tiny(codebook_size=64)).state_dict()}, folder / "vq.pt")
    return folder


def tokens_of(path: Path) -> list[torch.Tensor]:
    saved = torch.load(path)
    return [saved[k] for k in sorted(k for k in saved if k.startswith("tokens."))]


def test_new_and_old_model_flags_give_the_same_tokens(llamagen_pair, tmp_cwd, capsys):
    common = ["--patch-nums", "4", "--num-heads", "2", "--labels", "1,3", "--samples-per-label", "2", "--no-progress"]
    new = ["--model", "llamagen", "--checkpoint", str(llamagen_pair / "c2i.pt"), "--tokenizer", str(llamagen_pair / "vq.pt")]
    old = ["--trajectory", "raster", "--model-adapter", "raster-gpt", "--var-checkpoint", str(llamagen_pair / "c2i.pt"),
           "--vae-checkpoint", str(llamagen_pair / "vq.pt")]
    assert main([*new, *common, "--output", "new.png", "--save-tokens", "new.pt"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main([*old, *common, "--output", "old.png", "--save-tokens", "old.pt"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert notes == ["mvar-engine: note: --var-checkpoint is deprecated and goes in the next release; use --checkpoint",
                     "mvar-engine: note: --vae-checkpoint is deprecated and goes in the next release; use --tokenizer",
                     "mvar-engine: note: --model-adapter is deprecated and goes in the next release; use --model"]
    assert all(torch.equal(a, b) for a, b in zip(tokens_of(tmp_cwd / "new.pt"), tokens_of(tmp_cwd / "old.pt")))
    # the file says it is a raster GPT: --model and --trajectory may both be left out
    assert main([*new[2:], *common, "--output", "detected.png", "--save-tokens", "detected.pt"]) == 0
    assert all(torch.equal(a, b) for a, b in zip(tokens_of(tmp_cwd / "new.pt"), tokens_of(tmp_cwd / "detected.pt")))


@pytest.mark.parametrize("argv, trajectory, family", [
    (["--model", "mvar"], "markov", "var"),
    (["--model", "var"], "full", "var"),
    (["--model", "VAR", "--trajectory", "markov"], "markov", "var"),  # --trajectory wins
    (["--checkpoint", "{w}/raster-digits.safetensors", "--tokenizer", "{w}/tokenizer-raster-digits.safetensors"],
     "raster", None),
    (["--checkpoint", "{w}/var-digits.safetensors", "--tokenizer", "{w}/tokenizer-digits.safetensors"], "full", None),
    (["--checkpoint", "{w}/mvar-digits.safetensors", "--tokenizer", "{w}/tokenizer-digits.safetensors"], "markov", None),
])
def test_the_model_picks_the_trajectory(argv, trajectory, family):
    config = parse_generate_args([a.format(w=WEIGHTS) for a in argv])
    assert config.trajectory.name == trajectory and config.model.name == (family or config.model.name)
    assert config.model.name == ("raster-gpt" if trajectory == "raster" else "var")


@pytest.mark.parametrize("argv, needle", [
    (["--model", "nothing"], "unknown model"),
    (["--model", ""], "--model is empty: give one of var, mvar, llamagen, janus"),
    (["--checkpoint", "a.pth", "--var-checkpoint", "b.pth"], "--var-checkpoint and --checkpoint name the same thing"),
    (["--tokenizer", "a.pth", "--vae-checkpoint", "b.pth"], "--vae-checkpoint and --tokenizer name the same thing"),
])
def test_model_flag_mistakes_are_one_line(argv, needle, refused):
    refused(argv, needle)


# ------------------------------------------------------------- model families are components
def test_plugins_lists_each_familys_options(capsys):
    assert main(["plugins", "--kind", "model"]) == 0
    out = capsys.readouterr().out
    blocks = {line.split()[1]: [] for line in out.splitlines() if line.startswith("model ")}
    current = None
    for line in out.splitlines():
        current = line.split()[1] if line.startswith("model ") else current
        if line.startswith("    option ") and current:
            blocks[current].append(line.split()[1].rstrip(":"))
    assert blocks["var"][:2] == ["--checkpoint", "--tokenizer"] and "--no-strict" in blocks["var"]
    assert "--num-heads" in blocks["raster-gpt"] and "--num-heads" not in blocks["var"]
    assert blocks["janus"] == ["--model-dir", "--prompt", "--no-chat-format"]


def test_the_options_given_pick_family_and_trajectory(tmp_path):
    config = parse_generate_args(["--model-dir", str(tmp_path), "--prompt", "a cat"])
    assert (config.trajectory.name, config.model.name) == ("raster", "janus")
    assert config.model.options == {"model_dir": str(tmp_path), "prompt": "a cat"}
    config = parse_generate_args(["--trajectory", "raster", "--random-weights", "--no-strict"])
    assert config.model.name == "raster-gpt" and config.model.options == {"random_weights": True, "strict": False}


@pytest.mark.parametrize("argv, needle", [
    (["--model", "mvar", "--prompt", "x"], "--prompt: model 'var' has no such option (model 'janus' has: give --model janus"),
    (["--trajectory", "markov", "--num-heads", "2"], "no next-scale model family takes --num-heads (model 'raster-gpt' takes them"),
    (["--model", "janus", "--prompt", "x"], "model_dir: required, and not given (set by --model-dir)"),
    (["--random-weights", "--checkpoint", "x.pth"], "--random-weights builds a freshly initialised model, so --checkpoint"),
    (["--patch-nums", "1,,2"], "--patch-nums has an empty entry between commas"),
])
def test_model_option_mistakes_are_one_line(argv, needle, refused):
    refused(argv, needle)


def test_a_config_file_names_the_model_and_reads_the_old_keys(tmp_cwd, recwarn):
    (tmp_cwd / "new.toml").write_text(f'[model]\nname = "mvar"\ncheckpoint = "{WEIGHTS}/mvar-digits.safetensors"\n'
                                      f'tokenizer = "{WEIGHTS}/tokenizer-digits.safetensors"\n')
    config = parse_generate_args(["--config", "new.toml"])
    assert (config.trajectory.name, config.model.name) == ("markov", "var") and not recwarn.list
    (tmp_cwd / "old.toml").write_text(f'[model]\nvar_checkpoint = "{WEIGHTS}/mvar-digits.safetensors"\n'
                                      f'vae_checkpoint = "{WEIGHTS}/tokenizer-digits.safetensors"\n')
    old = parse_generate_args(["--config", "old.toml"])
    assert old.model.options == config.model.options
    assert any("'var_checkpoint' is deprecated" in str(w.message) for w in recwarn.list)
    # a flag adds to the file's model options, naming the family or not
    assert parse_generate_args(["--config", "new.toml", "--depth", "2"]).model.options["depth"] == "2"
    assert parse_generate_args(["--config", "new.toml", "--model", "mvar"]).model.options == config.model.options


def test_a_plugin_family_option_that_takes_a_generation_flag_is_refused(capsys):
    import types

    from pydantic import BaseModel

    from mvar_engine import ModelAdapterRecord, ModelFamily, hookimpl
    from mvar_engine.core.registry import load_registry

    class Seeded(BaseModel):
        seed: int = 0

    class Family(ModelFamily):
        name, family = "seeded", "next-token"

        def build(self, device, dtype):
            raise AssertionError("never built")

        def adapter(self, model, tokenizer):
            raise AssertionError("never built")

    hooks = types.SimpleNamespace(mvar_engine_model_adapters=hookimpl(lambda: [
        ModelAdapterRecord(name="seeded", factory=Family, family="next-token", options=Seeded)]))
    assert main(["--model", "seeded"], registry=load_registry([("seeded", hooks)])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mvar-engine: error: model 'seeded': its option 'seed' would be the flag --seed, which the command "
                   "already has (the family's author must rename it)"]


def test_the_layers_of_the_old_model_settings_are_gone():
    import dataclasses

    from mvar_engine.apps import cli, config
    from mvar_engine.core.records import ModelAdapterRecord

    assert not hasattr(config, "ModelConfig")
    assert "claims" not in {f.name for f in dataclasses.fields(ModelAdapterRecord)}
    source = Path(cli.__file__).read_text()
    assert "model_keys" not in source and "sampling_keys" not in source


def test_a_checkpoint_of_one_family_under_another_model_is_one_line(llamagen_pair, refused, tmp_path):
    from mvar_engine.models.var import VAR, VARConfig

    var = VAR(VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=10, vocab_size=64, z_channels=8,
                        patch_nums=(1, 2, 4)))
    torch.save(var.state_dict(), tmp_path / "var_d2.pth")  # VAR's released layout: a flat state dict
    refused(["--model", "var", "--checkpoint", llamagen_pair / "c2i.pt", "--tokenizer", llamagen_pair / "vq.pt"],
            "c2i.pt holds a raster GPT (LlamaGen's c2i keys), not VAR/MVAR weights; the var family")
    refused(["--model", "llamagen", "--checkpoint", tmp_path / "var_d2.pth", "--tokenizer", llamagen_pair / "vq.pt",
             "--patch-nums", "4"], "var_d2.pth holds VAR/MVAR weights (next-scale), not a raster GPT; the raster-gpt family")
    refused(["--model", "mvar", "--checkpoint", WEIGHTS / "raster-digits.safetensors", "--tokenizer",
             WEIGHTS / "tokenizer-raster-digits.safetensors"], "run raster GPT weights with --model llamagen")
