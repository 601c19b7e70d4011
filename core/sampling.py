"""Token sampling as VAR does it: classifier-free guidance, then top-k, then top-p, then a draw."""

from __future__ import annotations

from typing import Sequence, Union

import torch


def guided_logits_var(logits: torch.Tensor, batch: int, cfg: float, scale: int, num_scales: int) -> torch.Tensor:
    """VAR's CFG with a linear ramp over scales.

    ``logits: [2B, l, V]`` with rows ``[cond; uncond]``; ``t = cfg * scale / (num_scales - 1)``;
    returns ``(1 + t) * cond - t * uncond`` of shape ``[B, l, V]``.
    """
    t = cfg * scale / max(num_scales - 1, 1)
    return (1 + t) * logits[:batch] - t * logits[batch:]


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Logits with everything outside the top-k, then outside the top-p mass, set to -inf.

    ``top_k <= 0`` and ``top_p <= 0`` (or >= 1) disable the filters. Ties at the k-th value are kept
    (as VAR). Works on ``[..., V]``; returns a new tensor.
    """
    logits = logits.clone()
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        logits.masked_fill_(remove_sorted.scatter(-1, sorted_idx, remove_sorted), float("-inf"))
    return logits


SAMPLING_CHUNK_BYTES = 8 * 2**20
"""Float32 logits filtered and drawn at once: the sort, cumulative sums and masks of top-k/top-p
cost several times the logits, so sampling a large scale in one piece would set the peak memory of
a cache-free (MVAR) generation. On this CPU, for ``[8, 1024, 4096]`` logits: 208 MiB of working
memory in 32 MiB pieces, 20 MiB in 8 MiB pieces, and no slower."""


Generators = Union[torch.Generator, Sequence[torch.Generator], None]
"""What the draws consume: one generator for all rows, one per sample (row ``b`` of ``[B, l, V]``
draws from ``generators[b]`` only, so a sample's tokens do not depend on the batch it is in), or
None (torch's default generator)."""


def sample_tokens(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 0.0,
                  generator: Generators = None) -> torch.Tensor:
    """``logits: [B, l, V]`` -> ``LongTensor[B, l]``; ``top_k == 1`` is greedy (argmax).

    Rows are filtered and drawn in chunks of at most :data:`SAMPLING_CHUNK_BYTES` of float32
    logits; ``torch.multinomial`` consumes the generator row by row, so on the CPU the draws equal
    one call over all rows (tested). ``generator`` may be a sequence of ``B`` generators, one per
    sample (see :data:`Generators`)."""
    if top_k == 1:
        return logits.argmax(dim=-1)
    per_sample = generator is not None and not isinstance(generator, torch.Generator)
    if per_sample and len(generator) != logits.shape[0]:
        raise ValueError(f"{len(generator)} generators for {logits.shape[0]} samples")
    vocab, length = logits.shape[-1], logits.shape[1] if logits.dim() == 3 else 1
    flat = logits.reshape(-1, vocab)
    rows = max(1, SAMPLING_CHUNK_BYTES // (4 * vocab))
    if per_sample:  # whole samples per chunk: sample b's rows draw from generator[b] alone
        rows = max(1, rows // length) * length
    filtering = 0 < top_k < vocab or 0 < top_p < 1
    if not per_sample and flat.shape[0] <= rows:  # one chunk (a raster step): no output buffer to fill
        chunk = flat.float()
        probs = (filter_top_k_top_p(chunk, top_k, top_p) if filtering else chunk).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])
    out = torch.empty(flat.shape[0], 1, dtype=torch.long, device=logits.device)
    for start in range(0, flat.shape[0], rows):
        # the filters and the softmax work row by row, so a row's probabilities do not depend on its chunk
        chunk = flat[start:start + rows].float()
        probs = (filter_top_k_top_p(chunk, top_k, top_p) if filtering else chunk).softmax(dim=-1)
        if not per_sample:
            out[start:start + rows] = torch.multinomial(probs, 1, generator=generator)
            continue
        for offset in range(0, probs.shape[0], length):
            sample = (start + offset) // length
            out[start + offset:start + offset + length] = torch.multinomial(
                probs[offset:offset + length], 1, generator=generator[sample])
    return out.view(logits.shape[:-1])


def raster_guided(cfg: float) -> bool:
    """LlamaGen's rule for raster models: classifier-free guidance runs only when ``cfg > 1``; at
    ``cfg <= 1`` the conditional rows run alone (no unconditional rows)."""
    return cfg > 1.0


def guided_logits_raster(logits: torch.Tensor, batch: int, cfg: float) -> torch.Tensor:
    """LlamaGen's CFG: rows ``[cond; uncond]`` -> ``uncond + cfg * (cond - uncond)`` (``[B, ..., V]``)."""
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + cfg * (cond - uncond)
