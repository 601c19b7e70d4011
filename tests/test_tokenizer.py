"""Tests of the VAR multi-scale VQ-VAE tokenizer (``mvar_engine.models.tokenizer``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mvar_engine.models.tokenizer import MultiScaleVQVAE, Phi, TokenizerConfig

TSV_NAME = "vae_ch160v4096z32.keys.tsv"
HERE = Path(__file__).resolve()
TSV_CANDIDATES = [
    HERE.parents[2] / "shared" / "reference" / TSV_NAME,
    HERE.parents[1] / "shared" / "reference" / TSV_NAME,
    HERE.parent / "data" / TSV_NAME,
]

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------ helpers


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic non-trivial weights from a private generator (no global RNG)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embedding.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() > 1:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _tiny(**kw) -> TokenizerConfig:
    base = dict(ch=32, ch_mult=(1,), num_res_blocks=1, z_channels=4, vocab_size=16, patch_nums=(1, 2, 4))
    base.update(kw)
    return TokenizerConfig(**base)


def _official_phi_index(si: int, S: int, K: int) -> int:
    """The reference rule, written out independently: nearest of the float64 ticks to si / (S - 1)."""
    ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)
    at = si / (S - 1) if S > 1 else 0.0
    return int(np.argmin(np.abs(ticks - at)))


@st.composite
def schedules(draw) -> tuple:
    """Small scale schedules: sorted (h, w) sides ending at the latent grid; square ones sometimes as ints."""
    H, W = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    S = draw(st.integers(1, 5))
    hs = sorted(draw(st.lists(st.integers(1, H), min_size=S - 1, max_size=S - 1))) + [H]
    ws = sorted(draw(st.lists(st.integers(1, W), min_size=S - 1, max_size=S - 1))) + [W]
    out = []
    for h, w in zip(hs, ws):
        out.append(h if (h == w and draw(st.booleans())) else (h, w))
    return tuple(out)


@st.composite
def quant_setups(draw):
    cfg = _tiny(
        z_channels=draw(st.integers(1, 6)),
        vocab_size=draw(st.integers(2, 24)),
        quant_resi=draw(st.sampled_from([0.0, 0.5, 0.25])),
        share_quant_resi=draw(st.sampled_from([0, 1, 2, 3, 4])),
        using_znorm=draw(st.booleans()),
        patch_nums=draw(schedules()),
    )
    seed = draw(st.integers(0, 2**31 - 1))
    batch = draw(st.integers(1, 3))
    model = _randomize(MultiScaleVQVAE(cfg), seed).eval()
    H, W = cfg.latent_hw
    f = torch.randn(batch, cfg.z_channels, H, W, generator=torch.Generator().manual_seed(seed + 1))
    return model, f


# ------------------------------------------------------------------------------------------ layout


def test_default_state_dict_matches_reference_tsv():
    tsv = next((p for p in TSV_CANDIDATES if p.is_file()), None)
    if tsv is None:
        pytest.skip(f"reference key list {TSV_NAME} not found in {[str(p) for p in TSV_CANDIDATES]}")
    expected = []
    for line in tsv.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        expected.append((key, tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()), dtype))
    with torch.device("meta"):
        model = MultiScaleVQVAE(TokenizerConfig())
    got = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert got == expected


@pytest.mark.parametrize(
    ("share", "quant_resi", "expected"),
    [
        (0, 0.5, ["quantize.quant_resi.0.weight", "quantize.quant_resi.2.bias"]),
        (1, 0.5, ["quantize.quant_resi.qresi.weight", "quantize.quant_resi.qresi.bias"]),
        (4, 0.5, ["quantize.quant_resi.qresi_ls.3.weight"]),
        (4, 0.0, []),
    ],
)
def test_phi_key_names(share, quant_resi, expected):
    with torch.device("meta"):
        model = MultiScaleVQVAE(_tiny(share_quant_resi=share, quant_resi=quant_resi))
    keys = [k for k in model.state_dict() if "quant_resi" in k]
    assert set(expected) <= set(keys)
    if share == 0:
        assert len(keys) == 2 * 3  # one phi per scale of the 3-scale schedule
    if quant_resi == 0.0:
        assert keys == []
        assert all(isinstance(model.phi(si), torch.nn.Identity) for si in range(3))


def test_attention_only_at_lowest_resolution():
    cfg = TokenizerConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=4, vocab_size=8, patch_nums=(1, 2))
    with torch.device("meta"):
        keys = list(MultiScaleVQVAE(cfg).state_dict())
    attn_levels = {k.split(".")[2] for k in keys if (".down." in k or ".up." in k) and ".attn." in k}
    assert attn_levels == {"2"}
    assert sum(k.startswith("encoder.down.2.attn.") and k.endswith("qkv.weight") for k in keys) == 2
    assert sum(k.startswith("decoder.up.2.attn.") and k.endswith("qkv.weight") for k in keys) == 3
    assert not any(k.startswith("encoder.down.2.downsample") or k.startswith("decoder.up.0.upsample") for k in keys)


def test_config_validation_and_helpers():
    cfg = TokenizerConfig()
    assert cfg.downsample == 16 and cfg.latent_hw == (16, 16) and cfg.image_hw == (256, 256)
    assert cfg.token_count == 680
    assert TokenizerConfig(patch_nums=(1, (2, 3), [4, 6])).scale_hws() == [(1, 1), (2, 3), (4, 6)]
    with pytest.raises(ValidationError):
        cfg.vocab_size = 5  # frozen
    with pytest.raises(ValidationError):
        TokenizerConfig(patch_nums=(1, 8, 4))  # a scale larger than the last grid
    with pytest.raises(ValidationError):
        TokenizerConfig(patch_nums=())
    with pytest.raises(ValidationError):
        TokenizerConfig(ch=48)  # not a multiple of the 32 GroupNorm groups
    with pytest.raises(ValidationError):
        TokenizerConfig(unknown=1)


# ------------------------------------------------------------------------------------------ phi selection


def test_phi_selection_for_the_256px_schedule():
    model = MultiScaleVQVAE(_tiny(share_quant_resi=4, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)))
    phis = list(model.quantize.quant_resi.qresi_ls)
    chosen = [next(k for k, p in enumerate(phis) if p is model.phi(si)) for si in range(10)]
    # Exact ties (2/9 and 7/9 lie midway between two ticks) are broken by float64 rounding.
    assert chosen == [_official_phi_index(si, 10, 4) for si in range(10)]
    assert chosen == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


@given(S=st.integers(1, 16), K=st.integers(1, 6))
@FAST
def test_phi_selection_matches_tick_rule(S, K):
    # share_quant_resi == 1 is the shared variant, so K == 1 is only reachable through share 0 with one scale.
    if K >= 2:
        model = MultiScaleVQVAE(_tiny(share_quant_resi=K, patch_nums=(1, 2)))
        phis = list(model.quantize.quant_resi.qresi_ls)
        for si in range(S):
            assert model.phi(si, S) is phis[_official_phi_index(si, S, K)]
    nonshared = MultiScaleVQVAE(_tiny(share_quant_resi=0, patch_nums=tuple(range(1, K + 1))))
    for si in range(S):
        assert nonshared.phi(si, S) is nonshared.quantize.quant_resi[_official_phi_index(si, S, K)]
    shared = MultiScaleVQVAE(_tiny(share_quant_resi=1))
    assert all(shared.phi(si, S) is shared.quantize.quant_resi.qresi for si in range(S))
    # With its own schedule the non-shared variant uses phi si at scale si.
    assert [_official_phi_index(si, K, K) for si in range(K)] == list(range(K))


def test_phi_formula():
    phi = _randomize(Phi(3, 0.5), 0)
    h = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(1))
    expected = 0.5 * h + 0.5 * F.conv2d(h, phi.weight, phi.bias, padding=1)
    torch.testing.assert_close(phi(h), expected)


# ------------------------------------------------------------------------------------------ multi-scale algebra


@given(quant_setups())
@FAST
def test_contributions_sum_to_fhat_and_var_input_matches_next_input(setup):
    model, f = setup
    hws = model.config.scale_hws()
    S, (B, C) = len(hws), f.shape[:2]
    with torch.no_grad():
        idx = model.quantize_to_indices(f)
        assert [tuple(i.shape) for i in idx] == [(B, h * w) for h, w in hws]
        assert all(i.dtype == torch.long and 0 <= int(i.min()) and int(i.max()) < model.vocab_size for i in idx)

        contribs = model.scale_contributions(idx)
        assert all(tuple(c.shape) == tuple(f.shape) for c in contribs)
        f_hat = model.indices_to_fhat(idx)
        torch.testing.assert_close(torch.stack(contribs).sum(0), f_hat, rtol=1e-5, atol=1e-5)

        # Inference path: repeated next_input, inputs left untouched.
        cur = torch.zeros_like(f)
        maps = []
        for si, (h, w) in enumerate(hws):
            codes = model.quantize.embedding(idx[si]).transpose(1, 2).reshape(B, C, h, w)
            before, codes_before = cur.clone(), codes.clone()
            new, nxt = model.next_input(si, cur, codes)
            assert torch.equal(cur, before) and torch.equal(codes, codes_before)  # inputs not mutated
            cur = new
            maps.append(nxt)
        torch.testing.assert_close(cur, f_hat, rtol=0, atol=0)
        assert maps[-1] is cur or torch.equal(maps[-1], cur)

        var_in = model.indices_to_var_input(idx)
        if S == 1:
            assert var_in is None
            return
        L = sum(h * w for h, w in hws)
        assert tuple(var_in.shape) == (B, L - hws[0][0] * hws[0][1], C)
        from_next = torch.cat([m.flatten(2).transpose(1, 2) for m in maps[:-1]], dim=1)
        assert torch.equal(var_in, from_next)
        # Independently: block s is the area-downsampled partial sum of scales < s.
        partial = torch.zeros_like(f)
        blocks = []
        for s in range(1, S):
            partial = partial + contribs[s - 1]
            blocks.append(F.adaptive_avg_pool2d(partial, hws[s]).flatten(2).transpose(1, 2))
        torch.testing.assert_close(var_in, torch.cat(blocks, 1), rtol=1e-5, atol=1e-5)
        # The first S-1 indices suffice.
        assert torch.equal(model.indices_to_var_input(idx[:-1]), var_in)


def test_next_input_does_not_mutate():
    model = _randomize(MultiScaleVQVAE(_tiny(patch_nums=((1, 2), (2, 3), (4, 4)))), 3).eval()
    f_hat = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    codes = torch.randn(2, 4, 2, 3, generator=torch.Generator().manual_seed(1))
    f0, c0 = f_hat.clone(), codes.clone()
    with torch.no_grad():
        new, nxt = model.next_input(1, f_hat, codes)
    assert torch.equal(f_hat, f0) and torch.equal(codes, c0)
    assert tuple(nxt.shape) == (2, 4, 4, 4) and not torch.equal(new, f_hat)
    with torch.no_grad():
        new0, nxt0 = model.next_input(0, f_hat, torch.zeros(2, 4, 1, 2))
    assert tuple(nxt0.shape) == (2, 4, 2, 3)


@given(quant_setups())
@FAST
def test_quantization_is_greedy_nearest_code(setup):
    """Index s is the nearest code to the area-downsampled residual left by scales < s."""
    model, f = setup
    hws = model.config.scale_hws()
    C = f.shape[1]
    E = model.quantize.embedding.weight.detach()
    with torch.no_grad():
        idx = model.quantize_to_indices(f)
        contribs = model.scale_contributions(idx)
    rest = f.clone()
    for s, hw in enumerate(hws):
        z = F.adaptive_avg_pool2d(rest, hw).permute(0, 2, 3, 1).reshape(-1, C)
        chosen = idx[s].reshape(-1)
        if model.config.using_znorm:
            sim = F.normalize(z, dim=1) @ F.normalize(E, dim=1).T
            assert torch.all(sim.gather(1, chosen[:, None]).squeeze(1) >= sim.max(1).values - 1e-4)
        else:
            d = torch.cdist(z.double(), E.double()).square()
            best = d.min(1).values
            assert torch.all(d.gather(1, chosen[:, None]).squeeze(1) <= best + 1e-4 * (1 + best))
        rest = rest - contribs[s]


@given(schedule=schedules(), seed=st.integers(0, 2**31 - 1), V=st.integers(2, 12), C=st.integers(2, 6))
@FAST
def test_requantisation_fixed_points(schedule, seed, V, C):
    """With phi = identity: a constant code map returns [its code, then the zero code everywhere].

    Scale 0 sees the constant code c (area average of a constant); its bicubic upsampling is c again,
    so the residual is ~0 and every later scale picks the zero code. With a single scale any code map
    is returned exactly.
    """
    cfg = _tiny(z_channels=C, vocab_size=V, quant_resi=0.0, patch_nums=schedule)
    model = MultiScaleVQVAE(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    codebook = 3.0 * torch.randn(V, C, generator=g)
    codebook[0] = 0.0
    d = torch.cdist(codebook, codebook) + 1e9 * torch.eye(V)
    if float(d.min()) < 0.5:
        return  # codes too close for an unambiguous nearest neighbour
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(codebook)
    hws = cfg.scale_hws()
    H, W = hws[-1]
    k = int(torch.randint(0, V, (), generator=g))
    f = codebook[k].reshape(1, C, 1, 1).expand(2, C, H, W).clone()
    with torch.no_grad():
        idx = model.quantize_to_indices(f)
        assert torch.all(idx[0] == k)
        assert all(torch.all(i == 0) for i in idx[1:])
        torch.testing.assert_close(model.indices_to_fhat(idx), f, rtol=1e-5, atol=1e-5)

        single = MultiScaleVQVAE(_tiny(z_channels=C, vocab_size=V, quant_resi=0.0, patch_nums=((H, W),))).eval()
        single.quantize.embedding.weight.copy_(codebook)
        idx_map = torch.randint(0, V, (2, H * W), generator=g)
        f1 = single.indices_to_fhat([idx_map])
        assert torch.equal(single.quantize_to_indices(f1)[0], idx_map)


# ------------------------------------------------------------------------------------------ numerics vs reference


def _gn_silu(sd, p, x):
    h = F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)
    return h * torch.sigmoid(h)


def _ref_res(sd, p, x):
    h = F.conv2d(_gn_silu(sd, p + ".norm1", x), sd[p + ".conv1.weight"], sd[p + ".conv1.bias"], padding=1)
    h = F.conv2d(_gn_silu(sd, p + ".norm2", h), sd[p + ".conv2.weight"], sd[p + ".conv2.bias"], padding=1)
    sc = x
    if p + ".nin_shortcut.weight" in sd:
        sc = F.conv2d(x, sd[p + ".nin_shortcut.weight"], sd[p + ".nin_shortcut.bias"])
    return sc + h


def _ref_attn(sd, p, x):
    B, C, H, W = x.shape
    h = F.group_norm(x, 32, sd[p + ".norm.weight"], sd[p + ".norm.bias"], eps=1e-6)
    q, k, v = F.conv2d(h, sd[p + ".qkv.weight"], sd[p + ".qkv.bias"]).reshape(B, 3, C, H * W).unbind(1)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C), dim=-1)
    o = torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W)
    return x + F.conv2d(o, sd[p + ".proj_out.weight"], sd[p + ".proj_out.bias"])


def _ref_mid(sd, p, h):
    h = _ref_res(sd, p + ".block_1", h)
    if p + ".attn_1.qkv.weight" in sd:
        h = _ref_attn(sd, p + ".attn_1", h)
    return _ref_res(sd, p + ".block_2", h)


def _ref_encode(sd, cfg, x):
    n, nrb = len(cfg.ch_mult), cfg.num_res_blocks
    h = F.conv2d(x, sd["encoder.conv_in.weight"], sd["encoder.conv_in.bias"], padding=1)
    for i in range(n):
        for b in range(nrb):
            h = _ref_res(sd, f"encoder.down.{i}.block.{b}", h)
            if i == n - 1:
                h = _ref_attn(sd, f"encoder.down.{i}.attn.{b}", h)
        if i != n - 1:  # pad right/bottom by one, 3x3 stride 2 without padding
            h = F.conv2d(F.pad(h, (0, 1, 0, 1)), sd[f"encoder.down.{i}.downsample.conv.weight"],
                         sd[f"encoder.down.{i}.downsample.conv.bias"], stride=2)
    h = _ref_mid(sd, "encoder.mid", h)
    h = _gn_silu(sd, "encoder.norm_out", h)
    h = F.conv2d(h, sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"], padding=1)
    return F.conv2d(h, sd["quant_conv.weight"], sd["quant_conv.bias"], padding=1)


def _ref_decode(sd, cfg, f_hat):
    n, nrb = len(cfg.ch_mult), cfg.num_res_blocks
    z = F.conv2d(f_hat, sd["post_quant_conv.weight"], sd["post_quant_conv.bias"], padding=1)
    h = _ref_mid(sd, "decoder.mid", F.conv2d(z, sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"], padding=1))
    for i in reversed(range(n)):
        for b in range(nrb + 1):
            h = _ref_res(sd, f"decoder.up.{i}.block.{b}", h)
            if i == n - 1:
                h = _ref_attn(sd, f"decoder.up.{i}.attn.{b}", h)
        if i != 0:
            h = F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), sd[f"decoder.up.{i}.upsample.conv.weight"],
                         sd[f"decoder.up.{i}.upsample.conv.bias"], padding=1)
    h = _gn_silu(sd, "decoder.norm_out", h)
    h = F.conv2d(h, sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"], padding=1)
    return h.clamp(-1, 1)


@pytest.mark.parametrize("hw", [(16, 16), (12, 20), (13, 9)])
def test_encoder_decoder_match_functional_reference(hw):
    cfg = TokenizerConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=8, vocab_size=32,
                          patch_nums=((1, 1), (hw[0] // 4, hw[1] // 4)))
    model = _randomize(MultiScaleVQVAE(cfg), 7).eval()
    sd = model.state_dict()
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        f = model.encode(x)
        assert tuple(f.shape) == (2, 8, hw[0] // 4, hw[1] // 4)  # each downsampling floors: n -> n // 2
        torch.testing.assert_close(f, _ref_encode(sd, cfg, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.fhat_to_img(f), _ref_decode(sd, cfg, f), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ real image, training


def _photo(h: int, w: int) -> torch.Tensor:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    img = torch.from_numpy(np.array(sklearn_datasets.load_sample_image("china.jpg"), dtype=np.float32))
    img = img.permute(2, 0, 1)[None] / 127.5 - 1
    return F.interpolate(img, size=(h, w), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)


@pytest.mark.parametrize(
    ("size", "patch_nums"),
    [((64, 64), (1, 2, 3, 4, 6, 8, 12, 16)), ((48, 64), ((1, 1), (2, 3), (3, 4), (6, 8), (12, 16)))],
)
def test_photo_round_trip(size, patch_nums):
    cfg = TokenizerConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=8, vocab_size=64,
                          patch_nums=patch_nums)
    model = _randomize(MultiScaleVQVAE(cfg), 11).eval()
    img = _photo(*size)
    with torch.no_grad():
        idx = model.img_to_indices(img)
        assert [tuple(i.shape) for i in idx] == [(1, h * w) for h, w in cfg.scale_hws()]
        assert all(0 <= int(i.min()) and int(i.max()) < cfg.vocab_size for i in idx)
        rec = model.indices_to_img(idx)
        assert tuple(rec.shape) == (1, 3, *size) and rec.dtype == torch.float32
        assert torch.isfinite(rec).all() and rec.min() >= -1 and rec.max() <= 1
        torch.testing.assert_close(rec, model.fhat_to_img(model.indices_to_fhat(idx)))
        var_in = model.indices_to_var_input(idx)
        assert tuple(var_in.shape) == (1, cfg.token_count - 1, cfg.z_channels)


def test_training_step_gradients_and_ema():
    cfg = TokenizerConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=32,
                          patch_nums=(1, 2, (3, 4), (8, 8)), quant_resi=0.5, share_quant_resi=4)
    model = _randomize(MultiScaleVQVAE(cfg), 5).train()
    img = _photo(16, 16).expand(2, -1, -1, -1) * torch.tensor([1.0, -0.5]).view(2, 1, 1, 1)
    recon, vq_loss, usage = model(img)
    assert tuple(recon.shape) == tuple(img.shape)
    assert vq_loss.ndim == 0 and torch.isfinite(vq_loss) and 0 < float(usage) <= 1
    (F.mse_loss(recon, img) + vq_loss).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ["encoder.conv_in.weight", "quant_conv.weight", "quantize.embedding.weight",
                 "quantize.quant_resi.qresi_ls.0.weight", "post_quant_conv.weight", "decoder.conv_out.weight"]:
        assert grads[name] is not None and torch.isfinite(grads[name]).all() and grads[name].abs().sum() > 0, name
    # EMA: first scale copied, later ones 0.1 * hits (the reference counts updates per scale).
    ema = model.quantize.ema_vocab_hit_SV
    assert float(ema[0].sum()) == 2 * 1
    torch.testing.assert_close(ema[1:].sum(1), 0.1 * torch.tensor([2 * 4, 2 * 12, 2 * 64.0]))


def test_straight_through_and_loss_value():
    cfg = TokenizerConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, vocab_size=16,
                          patch_nums=(1, (2, 3), 4, 8), share_quant_resi=0)
    model = _randomize(MultiScaleVQVAE(cfg), 9).eval()
    img = _photo(16, 16)
    recon, vq_loss, _ = model(img)
    recon.sum().backward()  # reconstruction alone reaches the encoder through the straight-through estimator
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None
    assert float(model.quantize.ema_vocab_hit_SV.abs().sum()) == 0  # eval: no EMA update
    with torch.no_grad():
        f = model.encode(img)
        contribs = model.scale_contributions(model.quantize_to_indices(f))
        partial, expected = torch.zeros_like(f), 0.0
        for c in contribs:
            partial = partial + c
            expected += (1 + cfg.beta) * F.mse_loss(partial, f)
        torch.testing.assert_close(vq_loss.detach(), expected / len(contribs), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(recon.detach(), model.decoder(model.post_quant_conv(partial)), rtol=1e-4, atol=1e-5)


def test_load_state_dict_tolerates_other_scale_count():
    a = _randomize(MultiScaleVQVAE(_tiny(patch_nums=(1, 2, 4))), 1)
    b = MultiScaleVQVAE(_tiny(patch_nums=(1, 2, 3, 4)))
    b.load_state_dict(a.state_dict())
    assert tuple(b.quantize.ema_vocab_hit_SV.shape) == (4, 16)
    torch.testing.assert_close(b.quantize.embedding.weight, a.quantize.embedding.weight)
