"""Raster GPT training (``train --trajectory raster``), raster checkpoints and the shipped raster defaults."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from mvar_engine.models.checkpoint import convert_weights, read_state_dict
from mvar_engine.apps.cli import main
from mvar_engine.apps.config import EngineConfig
from mvar_engine.models.default_models import DEFAULT_TRANSFORMERS, default_checkpoints, weights_metadata
from mvar_engine.models.raster_gpt import RasterGPT, RasterGPTConfig
from mvar_engine.models.tokenizer import MultiScaleVQVAE, TokenizerConfig
from mvar_engine.apps.pipeline import Pipeline, load_raster
from mvar_engine.models.raster_adapter import RasterEngine
from mvar_engine.plugins.patterns import CausalPattern
from mvar_engine.apps.training.checkpointing import export_weights
from mvar_engine.apps.training.loop import TrainingInterrupted
from mvar_engine.apps.training.raster_trainer import RasterTrainSettings, train_raster
from mvar_engine.plugins.caches import NoCache
from mvar_engine.plugins.raster import RasterTrajectory

TINY = dict(depth=1, embed_dim=32, num_heads=2, multiple_of=8, max_images=96, batch_size=32, lr=3e-3, warmup_steps=2,
            progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A random multi-scale tokenizer (16px, scales 1,2,4; vocabulary 32) exported with metadata:
    the raster trainer uses its last scale, a 4x4 token grid."""
    torch.manual_seed(0)
    config = TokenizerConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, using_sa=False,
                             using_mid_sa=False, patch_nums=(1, 2, 4))
    model = MultiScaleVQVAE(config)
    with torch.no_grad():  # spread the codes so that the digits use many of them
        model.quantize.embedding.weight.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.safetensors"
    export_weights(path, model.state_dict(), {"kind": "tokenizer", "architecture": config.model_dump(mode="json"),
                                              "resolution": 16, "patch_nums": [1, 2, 4]})
    return path


def settings(tokenizer_file: Path, output: Path, **kw) -> RasterTrainSettings:
    return RasterTrainSettings(tokenizer=str(tokenizer_file), output=str(output), **{**TINY, **kw})


def steps_of(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "event" not in r]


