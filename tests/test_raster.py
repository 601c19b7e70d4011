"""Next-token (raster) generation: the LlamaGen-style GPT, the ``raster`` trajectory, the raster engine."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mvar_engine.core.attention import Causal, Masked
from mvar_engine.core.backend_selection import selector_for
from mvar_engine.core.errors import IncompatibleComponentsError
from mvar_engine.models.raster_gpt import (RasterGPT, RasterGPTConfig, apply_rotary_emb, infer_raster_config,
                                                precompute_freqs_cis_2d)
from mvar_engine.models.raster_adapter import RasterEngine
from mvar_engine.core.sampling import guided_logits_raster
from mvar_engine.core.layout import SequenceLayout
from mvar_engine.core.trajectory import Visibility
from mvar_engine.plugins.patterns import CausalPattern, DensePattern
from mvar_engine.plugins.caches import FullCache, NoCache, WindowCache
from mvar_engine.plugins.raster import RasterTrajectory
from mvar_engine.testing import tiny_raster_model as tiny_model


def engine(model, cache="full", backend="sdpa", tokenizer=None) -> RasterEngine:
    policy = {"full": FullCache, "none": NoCache}[cache]() if isinstance(cache, str) else cache
    return RasterEngine(model, tokenizer, RasterTrajectory(), policy, selector_for(backend), pattern=CausalPattern())


# ------------------------------------------------------------------------------------- model


def test_llamagen_b_keys_and_shapes_on_meta():
    config = RasterGPTConfig.llamagen_b()
    with torch.device("meta"):
        model = RasterGPT(config)
    sd = model.state_dict()
    c, v, hidden = 768, 16384, 2048  # SwiGLU: find_multiple(int(2 * 4c / 3), 256)
    expected = {"tok_embeddings.weight": (v, c), "cls_embedding.embedding_table.weight": (1001, c),
                "norm.weight": (c,), "output.weight": (v, c)}
    for i in range(12):
        expected.update({f"layers.{i}.attention.wqkv.weight": (3 * c, c), f"layers.{i}.attention.wo.weight": (c, c),
                         f"layers.{i}.feed_forward.w1.weight": (hidden, c),
                         f"layers.{i}.feed_forward.w3.weight": (hidden, c),
                         f"layers.{i}.feed_forward.w2.weight": (c, hidden),
                         f"layers.{i}.attention_norm.weight": (c,), f"layers.{i}.ffn_norm.weight": (c,)})
    assert {k: tuple(t.shape) for k, t in sd.items()} == expected
    assert 110e6 < sum(t.numel() for t in sd.values()) < 112e6  # LlamaGen: "GPT-B 111M"
    assert tuple(model.freqs_cis.shape) == (1 + 576, 32, 2)  # buffer, but not in the state dict (as LlamaGen)
    assert model.layout.length == 577 and model.layout.grids == ((1, 1), (24, 24))
    assert infer_raster_config({k: torch.empty(s, device="meta") for k, s in expected.items()},
                               grid=(24, 24)) == config


def test_config_rejects_bad_head_dim():
    with pytest.raises(ValueError, match="divisible by 4"):
        RasterGPTConfig.tiny(width=12, heads=2)  # head_dim 6


def test_rope_hand_case():
    # head_dim 4: one frequency (1.0) per axis; pair 0 turns by the row, pair 1 by the column.
    freqs = precompute_freqs_cis_2d((2, 3), head_dim=4, cls_token_num=1)
    assert freqs.shape == (1 + 6, 2, 2)
    assert torch.equal(freqs[0], torch.zeros(2, 2))  # the class position: cos = sin = 0 (LlamaGen)
    x = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 4)
    pos = 1 + 1 * 3 + 2  # row 1, column 2
    out = apply_rotary_emb(x, freqs[pos:pos + 1]).flatten()
    want = torch.tensor([math.cos(1), math.sin(1), -math.sin(2), math.cos(2)])
    assert torch.allclose(out, want, atol=1e-6)
    assert torch.equal(apply_rotary_emb(x, freqs[:1]), torch.zeros_like(x))


def _llamagen_rope_complex(x, row, col, base=10000.0):
    """LlamaGen's math, independently: pairs as complex numbers times exp(i * angle); the first D/4
    pairs use the row with frequencies base^(-4j/D), the last D/4 the column."""
    d = x.shape[-1]
    f = base ** (-torch.arange(0, d // 2, 2)[: d // 4].double() / (d // 2))
    angles = torch.cat([row * f, col * f])
    z = torch.view_as_complex(x.double().reshape(d // 2, 2).contiguous()) * torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(z).flatten()


@given(h=st.integers(1, 5), w=st.integers(1, 5), head_dim=st.sampled_from([4, 8, 16]), seed=st.integers(0, 9),
       data=st.data())
def test_rope_matches_llamagen_formula(h, w, head_dim, seed, data):
    freqs = precompute_freqs_cis_2d((h, w), head_dim=head_dim, cls_token_num=2)
    r, c = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    x = torch.randn(head_dim, generator=torch.Generator().manual_seed(seed))
    pos = 2 + r * w + c
    got = apply_rotary_emb(x.view(1, 1, 1, -1), freqs[pos:pos + 1]).flatten()
    assert torch.allclose(got.double(), _llamagen_rope_complex(x, r, c), atol=1e-5)


def _llamagen_apply_rotary_emb(x, freqs_cis):
    """LlamaGen's own ``apply_rotary_emb`` (``gpt.py``), for ``x: [B, H, l, D]``, ``freqs_cis: [l, D/2, 2]``."""
    xshaped = x.float().reshape(*x.shape[:-1], -1, 2)
    freqs_cis = freqs_cis.view(1, 1, xshaped.size(2), xshaped.size(3), 2)
    x_out2 = torch.stack([xshaped[..., 0] * freqs_cis[..., 0] - xshaped[..., 1] * freqs_cis[..., 1],
                          xshaped[..., 1] * freqs_cis[..., 0] + xshaped[..., 0] * freqs_cis[..., 1]], dim=-1)
    return x_out2.flatten(3).type_as(x)


