"""Sampling: top-k/top-p filtering, greedy, and chunked draws equal to one draw over all rows."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from mvar_engine.core import sampling
from mvar_engine.core.sampling import filter_top_k_top_p, sample_tokens


def _one_call(logits, top_k, top_p, seed):
    """The unchunked reference: filter everything, one multinomial over all rows."""
    probs = filter_top_k_top_p(logits.float(), top_k, top_p).softmax(-1).view(-1, logits.shape[-1])
    return torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).view(logits.shape[:-1])


@given(b=st.integers(1, 3), l=st.integers(1, 40), vocab=st.integers(2, 64), top_k=st.integers(0, 70),
       top_p=st.sampled_from([0.0, 0.5, 0.9, 1.0]), chunk_rows=st.integers(1, 17), seed=st.integers(0, 99))
def test_chunked_sampling_equals_one_draw(b, l, vocab, top_k, top_p, chunk_rows, seed):
    logits = torch.randn(b, l, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    saved = sampling.SAMPLING_CHUNK_BYTES
    sampling.SAMPLING_CHUNK_BYTES = chunk_rows * 4 * vocab
    try:
        got = sample_tokens(logits, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(seed))
    finally:
        sampling.SAMPLING_CHUNK_BYTES = saved
    if top_k == 1:
        assert torch.equal(got, logits.argmax(-1))
    else:
        assert torch.equal(got, _one_call(logits, top_k, top_p, seed))
    allowed = filter_top_k_top_p(logits, top_k, top_p) > float("-inf")
    assert bool(allowed.gather(-1, got[..., None]).all())  # every draw survives the filters


def test_filters_keep_top_k_and_the_top_p_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert (filter_top_k_top_p(logits, top_k=2) > float("-inf")).tolist() == [[True, True, False, False]]
    assert (filter_top_k_top_p(logits, top_p=0.7) > float("-inf")).tolist() == [[True, True, False, False]]
    assert (filter_top_k_top_p(logits, top_p=0.9) > float("-inf")).tolist() == [[True, True, True, False]]


@given(batch=st.integers(1, 5), chunk_samples=st.integers(1, 4), cfg=st.sampled_from([0.0, 1.5]),
       top_k=st.sampled_from([0, 1, 5]), seed=st.integers(0, 20))
def test_next_scale_engine_samples_in_chunks_of_samples_as_in_one_pass(batch, chunk_samples, cfg, top_k, seed):
    from conftest import make_engine, small_models
    from mvar_engine.core import engine as engine_module

    model, tok = small_models((1, 2, 3))
    labels = torch.randint(0, 5, (batch,), generator=torch.Generator().manual_seed(seed))
    eng = make_engine(model, tok, "markov", "dense", "none")
    whole = eng.generate(labels, cfg=cfg, top_k=top_k, top_p=0.9, generator=torch.Generator().manual_seed(seed))
    saved = engine_module.LOGITS_CHUNK_BYTES
    engine_module.LOGITS_CHUNK_BYTES = chunk_samples * (2 if cfg else 1) * 9 * 16 * 4  # l = 9 tokens, V = 16
    try:
        chunked = eng.generate(labels, cfg=cfg, top_k=top_k, top_p=0.9, generator=torch.Generator().manual_seed(seed))
    finally:
        engine_module.LOGITS_CHUNK_BYTES = saved
    for a, b in zip(whole.tokens, chunked.tokens):
        assert torch.equal(a, b)


@given(tokens=st.integers(1, 50), chunk_tokens=st.integers(1, 20), seed=st.integers(0, 9))
def test_ffn_in_chunks_equals_one_pass(tokens, chunk_tokens, seed):
    from mvar_engine.models import var

    torch.manual_seed(seed)
    ffn = var.FFN(8, 32)
    x = torch.randn(1, tokens, 8)
    with torch.no_grad():
        whole = ffn(x)
        saved = var.FFN_CHUNK_BYTES
        var.FFN_CHUNK_BYTES = chunk_tokens * 32 * 4
        try:
            chunked = ffn(x)
        finally:
            var.FFN_CHUNK_BYTES = saved
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    assert chunked.shape == whole.shape
