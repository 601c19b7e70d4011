"""Issue 13: LlamaGen's released files. The GPT's head count comes from the table of released sizes
(the files do not store it; GPT-3B has 32 heads of 100 dims) or ``--num-heads``; a GPT + VQ pair in
the released layout (``{"model": ...}`` pickles, training checkpoints with an ``argparse.Namespace``)
generates a PNG from the CLI, decoded by LlamaGen's VQ."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from mvar_engine.models.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig
from mvar_engine.models.raster_gpt import LLAMAGEN_GPT_HEADS, RasterGPT, RasterGPTConfig, find_multiple, infer_raster_config


def _gpt_shapes(depth: int, width: int, *, vocab: int = 16384, classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of a LlamaGen c2i GPT (SwiGLU hidden ``find_multiple(8 width / 3, 256)``)."""
    hidden = find_multiple(int(2 * 4 * width / 3), 256)
    shapes = {"tok_embeddings.weight": (vocab, width), "cls_embedding.embedding_table.weight": (classes + 1, width),
              "norm.weight": (width,), "output.weight": (vocab, width)}
    for i in range(depth):
        shapes.update({f"layers.{i}.attention.wqkv.weight": (3 * width, width),
                       f"layers.{i}.attention.wo.weight": (width, width),
                       f"layers.{i}.feed_forward.w1.weight": (hidden, width),
                       f"layers.{i}.feed_forward.w3.weight": (hidden, width),
                       f"layers.{i}.feed_forward.w2.weight": (width, hidden),
                       f"layers.{i}.attention_norm.weight": (width,), f"layers.{i}.ffn_norm.weight": (width,)})
    return shapes


def _meta(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize("size", sorted(LLAMAGEN_GPT_HEADS))
def test_every_released_size_gets_its_published_head_count(size):
    depth, width = size
    name, heads = LLAMAGEN_GPT_HEADS[size]
    config = infer_raster_config(_meta(_gpt_shapes(depth, width)), grid=(16, 16))
    assert (config.depth, config.width, config.heads) == (depth, width, heads), name


def test_gpt_3b_has_32_heads_of_100_dims():
    config = infer_raster_config(_meta(_gpt_shapes(24, 3200)), grid=(24, 24))
    assert config.heads == 32 and config.head_dim == 100  # width / 64 would have given 50


def test_other_sizes_need_num_heads():
    shapes = _meta(_gpt_shapes(3, 96))
    with pytest.raises(ValueError, match="give it with --num-heads"):
        infer_raster_config(shapes, grid=(4, 4))
    assert infer_raster_config(shapes, grid=(4, 4), heads=3).heads == 3
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        infer_raster_config(shapes, grid=(4, 4), heads=5)


def _stride0_file(path, shapes, nest="model", **extra):
    """A checkpoint of the given shapes whose tensors are stride-0 views of one number (a few KB on
    disk whatever the shapes: torch.save stores the one-element storage)."""
    state = {k: torch.full((1,), 0.01).expand(*s) for k, s in shapes.items()}
    torch.save({nest: state, **extra} if nest else state, path)
    return path


@pytest.mark.parametrize("nest", ["model", "module", "state_dict", None])
def test_a_gpt_3b_shaped_file_is_planned_with_32_heads(nest, tmp_path, no_model_built):
    from mvar_engine.apps.cli import parse_generate_args
    from mvar_engine.apps.pipeline import check_model_facts, resolve_components

    gpt = _stride0_file(tmp_path / "c2i_3B_384.pt", _gpt_shapes(24, 3200), nest,
                        args=argparse.Namespace(gpt_model="GPT-3B"), steps=10)
    vq = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": {k: v.to("cpu") if v.device.type != "meta" else torch.zeros(1).expand(v.shape)
                          for k, v in _vq_meta_state().items()}}, vq)
    config = parse_generate_args(["--trajectory", "raster", "--var-checkpoint", str(gpt), "--vae-checkpoint", str(vq),
                                  "--patch-nums", "24"])
    facts = check_model_facts(config, resolve_components(config))
    assert facts.num_heads == 32 and facts.num_layers == 24 and facts.layout.grids[-1] == (24, 24)


def _vq_meta_state():
    with torch.device("meta"):
        return LlamaGenVQ(LlamaGenVQConfig.vq_16()).state_dict()