@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), rows=st.integers(1, 3),
       heads=st.integers(1, 3), length=st.integers(1, 7), head_dim=st.sampled_from([4, 8, 64]),
       strided=st.booleans(), seed=st.integers(0, 999))
def test_rope_equals_llamagen_s_apply_rotary_emb_bit_for_bit(dtype, rows, heads, length, head_dim, strided, seed):
    """The whole-tensor rotation equals LlamaGen's per-element stack exactly, on q/k views as the
    attention passes them (a permuted slice of the fused projection) and on contiguous tensors."""
    g = torch.Generator().manual_seed(seed)
    freqs = torch.randn(length, head_dim // 2, 2, generator=g)
    if strided:
        x = torch.randn(rows, length, 3, heads, head_dim, generator=g).to(dtype).permute(2, 0, 3, 1, 4)[1]
    else:
        x = torch.randn(rows, heads, length, head_dim, generator=g).to(dtype)
    assert torch.equal(apply_rotary_emb(x, freqs), _llamagen_apply_rotary_emb(x, freqs))


@given(seed=st.integers(0, 20), data=st.data())
def test_rope_scores_depend_only_on_offsets(seed, data):
    h = w = 6
    freqs = precompute_freqs_cis_2d((h, w), head_dim=16, cls_token_num=1)
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(qr, qc, kr, kc):
        fq, fk = freqs[1 + qr * w + qc], freqs[1 + kr * w + kc]
        return float((apply_rotary_emb(q, fq[None]) * apply_rotary_emb(k, fk[None])).sum())

    qr, qc, kr, kc = (data.draw(st.integers(0, 3)) for _ in range(4))
    dr, dc = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2))
    assert math.isclose(score(qr, qc, kr, kc), score(qr + dr, qc + dc, kr + dr, kc + dc), abs_tol=1e-4)
    # 1-D slices: along a row only the column offset matters, and a different offset changes it
    assert math.isclose(score(qr, 0, qr, 2), score(qr, 3, qr, 5), abs_tol=1e-4)
    assert not math.isclose(score(qr, 0, qr, 2), score(qr, 0, qr, 3), abs_tol=1e-4)


