"""Memory-lean inference paths of VAR blocks equal the plain computation: attention a head group at a
time (uncached steps), the FFN writing its chunks over its input, and the engine routing cache-less
steps through the head-independent callback."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_engine, small_models
from mvar_engine.core.attention import Dense, Neighborhood2D
from mvar_engine.models import var


def _reference_attend(spec):
    def attend(q, k, v, scale):
        mask = spec.mask(q.shape[-2], k.shape[-2], "cpu")
        scores = (q @ k.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1) @ v

    return attend


@settings(max_examples=25, deadline=None)
@given(heads=st.sampled_from([1, 2, 3, 4, 6]), side=st.integers(1, 5), batch=st.integers(1, 3),
       group=st.integers(1, 6), neighborhood=st.booleans(), l2_norm=st.booleans(), seed=st.integers(0, 50))
def test_block_attends_head_groups_as_all_heads(heads, side, batch, group, neighborhood, l2_norm, seed):
    torch.manual_seed(seed)
    width = 8 * heads
    block = var.AdaLNSelfAttn(width, heads, 4.0, 1e-6, l2_norm).eval()
    with torch.no_grad():  # random gains so that every part of the block matters
        block.attn.scale_mul_1H11.copy_(torch.randn(1, heads, 1, 1)) if l2_norm else None
        block.attn.q_bias.normal_()
        block.attn.v_bias.normal_()
    n = side * side
    spec = Neighborhood2D(side, side, kernel_size=3) if neighborhood else Dense()
    seen: list[int] = []

    def attend(q, k, v, scale):
        seen.append(q.shape[1])
        return _reference_attend(spec)(q, k, v, scale)

    x, cond = torch.randn(batch, n, width), torch.randn(batch, width)
    per_head = 3 * batch * n * 8 * 4
    saved = var.QKV_CHUNK_BYTES
    try:
        with torch.no_grad():
            whole = block(x, cond, attend, False)
            assert seen == [heads]
            seen.clear()
            var.QKV_CHUNK_BYTES = group * per_head
            grouped = block(x, cond, attend, True)
    finally:
        var.QKV_CHUNK_BYTES = saved
    size = min(group, heads)
    assert seen == [min(size, heads - first) for first in range(0, heads, size)]
    torch.testing.assert_close(grouped, whole, atol=1e-5, rtol=1e-5)


def test_head_groups_are_never_used_with_autograd_or_a_cache():
    block = var.AdaLNSelfAttn(16, 2, 4.0, 1e-6, True)
    calls: list[int] = []

    def attend(q, k, v, scale):
        calls.append(q.shape[1])
        return _reference_attend(Dense())(q, k, v, scale)

    saved = var.QKV_CHUNK_BYTES
    var.QKV_CHUNK_BYTES = 1
    try:
        block(torch.randn(1, 4, 16), torch.randn(1, 16), attend, True)  # training: one call, all heads
        with torch.no_grad():
            block(torch.randn(1, 4, 16), torch.randn(1, 16), attend, False)  # a cache sees the heads
    finally:
        var.QKV_CHUNK_BYTES = saved
    assert calls == [2, 2]


@given(tokens=st.integers(1, 50), chunk_tokens=st.integers(1, 20), seed=st.integers(0, 9))
def test_ffn_writing_over_its_input_equals_one_pass(tokens, chunk_tokens, seed):
    torch.manual_seed(seed)
    ffn = var.FFN(8, 32)
    x = torch.randn(2, tokens, 8)
    saved = var.FFN_CHUNK_BYTES
    with torch.no_grad():
        whole = ffn(x)
        var.FFN_CHUNK_BYTES = chunk_tokens * 32 * 4
        try:
            kept = x.clone()
            assert torch.equal(ffn(kept), whole) or torch.allclose(ffn(kept), whole, atol=1e-6)
            assert torch.equal(kept, x)  # not asked to: the input is untouched
            given_up = x.clone()
            over = ffn(given_up, overwrite_input=True)
        finally:
            var.FFN_CHUNK_BYTES = saved
    torch.testing.assert_close(over, whole, atol=1e-6, rtol=1e-6)
    if 2 * tokens > chunk_tokens:  # chunked: the result lives in the input's storage
        assert over.data_ptr() == given_up.data_ptr()


@pytest.mark.parametrize("trajectory, attention, cache", [
    ("markov", "neighborhood", "none"), ("markov", "dense", "none"), ("full", "dense", "none")])
def test_engine_runs_cache_less_steps_a_head_group_at_a_time(trajectory, attention, cache):
    """Forced tokens: the logits with tiny head groups equal those of one call over all heads, and
    the backends saw single heads (the engine took the head-independent callback)."""
    model, tok = small_models((1, 2, 3), depth=2, width=32, heads=2)
    engine = make_engine(model, tok, trajectory, attention, cache,
                         attention_options={"kernel_size": 3} if attention == "neighborhood" else None)
    labels = torch.tensor([0, 3])
    first = engine.generate(labels, cfg=1.5, return_logits=True, generator=torch.Generator().manual_seed(0))
    heads_seen: list[int] = []
    original = engine.backends.attend

    def spy(q, k, v, spec, *, scale):
        heads_seen.append(q.shape[1])
        return original(q, k, v, spec, scale=scale)

    engine.backends.attend = spy
    saved = var.QKV_CHUNK_BYTES
    var.QKV_CHUNK_BYTES = 1
    try:
        again = engine.generate(labels, cfg=1.5, return_logits=True, forced_tokens=first.tokens)
    finally:
        var.QKV_CHUNK_BYTES = saved
    assert set(heads_seen) == {1}
    for a, b in zip(first.logits, again.logits):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 2), height=st.integers(2, 5), width=st.integers(1, 5), band_rows=st.integers(1, 7),
       ch_mult=st.sampled_from([(1,), (1, 2), (2, 1), (1, 1, 2)]), seed=st.integers(0, 50))
def test_banded_decoder_equals_the_plain_decoder(batch, height, width, band_rows, ch_mult, seed):
    """Every level banded (ragged bands of ``band_rows`` rows of the widest map) vs the plain forward."""
    from mvar_engine.models import banded_decode
    from mvar_engine.models.vae_blocks import Decoder

    torch.manual_seed(seed)
    decoder = Decoder(ch=32, ch_mult=ch_mult, num_res_blocks=1, z_channels=4, using_sa=False, using_mid_sa=False).eval()
    with torch.no_grad():
        for module in decoder.modules():  # non-trivial norms, so that statistics and affine terms matter
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.5)
                module.bias.normal_(0.0, 0.5)
    z = torch.randn(batch, 4, height, width) * 3 + 1
    saved = banded_decode.BAND_BYTES, banded_decode.BANDED_MAP_BYTES
    try:
        with torch.no_grad():
            banded_decode.BANDED_MAP_BYTES = 1 << 60
            plain = decoder(z)
            banded_decode.BANDED_MAP_BYTES = 0
            banded_decode.BAND_BYTES = band_rows * batch * 32 * max(ch_mult) * width * 2 ** (len(ch_mult) - 1) * 4
            banded = decoder(z)
    finally:
        banded_decode.BAND_BYTES, banded_decode.BANDED_MAP_BYTES = saved
    assert banded.shape == plain.shape
    torch.testing.assert_close(banded, plain, atol=2e-5, rtol=1e-4)


def test_banded_decoding_is_inference_only():
    from mvar_engine.models import banded_decode
    from mvar_engine.models.vae_blocks import Decoder

    decoder = Decoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, using_sa=False, using_mid_sa=False)
    saved = banded_decode.BANDED_MAP_BYTES
    banded_decode.BANDED_MAP_BYTES = 0
    try:
        out = decoder(torch.randn(1, 4, 3, 3, requires_grad=True))
    finally:
        banded_decode.BANDED_MAP_BYTES = saved
    out.sum().backward()  # the plain, differentiable path ran
    assert decoder.conv_out.weight.grad is not None


def test_banded_level_takes_channels_last_maps():
    """Regression: a plain convolution may hand a batch over as a channels-last map (LlamaGen-size
    decoding at batch 2 failed in ``group_stats``'s view)."""
    from mvar_engine.models import banded_decode
    from mvar_engine.models.vae_blocks import Decoder

    torch.manual_seed(0)
    decoder = Decoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, using_sa=False, using_mid_sa=False).eval()
    level = decoder.up[0]
    x = torch.randn(2, 64, 6, 5).contiguous(memory_format=torch.channels_last)  # level 0 maps 64 -> 32 channels
    y = torch.randn(2, 32, 6, 5).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous() and not y.is_contiguous()
    with torch.no_grad():
        plain = level.run(x.clone())
        banded = banded_decode.run_level(level, x.clone())
        head = banded_decode.norm_silu_conv(decoder.norm_out, decoder.conv_out, y.clone())
        plain_head = decoder.conv_out(torch.nn.functional.silu(decoder.norm_out(y)))
    torch.testing.assert_close(banded, plain, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(head, plain_head, atol=2e-5, rtol=1e-4)
