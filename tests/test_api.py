"""Issue 30, the Python API: ``mvar_engine.Pipeline.from_pretrained`` on the shipped models and on local
files of each family, ``pipe(...)`` giving the CLI's pixels at the same seed, ``pipe.to``, and
one-line errors for names and files it cannot load."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mvar_engine
from mvar_engine.apps.cli import main
from mvar_engine.core.errors import UsageError

WEIGHTS = Path(mvar_engine.__file__).parent / "models" / "weights"


def cli_images(tmp_path: Path, argv: list[str]) -> list[np.ndarray]:
    """The per-image PNGs of ``mvar-engine argv --per-image`` as uint8 arrays."""
    out = tmp_path / "cli" / "grid.png"
    assert main([*argv, "--per-image", "--no-progress", "--output", str(out)]) == 0
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted((tmp_path / "cli" / "grid").glob("*.png"))]


@pytest.mark.parametrize("name, argv, call", [
    ("digits-mvar", ["--trajectory", "markov"], {}),
    ("digits-var", ["--trajectory", "full"], {"cfg": 3.0}),
    ("digits-raster", ["--trajectory", "raster", "--cache", "sink", "--cache-budget", "0.5"],
     {"cache": "sink", "cache_budget": 0.5}),
])
def test_the_api_draws_the_cli_pixels(name, argv, call, tmp_path):
    pipe = mvar_engine.Pipeline.from_pretrained(name)
    out = pipe(labels=[3, 5], images_per_label=2, seed=7, **call)
    extra = ["--cfg", str(call["cfg"])] if "cfg" in call else []
    expected = cli_images(tmp_path, [*argv, "--labels", "3,5", "--samples-per-label", "2", "--seed", "7", *extra])
    assert out.labels == [3, 3, 5, 5] and len(out.images) == 4
    assert all(np.array_equal(np.asarray(image), cli) for image, cli in zip(out.images, expected))
    other = pipe(labels=[3, 5], images_per_label=2, seed=8, **call)
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out.images, other.images))
    # a diffusers-style generator stands for its seed
    same = pipe(labels=[3, 5], images_per_label=2, generator=torch.Generator().manual_seed(7), **call)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out.images, same.images))
    with pytest.raises(UsageError, match="seed= and generator= both give the seed"):
        pipe(labels=[3], seed=1, generator=torch.Generator())


def test_output_types_tokens_and_facts():
    pipe = mvar_engine.Pipeline.from_pretrained("digits-mvar")
    out = pipe(labels=3, images_per_label=3, seed=0, output_type="pt")
    assert out.images.shape == (3, 3, 32, 32) and 0 <= float(out.images.min()) <= float(out.images.max()) <= 1
    assert [t.shape[1] for t in out.tokens] == [1, 4, 9, 16, 36, 64]
    assert out.facts["components"]["trajectory"] == "markov" and out.facts["seed"] == 0


def test_to_changes_the_dtype_and_back(monkeypatch):
    monkeypatch.setenv("MVAR_ENGINE_CPU_BF16", "1")
    pipe = mvar_engine.Pipeline.from_pretrained("digits-mvar")
    full = pipe(labels=[1], seed=0, output_type="pt").images
    assert pipe.to(dtype="bfloat16") is pipe and pipe.engine.autocast_dtype == torch.bfloat16
    half = pipe(labels=[1], seed=0, output_type="pt").images
    assert pipe.to("cpu", "float32").engine.autocast_dtype is None
    assert torch.equal(pipe(labels=[1], seed=0, output_type="pt").images, full)
    assert half.shape == full.shape


def test_a_local_official_var_file_and_a_llamagen_pair(tmp_path):
    """VAR's training-checkpoint layout (random d2 at the digits tokenizer's schedule) on markov, and
    LlamaGen's ``{"model": ...}`` pair on raster."""
    from mvar_engine.models.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig
    from mvar_engine.models.raster_gpt import RasterGPT, RasterGPTConfig
    from mvar_engine.models.var import VAR, VARConfig

    torch.manual_seed(0)
    var = VAR(VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=10, vocab_size=512, z_channels=16,
                        patch_nums=(1, 2, 3, 4, 6, 8)))
    torch.save({"trainer": {"var_wo_ddp": {f"module.{k}": v for k, v in var.state_dict().items()}}}, tmp_path / "v.pth")
    schedule = {"patch_nums": (1, 2, 3, 4, 6, 8)}  # not VAR's 256 px one: the file does not say it
    pipe = mvar_engine.Pipeline.from_pretrained(tmp_path / "v.pth", tokenizer=WEIGHTS / "tokenizer-digits.safetensors",
                                                trajectory="markov", model=schedule)
    assert pipe.components.names["trajectory"] == "markov" and len(pipe(labels=[0]).images) == 1
    assert mvar_engine.Pipeline.from_pretrained(tmp_path / "v.pth", tokenizer=WEIGHTS / "tokenizer-digits.safetensors",
                                                model=schedule).components.names["trajectory"] == "full"  # VAR's
    gpt = RasterGPT(RasterGPTConfig.tiny(vocab_size=64, grid=(4, 4), num_classes=5))
    torch.save({"model": gpt.state_dict(), "args": argparse.Namespace(gpt_model="GPT-tiny")}, tmp_path / "c2i.pt")
    torch.save({"model": LlamaGenVQ(LlamaGenVQConfig.tiny(codebook_size=64)).state_dict()}, tmp_path / "vq.pt")
    raster = mvar_engine.Pipeline.from_pretrained(tmp_path / "c2i.pt", tokenizer=tmp_path / "vq.pt",
                                                  model={"patch_nums": (4,), "num_heads": 2})
    out = raster(labels=[1, 2], seed=0)
    assert raster.components.names["trajectory"] == "raster" and out.images[0].size == (8, 8)