# ------------------------------------------------------------------------------------- trajectory


def test_raster_trajectory_registered_and_cache_checks():
    from mvar_engine.core.registry import get_registry

    trajectory = get_registry().create("trajectory", "raster")
    assert isinstance(trajectory, RasterTrajectory)
    assert (trajectory.family, trajectory.default_cache) == ("next-token", "full")
    trajectory.check_cache("full", FullCache())
    trajectory.check_cache("none", NoCache())
    with pytest.raises(IncompatibleComponentsError) as error:
        trajectory.check_cache("window", WindowCache())
    assert "\n" not in str(error.value) and "raster" in str(error.value)

    class TokenWindow(WindowCache):
        families = ("next-token",)

    trajectory.check_cache("token-window", TokenWindow())


def test_raster_specs():
    """The ``causal`` pattern under ``raster``: Causal where the keys end with the queries, else the
    explicit token-causal mask; ``dense`` (every visible key) gives the same specs."""
    layout = SequenceLayout(((1, 1), (3, 3)))
    visible = Visibility(RasterTrajectory())
    for pattern in (CausalPattern(), DensePattern()):
        def spec(queries, keys):
            return pattern.spec(layout, queries, keys, visible)

        assert isinstance(spec(((0, 5),), ((0, 5),)), Causal)
        assert isinstance(spec(((7, 8),), ((0, 8),)), Causal)
        assert isinstance(spec(((7, 8),), ((0, 1), (4, 8))), Causal)  # compressed history, new token last
        masked = spec(((3, 5),), ((0, 1), (3, 5), (6, 7)))  # keys not ending with the queries
        assert isinstance(masked, Masked)
        assert masked.allowed.tolist() == [[True, True, False, False], [True, True, True, False]]
        assert isinstance(spec(((7, 8),), ((8, 9), (0, 1), (7, 8))), Masked)  # a later key stays hidden


def test_raster_steps():
    """The prefix gives token 0, then step t feeds token t - 1 at position P + t - 1 and sees all before."""
    layout = SequenceLayout(((1, 2), (2, 2)))
    steps = RasterTrajectory().steps(layout)
    assert [(s.index, s.spans, s.emits, s.history) for s in steps] == [
        (0, ((0, 2),), 1, (0,)), (1, ((2, 3),), 1, (0, 1)), (2, ((3, 4),), 1, (0, 1, 2)), (3, ((4, 5),), 1, (0, 1, 2, 3))]


# ------------------------------------------------------------------------------------- engine


def test_cfg_formula():
    logits = torch.tensor([[[1.0, 3.0]], [[2.0, 0.0]]])  # rows [cond; uncond]
    assert torch.equal(guided_logits_raster(logits, 1, 4.0), torch.tensor([[[2.0 + 4 * -1.0, 0.0 + 4 * 3.0]]]))
    assert torch.equal(guided_logits_raster(logits, 1, 1.0), logits[:1])


@given(h=st.integers(1, 3), w=st.integers(1, 4), batch=st.integers(1, 2), cfg=st.sampled_from([1.0, 4.0]),
       cls_token_num=st.sampled_from([1, 2]), seed=st.integers(0, 5))
