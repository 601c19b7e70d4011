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
    assert config.trajectory.name == trajectory and config.model.adapter == family


@pytest.mark.parametrize("argv, needle", [
    (["--model", "nothing"], "unknown model"),
    (["--model", ""], "--model is empty: give one of var, mvar, llamagen, janus"),
    (["--checkpoint", "a.pth", "--var-checkpoint", "b.pth"], "--var-checkpoint and --checkpoint name the same thing"),
    (["--tokenizer", "a.pth", "--vae-checkpoint", "b.pth"], "--vae-checkpoint and --tokenizer name the same thing"),
])
def test_model_flag_mistakes_are_one_line(argv, needle, refused):
    refused(argv, needle)