def test_our_own_run_finds_its_tokenizer_from_the_metadata():
    pipe = mvar_engine.Pipeline.from_pretrained(WEIGHTS / "mvar-digits.safetensors",
                                                tokenizer=WEIGHTS / "tokenizer-digits.safetensors")
    assert pipe.components.names["trajectory"] == "markov"  # the trajectory it was trained on


@pytest.mark.parametrize("args, kwargs, needle", [
    (("nothing-here",), {}, "not a shipped model (digits-mvar, digits-raster, digits-var)"),
    (("Someone/unknown-model",), {}, "not a Hub id this engine knows (known: CVLUESTC/MVAR"),
    (("FoundationVision/var",), {"variant": "d99"}, "has no variant 'd99' (known: d16, d20, d24, d30, d36)"),
    (("deepseek-ai/Janus-Pro-1B",), {}, "use deepseek-community/Janus-Pro-1B"),
    (("digits-mvar",), {"variant": "d16"}, "is not a Hub id"),
    (("{w}/var-digits.safetensors",), {}, "give its tokenizer file as tokenizer="),
    (("{w}/var-digits.safetensors",), {"tokenizer": "{w}/tokenizer-digits.safetensors", "trajectory": "raster"},
     "holds var weights (next-scale), not raster weights"),
    (("{w}/tokenizer-digits.safetensors",), {}, "holds tokenizer weights"),
    (("digits-mvar",), {"tokenizer": "x"}, "ships with its tokenizer"),
])
def test_what_cannot_be_loaded_is_one_line(args, kwargs, needle):
    args = tuple(a.format(w=WEIGHTS) for a in args)
    kwargs = {k: v.format(w=WEIGHTS) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(UsageError) as error:
        mvar_engine.Pipeline.from_pretrained(*args, **kwargs)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_bad_call_arguments_are_usage_errors():
    pipe = mvar_engine.Pipeline.from_pretrained("digits-raster")
    for kwargs, needle in (({"labels": [99]}, "labels=99: this model has classes 0..9"), ({"output_type": "np"}, "output_type"),
                           ({"cache_budget": 0.5}, "cache_budget= needs cache="), ({"top_p": 2.0}, "top_p")):
        with pytest.raises((UsageError, ValueError)) as error:
            pipe(**{"labels": [1], **kwargs})
        assert needle in str(error.value)


def test_import_mvar_engine_then_generate_in_a_fresh_interpreter():
    code = ("import mvar_engine; pipe = mvar_engine.Pipeline.from_pretrained('digits-mvar'); out = pipe(labels=[3]); "
            "print(type(out.images[0]).__name__, out.labels)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "Image [3]", proc.stderr[-2000:]


def test_a_janus_model_folder_through_transformers(tmp_path):
    pytest.importorskip("transformers")
    from test_janus import save_tiny

    folder = save_tiny(tmp_path / "janus", kv_heads=2, seed=1)
    pipe = mvar_engine.Pipeline.from_pretrained(folder, model={"prompt": "a cat"})
    out = pipe(labels=[0], images_per_label=2, seed=0, cfg=5.0)
    assert pipe.components.names["model"] == "janus" and len(out.images) == 2
    assert pipe.components.names["trajectory"] == "raster"


def test_core_errors_are_worded_for_the_reader(capsys, tmp_path):
    """The same core error names ``--backend auto`` on the command line and ``backend='auto'`` from Python."""
    pipe = mvar_engine.Pipeline.from_pretrained("digits-raster", backend="natten")
    with pytest.raises(UsageError) as error:
        pipe(labels=[1])
    assert "(use backend='auto' or sdpa)" in str(error.value) and "--backend" not in str(error.value)
    assert main(["--trajectory", "raster", "--backend", "natten", "--no-progress", "--output",
                 str(tmp_path / "x.png")]) == 2
    assert "(use --backend auto or sdpa)" in capsys.readouterr().err


def test_render_settings_both_ways():
    from mvar_engine.core.errors import render_settings, setting

    text = f"use {setting('backend', 'sdpa')}, or leave {setting('compile')} off; {setting('top_k', 5)}"
    assert render_settings(text) == "use --backend sdpa, or leave --compile off; --top-k 5"
    assert render_settings(text, "python") == "use backend='sdpa', or leave compile off; top_k=5"
    switches = f"{setting('strict', False)}, {setting('random_weights', True)}"
    assert render_settings(switches) == "--no-strict, --random-weights"
    assert render_settings(switches, "python") == "strict=False, random_weights=True"


def test_model_option_errors_name_the_python_arguments():
    with pytest.raises(UsageError) as error:
        mvar_engine.Pipeline.from_pretrained("digits-mvar", model={"depth": 3})
    assert str(error.value).startswith("depth=3: ") and "(drop depth, or add strict=False" in str(error.value)
    with pytest.raises(UsageError) as error:
        mvar_engine.Pipeline.from_pretrained("digits-mvar", model={"prompt": "a cat"})
    assert "model adapter 'var' option prompt: unknown option" in str(error.value) and "--" not in str(error.value)


def test_api_errors_name_arguments_not_flags(monkeypatch):
    monkeypatch.setenv("MVAR_ENGINE_CPU_BF16", "0")
    pipe = mvar_engine.Pipeline.from_pretrained("digits-mvar")
    with pytest.raises(UsageError) as error:
        pipe.to(dtype="bfloat16")
    assert "dtype='bfloat16' on the CPU needs native bf16" in str(error.value) and "--" not in str(error.value)
    with pytest.raises(UsageError) as error:
        mvar_engine.Pipeline.from_pretrained("digits-mvar", device="cuda:7" if not torch.cuda.is_available() else "cuda:99")
    assert str(error.value).startswith("device=") and "--device" not in str(error.value)