def test_full_cache_equals_recompute_and_teacher_forcing(h, w, batch, cfg, cls_token_num, seed):
    model = tiny_model((h, w), cls_token_num, seed)
    labels = torch.randint(0, model.num_classes, (batch,), generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    cached = engine(model, "full").generate(labels, cfg=cfg, top_k=0, generator=gen, return_logits=True)
    n = h * w
    assert cached.tokens.shape == (batch, n) and cached.logits.shape[:2] == (batch * (2 if cfg > 1 else 1), n)
    oracle = engine(model, "none").generate(labels, cfg=cfg, forced_tokens=cached.tokens, return_logits=True)
    assert torch.allclose(cached.logits, oracle.logits, atol=1e-4, rtol=1e-4)
    rows = torch.cat([labels, torch.full_like(labels, model.null_class)]) if cfg > 1 else labels
    forced = engine(model, "none").teacher_forced_logits(rows, cached.tokens.repeat(rows.shape[0] // batch, 1))
    assert torch.allclose(cached.logits, forced, atol=1e-4, rtol=1e-4)
    assert oracle.cache_peak_bytes == 0
    rows_n, heads, d = rows.shape[0], model.config.heads, model.config.head_dim
    assert cached.cache_peak_bytes == 2 * model.config.depth * rows_n * heads * (cls_token_num + n) * d * 4


def test_equivalence_is_not_vacuous():
    """Logits depend on earlier tokens and on the class: a wrong cache would be caught."""
    model = tiny_model((2, 3))
    eng = engine(model, "none")
    labels = torch.tensor([1])
    tokens = torch.tensor([[0, 1, 2, 3, 4, 5]])
    base = eng.teacher_forced_logits(labels, tokens)
    changed = eng.teacher_forced_logits(labels, torch.tensor([[7, 1, 2, 3, 4, 5]]))
    other_class = eng.teacher_forced_logits(torch.tensor([2]), tokens)
    assert torch.allclose(base[:, :1], changed[:, :1])  # token 0's logits do not see token 0
    assert (base[:, -1] - changed[:, -1]).abs().max() > 1e-2
    assert (base[:, -1] - other_class[:, -1]).abs().max() > 1e-2

    class PrefixDroppingCache(FullCache):  # evicts the class prefix: must break the equivalence
        def update(self, layer, k, v, spans):
            k_all, v_all, k_spans = super().update(layer, k, v, spans)
            if k_all.shape[2] > 1:
                return k_all[:, :, 1:], v_all[:, :, 1:], ((k_spans[0][0] + 1, k_spans[-1][1]),)
            return k_all, v_all, k_spans

    out = RasterEngine(model, None, RasterTrajectory(), PrefixDroppingCache(), selector_for("sdpa"), pattern=CausalPattern()).generate(
        labels, cfg=1.0, forced_tokens=tokens, return_logits=True)
    assert not torch.allclose(out.logits, base, atol=1e-4)


def test_greedy_cfg_sampling_and_cache_agree():
    model = tiny_model((2, 2), seed=3)
    labels = torch.tensor([0, 4])
    full = engine(model, "full").generate(labels, cfg=4.0, top_k=1, return_logits=True)
    none = engine(model, "none").generate(labels, cfg=4.0, top_k=1, return_logits=True)
    assert torch.equal(full.tokens, none.tokens)
    want = guided_logits_raster(full.logits, 2, 4.0).argmax(-1)
    assert torch.equal(full.tokens, want)
    assert not torch.equal(want, full.logits[:2].argmax(-1)) or not torch.equal(want, full.logits[2:].argmax(-1))


def test_observe_hook_receives_queries_and_keys():
    calls = []

    class Observing(FullCache):
        def observe(self, layer, q, k_all, spec, scale):
            calls.append((layer, tuple(q.shape), k_all.shape[2], spec, scale))

    model = tiny_model((2, 2))
    RasterEngine(model, None, RasterTrajectory(), Observing(), selector_for("sdpa"), pattern=CausalPattern()).generate(
        torch.tensor([1]), cfg=4.0, top_k=0)
    depth, heads, d = model.config.depth, model.config.heads, model.config.head_dim
    assert len(calls) == depth * 4  # prefill + 3 decode steps
    assert calls[0] == (0, (2, heads, 1, d), 1, Causal(), d ** -0.5)
    assert calls[-1] == (depth - 1, (2, heads, 1, d), 4, Causal(), d ** -0.5)


def test_rows_see_rotated_keys_in_cache():
    """Cached keys are rotated (RoPE before caching): the class key is zero, a token key is not."""
    model = tiny_model((2, 2))
    cache = FullCache()
    engine(model, cache).generate(torch.tensor([1]), cfg=1.0, top_k=0)
    store = cache.layers[0]
    assert store.filled == 4 and torch.count_nonzero(store.k[:, :, 0]) == 0
    assert torch.count_nonzero(store.k[:, :, 1:4]) > 0


def test_decode_through_one_scale_tokenizer():
    from mvar_engine.models.tokenizer import MultiScaleVQVAE, TokenizerConfig

    torch.manual_seed(0)
    tok = MultiScaleVQVAE(TokenizerConfig(vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                                          using_sa=False, using_mid_sa=False, patch_nums=((2, 3),))).eval()
    model = tiny_model((2, 3))
    eng = engine(model, "full", tokenizer=tok)
    out = eng.generate(torch.tensor([0, 1]), cfg=4.0)
    img = eng.decode(out.tokens)
    assert img.shape[:2] == (2, 3) and img.shape[2] / img.shape[3] == 2 / 3 and torch.isfinite(img).all()


@pytest.mark.parametrize("quant_resi", [0.0, 0.5])
def test_decode_is_the_tokenizers_one_scale_reconstruction(quant_resi):
    """decode applies the tokenizer's phi like its own one-scale path (a bug skipped it)."""
    from mvar_engine.models.tokenizer import MultiScaleVQVAE, TokenizerConfig

    torch.manual_seed(1)
    tok = MultiScaleVQVAE(TokenizerConfig(vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                                          using_sa=False, using_mid_sa=False, quant_resi=quant_resi,
                                          patch_nums=((2, 3),))).eval()
    with torch.no_grad():
        for module in tok.modules():  # phi convolutions far from identity
            if isinstance(module, torch.nn.Conv2d) and module.in_channels == module.out_channels == 8:
                module.weight.normal_(0, 0.5)
    eng = engine(tiny_model((2, 3)), "full", tokenizer=tok)
    tokens = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tok.indices_to_img([tokens], ((2, 3),))
    torch.testing.assert_close(eng.decode(tokens), expected)


@given(rows=st.integers(1, 40), width=st.integers(1, 300), log_scale=st.floats(-3, 3), seed=st.integers(0, 10**6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_rms_norm_is_llamagen_s_formula_bit_for_bit(rows, width, log_scale, seed, dtype):
    """The RMSNorm (one fused call where torch has it) equals LlamaGen's ``RMSNorm.forward`` to the bit."""
    from mvar_engine.models.raster_gpt import RMSNorm

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=g) * 10 ** log_scale).to(dtype)
    norm = RMSNorm(width).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=g))
        xf = x.float()
        want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).type_as(x) * norm.weight
        assert torch.equal(norm(x), want)


def test_inference_linear_keeps_a_transposed_view_that_follows_the_weights():
    """``Linear``'s inference path (one ``mm`` on a kept transposed view) equals ``F.linear`` to the
    bit, sees in-place weight updates, and rebuilds the view when the weights move (``.to``)."""
    import torch.nn.functional as F
    from mvar_engine.models.raster_gpt import Linear

    layer, x = Linear(8, 5), torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight)) and layer.weight_t is not None
        layer.weight.mul_(2)  # an optimizer step, load_state_dict: the same storage
        assert torch.equal(layer(x), F.linear(x, layer.weight))
        layer.to(torch.float64)
        assert torch.equal(layer(x.double()), F.linear(x.double(), layer.weight))
    y = layer(x.double())  # with autograd: F.linear, gradients reach the weight
    y.sum().backward()
    assert layer.weight.grad is not None
