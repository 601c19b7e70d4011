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
