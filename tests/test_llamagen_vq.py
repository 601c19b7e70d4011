"""LlamaGen's VQ-16 tokenizer: the released file's layout, the cosine-similarity quantiser, the
forward math against a functional transcription of the reference, and loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mvar_engine.models import banded_decode
from mvar_engine.models.checkpoint import read_state_dict
from mvar_engine.models.llamagen_vq import (
    LlamaGenVQ,
    LlamaGenVQConfig,
    infer_llamagen_vq_config,
    is_llamagen_vq_state,
    nearest_code,
)

from conftest import read_keys_tsv, shared_reference

VQ_TSV = shared_reference("vq_ds16_c2i.keys.tsv")
needs_tsv = pytest.mark.skipif(VQ_TSV is None, reason="reference/vq_ds16_c2i.keys.tsv not available")


def _random_tiny(config: LlamaGenVQConfig | None = None, seed: int = 0) -> LlamaGenVQ:
    """A tiny model with every parameter perturbed (non-trivial norms, biases) and a codebook whose
    rows have very different lengths, so that cosine and Euclidean nearest codes disagree."""
    torch.manual_seed(seed)
    model = LlamaGenVQ(config or LlamaGenVQConfig.tiny()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.ndim == 1:  # GroupNorm scales
                p.uniform_(0.5, 1.5)
        emb = model.quantize.embedding.weight
        emb.copy_(torch.randn_like(emb) * torch.exp(2.0 * torch.randn(emb.shape[0], 1)))
    return model


# ----------------------------------------------------------------------------- the released layout


@needs_tsv
def test_state_dict_equals_released_file_layout():
    with torch.device("meta"):
        model = LlamaGenVQ(LlamaGenVQConfig())
    ours = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert ours == read_keys_tsv(VQ_TSV, dtypes=True)


@needs_tsv
def test_config_inferred_from_released_shapes():
    shapes = {k: torch.Size(s) for k, s in read_keys_tsv(VQ_TSV)}
    config = infer_llamagen_vq_config(shapes)
    assert config == LlamaGenVQConfig()
    assert (config.codebook_size, config.codebook_dim, config.ch, config.ch_mult) == (16384, 8, 128, (1, 1, 2, 2, 4))
    assert (config.z_channels, config.num_res_blocks, config.usage_buffer, config.downsample) == (256, 2, 65536, 16)


def test_config_validation_and_properties():
    assert LlamaGenVQConfig().downsample == 16 and LlamaGenVQConfig.tiny().downsample == 2
    assert LlamaGenVQ(LlamaGenVQConfig.tiny()).vocab_size == 64
    with pytest.raises(ValueError):
        LlamaGenVQConfig(ch=48)  # not a multiple of the 32 GroupNorm groups
    with pytest.raises(ValueError):
        LlamaGenVQConfig(decoder_ch_mult=(1, 2, 4))  # decoder would not mirror the encoder
    with pytest.raises(Exception):
        LlamaGenVQConfig().ch = 64  # frozen


@pytest.mark.parametrize("overrides", [{}, {"ch_mult": (1, 1, 2), "num_res_blocks": 2, "usage_buffer": 0},
                                       {"ch_mult": (1, 2), "decoder_ch_mult": (2, 1), "codebook_size": 10}])
def test_config_inferred_from_own_state(overrides):
    config = LlamaGenVQConfig.tiny(**overrides)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaGenVQ(config).state_dict().items()}
    assert infer_llamagen_vq_config(shapes) == config


# ----------------------------------------------------------------------------- the quantiser


def _cosine_nearest(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-computed in float64: most cosine-similar row, and the similarities ``[N, V]``."""
    z, e = z.double(), codebook.double()
    sims = (z @ e.T) / (z.norm(dim=1, keepdim=True) * e.norm(dim=1)[None, :])
    return sims.argmax(dim=1), sims


def _assert_cosine_choice(chosen: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor) -> None:
    best, sims = _cosine_nearest(z, codebook)
    top2 = sims.topk(min(2, sims.shape[1]), dim=1).values
    clear = (top2[:, 0] - top2[:, -1] > 1e-5) | (top2.shape[1] == 1)
    assert torch.equal(chosen[clear], best[clear])
    # near-ties: the chosen code is as similar as the best one, up to float32 rounding
    picked = sims.gather(1, chosen[:, None])[:, 0]
    assert torch.all(picked >= top2[:, 0] - 1e-5)