def teacher_forced(model: RasterGPT, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    from mvar_engine.core.backend_selection import selector_for

    engine = RasterEngine(model.eval(), None, RasterTrajectory(), NoCache(), selector_for("sdpa"), pattern=CausalPattern())
    with torch.no_grad():
        return engine.teacher_forced_logits(labels, tokens)


@pytest.fixture(scope="module")
def trained(tokenizer_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("raster")
    summary = train_raster(settings(tokenizer_file, run, steps=30, save_every=30, log_every=3))
    return run, summary


def test_training_reduces_the_loss_and_exports_metadata(trained, tokenizer_file):
    run, summary = trained
    records = steps_of(run)
    assert summary.step == 30 and [r["step"] for r in records] == list(range(3, 31, 3))
    assert records[-1]["loss"] < records[0]["loss"] - 0.5, [r["loss"] for r in records]
    meta = weights_metadata(run / "model.safetensors")
    assert (meta["kind"], meta["family"], meta["trajectory"]["name"]) == ("raster", "next-token", "raster")
    assert meta["architecture"]["grid"] == [4, 4] and meta["grid"] == [4, 4] and meta["patch_nums"] == [4]
    assert meta["tokenizer"]["patch_nums"] == [4] and meta["tokenizer"]["file_patch_nums"] == [1, 2, 4]
    assert meta["num_classes"] == 10 and meta["class_names"] == [str(d) for d in range(10)]
    assert meta["resolution"] == 16 and meta["vocab_size"] == 32
    assert meta["training"]["final_loss"] == pytest.approx(records[-1]["loss"])
    assert RasterGPTConfig(**meta["architecture"]).class_dropout_prob == 0.1  # the null class exists (CFG)


def test_export_then_load_gives_identical_logits(trained, tmp_path):
    run, _ = trained
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    meta = weights_metadata(run / "model.safetensors")
    reference = RasterGPT(RasterGPTConfig(**meta["architecture"]))
    reference.load_state_dict(ckpt["model"])
    loaded = load_raster(run / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    labels, tokens = torch.tensor([0, 3, 9]), torch.randint(32, (3, 16), generator=g)
    assert torch.equal(teacher_forced(loaded, labels, tokens), teacher_forced(reference, labels, tokens))
    half = convert_weights(run / "model.safetensors", tmp_path / "half.safetensors", torch.float16)
    assert half.stat().st_size < 0.6 * (run / "model.safetensors").stat().st_size
    close = teacher_forced(load_raster(half), labels, tokens)
    assert torch.allclose(close, teacher_forced(reference, labels, tokens), atol=2e-2)


def test_pipeline_generates_from_the_trained_run(trained, tokenizer_file, tmp_path, capsys):
    run, _ = trained
    config = EngineConfig(trajectory="raster", samples_per_label=2, progress=False,
                          model={"checkpoint": str(run / "model.safetensors"), "tokenizer": str(tokenizer_file)})
    pipe = Pipeline.from_config(config)
    result = pipe.generate(labels=[1, 7])
    assert result.images.shape == (4, 3, 16, 16) and result.tokens[0].shape == (4, 16)
    out = tmp_path / "grid.png"
    argv = ["--trajectory", "raster", "--var-checkpoint", str(run / "model.safetensors"), "--vae-checkpoint",
            str(tokenizer_file), "--labels", "0,1,2", "--samples-per-label", "2", "--output", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert Image.open(out).size == (2 * (16 + 2) + 2, 3 * (16 + 2) + 2)


def test_resume_continues_exactly(tokenizer_file, tmp_path):
    base = settings(tokenizer_file, tmp_path / "straight", steps=6, save_every=2, log_every=1, class_dropout=0.5)
    straight = train_raster(base)
    broken = replace(base, output=str(tmp_path / "broken"))

    def stop_at_3(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag: graceful stop after step 3

    with pytest.raises(TrainingInterrupted):
        train_raster(broken, callbacks=(stop_at_3,))
    assert torch.load(tmp_path / "broken" / "checkpoint.pt", weights_only=True)["step"] == 3
    resumed = train_raster(replace(broken, resume=True))
    assert resumed.step == 6 and resumed.state_sha256 == straight.state_sha256  # bit-identical weights
    a, b = steps_of(tmp_path / "straight"), steps_of(tmp_path / "broken")
    assert [r["step"] for r in b] == list(range(1, 7)) and [r["loss"] for r in a] == [r["loss"] for r in b]


def _train_argv(tokenizer_file: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--trajectory", "raster", "--tokenizer", str(tokenizer_file), "--depth", "1", "--embed-dim", "32",
            "--num-heads", "2", "--multiple-of", "8", "--max-images", "64", "--batch-size", "32", "--steps", "1",
            "--output", str(output), "--no-progress", *extra]


def test_init_from_another_architecture_is_one_line(trained, tokenizer_file, tmp_path, capsys):
    run, _ = trained
    code = main(_train_argv(tokenizer_file, tmp_path / "d2", "--depth", "2", "--init-from", str(run / "model.safetensors")))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "missing (layers.1." in err, err
    assert not (tmp_path / "d2" / "model.safetensors").exists() and not (tmp_path / "d2" / "checkpoint.pt").exists()
    code = main(_train_argv(tokenizer_file, tmp_path / "w", "--embed-dim", "64", "--init-from", str(run / "checkpoint.pt")))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "mis-shaped (" in err and "file [" in err, err
    # the same architecture starts from the weights
    assert main(_train_argv(tokenizer_file, tmp_path / "same", "--init-from", str(run / "model.safetensors"))) == 0


@pytest.mark.parametrize("extra, needle", [
    (["--attention", "dense"], "--attention does not apply to --trajectory raster"),
    (["--strategy", "parallel"], "--strategy does not apply"),
    (["--mlp-ratio", "2"], "--multiple-of"),
    (["--num-heads", "16"], "head_dim 2 must be divisible by 4"),
    (["--resolution", "32"], "does not match the tokenizer"),
])
def test_bad_raster_flags_are_one_line(tokenizer_file, tmp_path, capsys, extra, needle):
    code = main(_train_argv(tokenizer_file, tmp_path / "run", *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and needle in err, err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_init_from_next_scale_weights_is_one_line(tokenizer_file, tmp_path, capsys):
    var = default_checkpoints("full")
    if var is None:
        pytest.skip("the default weights are not installed")
    code = main(_train_argv(tokenizer_file, tmp_path / "run", "--init-from", str(var[0])))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "holds var weights" in err, err


# -- LlamaGen-style checkpoints -------------------------------------------------------------------------
def _llamagen_files(tmp_path: Path, tokenizer_file: Path) -> tuple[RasterGPT, Path]:
    """A random LlamaGen-shaped c2i GPT (width 64 -> 1 head of 64, LlamaGen's FFN rounding) saved as
    LlamaGen's released files are: ``{"model": state_dict}`` in a .pt file, no metadata."""
    torch.manual_seed(1)
    model = RasterGPT(RasterGPTConfig(depth=2, width=64, heads=1, num_classes=10, vocab_size=32, grid=(4, 4)))
    torch.save({"model": model.state_dict()}, tmp_path / "c2i.pt")
    return model.eval(), tmp_path / "c2i.pt"


def test_llamagen_state_dict_loads_and_generates(tokenizer_file, tmp_path):
    model, path = _llamagen_files(tmp_path, tokenizer_file)
    loaded = load_raster(path, grid=(4, 4), num_heads=1)  # not a released size: the head count is given
    labels, tokens = torch.tensor([2, 5]), torch.randint(32, (2, 16), generator=torch.Generator().manual_seed(2))
    assert torch.equal(teacher_forced(loaded, labels, tokens), teacher_forced(model, labels, tokens))
    config = EngineConfig(trajectory="raster", samples_per_label=1, progress=False,
                          model={"checkpoint": str(path), "tokenizer": str(tokenizer_file), "num_heads": 1})
    result = Pipeline.from_config(config).generate(labels=[0, 9])  # the grid comes from the tokenizer's metadata
    assert result.images.shape == (2, 3, 16, 16)


def test_llamagen_state_dict_with_a_wrong_key_is_one_line(tokenizer_file, tmp_path, capsys):
    model, _ = _llamagen_files(tmp_path, tokenizer_file)
    state = model.state_dict()
    state["layers.1.attention.wout.weight"] = state.pop("layers.1.attention.wo.weight")
    torch.save({"model": state}, tmp_path / "bad.pt")
    argv = ["--trajectory", "raster", "--var-checkpoint", str(tmp_path / "bad.pt"), "--vae-checkpoint",
            str(tokenizer_file), "--patch-nums", "4", "--num-heads", "1", "--output", str(tmp_path / "x.png"),
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "1 missing (layers.1.attention.wo.weight)" in err, err
    assert "1 unexpected (layers.1.attention.wout.weight)" in err and not (tmp_path / "x.png").exists()
    assert read_state_dict(tmp_path / "bad.pt").keys() == state.keys()  # the nesting is LlamaGen's "model"


# -- shipped defaults -----------------------------------------------------------------------------------
SHIPPED = pytest.mark.skipif(default_checkpoints("raster") is None, reason="the default raster weights are not installed")


@SHIPPED
def test_raster_trajectory_uses_the_shipped_weights(tmp_path, capsys):
    assert "raster" in DEFAULT_TRANSFORMERS
    pipe = Pipeline.from_config(EngineConfig(trajectory="raster", samples_per_label=1, progress=False))
    assert str(pipe.config.model.options["checkpoint"]).endswith(DEFAULT_TRANSFORMERS["raster"])
    result = pipe.generate(labels=[0, 4])
    assert result.images.shape == (2, 3, 32, 32) and result.tokens[0].shape == (2, 64)
    out = tmp_path / "grid.png"
    assert main(["--trajectory", "raster", "--samples-per-label", "1", "--output", str(out), "--no-progress"]) == 0, \
        capsys.readouterr().err
    assert Image.open(out).size == (1 * (32 + 2) + 2, 10 * (32 + 2) + 2)