def test_num_heads_that_do_not_divide_the_width(tmp_path, refused):
    gpt = _stride0_file(tmp_path / "gpt.pt", _gpt_shapes(24, 3200))
    vq = tmp_path / "vq.pt"
    torch.save({"model": {k: torch.zeros(1).expand(v.shape) for k, v in _vq_meta_state().items()}}, vq)
    refused(["--trajectory", "raster", "--var-checkpoint", gpt, "--vae-checkpoint", vq, "--patch-nums", "24",
             "--num-heads", "33"], "width 3200 is not divisible by 33 heads")
    refused(["--var-checkpoint", gpt, "--vae-checkpoint", vq, "--num-heads", "4", "--trajectory", "full"],
            "no next-scale model family takes --checkpoint, --num-heads, --tokenizer (model 'raster-gpt' takes them")


# ------------------------------------------------------------------------- a released-layout pair
VOCAB, GRID = 64, (4, 4)


@pytest.fixture(scope="module")
def released_pair(tmp_path_factory):
    """A tiny GPT and VQ written as LlamaGen writes them: ``{"model": state, "args": Namespace, ...}``."""
    folder = tmp_path_factory.mktemp("llamagen")
    torch.manual_seed(0)
    gpt = RasterGPT(RasterGPTConfig.tiny(vocab_size=VOCAB, grid=GRID, num_classes=5))
    vq = LlamaGenVQ(LlamaGenVQConfig.tiny(codebook_size=VOCAB))
    with torch.no_grad():
        for p in vq.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"model": gpt.state_dict(), "optimizer": None, "steps": 100,
                "args": argparse.Namespace(gpt_model="GPT-tiny", image_size=8)}, folder / "c2i_tiny.pt")
    torch.save({"model": vq.state_dict()}, folder / "vq_tiny.pt")
    return folder, gpt, vq


def test_a_released_pair_generates_a_png_decoded_by_the_vq(released_pair, tmp_cwd, capsys):
    from mvar_engine.apps.cli import main

    folder, gpt, vq = released_pair
    status = main(["--trajectory", "raster", "--var-checkpoint", str(folder / "c2i_tiny.pt"),
                   "--vae-checkpoint", str(folder / "vq_tiny.pt"), "--patch-nums", "4", "--num-heads", "2",
                   "--labels", "1,3", "--samples-per-label", "2", "--cfg", "4", "--top-k", "1", "--no-progress",
                   "--output", "grid.png", "--per-image", "--save-tokens", "tokens.pt"])
    assert status == 0, capsys.readouterr().err
    tokens = torch.load(tmp_cwd / "tokens.pt")
    tokens = tokens[0] if isinstance(tokens, (list, tuple)) else next(iter(tokens.values())) if isinstance(tokens, dict) else tokens
    assert tokens.shape == (4, GRID[0] * GRID[1]) and int(tokens.max()) < VOCAB
    images = vq.decode_tokens(tokens, GRID).clamp(-1, 1)  # [4, 3, 8, 8]
    assert images.shape[-2:] == (GRID[0] * vq.downsample, GRID[1] * vq.downsample)
    pngs = sorted((tmp_cwd / "grid").glob("*.png"))
    assert len(pngs) == 4
    first = np.asarray(Image.open(pngs[0]).convert("RGB"), dtype=np.float32)
    expected = ((images[0].permute(1, 2, 0).numpy() + 1) * 127.5)
    assert np.abs(first - expected).max() <= 1.0  # the PNG is the VQ's decoding of the tokens (uint8 rounding)


@pytest.mark.parametrize("swap, needle", [("vq-as-gpt", "holds LlamaGen VQ tokenizer weights, not a raster GPT"),
                                          ("gpt-as-vq", "holds a raster GPT (LlamaGen c2i keys), not a tokenizer")])
def test_a_vq_given_as_the_gpt_and_vice_versa(swap, needle, released_pair, refused):
    folder, _, _ = released_pair
    gpt, vq = folder / "c2i_tiny.pt", folder / "vq_tiny.pt"
    pair = (vq, vq) if swap == "vq-as-gpt" else (gpt, gpt)
    refused(["--trajectory", "raster", "--var-checkpoint", pair[0], "--vae-checkpoint", pair[1], "--patch-nums", "4",
             "--num-heads", "2"], needle)


def test_a_vq_whose_codebook_does_not_fit_the_gpt(released_pair, refused, tmp_path):
    folder, _, _ = released_pair
    other = LlamaGenVQ(LlamaGenVQConfig.tiny(codebook_size=VOCAB * 2))
    torch.save({"model": other.state_dict()}, tmp_path / "vq_big.pt")
    refused(["--trajectory", "raster", "--var-checkpoint", folder / "c2i_tiny.pt", "--vae-checkpoint",
             tmp_path / "vq_big.pt", "--patch-nums", "4", "--num-heads", "2"], "vocabulary 128")