@given(n=st.integers(1, 40), v=st.integers(1, 50), d=st.integers(1, 6), seed=st.integers(0, 2**16),
       max_elements=st.sampled_from([1, 7, 64, 2**24]))
def test_nearest_code_is_most_cosine_similar(n, v, d, seed, max_elements):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g) * 3.0
    codebook = torch.randn(v, d, generator=g) * torch.exp(2 * torch.randn(v, 1, generator=g))
    chosen = nearest_code(z, codebook, max_elements=max_elements)
    assert chosen.dtype == torch.long and chosen.shape == (n,)
    _assert_cosine_choice(chosen, z, codebook)


def test_nearest_code_without_l2_norm_is_euclidean():
    g = torch.Generator().manual_seed(1)
    z, codebook = torch.randn(200, 4, generator=g), torch.randn(30, 4, generator=g) * torch.rand(30, 1, generator=g) * 4
    euclid = torch.cdist(z.double(), codebook.double()).argmin(dim=1)
    assert torch.equal(nearest_code(z, codebook, l2_norm=False), euclid)
    # the codebook's row lengths vary, so the two rules must disagree somewhere (the tests can tell them apart)
    assert not torch.equal(nearest_code(z, codebook), euclid)


def test_nearest_code_ties_to_first_index():
    codebook = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # rows 0 and 1 are the same direction
    assert nearest_code(torch.tensor([[5.0, 0.1]]), codebook).tolist() == [0]


def test_encode_to_tokens_is_cosine_lookup_row_major():
    model = _random_tiny()
    img = torch.rand(2, 3, 8, 12) * 2 - 1
    tokens = model.encode_to_tokens(img)
    assert tokens.dtype == torch.long and tokens.shape == (2, 4 * 6)
    with torch.no_grad():
        z = model.encode_latents(img)  # [B, D, h, w]
    assert z.shape == (2, 4, 4, 6)
    for b in range(2):
        cells = torch.stack([z[b, :, r, c] for r in range(4) for c in range(6)])  # row-major by hand
        _assert_cosine_choice(tokens[b], cells, model.quantize.embedding.weight.detach())


# ----------------------------------------------------------------------------- forward math vs the reference


def _gn(sd, p, x):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(sd, p, x, **kw):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], **kw)


def _swish(x):
    return x * torch.sigmoid(x)


def _res(sd, p, x):
    h = _conv(sd, p + ".conv1", _swish(_gn(sd, p + ".norm1", x)), padding=1)
    h = _conv(sd, p + ".conv2", _swish(_gn(sd, p + ".norm2", h)), padding=1)
    if p + ".nin_shortcut.weight" in sd:
        x = _conv(sd, p + ".nin_shortcut", x)
    return x + h


def _attn(sd, p, x):
    b, c, hh, ww = x.shape
    h = _gn(sd, p + ".norm", x)
    q = _conv(sd, p + ".q", h).reshape(b, c, hh * ww).permute(0, 2, 1)
    k = _conv(sd, p + ".k", h).reshape(b, c, hh * ww)
    w_ = F.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2)
    v = _conv(sd, p + ".v", h).reshape(b, c, hh * ww)
    out = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(sd, p + ".proj_out", out)


def _mid(sd, p, h):
    return _res(sd, p + ".2", _attn(sd, p + ".1", _res(sd, p + ".0", h)))


def _reference_tokens(sd, config, x):
    """LlamaGen ``VQModel.encode`` + ``VectorQuantizer`` (l2_norm), transcribed functionally."""
    n = len(config.ch_mult)
    h = _conv(sd, "encoder.conv_in", x, padding=1)
    for i in range(n):
        for j in range(config.num_res_blocks):
            h = _res(sd, f"encoder.conv_blocks.{i}.res.{j}", h)
            if i == n - 1:
                h = _attn(sd, f"encoder.conv_blocks.{i}.attn.{j}", h)
        if i != n - 1:
            h = _conv(sd, f"encoder.conv_blocks.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2)
    h = _mid(sd, "encoder.mid", h)
    h = _conv(sd, "encoder.conv_out", _swish(_gn(sd, "encoder.norm_out", h)), padding=1)
    z = _conv(sd, "quant_conv", h)
    B, D = z.shape[:2]
    zf = F.normalize(torch.einsum("bchw->bhwc", z).reshape(-1, D), p=2, dim=-1)
    e = F.normalize(sd["quantize.embedding.weight"], p=2, dim=-1)
    d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * torch.einsum("bd,dn->bn", zf, e.T)
    return d.argmin(dim=1).reshape(B, -1)


def _reference_decode(sd, config, tokens, grid):
    """LlamaGen ``VQModel.decode_code`` (``get_codebook_entry`` with l2_norm), transcribed functionally."""
    n = len(config.ch_mult)
    e = F.normalize(sd["quantize.embedding.weight"], p=2, dim=-1)
    B, D = tokens.shape[0], e.shape[1]
    z_q = e[tokens.reshape(-1)].reshape(B, grid[0], grid[1], D).permute(0, 3, 1, 2)
    h = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", z_q), padding=1)
    h = _mid(sd, "decoder.mid", h)
    for j in range(n):
        for r in range(config.num_res_blocks + 1):
            h = _res(sd, f"decoder.conv_blocks.{j}.res.{r}", h)
            if j == 0:
                h = _attn(sd, f"decoder.conv_blocks.{j}.attn.{r}", h)
        if j != n - 1:
            h = _conv(sd, f"decoder.conv_blocks.{j}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"),
                      padding=1)
    return _conv(sd, "decoder.conv_out", _swish(_gn(sd, "decoder.norm_out", h)), padding=1)


@pytest.mark.parametrize("overrides,size", [({}, (8, 12)), ({"ch_mult": (1, 1, 2), "num_res_blocks": 2}, (16, 8))])
def test_matches_reference_math(overrides, size):
    config = LlamaGenVQConfig.tiny(**overrides)
    model = _random_tiny(config, seed=3)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    img = torch.rand(2, 3, *size) * 2 - 1
    tokens = model.encode_to_tokens(img)
    assert torch.equal(tokens, _reference_tokens(sd, config, img))
    grid = model.token_grid(*size)
    out = model.decode_tokens(tokens, grid)
    assert out.shape == (2, 3, *size)
    torch.testing.assert_close(out, _reference_decode(sd, config, tokens, grid), rtol=1e-4, atol=1e-5)


def test_decode_uses_normalised_codes():
    model = _random_tiny()
    tokens = torch.randint(0, 64, (1, 9))
    before = model.decode_tokens(tokens, (3, 3))
    with torch.no_grad():
        model.quantize.embedding.weight.mul_(torch.rand(64, 1) * 10 + 0.1)  # lengths change, directions stay
    torch.testing.assert_close(model.decode_tokens(tokens, (3, 3)), before, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- round trip and shapes


@given(b=st.integers(1, 3), h=st.integers(1, 4), w=st.integers(2, 4), seed=st.integers(0, 1000))
def test_round_trip_shapes_and_finite(b, h, w, seed):
    # (w >= 2: the tiny widths put one channel in each of the 32 GroupNorm groups, and a 1x1 map
    # would leave a single value per group, which GroupNorm refuses)
    model = _random_tiny(seed=seed % 3)
    d = model.downsample
    img = torch.rand(b, 3, h * d, w * d, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    tokens = model.encode_to_tokens(img)
    assert tokens.shape == (b, h * w) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < model.vocab_size
    out = model.decode_tokens(tokens, (h, w))
    assert out.shape == (b, 3, h * d, w * d) and torch.isfinite(out).all()


def test_forward_straight_through():
    model = _random_tiny()
    img = (torch.rand(1, 3, 6, 4) * 2 - 1).requires_grad_(True)
    recon, tokens = model(img)
    assert recon.shape == img.shape and torch.equal(tokens, model.encode_to_tokens(img.detach()))
    torch.testing.assert_close(recon.detach(), model.decode_tokens(tokens, (3, 2)), rtol=1e-4, atol=1e-5)
    recon.square().mean().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_bad_inputs_raise():
    model = _random_tiny()
    with pytest.raises(ValueError):
        model.encode_to_tokens(torch.zeros(1, 3, 7, 8))  # not a multiple of 2 px a token
    with pytest.raises(ValueError):
        model.encode_to_tokens(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError):
        model.decode_tokens(torch.zeros(1, 8, dtype=torch.long), (3, 3))
    with pytest.raises(ValueError):
        model.decode_tokens(torch.full((1, 9), 64), (3, 3))
    with pytest.raises(ValueError):
        model.decode_tokens(torch.full((1, 9), -1), (3, 3))


def test_banded_decode_equals_plain(monkeypatch):
    model = _random_tiny(LlamaGenVQConfig.tiny(ch_mult=(1, 1, 2), num_res_blocks=2))
    tokens = torch.randint(0, 64, (2, 5 * 3))
    with torch.enable_grad():
        plain = model.decode_latents(model.tokens_to_latents(tokens, (5, 3))).detach()
    calls = []
    real = banded_decode.resnet_block
    monkeypatch.setattr(banded_decode, "BANDED_MAP_BYTES", 1)
    monkeypatch.setattr(banded_decode, "BAND_BYTES", 2 * 32 * 4 * 4)  # a few rows a band
    monkeypatch.setattr(banded_decode, "resnet_block", lambda block, x: calls.append(1) or real(block, x))
    banded = model.decode_tokens(tokens, (5, 3))
    assert calls, "the banded path was not taken"
    torch.testing.assert_close(banded, plain, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- loading


def test_saved_under_model_loads_strictly(tmp_path):
    model = _random_tiny(seed=5)
    path = tmp_path / "vq_tiny.pt"
    torch.save({"model": model.state_dict()}, path)

    fresh = LlamaGenVQ(LlamaGenVQConfig.tiny()).eval()
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert fresh.load_state_dict(state, strict=True) is not None
    img = torch.rand(1, 3, 8, 8) * 2 - 1
    assert torch.equal(fresh.encode_to_tokens(img), model.encode_to_tokens(img))

    read = read_state_dict(path)  # the project's loader finds the weights under 'model'
    assert is_llamagen_vq_state(read)
    rebuilt = LlamaGenVQ.from_state_dict(read)
    assert rebuilt.config == LlamaGenVQConfig.tiny()
    tokens = model.encode_to_tokens(img)
    torch.testing.assert_close(rebuilt.decode_tokens(tokens, (4, 4)), model.decode_tokens(tokens, (4, 4)))

    del state["quantize.codebook_used"]
    with pytest.raises(RuntimeError):
        LlamaGenVQ(LlamaGenVQConfig.tiny()).load_state_dict(state, strict=True)


def test_recognises_its_key_layout():
    tiny_keys = LlamaGenVQ(LlamaGenVQConfig.tiny()).state_dict().keys()
    assert is_llamagen_vq_state(tiny_keys)
    assert is_llamagen_vq_state(iter(list(tiny_keys)))
    if VQ_TSV is not None:
        assert is_llamagen_vq_state(k for k, _ in read_keys_tsv(VQ_TSV))
    assert not is_llamagen_vq_state({"tok_embeddings.weight": 0, "layers.0.attention.wqkv.weight": 0, "output.weight": 0})
    assert not is_llamagen_vq_state([])
    # VAR's VQ-VAE shares quantize / quant_conv names but has encoder.down.*
    var_keys = {"quantize.embedding.weight", "quant_conv.weight", "post_quant_conv.weight",
                "encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"}
    assert not is_llamagen_vq_state(var_keys)
    for name in ("llamagen_gpt_b_c2i.keys.tsv", "vae_ch160v4096z32.keys.tsv"):
        path = shared_reference(name)
        if path is not None:
            assert not is_llamagen_vq_state(k for k, _ in read_keys_tsv(path))
    with pytest.raises(KeyError):
        infer_llamagen_vq_config({"tok_embeddings.weight": torch.Size([16384, 768])})
